"""Police: a structured vulnerability referral (PPN-style) as JSON, and Operation Encompass.

One JSON object per referral, or an array of them. ``notification_type`` is
``vulnerability_referral`` (a Public Protection Notice about a child) or ``operation_encompass``:
the police telling a child's school, before the next school day, that the child was present at
a domestic abuse incident. Operation Encompass maps to an ordinary canonical referral with a
``domestic_abuse`` concern, the safeguarding flag and the school named, so the sharing policy
can route it to schools; a referral with exactly that shape renders back as one. The DASH risk
level maps to priority. Fields and their canonical paths: ``FORMATS.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import JsonAdapter, register
from .field_map import (
    BOOL,
    INT,
    ISO_DATE,
    NHS_NUMBER,
    NI_NUMBER,
    POSTCODE,
    SYMBOLS,
    TIMESTAMP,
    UPN,
    UUID,
    Const,
    Field,
    FieldMap,
    Items,
    MappingProblem,
    codes,
    get_canonical,
)

VULNERABILITY_REFERRAL = "vulnerability_referral"
OPERATION_ENCOMPASS = "operation_encompass"
RISK_LEVEL = codes({"standard": "routine", "medium": "high", "high": "urgent"})

REFERRAL_MAP = FieldMap(
    (
        Const(
            "notification_type",
            VULNERABILITY_REFERRAL,
            frozenset({VULNERABILITY_REFERRAL, OPERATION_ENCOMPASS}),
        ),
        Field("reference", "referral_id", UUID),
        Field("version", "version", INT),
        Field("submitted_at", "created_at", TIMESTAMP),
        Field("district", "district"),
        Field("risk_level", "priority", RISK_LEVEL),
        Field("flags.safeguarding_concern", "flags.safeguarding_concern", BOOL),
        Field("flags.crime_prevention", "flags.crime_prevention", BOOL),
        Field("flags.early_support_pathway", "flags.early_support_pathway", BOOL),
        Field("referred_by", "referrer.partner"),
        Field("officer.force", "referrer.organisation"),
        Field("officer.name", "referrer.practitioner.name"),
        Field("officer.role", "referrer.practitioner.role"),
        Field("officer.email", "referrer.practitioner.email"),
        Field("officer.phone", "referrer.practitioner.phone"),
        Field("child.forename", "child.given_name"),
        Field("child.surname", "child.family_name"),
        Field("child.known_as", "child.preferred_name"),
        Field("child.date_of_birth", "child.date_of_birth", ISO_DATE),
        Field("child.sex", "child.sex"),
        Field("child.gender_identity", "child.gender_identity"),
        Field("child.ethnicity", "child.ethnicity"),
        Field("child.first_language", "child.first_language"),
        Field("child.interpreter_needed", "child.interpreter_needed", BOOL),
        Field("child.address.line1", "child.address.line1"),
        Field("child.address.line2", "child.address.line2"),
        Field("child.address.town", "child.address.town"),
        Field("child.address.postcode", "child.address.postcode", POSTCODE),
        Field("child.phone", "child.contact.phone"),
        Field("child.email", "child.contact.email"),
        Field("child.nhs_number", "identifiers.nhs_number", NHS_NUMBER),
        Field("child.ni_number", "identifiers.ni_number", NI_NUMBER),
        Field("child.upn", "identifiers.upn", UPN),
        Items(
            "household",
            "household",
            (
                Field("forename", "given_name"),
                Field("surname", "family_name"),
                Field("date_of_birth", "date_of_birth", ISO_DATE),
                Field("relationship", "relationship"),
                Field("parental_responsibility", "parental_responsibility", BOOL),
                Field("phone", "contact.phone"),
                Field("email", "contact.email"),
                Field("ni_number", "ni_number", NI_NUMBER),
            ),
        ),
        Field("school.name", "school.school_name"),
        Field("school.urn", "school.urn"),
        Items(
            "vulnerability_factors",
            "concerns",
            (Field("category", "type"), Field("details", "detail"), Field("since", "since", ISO_DATE)),
        ),
        Field("requested_services", "services_requested", SYMBOLS),
        Field("consent.state", "consent.state"),
        Field("consent.recorded_at", "consent.recorded_at", TIMESTAMP),
        Field("consent.recorded_by", "consent.recorded_by"),
        Field("shared_without_consent.decision_id", "sharing_override.override_id", UUID),
        Field("shared_without_consent.ground", "sharing_override.ground"),
        Field("shared_without_consent.reason", "sharing_override.reason"),
        Field("shared_without_consent.approved_by.role", "sharing_override.approved_by.role"),
        Field("shared_without_consent.approved_by.name", "sharing_override.approved_by.name"),
        Field("shared_without_consent.approved_at", "sharing_override.approved_at", TIMESTAMP),
    )
)


def is_operation_encompass(record: Mapping[str, Any]) -> bool:
    """A referral whose only concern is domestic abuse and which names the child's school."""
    concern_types = {c.get("type") for c in record.get("concerns") or [] if isinstance(c, Mapping)}
    return concern_types == {"domestic_abuse"} and bool(get_canonical(record, "school.school_name"))


@register
class PoliceAdapter(JsonAdapter):
    kind = "police"
    referral_map = REFERRAL_MAP

    def extra_problems(self, native: Any, record: dict[str, Any]) -> list[MappingProblem]:
        if native.get("notification_type") != OPERATION_ENCOMPASS or is_operation_encompass(record):
            return []
        return [
            MappingProblem(
                "notification_type",
                "",
                "an Operation Encompass notification names the school and has one domestic_abuse concern",
            )
        ]

    def finish_native(self, document: dict[str, Any], record: Mapping[str, Any]) -> None:
        if is_operation_encompass(record):
            document["notification_type"] = OPERATION_ENCOMPASS
