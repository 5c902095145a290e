"""DWP: a batch CSV of household circumstances, one referral per row, possibly 100k rows.

Column names are upper-case as in DWP data shares; dates are ISO (YYYY-MM-DD) and code values
are the canonical words. Rows are read one at a time (``iter_file``), so memory stays flat
however long the batch. Columns and their canonical paths: ``FORMATS.md``.
"""

from __future__ import annotations

from .base import NOT_OBTAINED_ETHNICITY, CsvAdapter, register
from .field_map import (
    INT,
    ISO_DATE,
    NI_NUMBER,
    POSTCODE,
    SYMBOLS_CELL,
    TIMESTAMP,
    UUID,
    YES_NO,
    Field,
    FieldMap,
    Items,
)

REFERRAL_MAP = FieldMap(
    (
        Field("REFERRAL_ID", "referral_id", UUID),
        Field("VERSION", "version", INT),
        Field("CREATED_AT", "created_at", TIMESTAMP),
        Field("DISTRICT", "district"),
        Field("PRIORITY", "priority"),
        Field("SAFEGUARDING_CONCERN", "flags.safeguarding_concern", YES_NO),
        Field("CRIME_PREVENTION", "flags.crime_prevention", YES_NO),
        Field("EARLY_SUPPORT_PATHWAY", "flags.early_support_pathway", YES_NO),
        Field("REFERRED_BY", "referrer.partner"),
        Field("OFFICE", "referrer.organisation"),
        Field("WORK_COACH_NAME", "referrer.practitioner.name"),
        Field("WORK_COACH_ROLE", "referrer.practitioner.role"),
        Field("WORK_COACH_EMAIL", "referrer.practitioner.email"),
        Field("WORK_COACH_PHONE", "referrer.practitioner.phone"),
        Field("CHILD_FORENAME", "child.given_name"),
        Field("CHILD_SURNAME", "child.family_name"),
        Field("CHILD_DOB", "child.date_of_birth", ISO_DATE),
        Field("CHILD_SEX", "child.sex"),
        Field("CHILD_NINO", "identifiers.ni_number", NI_NUMBER),
        Field("CHILD_FIRST_LANGUAGE", "child.first_language"),
        Field("CHILD_INTERPRETER_NEEDED", "child.interpreter_needed", YES_NO),
        Field("ADDRESS_LINE_1", "child.address.line1"),
        Field("ADDRESS_LINE_2", "child.address.line2"),
        Field("TOWN", "child.address.town"),
        Field("POSTCODE", "child.address.postcode", POSTCODE),
        Items(
            "ADULT_{n}_",
            "household",
            (
                Field("FORENAME", "given_name"),
                Field("SURNAME", "family_name"),
                Field("DOB", "date_of_birth", ISO_DATE),
                Field("RELATIONSHIP", "relationship"),
                Field("PARENTAL_RESPONSIBILITY", "parental_responsibility", YES_NO),
                Field("NINO", "ni_number", NI_NUMBER),
                Field("PHONE", "contact.phone"),
                Field("EMAIL", "contact.email"),
            ),
            slots=2,
        ),
        Field("HOUSING", "home_circumstances.housing"),
        Field("OVERCROWDED", "home_circumstances.overcrowded", YES_NO),
        Field("FINANCIAL_HARDSHIP", "home_circumstances.financial_hardship", YES_NO),
        Field("RECEIVES_BENEFITS", "home_circumstances.receives_benefits", YES_NO),
        Field("YOUNG_CARER", "home_circumstances.young_carer", YES_NO),
        Field("CIRCUMSTANCES_SUMMARY", "home_circumstances.summary"),
        Items(
            "CONCERN_{n}_",
            "concerns",
            (Field("TYPE", "type"), Field("DETAIL", "detail"), Field("SINCE", "since", ISO_DATE)),
            slots=3,
        ),
        Field("SERVICES_REQUESTED", "services_requested", SYMBOLS_CELL),
        Field("CONSENT", "consent.state"),
        Field("CONSENT_RECORDED_AT", "consent.recorded_at", TIMESTAMP),
        Field("CONSENT_RECORDED_BY", "consent.recorded_by"),
        Field("OVERRIDE_ID", "sharing_override.override_id", UUID),
        Field("OVERRIDE_GROUND", "sharing_override.ground"),
        Field("OVERRIDE_REASON", "sharing_override.reason"),
        Field("OVERRIDE_APPROVER_ROLE", "sharing_override.approved_by.role"),
        Field("OVERRIDE_APPROVER_NAME", "sharing_override.approved_by.name"),
        Field("OVERRIDE_APPROVED_AT", "sharing_override.approved_at", TIMESTAMP),
    )
)


@register
class DwpAdapter(CsvAdapter):
    kind = "dwp"
    referral_map = REFERRAL_MAP
    defaults_when_absent = NOT_OBTAINED_ETHNICITY
