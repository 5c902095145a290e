"""Who receives which fields of one referral, and why: a pure function of the policy, the
organisation registry, the referral and the clock. No I/O, so every rule can be tested
exhaustively and explained.

Recipients are organisations resolved per referral: each purpose's recipient rule
(``child_school``, ``gp_practice``, ...) finds exactly one registered, active organisation or
an :class:`~referral_broker.organisations.Unresolved` reason. An unresolved rule sends nothing
to anyone of that kind: it becomes a decision of its own (not delivered, with the reason), so the
audit, the district team's copy and ``orgs unresolved`` show it.

Consent to the service and the legal ground are kept apart: the ground always comes from the
purpose; consent (or, without it, a complete override record) decides whether a purpose that
needs consent may be used at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any

from referral_broker.errors import PolicyError
from referral_broker.organisations import Organisation, OrgKind, Registry, Resolution, Unresolved
from referral_broker.parties import current_registry
from referral_broker.policy.model import Purpose, SharingPolicy

DEFAULT_DENY = "not granted to this recipient by any purpose (default deny)"


@dataclass(frozen=True)
class Decision:
    """One recipient's share of one referral (field paths and reasons; never values)."""

    recipient: str  # the organisation's party name; the rule's name when unresolved
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
    recipient_name: str = ""  # the organisation's name, for people reading the audit
    rules: tuple[str, ...] = ()  # the recipient rules that selected it
    unresolved: str | None = None  # why the rule found no organisation (nothing was sent)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def age_on(born: date, day: date) -> int:
    return day.year - born.year - ((day.month, day.day) < (born.month, born.day))


def district_party(district: str) -> str:
    return "district-" + district.replace("_", "-")


def _condition_holds(cond: str, purpose: Purpose, referral: dict[str, Any], today: date) -> bool:
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
        return bool(referral.get("district"))
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


def _requested(purpose: Purpose, referral: dict[str, Any]) -> list[str]:
    wanted = set(referral.get("services_requested") or [])
    return [service for service in purpose.provides if service in wanted]


def _named_provider(referral: dict[str, Any], service: str) -> str | None:
    for entry in referral.get("service_providers") or []:
        if isinstance(entry, dict) and entry.get("service") == service:
            return str(entry.get("provider") or "") or None
    return None


def resolve(purpose: Purpose, referral: dict[str, Any], registry: Registry) -> list[Resolution]:
    """The organisations (or reasons) the purpose's recipient rule finds for this referral."""
    rule = purpose.recipient
    district = str(referral.get("district") or "")
    if not district and rule != "child_school" and rule != "gp_practice":
        return [Unresolved("the referral names no family district")]
    if rule == "child_school":
        return [registry.school_by_urn((referral.get("school") or {}).get("urn"))]
    if rule == "gp_practice":
        health = referral.get("health_and_development") or {}
        return [registry.nhs_by_ods(health.get("gp_practice_ods"), noun="GP practice")]
    if rule == "service_provider":
        return [registry.service_for_district(s, district) for s in _requested(purpose, referral)]
    if rule == "named_charity":
        return [registry.charity_for(s, district, _named_provider(referral, s)) for s in _requested(purpose, referral)]
    if rule == "police_force":
        return [registry.serving(OrgKind.POLICE_FORCE, district)]
    if rule == "dwp":
        return [registry.serving(OrgKind.DWP, district)]
    if rule == "district_team":
        return [registry.district_team(district)]
    raise PolicyError(f"unknown recipient rule '{rule}'")  # the loader rules this out


def _selected(purpose: Purpose, referral: dict[str, Any], today: date) -> list[str] | None:
    """The conditions met, or None when the purpose does not apply to this referral."""
    met_all = [c for c in purpose.when_all if _condition_holds(c, purpose, referral, today)]
    met_any = [c for c in purpose.when_any if _condition_holds(c, purpose, referral, today)]
    if len(met_all) == len(purpose.when_all) and (not purpose.when_any or met_any):
        return met_all + met_any
    return None


def decide(
    policy: SharingPolicy,
    referral: dict[str, Any],
    *,
    referrer_party: str,
    at: datetime,
    registry: Registry | None = None,
) -> list[Decision]:
    """One decision per organisation that a purpose selects for this referral (delivered or
    not), plus one per recipient rule that could not be resolved (never delivered).

    The referrer never receives its own referral back; organisations no purpose selects get
    no decision at all (they were never candidates).
    """
    registry = registry if registry is not None else current_registry()
    override = _complete_override(referral)
    today = at.date()
    chosen: dict[str, tuple[Organisation, list[tuple[Purpose, list[str]]]]] = {}
    unresolved: dict[tuple[str, str], list[Purpose]] = {}
    for purpose in policy.purposes:
        met = _selected(purpose, referral, today)
        if met is None:
            continue
        for found in resolve(purpose, referral, registry):
            if isinstance(found, Unresolved):
                unresolved.setdefault((purpose.recipient, found.reason), []).append(purpose)
            elif found.party != referrer_party:
                chosen.setdefault(found.party, (found, []))[1].append((purpose, met))
    decisions = [_decision(policy, org, candidates, referral, override) for org, candidates in chosen.values()]
    for (rule, reason), purposes in unresolved.items():
        decisions.append(
            Decision(
                recipient=rule,
                delivered=False,
                shared=(),
                withheld={},  # nothing was sent to anyone: the reason says why
                purposes=tuple(dict.fromkeys(p.name for p in purposes)),
                grounds=(),
                special_category_conditions=(),
                conditions_met=(),
                basis="none",
                override_id=None,
                no_onward_sharing=(),
                rules=(rule,),
                unresolved=reason,
            )
        )
    return decisions


def _decision(
    policy: SharingPolicy,
    org: Organisation,
    candidates: list[tuple[Purpose, list[str]]],
    referral: dict[str, Any],
    override: dict[str, Any] | None,
) -> Decision:
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
    return Decision(
        recipient=org.party,
        delivered=bool(used),
        shared=tuple(u for u in policy.units if u in granted),
        withheld=withheld,
        purposes=tuple(dict.fromkeys(p.name for p, _, _ in used))
        or tuple(dict.fromkeys(p.name for p, _ in candidates)),
        grounds=tuple(sorted({p.ground for p, _, _ in used})),
        special_category_conditions=tuple(
            sorted({p.special_category_condition for p, _, _ in used if p.special_category_condition})
        ),
        conditions_met=tuple(sorted({c for _, _, met in used for c in met})),
        basis=basis,
        override_id=str(override.get("override_id")) if override and basis == "override" else None,
        no_onward_sharing=tuple(sorted(set().union(*(p.no_onward_sharing for p, _, _ in used)))),
        recipient_name=org.name,
        rules=tuple(dict.fromkeys(p.recipient for p, _ in candidates)),
    )
