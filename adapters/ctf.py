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

# The CBDS "relationship to pupil" codes as MIS exports write them in CTF contacts.
RELATIONSHIP = codes(
    {
        "PAM": "mother",
        "PAF": "father",
        "STM": "step_parent",
        "STF": "step_parent",
        "PAO": "parent_partner",
        "GRD": "guardian",
        "FOM": "foster_carer",
        "FOF": "foster_carer",
        "CAR": "kinship_carer",
        "GRM": "grandparent",
        "GRF": "grandparent",
        "SIB": "sibling",
        "HSB": "half_sibling",
        "SSB": "step_sibling",
        "REL": "other_relative",
        "OTH": "other",
    }
)
# DfE language codes (first language) for the languages most spoken in England's schools.
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
    "WEL": "Welsh",
}
_LANGUAGE_CODES = {name.lower(): code for code, name in LANGUAGES.items()}
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
# the pre-2014 codes still found in older records, A (School Action) and P (School Action
# Plus), both now SEN support, and S (statement), converted to EHC plans by 2018. The DfE has no
# code for "EHC needs assessment requested": a CTF says K (the pupil is on SEN support while
# assessed) and ``EarlyHelpReferral.EHCAssessmentRequested`` says true.
_SEN_PROVISION_READ = {
    "N": "no_sen",
    "K": "sen_support",
    "E": "ehc_plan",
    "A": "sen_support",
    "P": "sen_support",
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
    """The CTF's table (built on first use: it shares the schools module's DfE code tables,
    and schools imports this module)."""
    from .schools import (
        ATTENDANCE_CODES,
        ETHNICITY,
        EXCLUSION_CATEGORY,
        EXCLUSION_REASON,
        GENDER,
        SEN_NEED,
        YEAR_GROUP,
    )

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
            pupil = element_to_dict(element, problems)
            yield number, _normalised(pupil if isinstance(pupil, dict) else {}, header), problems
            element.clear()
            while element.getprevious() is not None:
                del parent[0]  # pupils already read: keep memory flat
    if number == 0:
        raise EmptyInputError(f"{name}: the CTF holds no Pupil: no records")


def _normalised(pupil: dict[str, Any], header: dict[str, Any]) -> dict[str, Any]:
    """What older CTFs and a CTF without the referral block say elsewhere: ``Gender`` for
    ``Sex``, the first language by DfE code, the school from the header."""
    if "Sex" not in pupil and "Gender" in pupil:
        pupil["Sex"] = pupil.pop("Gender")
    block = pupil.setdefault("EarlyHelpReferral", {})
    if not isinstance(block, dict):
        return pupil
    code = get_path(pupil, "BasicDetails.Languages.Type[LanguageType=F].Language")
    if "FirstLanguage" not in block and isinstance(code, str) and code.upper() in LANGUAGES:
        block["FirstLanguage"] = LANGUAGES[code.upper()]
    school = block.setdefault("School", {})
    source_school = header.get("SourceSchool") if isinstance(header, dict) else None
    if isinstance(school, dict) and isinstance(source_school, dict):
        for ours, theirs in (("Name", "SchoolName"), ("URN", "URN")):
            if ours not in school and source_school.get(theirs):
                school[ours] = source_school[theirs]
    return pupil


def finish_pupil(document: dict[str, Any]) -> None:
    """DfE elements derived from the referral block: the first language's code."""
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
