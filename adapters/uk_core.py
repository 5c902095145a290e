"""UK Core (HL7 UK / NHS England FHIR R4 profiles): profile URLs, code systems and the codecs
between their coded elements and the referral schema's words.

Sources: the UK Core profiles and code systems published at https://fhir.hl7.org.uk
(``StructureDefinition/UKCore-Patient``, ``CodeSystem/UKCore-EthnicCategoryEngland``,
``CodeSystem/UKCore-HumanLanguage``, ``CodeSystem/UKCore-AdditionalPersonRelationshipRole``,
``ValueSet/UKCore-PersonRelationshipType`` over HL7 v3 RoleCode and v2 0131), and the NHS
Data Dictionary's ETHNIC CATEGORY codes, which the England code system carries.

Each codec reads a whole CodeableConcept (or a list of them) and renders one back with the UK
Core coding first and, where the UK Core code is coarser than the schema's word (ethnicity:
Gypsy or Roma and Irish Traveller are both "Any other White background"), a second coding in
this project's own system, which reading prefers, so a round trip loses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .field_map import Codec

UK_CORE = "https://fhir.hl7.org.uk"
PROFILE = f"{UK_CORE}/StructureDefinition"
PROFILES = {
    name: f"{PROFILE}/UKCore-{name}"
    for name in (
        "Patient",
        "ServiceRequest",
        "Practitioner",
        "PractitionerRole",
        "Organization",
        "Task",
        "MessageHeader",
    )
}
ETHNIC_CATEGORY_EXTENSION = f"{PROFILE}/Extension-UKCore-EthnicCategory"
NHS_COMMUNICATION_EXTENSION = f"{PROFILE}/Extension-UKCore-NHSCommunication"
ETHNIC_CATEGORY_ENGLAND = f"{UK_CORE}/CodeSystem/UKCore-EthnicCategoryEngland"
HUMAN_LANGUAGE = f"{UK_CORE}/CodeSystem/UKCore-HumanLanguage"
BCP47 = "urn:ietf:bcp:47"
ADDITIONAL_RELATIONSHIP = f"{UK_CORE}/CodeSystem/UKCore-AdditionalPersonRelationshipRole"
V3_ROLE_CODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
V2_CONTACT_ROLE = "http://terminology.hl7.org/CodeSystem/v2-0131"
LOCAL = "https://fhir.early-help.example"
LOCAL_ETHNICITY = f"{LOCAL}/CodeSystem/ethnicity"
LOCAL_RELATIONSHIP = f"{LOCAL}/CodeSystem/relationship"

# NHS Data Dictionary ETHNIC CATEGORY (2001 census classification), England.
ETHNIC_CATEGORY: Mapping[str, str] = {
    "A": "white_british",
    "B": "white_irish",
    "C": "white_other",
    "D": "mixed_white_black_caribbean",
    "E": "mixed_white_black_african",
    "F": "mixed_white_asian",
    "G": "mixed_other",
    "H": "asian_indian",
    "J": "asian_pakistani",
    "K": "asian_bangladeshi",
    "L": "asian_other",
    "M": "black_caribbean",
    "N": "black_african",
    "P": "black_other",
    "R": "asian_chinese",
    "S": "other_ethnic_group",
    "Z": "refused",  # "Not stated": asked, and the person chose not to say
    "99": "not_obtained",  # "Not known"
}
_ETHNIC_DISPLAY = {
    "A": "White - British",
    "B": "White - Irish",
    "C": "White - Any other White background",
    "D": "Mixed - White and Black Caribbean",
    "E": "Mixed - White and Black African",
    "F": "Mixed - White and Asian",
    "G": "Mixed - Any other mixed background",
    "H": "Asian or Asian British - Indian",
    "J": "Asian or Asian British - Pakistani",
    "K": "Asian or Asian British - Bangladeshi",
    "L": "Asian or Asian British - Any other Asian background",
    "M": "Black or Black British - Caribbean",
    "N": "Black or Black British - African",
    "P": "Black or Black British - Any other Black background",
    "R": "Other Ethnic Groups - Chinese",
    "S": "Other Ethnic Groups - Any other ethnic group",
    "Z": "Not stated",
    "99": "Not known",
}
# The schema's words the England codes fold into a broader code.
_ETHNIC_BROADER = {"white_gypsy_roma": "C", "white_irish_traveller": "C", "arab": "S"}

# UK Core HumanLanguage codes (ISO 639-1, as NHS systems send them) for the languages most
# spoken in England, with the English name the referral schema holds.
LANGUAGES: Mapping[str, str] = {
    "en": "English",
    "pl": "Polish",
    "ro": "Romanian",
    "pa": "Panjabi",
    "ur": "Urdu",
    "pt": "Portuguese",
    "es": "Spanish",
    "ar": "Arabic",
    "bn": "Bengali",
    "gu": "Gujarati",
    "it": "Italian",
    "fr": "French",
    "zh": "Chinese",
    "lt": "Lithuanian",
    "so": "Somali",
    "ta": "Tamil",
    "tr": "Turkish",
    "bg": "Bulgarian",
    "ru": "Russian",
    "fa": "Persian",
    "ps": "Pashto",
    "ku": "Kurdish",
    "uk": "Ukrainian",
    "lv": "Latvian",
    "hu": "Hungarian",
    "de": "German",
    "el": "Greek",
    "hi": "Hindi",
    "ne": "Nepali",
    "sq": "Albanian",
    "ti": "Tigrinya",
    "am": "Amharic",
    "cy": "Welsh",
    "ga": "Irish",
    "gd": "Scottish Gaelic",
    "sk": "Slovak",
    "cs": "Czech",
    "vi": "Vietnamese",
    "tl": "Tagalog",
    "yo": "Yoruba",
}
_LANGUAGE_BY_NAME = {name.lower(): code for code, name in LANGUAGES.items()}

# Patient.contact.relationship (UK Core Person Relationship Type): code -> the schema's word.
V3_RELATIONSHIP: Mapping[str, str] = {
    **dict.fromkeys(("MTH", "NMTH", "ADOPTM", "GESTM"), "mother"),
    **dict.fromkeys(("FTH", "NFTH", "ADOPTF"), "father"),
    **dict.fromkeys(("STPMTH", "STPFTH", "STPPRN"), "step_parent"),
    "GUARD": "guardian",
    **dict.fromkeys(("MTHFOST", "FTHFOST", "PRNFOST"), "foster_carer"),
    **dict.fromkeys(
        ("GRPRN", "GRMTH", "GRFTH", "MGRMTH", "MGRFTH", "MGRPRN", "PGRMTH", "PGRFTH", "PGRPRN"),
        "grandparent",
    ),
    **dict.fromkeys(("SIB", "BRO", "SIS", "TWIN", "TWINBRO", "TWINSIS"), "sibling"),
    **dict.fromkeys(("HSIB", "HBRO", "HSIS"), "half_sibling"),
    **dict.fromkeys(("STPSIB", "STPBRO", "STPSIS"), "step_sibling"),
    **dict.fromkeys(
        ("FAMMEMB", "EXT", "AUNT", "UNCLE", "COUSN", "MAUNT", "PAUNT", "MUNCLE", "PUNCLE", "NIENEPH"),
        "other_relative",
    ),
}
UK_CORE_RELATIONSHIP: Mapping[str, str] = {"Guardian": "guardian", "Carer": "other", "Personal": "other"}
# Roles rather than kin (next of kin, emergency contact, agent, proxy): the relationship is "other".
_ROLE_ONLY = {
    V2_CONTACT_ROLE: frozenset({"N", "C", "CP", "EP", "E", "O", "U", "PR"}),
    ADDITIONAL_RELATIONSHIP: frozenset(
        {"Agent", "NotSpecified", "ProxyContact", "ProxyCommunication", "ProxyContactCommunication"}
    ),
    V3_ROLE_CODE: frozenset({"NOK", "ECON", "PRN", "FRND", "NBOR"}),
}
_RELATIONSHIP_RENDER = {
    "mother": (V3_ROLE_CODE, "MTH", "mother"),
    "father": (V3_ROLE_CODE, "FTH", "father"),
    "step_parent": (V3_ROLE_CODE, "STPPRN", "step parent"),
    "parent_partner": (ADDITIONAL_RELATIONSHIP, "Personal", "Personal relationship with the patient"),
    "guardian": (ADDITIONAL_RELATIONSHIP, "Guardian", "Guardian of patient"),
    "foster_carer": (V3_ROLE_CODE, "PRNFOST", "foster parent"),
    "kinship_carer": (ADDITIONAL_RELATIONSHIP, "Carer", "Carer of patient"),
    "grandparent": (V3_ROLE_CODE, "GRPRN", "grandparent"),
    "sibling": (V3_ROLE_CODE, "SIB", "sibling"),
    "half_sibling": (V3_ROLE_CODE, "HSIB", "half-sibling"),
    "step_sibling": (V3_ROLE_CODE, "STPSIB", "step sibling"),
    "other_relative": (V3_ROLE_CODE, "FAMMEMB", "family member"),
    "other": (ADDITIONAL_RELATIONSHIP, "NotSpecified", "Not Specified"),
}


def _codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        raise ValueError("expected a CodeableConcept (an object)")
    codings = concept.get("coding") or []
    if not isinstance(codings, list):
        raise ValueError("expected coding to be a list")
    return [c for c in codings if isinstance(c, dict)]


def _code(codings: list[dict[str, Any]], system: str) -> str | None:
    for coding in codings:
        if coding.get("system") == system and isinstance(coding.get("code"), str):
            return str(coding["code"]).strip()
    return None


def _parse_ethnicity(concept: Any) -> str:
    codings = _codings(concept)
    local = _code(codings, LOCAL_ETHNICITY)
    if local is not None:
        return local  # this project's own word, checked against the schema by validation
    code = _code(codings, ETHNIC_CATEGORY_ENGLAND)
    if code is None:
        raise ValueError(f"no coding in {ETHNIC_CATEGORY_ENGLAND}")
    if code not in ETHNIC_CATEGORY:
        raise ValueError(f"not one of the UK Core ethnic category codes {', '.join(ETHNIC_CATEGORY)}")
    return ETHNIC_CATEGORY[code]


def _render_ethnicity(symbol: str) -> dict[str, Any]:
    code = next((c for c, s in ETHNIC_CATEGORY.items() if s == symbol), None) or _ETHNIC_BROADER[symbol]
    coding = [{"system": ETHNIC_CATEGORY_ENGLAND, "code": code, "display": _ETHNIC_DISPLAY[code]}]
    if ETHNIC_CATEGORY.get(code) != symbol:
        coding.append({"system": LOCAL_ETHNICITY, "code": symbol})
    return {"coding": coding}


def _parse_language(concept: Any) -> str:
    codings = _codings(concept)
    text = concept.get("text")
    if isinstance(text, str) and text.strip():
        return text.strip()
    for coding in codings:
        display = coding.get("display")
        if isinstance(display, str) and display.strip():
            return display.strip()
    for system in (HUMAN_LANGUAGE, BCP47):
        code = _code(codings, system)
        if code is not None:
            name = LANGUAGES.get(code.lower().split("-")[0])
            if name is None:
                raise ValueError("a language code with no display and no text, not one this adapter names")
            return name
    raise ValueError(f"no text, no display and no coding in {HUMAN_LANGUAGE}")


def _render_language(name: str) -> dict[str, Any]:
    code = _LANGUAGE_BY_NAME.get(name.lower())
    if code is None:
        return {"text": name}
    return {"coding": [{"system": HUMAN_LANGUAGE, "code": code, "display": LANGUAGES[code]}], "text": name}


def _parse_relationship(concepts: Any) -> str:
    if isinstance(concepts, dict):
        concepts = [concepts]
    if not isinstance(concepts, list):
        raise ValueError("expected a list of CodeableConcepts")
    codings = [coding for concept in concepts for coding in _codings(concept)]
    local = _code(codings, LOCAL_RELATIONSHIP)
    if local is not None:
        return local
    for coding in codings:
        code, system = coding.get("code"), coding.get("system")
        if not isinstance(code, str):
            continue  # a code that is not text is no relationship code
        if system == V3_ROLE_CODE and code in V3_RELATIONSHIP:
            return V3_RELATIONSHIP[code]
        if system == ADDITIONAL_RELATIONSHIP and code in UK_CORE_RELATIONSHIP:
            return UK_CORE_RELATIONSHIP[code]
    if any(coding.get("code") in _ROLE_ONLY.get(str(coding.get("system")), ()) for coding in codings):
        return "other"
    raise ValueError(
        f"no code this adapter knows: use {V3_ROLE_CODE} (MTH, FTH, STPPRN, GUARD, PRNFOST, GRPRN, "
        f"SIB, HSIB, STPSIB, FAMMEMB ...) or {ADDITIONAL_RELATIONSHIP}"
    )


def _render_relationship(symbol: str) -> list[dict[str, Any]]:
    system, code, display = _RELATIONSHIP_RENDER[symbol]
    coding = [{"system": system, "code": code, "display": display}]
    if _parse_relationship([{"coding": coding}]) != symbol:
        coding.append({"system": LOCAL_RELATIONSHIP, "code": symbol})
    return [{"coding": coding}]


ETHNICITY = Codec(_parse_ethnicity, _render_ethnicity)
LANGUAGE = Codec(_parse_language, _render_language)
RELATIONSHIP = Codec(_parse_relationship, _render_relationship)
