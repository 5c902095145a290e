"""The sharing policy as values: purposes granting fields to recipients, and the closed
vocabularies (grounds, conditions, classes) a purpose may use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from referral_broker.organisations import Organisation

GROUNDS: dict[str, str] = {
    "uk_gdpr_6_1_e": "UK GDPR Art 6(1)(e): public task",
    "uk_gdpr_6_1_c": "UK GDPR Art 6(1)(c): legal obligation",
}
SPECIAL_CATEGORY_CONDITIONS: dict[str, str] = {
    "uk_gdpr_9_2_h": "UK GDPR Art 9(2)(h): health or social care (DPA 2018 Sch 1 para 2)",
    "dpa_2018_sch1_para18": (
        "UK GDPR Art 9(2)(g) with DPA 2018 Sch 1 para 18: safeguarding of children and of individuals at risk"
    ),
}
OVERRIDE_GROUNDS: dict[str, str] = {
    "risk_of_significant_harm": "risk of significant harm to a child",
    "prevention_detection_of_crime": "prevention or detection of crime",
}
CONSENT_MODES = ("required", "not_required")
# Who a purpose is for. A recipient is never a kind: each rule resolves, per referral and from
# the organisation registry, to exactly one organisation or to a recorded reason why not.
RECIPIENT_RULES: dict[str, str] = {
    "child_school": "the child's school, by its DfE URN (school.urn)",
    "gp_practice": "the child's GP practice, by its ODS code (health_and_development.gp_practice_ods)",
    "service_provider": "the organisation registered to provide each requested service (of those the "
    "purpose provides) in the family's district",
    "named_charity": "the charity the referral names as provider of a requested service (service_providers), "
    "when it provides that service in the family's district",
    "police_force": "the police force serving the family's district",
    "dwp": "the Department for Work and Pensions",
    "district_team": "the Early Help district team for the family's district",
}
# The organisation kind each rule can resolve to (None: any kind that provides the service).
RULE_KINDS: dict[str, str | None] = {
    "child_school": "school",
    "gp_practice": "nhs_organisation",
    "service_provider": None,
    "named_charity": "charity",
    "police_force": "police_force",
    "dwp": "dwp",
    "district_team": "district_team",
}
CONDITION_KINDS = ("flag", "concern", "referrer", "child_age_at_most", "service_requested", "family_district")


@dataclass(frozen=True)
class Purpose:
    """One reason a recipient gets data: what it grants, on what ground, when."""

    recipient: str  # a rule of RECIPIENT_RULES
    name: str
    description: str
    ground: str
    consent: str
    granted: frozenset[str]  # policy units (see units.py), expanded from fields and classes
    declared_fields: tuple[str, ...] = ()
    declared_classes: tuple[str, ...] = ()
    when_all: tuple[str, ...] = ()
    when_any: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    special_category_condition: str | None = None
    override_grounds: tuple[str, ...] = ()
    no_onward_sharing: frozenset[str] = frozenset()
    line: int = 0

    def could_reach(self, org: Organisation) -> bool:
        """Whether this purpose's rule can resolve to ``org`` (explaining the policy per
        organisation): the rule's kind, and for a service rule a service it provides."""
        want = RULE_KINDS[self.recipient]
        if want is None:
            return bool(set(self.provides) & set(org.services))
        if self.recipient == "gp_practice":  # a practice code: a letter and five digits
            return org.kind.value == want and len(org.identifier) == 6 and org.identifier[1:].isdigit()
        return org.kind.value == want


@dataclass(frozen=True)
class SharingPolicy:
    source: str
    version: int
    purposes: tuple[Purpose, ...]
    units: tuple[str, ...]  # every policy unit of the canonical schema, in schema order
    unit_classes: dict[str, str] = field(hash=False, default_factory=dict)

    def purposes_for(self, recipient: str) -> list[Purpose]:
        """The purposes of a rule (``child_school``), or those that can reach an organisation
        (a party name or ``kind:identifier``)."""
        if recipient in RECIPIENT_RULES:
            return [p for p in self.purposes if p.recipient == recipient]
        from referral_broker.parties import get_party

        org = get_party(recipient).org
        if org is None:
            return []
        return [p for p in self.purposes if p.could_reach(org)]

    def recipients(self) -> list[str]:
        """Every rule some purpose uses, in RECIPIENT_RULES order."""
        used = {p.recipient for p in self.purposes}
        return [r for r in RECIPIENT_RULES if r in used]
