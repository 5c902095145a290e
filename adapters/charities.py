"""Charities: the JSON a web form sends when a charity worker submits a referral.

Flat, form-style keys (``child_first_name``), yes/no answers as JSON booleans, lists for the
family members, concerns and support needed; one submission per object, or an array of them.
The ethnicity question is optional on the form; unanswered it is ``not_obtained``. Fields and
their canonical paths: ``FORMATS.md``.
"""

from __future__ import annotations

from .base import NOT_OBTAINED_ETHNICITY, JsonAdapter, register
from .field_map import (
    BOOL,
    CHARITY_NUMBER,
    INT,
    ISO_DATE,
    POSTCODE,
    SYMBOLS,
    TIMESTAMP,
    UUID,
    Field,
    FieldMap,
    Items,
)

REFERRAL_MAP = FieldMap(
    (
        Field("submission_id", "referral_id", UUID),
        Field("form_version", "version", INT),
        Field("submitted_at", "created_at", TIMESTAMP),
        Field("district", "district"),
        Field("urgency", "priority"),
        Field("safeguarding_concern", "flags.safeguarding_concern", BOOL),
        Field("crime_prevention", "flags.crime_prevention", BOOL),
        Field("early_support_pathway", "flags.early_support_pathway", BOOL),
        Field("referred_by", "referrer.partner"),
        Field("organisation", "referrer.organisation"),
        Field("your_name", "referrer.practitioner.name"),
        Field("your_role", "referrer.practitioner.role"),
        Field("your_email", "referrer.practitioner.email"),
        Field("your_phone", "referrer.practitioner.phone"),
        Field("child_first_name", "child.given_name"),
        Field("child_last_name", "child.family_name"),
        Field("child_known_as", "child.preferred_name"),
        Field("child_date_of_birth", "child.date_of_birth", ISO_DATE),
        Field("child_sex", "child.sex"),
        Field("child_gender_identity", "child.gender_identity"),
        Field("child_ethnicity", "child.ethnicity"),
        Field("child_first_language", "child.first_language"),
        Field("child_needs_interpreter", "child.interpreter_needed", BOOL),
        Field("address_line_1", "child.address.line1"),
        Field("address_line_2", "child.address.line2"),
        Field("town", "child.address.town"),
        Field("postcode", "child.address.postcode", POSTCODE),
        Field("family_phone", "child.contact.phone"),
        Field("family_email", "child.contact.email"),
        Items(
            "family_members",
            "household",
            (
                Field("first_name", "given_name"),
                Field("last_name", "family_name"),
                Field("date_of_birth", "date_of_birth", ISO_DATE),
                Field("relationship", "relationship"),
                Field("parental_responsibility", "parental_responsibility", BOOL),
                Field("phone", "contact.phone"),
                Field("email", "contact.email"),
            ),
        ),
        Field("housing", "home_circumstances.housing"),
        Field("overcrowded", "home_circumstances.overcrowded", BOOL),
        Field("money_worries", "home_circumstances.financial_hardship", BOOL),
        Field("receives_benefits", "home_circumstances.receives_benefits", BOOL),
        Field("young_carer", "home_circumstances.young_carer", BOOL),
        Field("home_situation", "home_circumstances.summary"),
        Items(
            "concerns",
            "concerns",
            (Field("type", "type"), Field("details", "detail"), Field("since", "since", ISO_DATE)),
        ),
        Field("support_needed", "services_requested", SYMBOLS),
        Items(
            "support_providers",
            "service_providers",
            (Field("service", "service"), Field("charity_number", "provider", CHARITY_NUMBER)),
        ),
        Field("consent", "consent.state"),
        Field("consent_recorded_at", "consent.recorded_at", TIMESTAMP),
        Field("consent_recorded_by", "consent.recorded_by"),
        Field("without_consent_reference", "sharing_override.override_id", UUID),
        Field("without_consent_ground", "sharing_override.ground"),
        Field("without_consent_reason", "sharing_override.reason"),
        Field("without_consent_approver_role", "sharing_override.approved_by.role"),
        Field("without_consent_approver_name", "sharing_override.approved_by.name"),
        Field("without_consent_approved_at", "sharing_override.approved_at", TIMESTAMP),
    )
)


@register
class CharitiesAdapter(JsonAdapter):
    kind = "charities"
    referral_map = REFERRAL_MAP
    defaults_when_absent = NOT_OBTAINED_ETHNICITY
