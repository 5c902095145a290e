"""Who receives which fields of one referral, and why: a pure function of the policy, the
referral and the clock. No I/O, so every rule can be tested exhaustively and explained.

Consent to the service and the legal ground are kept apart: the ground always comes from the
purpose; consent (or, without it, a complete override record) decides whether a purpose that
needs consent may be used at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any

from referral_broker.errors import PolicyError
from referral_broker.parties import all_parties
from referral_broker.policy.model import Purpose, SharingPolicy

DEFAULT_DENY = "not granted to this recipient by any purpose (default deny)"


@dataclass(frozen=True)
class Decision:
    """One recipient's share of one referral (field paths and reasons; never values)."""

    recipient: str
    delivered: bool
    shared: tuple[str, ...]
    withheld: dict[str, str] = field(hash=False)
    purposes: tuple[str, ...]
    grounds: tuple[str, ...]
    special_category_conditions: tuple[str, ...]
    conditions_met: tuple[str, ...]
    basis: str  # consent | override | not_required | none
    override_id: str | None
    no_onward_sharing: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def age_on(born: date, day: date) -> int:
    return day.year - born.year - ((day.month, day.day) < (born.month, born.day))


def district_party(district: str) -> str:
    return "district-" + district.replace("_", "-")


def _condition_holds(cond: str, purpose: Purpose, party: str, referral: dict[str, Any], today: date) -> bool:
    kind, _, arg = cond.partition(":")
    if kind == "flag":
        return bool((referral.get("flags") or {}).get(arg))
    if kind == "concern":
        return arg in (referral.get("concern_types") or [])
    if kind == "referrer":
        return (referral.get("referrer") or {}).get("partner") == arg
    if kind == "child_age_at_most":
        born = (referral.get("child") or {}).get("date_of_birth")
        return isinstance(born, date) and age_on(born, today) <= int(arg)
    if kind == "service_requested":
        return bool(set(purpose.provides) & set(referral.get("services_requested") or []))
    if kind == "family_district":
        return district_party(str(referral.get("district"))) == party
    raise PolicyError(f"unknown condition '{cond}'")  # the loader rules this out


def _complete_override(referral: dict[str, Any]) -> dict[str, Any] | None:
    """The override record if there is one; an incomplete one is an error, never ignored."""
    override: dict[str, Any] | None = referral.get("sharing_override")
    if not override:
        return None
    approver = override.get("approved_by") or {}
    missing = [
        name
        for name, value in (
            ("sharing_override.ground", override.get("ground")),
            ("sharing_override.reason", (override.get("reason") or "").strip()),
            ("sharing_override.approved_by.role", approver.get("role")),
            ("sharing_override.approved_by.name", (approver.get("name") or "").strip()),
            ("sharing_override.approved_at", override.get("approved_at")),
        )
        if not value
    ]
    if missing:
        raise PolicyError(f"sharing override record is incomplete: missing {', '.join(missing)}")
    return override


def _basis(
    purpose: Purpose, referral: dict[str, Any], override: dict[str, Any] | None
) -> tuple[str, str | None]:
    """('consent'|'override'|'not_required', None) when the purpose may be used, else ('none', why)."""
    if purpose.consent == "not_required":
        return "not_required", None
    consent = (referral.get("consent") or {}).get("state")
    requested = set(referral.get("services_requested") or [])
    if consent == "given" and set(purpose.provides) & requested:
        return "consent", None
    if override is not None and override.get("ground") in purpose.override_grounds:
        return "override", None
    covered = (
        "consent was given to a service this purpose does not provide"
        if consent == "given"
        else f"consent is '{consent}'"
    )
    if override is None:
        why = f"{covered} and there is no sharing override record"
    else:
        why = f"{covered} and the override's ground is not one this purpose accepts"
    return "none", f"withheld: {why} (purpose {purpose.name})"


def decide(
    policy: SharingPolicy, referral: dict[str, Any], *, referrer_party: str, at: datetime
) -> list[Decision]:
    """One decision per recipient that a purpose selects for this referral (delivered or not).

    The referrer never receives its own referral back; recipients no purpose selects get no
    decision at all (they were never candidates).
    """
    override = _complete_override(referral)
    today = at.date()
    decisions: list[Decision] = []
    for party_name, party in all_parties().items():
        if party_name == referrer_party or not party.receives or party.kind == "research":
            continue
        candidates: list[tuple[Purpose, list[str]]] = []
        for purpose in policy.purposes_for(party_name):
            met_all = [
                c for c in purpose.when_all if _condition_holds(c, purpose, party_name, referral, today)
            ]
            met_any = [
                c for c in purpose.when_any if _condition_holds(c, purpose, party_name, referral, today)
            ]
            if len(met_all) == len(purpose.when_all) and (not purpose.when_any or met_any):
                candidates.append((purpose, met_all + met_any))
        if not candidates:
            continue
        granted: set[str] = set()
        blocked: dict[str, str] = {}
        used: list[tuple[Purpose, str, list[str]]] = []
        for purpose, met in candidates:
            basis, why = _basis(purpose, referral, override)
            if why is None:
                used.append((purpose, basis, met))
                granted |= purpose.granted
            else:
                for unit in purpose.granted:
                    blocked.setdefault(unit, why)
        withheld = {u: blocked.get(u, DEFAULT_DENY) for u in policy.units if u not in granted}
        bases = {b for _, b, _ in used}
        basis = "override" if "override" in bases else (sorted(bases)[0] if bases else "none")
        decisions.append(
            Decision(
                recipient=party_name,
                delivered=bool(used),
                shared=tuple(u for u in policy.units if u in granted),
                withheld=withheld,
                purposes=tuple(p.name for p, _, _ in used) or tuple(p.name for p, _ in candidates),
                grounds=tuple(sorted({p.ground for p, _, _ in used})),
                special_category_conditions=tuple(
                    sorted({p.special_category_condition for p, _, _ in used if p.special_category_condition})
                ),
                conditions_met=tuple(sorted({c for _, _, met in used for c in met})),
                basis=basis,
                override_id=str(override.get("override_id")) if override and basis == "override" else None,
                no_onward_sharing=tuple(sorted(set().union(*(p.no_onward_sharing for p, _, _ in used)))),
            )
        )
    return decisions
