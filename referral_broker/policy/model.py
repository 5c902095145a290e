"""The sharing policy as values: purposes granting fields to recipients, and the closed
vocabularies (grounds, conditions, classes) a purpose may use."""

from __future__ import annotations

from dataclasses import dataclass, field

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
CONDITION_KINDS = ("flag", "concern", "referrer", "child_age_at_most", "service_requested", "family_district")


@dataclass(frozen=True)
class Purpose:
    """One reason a recipient gets data: what it grants, on what ground, when."""

    recipient: str  # a party name, or "kind:<party kind>"
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

    def applies_to(self, party: str, kind: str) -> bool:
        return self.recipient == party or self.recipient == f"kind:{kind}"


@dataclass(frozen=True)
class SharingPolicy:
    source: str
    version: int
    purposes: tuple[Purpose, ...]
    units: tuple[str, ...]  # every policy unit of the canonical schema, in schema order
    unit_classes: dict[str, str] = field(hash=False, default_factory=dict)

    def purposes_for(self, party: str) -> list[Purpose]:
        from referral_broker.parties import get_party

        kind = get_party(party).kind
        return [p for p in self.purposes if p.applies_to(party, kind)]

    def recipients(self) -> list[str]:
        """Every party some purpose names, in parties.toml order."""
        from referral_broker.parties import all_parties

        return [
            name
            for name, party in all_parties().items()
            if any(p.applies_to(name, party.kind) for p in self.purposes)
        ]
