"""Schools' second format: the DfE Common Transfer File (CTF) XML, one ``Pupil`` per referral.

The CTF is the file a school's MIS exports when a pupil moves (``CTfile`` > ``Header`` and
``CTFpupilData`` > ``Pupil``); its element names are the DfE's (CTF specification, Common
Basic Data Set codes, as the schools CSV uses). What a CTF has no element for (the referral
itself: id, district, priority, flags, referrer, concerns, consent, the sharing override; and
the attendance breakdown by code, period end and curriculum results) travels in an
``EarlyHelpReferral`` element this project adds at the end of each ``Pupil``. A CTF without it
still gives the pupil's data (and the school from the header), and validation names what the
referral lacks. Read with ``lxml.etree.iterparse`` one pupil at a time (entities and network
access off). Elements and their canonical paths: ``FORMATS.md``.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable, Iterator
from types import MappingProxyType
from typing import IO, Any

from lxml import etree

from referral_broker.errors import EmptyInputError, PartnerInputError

from .field_map import (
    BOOL,
    CHARITY_NUMBER,
    INT,
    ISO_DATE,
    POSTCODE,
    TIMESTAMP,
    UPN,
    UUID,
    CodeTable,
    Field,
    FieldMap,
    Items,
    MappingProblem,
    codes,
    get_path,
)
from .native_files import Source, _opened, source_name

# --- DfE code lists (sources and the reasoning for each mapping: FORMATS.md, CTF section) ------

_RELATIONSHIP_SYMBOLS = (
    "mother",
    "father",
    "step_parent",
    "parent_partner",
    "guardian",
    "foster_carer",
    "kinship_carer",
    "grandparent",
    "sibling",
    "half_sibling",
    "step_sibling",
    "other_relative",
    "other",
)
# The CBDS "relationship to pupil" code set a CTF Contact's <Relationship> carries, read as the
# schema's word the code determines. The professionals and other contacts are "other".
_RELATIONSHIP_READ = {
    "CAR": "other",  # Carer
    "CHM": "other",  # Childminder
    "DOC": "other",  # Doctor
    "FAM": "other_relative",  # Other family member
    "FOF": "foster_carer",  # Foster Father
    "FOM": "foster_carer",  # Foster Mother
    "HTC": "other",  # Head Teacher
    "OTH": "other",  # Other Contact
    "PAF": "father",  # Father
    "PAM": "mother",  # Mother
    "REL": "other_relative",  # Other Relative
    "RLG": "other",  # Religious/Spiritual Contact
    "STF": "step_parent",  # Step Father
    "STM": "step_parent",  # Step Mother
    "SWR": "other",  # Social Worker
    "TCH": "other",  # Teacher
}
# Writing: the DfE code that is true of the word. The household has no sex, so a step-parent or
# a foster carer cannot be given the DfE's Step Mother/Father or Foster Mother/Father: they are
# written as the broader code that is true (FAM, CAR), with the word in <EarlyHelpRelationship>.
_RELATIONSHIP_WRITE = {
    "mother": "PAM",
    "father": "PAF",
    "step_parent": "FAM",
    "parent_partner": "OTH",
    "guardian": "OTH",
    "foster_carer": "CAR",
    "kinship_carer": "CAR",
    "grandparent": "REL",
    "sibling": "REL",
    "half_sibling": "REL",
    "step_sibling": "FAM",
    "other_relative": "REL",
    "other": "OTH",
}
# What <EarlyHelpRelationship> may say beside each DfE code: the code's own reading and the
# words written as that code (Step Mother with "grandparent" contradicts itself).
_RELATIONSHIP_REFINES = {
    code: frozenset({word} | {w for w, c in _RELATIONSHIP_WRITE.items() if c == code})
    for code, word in _RELATIONSHIP_READ.items()
}


def _relationship_code(value: Any) -> str:
    code = value.strip().upper() if isinstance(value, str) else None
    if code not in _RELATIONSHIP_READ:
        raise ValueError(f"not one of the codes {', '.join(_RELATIONSHIP_READ)}")
    return code


RELATIONSHIP = CodeTable(
    lambda value: _RELATIONSHIP_READ[_relationship_code(value)],
    _RELATIONSHIP_WRITE.__getitem__,
    frozenset(_RELATIONSHIP_WRITE),
)


def _relationship_word(value: Any) -> str:
    word = value.strip() if isinstance(value, str) else None
    if word not in _RELATIONSHIP_SYMBOLS:
        raise ValueError(f"not one of the allowed values: {', '.join(_RELATIONSHIP_SYMBOLS)}")
    return word


# This project's <EarlyHelpRelationship> (not DfE): the schema's word, written only when the DfE
# code alone reads back as another word; read, it wins over the code's reading.
EARLY_HELP_RELATIONSHIP = CodeTable(
    _relationship_word,
    lambda word: None if _RELATIONSHIP_READ[_RELATIONSHIP_WRITE[word]] == word else word,
    frozenset(_RELATIONSHIP_WRITE),
)

# DfE language codes (CBDS language code set), three letters. A four-letter code is one of these
# and a letter (a variety: the list below has such codes cut to three letters, so repeats them).
_DFE_LANGUAGES = """
    ACL ADA AFA AFK AKA ALB ALU AMR ARA ARM ASM ASR AYB AYM AZE BAI BAL BEJ BEL BEM BHO BIK BLT BMA
    BNG BSL BSQ BUL CAM CAT CCE CCF CGA CGR CHE CHI CKW CRN CTR CWA CYM CZE DAN DGA DGB DIN DUT DZO
    EBI EDO EFI ENB ENG ESA EST EWE EWO FAN FIJ FIN FON FRN FUL GAA GAE GAL GEO GER GGO GKY GLG GRE
    GRN GUJ GUN GUR HAU HDK HEB HER HGR HIN IBA IDM IGA IGB IJO ILO ISK ISL ITA JAV JIN JPN KAM KAN
    KAR KAS KAU KAZ KCH KGZ KHA KHY KIN KIR KIS KLN KMB KME KNK KNY KON KOR KPE KRI KRU KSI KSU KUR
    LAO LBA LGA LGB LGS LIN LIT LNG LOZ LSO LTV LTZ LUE LUN LUO LUY MAG MAI MAK MAN MAO MAR MAS MDV
    MEN MKD MLG MLM MLT MLY MNA MNG MNX MOR MSC MUN MYA NAH NAM NBN NDB NEP NOR NOT NUE NUP NWA NZM
    OAM OGN ORI ORM OTB OTH OTL PAG PAM PAT PHA PHR PNJ POL POR PRS QUE RAJ REF RME RMI RMN RMS RNY
    RUS SAM SCB SCO SHL SHO SID SIO SLO SLV SND SNG SNH SOM SPA SRD SRK SSO SSW STS SUN SWA SWE TAM
    TEL TEM TES TGE TGL TGR THA TIB TIV TMZ TNG TON TPI TRI TSO TUK TUL TUM TUR UKR UMB URD URH UYG
    UZB VEN VIE VSY WAP WCP WOL WPE XHO YAO YDI YOR ZND ZUL ZZZ
"""
DFE_LANGUAGE_CODES = frozenset(_DFE_LANGUAGES.split())
# The DfE codes read as a first language by name: the languages most spoken in England's schools.
LANGUAGES = {
    "ENG": "English",
    "POL": "Polish",
    "URD": "Urdu",
    "PNJ": "Panjabi",
    "BNG": "Bengali",
    "GUJ": "Gujarati",
    "ARA": "Arabic",
    "SOM": "Somali",
    "TUR": "Turkish",
    "POR": "Portuguese",
    "SPA": "Spanish",
    "FRN": "French",
    "ITA": "Italian",
    "RUS": "Russian",
    "TAM": "Tamil",
    "LIT": "Lithuanian",
    "CYM": "Welsh",
}
_LANGUAGE_CODES = {name.lower(): code for code, name in LANGUAGES.items()}
FIRST_LANGUAGE = "BasicDetails.Languages.Type[LanguageType=F].Language"


def is_dfe_language_code(code: str) -> bool:
    return code in DFE_LANGUAGE_CODES or (len(code) == 4 and code[:3] in DFE_LANGUAGE_CODES and code.isalpha())


# DfE ethnicity codes: the main codes, then the extended codes by their main group.
_ETHNICITY_GROUPS = {
    "white_british": "WBRI WCOR WENG WOWB WSCO WWEL",
    "white_irish": "WIRI",
    "white_irish_traveller": "WIRT",
    "white_gypsy_roma": "WROM",
    "white_other": "WOTH WALB WBOS WCRO WEEU WEUR WGRC WGRE WGRK WITA WKOS WOTW WPOR WSER WTUC WTUK WTUR WWEU",
    "mixed_white_black_caribbean": "MWBC",
    "mixed_white_black_african": "MWBA",
    "mixed_white_asian": "MWAS MWAI MWAO MWAP",
    "mixed_other": "MOTH MABL MACH MAOE MBCH MBOE MCOE MOTM MWCH MWOE",
    "asian_indian": "AIND",
    "asian_pakistani": "APKN AKPA AMPK AOPK",
    "asian_bangladeshi": "ABAN",
    "asian_chinese": "CHNE CHKC CMAL COCH CSNG CTWN",
    "asian_other": "AOTH AAFR AKAO ANEP AOTA ASLT ASNL ASRO",
    "black_caribbean": "BCRB",
    "black_african": "BAFR BANN BAOF BCON BGHA BNGN BSLN BSOM BSUD",
    "black_other": "BOTH BEUR BNAM BOTB",
    "arab": "OARA",
    "other_ethnic_group": "OOTH OAFG OEGY OFIL OIRN OIRQ OJPN OKOR OKRD OLAM OLEB OLIB OMAL OMRC OOEG OPOL OTHA OVIE OYEM",
    "refused": "REFU",
    "not_obtained": "NOBT",
}
# main codes first: writing uses the first code per word
ETHNICITY = codes(
    {code: word for word, group in _ETHNICITY_GROUPS.items() for code in group.split()[:1]}
    | {code: word for word, group in _ETHNICITY_GROUPS.items() for code in group.split()[1:]}
)

# CBDS SEN type codes (primary need), as the schools CSV reads them too.
SEN_NEED_CODES = MappingProxyType(
    {
        "SPLD": "specific_learning_difficulty",
        "MLD": "moderate_learning_difficulty",
        "SLD": "severe_learning_difficulty",
        "PMLD": "profound_multiple_learning_difficulty",
        "SEMH": "social_emotional_mental_health",
        "SLCN": "speech_language_communication",
        "HI": "hearing_impairment",
        "VI": "visual_impairment",
        "MSI": "multi_sensory_impairment",
        "PD": "physical_disability",
        "ASD": "autistic_spectrum_disorder",
        "OTH": "other_difficulty",
        "NSA": "sen_no_specialist_assessment",
    }
)
# DS (Down syndrome; CBDS, not in the CSV's list) has no word in the schema: other_difficulty.
SEN_NEED = codes({**SEN_NEED_CODES, "DS": "other_difficulty"})

# CBDS exclusion categories: SUSP (suspension), PERM, LNCH (lunchtime: a suspension), and FIXD,
# the fixed-period code of CTFs from before "suspension" replaced "fixed period" in 2021/22.
EXCLUSION_CATEGORY = codes({"SUSP": "suspension", "PERM": "permanent_exclusion", "LNCH": "suspension", "FIXD": "suspension"})

# CBDS exclusion reason codes. The schema has fewer reasons than the DfE now has: a code whose
# reason the schema has no word for reads as "other"; the DfE's sub-reasons read as their reason.
EXCLUSION_REASON = codes(
    {
        "PP": "physical_assault_against_pupil",
        "PA": "physical_assault_against_adult",
        "VP": "verbal_abuse_against_pupil",
        "VA": "verbal_abuse_against_adult",
        "OW": "use_or_threat_of_offensive_weapon",
        "BU": "bullying",
        "RA": "racist_abuse",
        "LG": "abuse_against_sexual_orientation_or_gender_identity",
        "DS": "abuse_relating_to_disability",
        "MT": "inappropriate_use_of_social_media_or_online_technology",
        "PH": "wilful_transgression_of_protective_measures",
        "DM": "damage",
        "TH": "theft",
        "DB": "persistent_disruptive_behaviour",
        "DA": "drug_and_alcohol_related",
        "SM": "sexual_misconduct",
        "OT": "other",  # withdrawn by the DfE; the only code meaning "other", so written for it
        "LD": "persistent_disruptive_behaviour",  # ... low level disruption
        "CB": "persistent_disruptive_behaviour",  # ... challenging behaviour
        "DR": "drug_and_alcohol_related",  # drug related
        "AR": "drug_and_alcohol_related",  # alcohol related
        "BW": "other",  # found to have brought a weapon or prohibited item into school
        "TB": "other",  # cyber-bullying or threatening behaviour online
        "SB": "other",  # harmful sexual behaviour
        "MB": "other",  # misogynistic behaviour
        "AB": "other",  # misandry behaviour
        "SR": "other",  # smoking related
        "VR": "other",  # vape related
        "MP": "other",  # use of mobile phone
        "OS": "other",  # misbehaviour outside of school
    }
)

# Elements that repeat inside their parent (parent, child); every other element is single.
REPEATED = frozenset(
    {
        ("Contacts", "Contact"),
        ("Phones", "Phone"),
        ("Languages", "Type"),
        ("SENneeds", "SENneed"),
        ("Attendance", "YearData"),
        ("Exclusions", "Exclusion"),
        ("Concerns", "Concern"),
        ("Results", "Result"),
        ("ServicesRequested", "Service"),
        ("ServiceProviders", "Provider"),
    }
)
EH = "EarlyHelpReferral."
CTF_VERSION = "24.0"

# The CBDS SEN provision codes a CTF may carry: N (no SEN), K (SEN support), E (EHC plan), and
# the pre-2014 codes still found in older records, A (School Action), P (School Action Plus)
# and Q (School Action Plus and statutory assessment, long since concluded), all now SEN
# support, and S (statement), converted to EHC plans by 2018. The DfE has no
# code for "EHC needs assessment requested": a CTF says K (the pupil is on SEN support while
# assessed) and ``EarlyHelpReferral.EHCAssessmentRequested`` says true.
_SEN_PROVISION_READ = {
    "N": "no_sen",
    "K": "sen_support",
    "E": "ehc_plan",
    "A": "sen_support",
    "P": "sen_support",
    "Q": "sen_support",
    "S": "ehc_plan",
}
_SEN_PROVISION_WRITE = {"no_sen": "N", "sen_support": "K", "ehc_assessment_requested": "K", "ehc_plan": "E"}


def _sen_provision(value: Any) -> str:
    code = value.strip().upper() if isinstance(value, str) else None
    if code not in _SEN_PROVISION_READ:
        raise ValueError(f"not one of the codes {', '.join(_SEN_PROVISION_READ)}")
    return _SEN_PROVISION_READ[code]


SEN_PROVISION = CodeTable(_sen_provision, _SEN_PROVISION_WRITE.__getitem__, frozenset(_SEN_PROVISION_WRITE))


def _assessment_requested(value: Any) -> str | None:
    return "ehc_assessment_requested" if BOOL.parse(value) else None  # false: as SENprovision says


EHC_ASSESSMENT_REQUESTED = CodeTable(
    _assessment_requested,
    lambda status: True if status == "ehc_assessment_requested" else None,
    frozenset(_SEN_PROVISION_WRITE),
)


@functools.cache
def ctf_map() -> FieldMap:
    """The CTF's table (built on first use: it shares the schools module's gender, year and
    attendance codes, and schools imports this module)."""
    from .schools import ATTENDANCE_CODES, GENDER, YEAR_GROUP

    return FieldMap(
        (
            Field("UPN", "identifiers.upn", UPN),
            Field("Surname", "child.family_name"),
            Field("Forename", "child.given_name"),
            Field("DOB", "child.date_of_birth", ISO_DATE),
            Field("Sex", "child.sex", GENDER),
            Field("BasicDetails.PreferredForename", "child.preferred_name"),
            Field("BasicDetails.NCyearActual", "school.year_group", YEAR_GROUP),
            Field("BasicDetails.Ethnicity", "child.ethnicity", ETHNICITY),
            Field("SENhistory.SEN.SENprovision", "send.status", SEN_PROVISION),
            Field("SENhistory.SENneeds.SENneed[SENtypeRank=1].SENtype", "send.primary_need", SEN_NEED),
            Field("Address.AddressLines.AddressLine1", "child.address.line1"),
            Field("Address.AddressLines.AddressLine2", "child.address.line2"),
            Field("Address.AddressLines.AddressLine3", "child.address.town"),
            Field("Address.PostCode", "child.address.postcode", POSTCODE),
            Field("Phones.Phone[TelephoneType=H].PhoneNo", "child.contact.phone"),
            Field("Email", "child.contact.email"),
            Items(
                "Contacts.Contact",
                "household",
                (
                    Field("Forename", "given_name"),
                    Field("Surname", "family_name"),
                    Field("Relationship", "relationship", RELATIONSHIP),
                    # after Relationship, so the word wins over the code's reading
                    Field("EarlyHelpRelationship", "relationship", EARLY_HELP_RELATIONSHIP),
                    Field("Responsibility", "parental_responsibility", BOOL),
                    Field("Phones.Phone[0].PhoneNo", "contact.phone"),
                    Field("Email", "contact.email"),
                ),
            ),
            Field("Attendance.YearData[0].AttendanceStartDate", "school.attendance.period_start", ISO_DATE),
            Field("Attendance.YearData[0].SessionsPossible", "school.attendance.possible_sessions", INT),
            Field("Attendance.YearData[0].SessionsAttended", "school.attendance.present_sessions", INT),
            Field(
                "Attendance.YearData[0].SessionsAuthorised", "school.attendance.authorised_absence_sessions", INT
            ),
            Field(
                "Attendance.YearData[0].SessionsUnauthorised",
                "school.attendance.unauthorised_absence_sessions",
                INT,
            ),
            Items(
                "Exclusions.Exclusion",
                "school.exclusions",
                (
                    Field("Category", "kind", EXCLUSION_CATEGORY),
                    Field("StartDate", "start_date", ISO_DATE),
                    Field("Sessions", "sessions", INT),
                    Field("Reason", "reason", EXCLUSION_REASON),
                ),
            ),
            Field(f"{EH}ReferralID", "referral_id", UUID),
            Field(f"{EH}Version", "version", INT),
            Field(f"{EH}DateOfReferral", "created_at", TIMESTAMP),
            Field(f"{EH}District", "district"),
            Field(f"{EH}Priority", "priority"),
            Field(f"{EH}SafeguardingConcern", "flags.safeguarding_concern", BOOL),
            Field(f"{EH}CrimePrevention", "flags.crime_prevention", BOOL),
            Field(f"{EH}EarlySupportPathway", "flags.early_support_pathway", BOOL),
            Field(f"{EH}ReferredBy", "referrer.partner"),
            Field(f"{EH}Referrer.Organisation", "referrer.organisation"),
            Field(f"{EH}Referrer.Name", "referrer.practitioner.name"),
            Field(f"{EH}Referrer.Role", "referrer.practitioner.role"),
            Field(f"{EH}Referrer.Email", "referrer.practitioner.email"),
            Field(f"{EH}Referrer.Phone", "referrer.practitioner.phone"),
            Field(f"{EH}FirstLanguage", "child.first_language"),
            Field(f"{EH}InterpreterRequired", "child.interpreter_needed", BOOL),
            Field(f"{EH}School.Name", "school.school_name"),
            Field(f"{EH}School.URN", "school.urn"),
            Field(f"{EH}AttendanceEndDate", "school.attendance.period_end", ISO_DATE),
            Field(f"{EH}AttendanceCodes", "school.attendance.by_code", ATTENDANCE_CODES),
            Items(
                f"{EH}Results.Result",
                "school.curriculum_results",
                (
                    Field("Assessment", "assessment"),
                    Field("Subject", "subject"),
                    Field("Outcome", "outcome"),
                    Field("Year", "academic_year"),
                ),
            ),
            Field(f"{EH}SENDetails", "send.details"),
            # after SENprovision, so a true here wins over its K
            Field(f"{EH}EHCAssessmentRequested", "send.status", EHC_ASSESSMENT_REQUESTED),
            Items(
                f"{EH}Concerns.Concern",
                "concerns",
                (Field("Type", "type"), Field("Detail", "detail"), Field("Since", "since", ISO_DATE)),
            ),
            Items(f"{EH}ServicesRequested.Service", "services_requested", (Field("Code", ""),)),
            Items(
                f"{EH}ServiceProviders.Provider",
                "service_providers",
                (Field("Service", "service"), Field("CharityNumber", "provider", CHARITY_NUMBER)),
            ),
            Field(f"{EH}Consent.State", "consent.state"),
            Field(f"{EH}Consent.RecordedAt", "consent.recorded_at", TIMESTAMP),
            Field(f"{EH}Consent.RecordedBy", "consent.recorded_by"),
            Field(f"{EH}SharingOverride.ID", "sharing_override.override_id", UUID),
            Field(f"{EH}SharingOverride.Ground", "sharing_override.ground"),
            Field(f"{EH}SharingOverride.Reason", "sharing_override.reason"),
            Field(f"{EH}SharingOverride.ApproverRole", "sharing_override.approved_by.role"),
            Field(f"{EH}SharingOverride.ApproverName", "sharing_override.approved_by.name"),
            Field(f"{EH}SharingOverride.ApprovedAt", "sharing_override.approved_at", TIMESTAMP),
        )
    )


# --- XML <-> the nested dicts the map reads ----------------------------------------------------


def _tag(element: Any) -> str:
    return str(etree.QName(element).localname)


def element_to_dict(element: Any, problems: list[MappingProblem], path: str = "") -> Any:
    """An element as text (a leaf) or a dict of its children (lists for the repeating ones)."""
    children = [child for child in element if isinstance(child.tag, str)]
    if not children:
        return (element.text or "").strip()
    out: dict[str, Any] = {}
    for child in children:
        name = _tag(child)
        where = f"{path}.{name}" if path else name
        value = element_to_dict(child, problems, where)
        if (_tag(element), name) in REPEATED:
            out.setdefault(name, []).append(value)
        elif name in out:
            problems.append(MappingProblem(where, "", "the element appears more than once; keep one"))
        else:
            out[name] = value
    return out


def dict_to_element(name: str, value: Any) -> Any:
    element = etree.Element(name)
    if isinstance(value, dict):
        for key, item in value.items():
            for one in item if isinstance(item, list) else [item]:
                if one is not None:
                    element.append(dict_to_element(key, one))
    elif isinstance(value, bool):
        element.text = "true" if value else "false"
    else:
        element.text = str(value)
    return element


def _events(source: Source) -> Iterator[tuple[str, Any]]:
    name = source_name(source)
    with _opened(source) as handle:
        if isinstance(handle.read(0), str):
            raise PartnerInputError(f"{name}: a CTF must be read as bytes (open the file in binary mode)")
        events = etree.iterparse(handle, events=("end",), resolve_entities=False, no_network=True, load_dtd=False)
        try:
            yield from events
        except etree.XMLSyntaxError as exc:
            line, column = exc.position
            raise PartnerInputError(f"{name}: line {line} column {column}: malformed XML") from None


def read_pupils(source: Source) -> Iterator[tuple[int, dict[str, Any], list[MappingProblem]]]:
    """Each ``Pupil`` of a CTF as a dict, numbered from 1, read one at a time."""
    name = source_name(source)
    header: dict[str, Any] = {}
    number = 0
    root_checked = False
    for _event, element in _events(source):
        tag = _tag(element)
        parent = element.getparent()
        if not root_checked:
            root = element.getroottree().getroot()
            if _tag(root) != "CTfile":
                raise PartnerInputError(
                    f"{name}: the XML is not a Common Transfer File (its root is not CTfile)"
                )
            root_checked = True
        if tag == "Header" and parent is not None and _tag(parent) == "CTfile":
            header = element_to_dict(element, [], "Header") or {}
            element.clear()
        elif tag == "Pupil" and parent is not None and _tag(parent) == "CTFpupilData":
            number += 1
            problems: list[MappingProblem] = []
            pupil = _normalised(element_to_dict(element, problems), header)
            problems.extend(_code_problems(pupil))
            yield number, pupil, problems
            element.clear()
            while element.getprevious() is not None:
                del parent[0]  # pupils already read: keep memory flat
    if number == 0:
        raise EmptyInputError(f"{name}: the CTF holds no Pupil: no records")


def _code_problems(pupil: dict[str, Any]) -> list[MappingProblem]:
    """The DfE codes the table does not read itself: the first language (read by name from the
    code) and a contact's <EarlyHelpRelationship> against its DfE <Relationship>."""
    problems = []
    code = get_path(pupil, FIRST_LANGUAGE)
    if isinstance(code, str) and code.strip() and not is_dfe_language_code(code.strip().upper()):
        problems.append(
            MappingProblem(
                FIRST_LANGUAGE,
                "child.first_language",
                "not a DfE language code: one of the CBDS language codes listed in adapters/FORMATS.md "
                "(three letters, or four for a variety)",
            )
        )
    contacts = get_path(pupil, "Contacts.Contact")
    for index, contact in enumerate(contacts if isinstance(contacts, list) else []):
        if not isinstance(contact, dict):
            continue
        code, word = contact.get("Relationship"), contact.get("EarlyHelpRelationship")
        if not (isinstance(code, str) and isinstance(word, str)):
            continue
        code, word = code.strip().upper(), word.strip()
        if code in _RELATIONSHIP_REFINES and word in _RELATIONSHIP_SYMBOLS and word not in _RELATIONSHIP_REFINES[code]:
            allowed = ", ".join(w for w in _RELATIONSHIP_SYMBOLS if w in _RELATIONSHIP_REFINES[code])
            problems.append(
                MappingProblem(
                    f"Contacts.Contact[{index}].EarlyHelpRelationship",
                    f"household[{index}].relationship",
                    f"'{word}' contradicts the DfE Relationship {code}, which allows {allowed}",
                )
            )
    return problems


def _normalised(pupil: Any, header: dict[str, Any]) -> dict[str, Any]:
    """What older CTFs and a CTF without the referral block say elsewhere: ``Gender`` for
    ``Sex``, the first language by DfE code, the school from the header."""
    if not isinstance(pupil, dict):
        pupil = {}
    if "Sex" not in pupil and "Gender" in pupil:
        pupil["Sex"] = pupil.pop("Gender")
    block = pupil.setdefault("EarlyHelpReferral", {})
    if not isinstance(block, dict):
        return pupil
    code = get_path(pupil, FIRST_LANGUAGE)
    if "FirstLanguage" not in block and isinstance(code, str) and code.strip().upper() in LANGUAGES:
        block["FirstLanguage"] = LANGUAGES[code.strip().upper()]
    school = block.setdefault("School", {})
    source_school = header.get("SourceSchool") if isinstance(header, dict) else None
    if isinstance(school, dict) and isinstance(source_school, dict):
        for ours, theirs in (("Name", "SchoolName"), ("URN", "URN")):
            if ours not in school and source_school.get(theirs):
                school[ours] = source_school[theirs]
    return pupil


def finish_pupil(document: dict[str, Any]) -> None:
    """DfE elements derived from the referral block: the first language's code (idempotent)."""
    name = get_path(document, f"{EH}FirstLanguage")
    code = _LANGUAGE_CODES.get(name.lower()) if isinstance(name, str) else None
    if code is not None:
        details = document.setdefault("BasicDetails", {})
        details["Languages"] = {"Type": [{"LanguageType": "F", "Language": code}]}


_ORDER = (
    "UPN",
    "Surname",
    "Forename",
    "DOB",
    "Sex",
    "BasicDetails",
    "SENhistory",
    "Address",
    "Phones",
    "Email",
    "Contacts",
    "Attendance",
    "Exclusions",
    "EarlyHelpReferral",
)


def write_ctf(documents: Iterable[dict[str, Any]], out: IO[str]) -> None:
    """Pupils as one CTF: the header names the first pupil's school as the source."""
    root = etree.Element("CTfile")
    header = etree.SubElement(root, "Header")
    pupils = etree.Element("CTFpupilData")
    schools: set[tuple[Any, Any]] = set()
    for document in documents:
        finish_pupil(document)  # here: the adapter's own hook is not called for a second format
        ordered = {key: document[key] for key in _ORDER if key in document}
        ordered.update({k: v for k, v in document.items() if k not in ordered})
        pupils.append(dict_to_element("Pupil", ordered))
        school = get_path(document, f"{EH}School")
        schools.add((school.get("Name"), school.get("URN")) if isinstance(school, dict) else (None, None))
    # The header names the source school only when every pupil has that one (reading gives
    # the header's school to a pupil without one).
    [(school_name, urn)] = schools if len(schools) == 1 else [(None, None)]
    source_school = {"SchoolName": school_name, "URN": urn} if school_name else {}
    for key, value in (
        ("DocumentName", "Common Transfer File"),
        ("CTFversion", CTF_VERSION),
        ("DateTime", dt.datetime.now(dt.UTC).replace(microsecond=0, tzinfo=None).isoformat()),
        ("DocumentQualifier", "partial"),
        ("SupplierID", "referral-broker"),
    ):
        etree.SubElement(header, key).text = value
    if source_school:
        header.append(dict_to_element("SourceSchool", {k: v for k, v in source_school.items() if v}))
    root.append(pupils)
    out.write(etree.tostring(root, pretty_print=True, xml_declaration=True, encoding="UTF-8").decode("utf-8"))
