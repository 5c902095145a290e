"""Schools: the CSV a school management information system (MIS) exports, one pupil per row.

Codes are the DfE's (Common Basic Data Set): gender, ethnicity, SEN provision and primary need,
exclusion category and reason, and the 2024 attendance and absence codes; dates are UK style
(DD/MM/YYYY) as MIS exports write them. On receipt the same layout is rendered, so a school can
import it. Columns and their canonical paths: ``FORMATS.md``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import IO, Any

from referral_broker.schemas.registry import shared_schema

from . import ctf
from .base import CsvAdapter, NativeRecord, Rendered, register
from .field_map import (
    CHARITY_NUMBER,
    INT,
    POSTCODE,
    SYMBOLS_CELL,
    TEXT,
    TIMESTAMP,
    UK_DATE,
    UPN,
    UUID,
    YES_NO,
    Codec,
    Field,
    FieldMap,
    Items,
    codes,
    list_cell,
)
from .native_files import Source, sniff

GENDER = codes({"F": "female", "M": "male", "U": "not_known", "X": "not_specified"})
ETHNICITY = codes(
    {
        "WBRI": "white_british",
        "WIRI": "white_irish",
        "WROM": "white_gypsy_roma",
        "WIRT": "white_irish_traveller",
        "WOTH": "white_other",
        "MWBC": "mixed_white_black_caribbean",
        "MWBA": "mixed_white_black_african",
        "MWAS": "mixed_white_asian",
        "MOTH": "mixed_other",
        "AIND": "asian_indian",
        "APKN": "asian_pakistani",
        "ABAN": "asian_bangladeshi",
        "CHNE": "asian_chinese",
        "AOTH": "asian_other",
        "BCRB": "black_caribbean",
        "BAFR": "black_african",
        "BOTH": "black_other",
        "OARA": "arab",
        "OOTH": "other_ethnic_group",
        "REFU": "refused",
        "NOBT": "not_obtained",
    }
)
RELATIONSHIP = codes(
    {
        "Mother": "mother",
        "Father": "father",
        "Step-parent": "step_parent",
        "Parent's partner": "parent_partner",
        "Guardian": "guardian",
        "Foster carer": "foster_carer",
        "Kinship carer": "kinship_carer",
        "Grandparent": "grandparent",
        "Sibling": "sibling",
        "Half-sibling": "half_sibling",
        "Step-sibling": "step_sibling",
        "Other relative": "other_relative",
        "Other": "other",
    }
)
# "A" (EHC needs assessment requested) is local: the DfE codes are N, K and E.
SEN_PROVISION = codes({"N": "no_sen", "K": "sen_support", "A": "ehc_assessment_requested", "E": "ehc_plan"})
SEN_NEED = codes(ctf.SEN_NEED_CODES)
# CBDS exclusion categories: FIXD (fixed period, now called a suspension), PERM, and LNCH (a
# lunchtime suspension, read as a suspension; written as FIXD).
EXCLUSION_CATEGORY = codes({"FIXD": "suspension", "PERM": "permanent_exclusion", "LNCH": "suspension"})
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
        "WT": "wilful_transgression_of_protective_measures",
        "DM": "damage",
        "TH": "theft",
        "DB": "persistent_disruptive_behaviour",
        "DA": "drug_and_alcohol_related",
        "SM": "sexual_misconduct",
        "OT": "other",
    }
)
_NAMED_YEARS = {"N1": -2, "N2": -1, "R": 0}


def _parse_year_group(value: str) -> int:
    # MIS exports nursery and reception years by name; canonical year groups count from reception = 0.
    named = _NAMED_YEARS.get(value.strip().upper())
    return named if named is not None else INT.parse(value)


YEAR_GROUP = Codec(_parse_year_group, lambda year: {v: k for k, v in _NAMED_YEARS.items()}.get(year, year))
# DfE marks present sessions "/" (morning) or a backslash (afternoon), a planned closure "#";
# the other codes are their letters, as the canonical symbols are.
_ATTENDANCE_MARKS = {"/": "present", "\\": "present", "#": "closed"}
ATTENDANCE_CODE = Codec(
    lambda mark: _ATTENDANCE_MARKS.get(mark, mark),
    lambda symbol: {"present": "/", "closed": "#"}.get(symbol, symbol),
)
ATTENDANCE_CODES = list_cell((("code", ATTENDANCE_CODE), ("sessions", INT)), "CODE:SESSIONS")
# Schema v2: the charity the school names for a requested service, by registered number.
SERVICE_PROVIDERS = list_cell((("service", TEXT), ("provider", CHARITY_NUMBER)), "SERVICE:CHARITY NUMBER")
EXCLUSIONS = list_cell(
    (("kind", EXCLUSION_CATEGORY), ("start_date", UK_DATE), ("sessions", INT), ("reason", EXCLUSION_REASON)),
    "CATEGORY:DD/MM/YYYY:SESSIONS:REASON",
)


REFERRAL_MAP = FieldMap(
    (
        Field("Referral ID", "referral_id", UUID),
        Field("Version", "version", INT),
        Field("Date Of Referral", "created_at", TIMESTAMP),
        Field("District", "district"),
        Field("Priority", "priority"),
        Field("Safeguarding Concern", "flags.safeguarding_concern", YES_NO),
        Field("Crime Prevention", "flags.crime_prevention", YES_NO),
        Field("Early Support Pathway", "flags.early_support_pathway", YES_NO),
        Field("Referred By", "referrer.partner"),
        Field("Referrer Organisation", "referrer.organisation"),
        Field("Referrer Name", "referrer.practitioner.name"),
        Field("Referrer Role", "referrer.practitioner.role"),
        Field("Referrer Email", "referrer.practitioner.email"),
        Field("Referrer Phone", "referrer.practitioner.phone"),
        Field("UPN", "identifiers.upn", UPN),
        Field("Legal Surname", "child.family_name"),
        Field("Legal Forename", "child.given_name"),
        Field("Preferred Forename", "child.preferred_name"),
        Field("DOB", "child.date_of_birth", UK_DATE),
        Field("Gender", "child.sex", GENDER),
        Field("Ethnicity", "child.ethnicity", ETHNICITY),
        Field("First Language", "child.first_language"),
        Field("Interpreter Required", "child.interpreter_needed", YES_NO),
        Field("Address Line 1", "child.address.line1"),
        Field("Address Line 2", "child.address.line2"),
        Field("Town", "child.address.town"),
        Field("Postcode", "child.address.postcode", POSTCODE),
        Field("Home Phone", "child.contact.phone"),
        Field("Home Email", "child.contact.email"),
        Items(
            "Contact {n} ",
            "household",
            (
                Field("Forename", "given_name"),
                Field("Surname", "family_name"),
                Field("Relationship", "relationship", RELATIONSHIP),
                Field("Parental Responsibility", "parental_responsibility", YES_NO),
                Field("Phone", "contact.phone"),
                Field("Email", "contact.email"),
            ),
            slots=2,
        ),
        Field("School Name", "school.school_name"),
        Field("School URN", "school.urn"),
        Field("NC Year", "school.year_group", YEAR_GROUP),
        Field("Attendance From", "school.attendance.period_start", UK_DATE),
        Field("Attendance To", "school.attendance.period_end", UK_DATE),
        Field("Possible Sessions", "school.attendance.possible_sessions", INT),
        Field("Present Sessions", "school.attendance.present_sessions", INT),
        Field("Authorised Absence Sessions", "school.attendance.authorised_absence_sessions", INT),
        Field("Unauthorised Absence Sessions", "school.attendance.unauthorised_absence_sessions", INT),
        Field("Attendance Codes", "school.attendance.by_code", ATTENDANCE_CODES),
        Field("Exclusions", "school.exclusions", EXCLUSIONS),
        Items(
            "Result {n} ",
            "school.curriculum_results",
            (
                Field("Assessment", "assessment"),
                Field("Subject", "subject"),
                Field("Outcome", "outcome"),
                Field("Year", "academic_year"),
            ),
            slots=6,
        ),
        Field("SEN Provision", "send.status", SEN_PROVISION),
        Field("SEN Primary Need", "send.primary_need", SEN_NEED),
        Field("SEN Details", "send.details"),
        Items(
            "Concern {n} ",
            "concerns",
            (Field("Type", "type"), Field("Detail", "detail"), Field("Since", "since", UK_DATE)),
            slots=3,
        ),
        Field("Services Requested", "services_requested", SYMBOLS_CELL),
        Field("Service Providers", "service_providers", SERVICE_PROVIDERS, header_optional=True),
        Field("Consent", "consent.state", TEXT),
        Field("Consent Recorded At", "consent.recorded_at", TIMESTAMP),
        Field("Consent Recorded By", "consent.recorded_by"),
        Field("Without Consent Ref", "sharing_override.override_id", UUID),
        Field("Without Consent Ground", "sharing_override.ground"),
        Field("Without Consent Reason", "sharing_override.reason"),
        Field("Without Consent Approver Role", "sharing_override.approved_by.role"),
        Field("Without Consent Approver Name", "sharing_override.approved_by.name"),
        Field("Without Consent Approved At", "sharing_override.approved_at", TIMESTAMP),
    )
)


@register
class SchoolsAdapter(CsvAdapter):
    """The MIS CSV, or the DfE Common Transfer File (``ctf``), chosen by the file's content."""

    kind = "schools"
    referral_map = REFERRAL_MAP
    allow_extra_columns = True  # an MIS export adds its own (admission number, tutor group)
    formats = MappingProxyType({"ctf": ".xml"})

    def _map_for(self, source: Source) -> FieldMap:
        return ctf.ctf_map() if sniff(source) == "xml" else REFERRAL_MAP

    def render(
        self,
        records: Iterable[Mapping[str, Any]],
        out: str | os.PathLike[str] | IO[str],
        *,
        name: str | None = None,
        fmt: str | None = None,
    ) -> Rendered:
        suffix = self._choose(fmt)
        field_map = ctf.ctf_map() if self.syntax == "ctf" else REFERRAL_MAP
        return self._render(records, out, name or f"referrals{suffix}", field_map, shared_schema("referral"))

    def read_native(self, source: Source, field_map: FieldMap) -> Iterator[NativeRecord]:
        if field_map is not ctf.ctf_map():
            yield from super().read_native(source, field_map)
            return
        for number, pupil, problems in ctf.read_pupils(source):
            yield NativeRecord(number, pupil, tuple(problems))

    def write_native(self, documents: Iterable[dict[str, Any]], field_map: FieldMap, out: IO[str]) -> None:
        if field_map is ctf.ctf_map():
            ctf.write_ctf(documents, out)
        else:
            super().write_native(documents, field_map, out)

    def finish_native(self, document: dict[str, Any], record: Mapping[str, Any]) -> None:
        if self.syntax == "ctf":
            ctf.finish_pupil(document)
