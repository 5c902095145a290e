"""Kafka client quotas from data: ``quotas.toml`` (rates by organisation kind), the organisation
registry and the prefix, the way :mod:`~referral_broker.cluster.acls` makes the ACLs.

:func:`plan` gives every active organisation's SCRAM user (``<prefix><party>``) its kind's
rates; :func:`apply` makes the cluster hold exactly that among the project's users (``acl
apply`` and ``setup`` run it after the ACLs); :func:`drift` reports the difference (``acl
check``); :func:`remove_user` takes a disabled organisation's quotas away with its user. The
services and the administrator are in no plan, so nothing here slows the router.

Only Kafka's ``user`` entity is managed (KIP-55: a user's own quota, no client id, no default
entity). **Ours**, as for ACLs: with a prefix, a user whose name starts with it; with no prefix
the project owns the cluster and every user's quota is ours.

kafka-python (3.0) has the protocol messages (DescribeClientQuotas, AlterClientQuotas) but no
admin method for them, so :func:`_send` hands them to the admin client's own connection
manager, as its methods do.
"""

from __future__ import annotations

import math
import time
import tomllib
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any

from referral_broker.cluster.acls import user_name
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, ConfigError
from referral_broker.organisations import OrgKind, Registry

KEYS = ("producer_byte_rate", "consumer_byte_rate", "request_percentage")
SHIPPED = "referral_broker/cluster/quotas.toml"
_MATCH_SPECIFIED = 2  # DescribeClientQuotas: any entity with a name (not the default entity)

# "default", or an organisation kind -> Kafka quota key -> value
Rates = dict[str, dict[str, float]]


@dataclass(frozen=True, order=True)
class Quota:
    """One quota of one user: Kafka's own key (``producer_byte_rate``...) and value."""

    user: str
    key: str
    value: float

    def describe(self) -> str:
        return f"{self.user} {self.key}={shown(self.value)}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def shown(value: float) -> str:
    """A quota value as written in quotas.toml: every digit of a byte rate (``:g`` alone would
    print 16777216 as 1.67772e+07, in the audit record too)."""
    return f"{value:.15g}"


# -- the plan, from data ---------------------------------------------------------------------------
def parse_rates(doc: dict[str, Any], source: str) -> Rates:
    """The rates of a quotas document, refused with the place of the first problem: an unknown
    section, organisation kind or quota key, or a value that is not a positive number."""
    unknown = sorted(set(doc) - {"default", "kind"})
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r}; expected [default] and [kind.<kind>]")
    kinds = doc.get("kind", {})
    if not isinstance(kinds, dict):
        raise ConfigError(f"{source}: 'kind' must hold tables, [kind.<organisation kind>]")
    rates = {"default": _checked(doc.get("default", {}), f"{source} [default]")}
    known = [k.value for k in OrgKind]
    for kind, table in kinds.items():
        if kind not in known:
            raise ConfigError(f"{source}: [kind.{kind}] is not an organisation kind; kinds: {', '.join(known)}")
        rates[kind] = _checked(table, f"{source} [kind.{kind}]")
    return rates


def _checked(table: Any, where: str) -> dict[str, float]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    for key, value in table.items():
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown quota {key!r}; known: {', '.join(KEYS)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}: {key} must be a positive number")
    return {key: float(value) for key, value in table.items()}


@cache
def shipped_rates() -> Rates:
    text = resources.files("referral_broker.cluster").joinpath("quotas.toml").read_text("utf-8")
    return parse_rates(tomllib.loads(text), SHIPPED)


def rates_for(kind: str, rates: Rates) -> dict[str, float]:
    """An organisation kind's rates: ``[default]`` with the kind's own keys over it."""
    return {**rates.get("default", {}), **rates.get(kind, {})}


def plan(settings: Settings, registry: Registry, rates: Rates | None = None) -> list[Quota]:
    """Every quota the cluster must hold for ``registry`` under ``settings``' prefix (sorted);
    ``rates`` defaults to the shipped ``quotas.toml``."""
    rates = shipped_rates() if rates is None else rates
    return sorted(
        Quota(user_name(settings, org.party), key, value)
        for org in registry.organisations(active_only=True)
        for key, value in rates_for(org.kind.value, rates).items()
    )


# -- the cluster -----------------------------------------------------------------------------------
def _send(admin: Any, request: Any, action: str) -> Any:
    from kafka.errors import KafkaError

    async def send() -> Any:
        return await admin._manager.send(request)

    try:
        return admin._manager.run(send)
    except KafkaError as exc:
        raise _refusal(exc, action) from None


def _refusal(exc: BaseException, action: str) -> BrokerError:
    from referral_broker.cluster.security import authorisation_error

    return authorisation_error(exc, action, "quotas") or BrokerError(f"{action} failed: {type(exc).__name__}")


def _check(code: int, action: str) -> None:
    if code:
        from kafka.errors import for_code

        raise _refusal(for_code(code)(), action)


def ours(settings: Settings, user: str) -> bool:
    return user.startswith(settings.kafka_topic_prefix)


def current(settings: Settings, admin: Any) -> list[Quota]:
    """The project's user quotas on the cluster (sorted)."""
    from kafka.protocol.admin.client_quotas import DescribeClientQuotasRequest as Describe

    request = Describe(
        components=[Describe.ComponentData(entity_type="user", match_type=_MATCH_SPECIFIED, match=None)],
        strict=True,  # users alone, not (user, client id) pairs
    )
    response = _send(admin, request, "describe quotas")
    _check(response.error_code, "describe quotas")
    found: list[Quota] = []
    for entry in response.entries or ():
        names = {e.entity_type: e.entity_name for e in entry.entity}
        user = names.get("user")
        if set(names) == {"user"} and user is not None and ours(settings, user):
            found.extend(Quota(user, value.key, value.value) for value in entry.values)
    return sorted(found)


@dataclass
class QuotaDrift:
    missing: list[Quota]  # planned, and absent from the cluster
    changed: list[tuple[Quota, Quota]]  # (planned, what the cluster holds instead)
    extra: list[Quota]  # on the cluster for a user and key the plan does not have

    @property
    def clean(self) -> bool:
        return not (self.missing or self.changed or self.extra)

    def as_dict(self) -> dict[str, Any]:
        return {
            "missing": [q.as_dict() for q in self.missing],
            "changed": [{"planned": p.as_dict(), "found": f.as_dict()} for p, f in self.changed],
            "extra": [q.as_dict() for q in self.extra],
            "clean": self.clean,
        }


def drift(settings: Settings, admin: Any, wanted: list[Quota]) -> QuotaDrift:
    have = {(q.user, q.key): q for q in current(settings, admin)}
    want = {(q.user, q.key): q for q in wanted}
    return QuotaDrift(
        missing=sorted(q for k, q in want.items() if k not in have),
        changed=sorted((q, have[k]) for k, q in want.items() if k in have and have[k].value != q.value),
        extra=sorted(q for k, q in have.items() if k not in want),
    )


def alter(admin: Any, put: list[Quota], remove: list[Quota]) -> None:
    """Set ``put`` and remove ``remove`` in one request; raises on any entry's refusal."""
    from kafka.protocol.admin.client_quotas import AlterClientQuotasRequest as Alter

    ops: dict[str, list[Any]] = {}
    for q in put:
        ops.setdefault(q.user, []).append(Alter.EntryData.OpData(key=q.key, value=q.value, remove=False))
    for q in remove:
        ops.setdefault(q.user, []).append(Alter.EntryData.OpData(key=q.key, value=0.0, remove=True))
    if not ops:
        return
    entries = [
        Alter.EntryData(entity=[Alter.EntryData.EntityData(entity_type="user", entity_name=user)], ops=user_ops)
        for user, user_ops in sorted(ops.items())
    ]
    response = _send(admin, Alter(entries=entries, validate_only=False), "alter quotas")
    for entry in response.entries:
        _check(entry.error_code, "alter quotas")


@dataclass
class QuotasApplied:
    set: list[Quota]
    removed: list[Quota]
    kept: int

    def as_dict(self) -> dict[str, Any]:
        return {"set": [q.as_dict() for q in self.set], "removed": [q.as_dict() for q in self.removed], "kept": self.kept}


def apply(settings: Settings, admin: Any, wanted: list[Quota], *, timeout_s: float = 20.0) -> QuotasApplied:
    """Make the cluster hold exactly ``wanted`` among the project's user quotas (idempotent),
    and return once the cluster describes them so (a change reaches the brokers through the
    metadata log, a moment after it is accepted)."""
    found = drift(settings, admin, wanted)
    put = sorted([*found.missing, *(planned for planned, _ in found.changed)])
    alter(admin, put, found.extra)
    if put or found.extra:
        deadline = time.monotonic() + timeout_s
        while not drift(settings, admin, wanted).clean:
            if time.monotonic() > deadline:
                raise BrokerError(f"quota changes were not in effect after {timeout_s:.0f}s")
            time.sleep(0.2)
    return QuotasApplied(put, found.extra, len(wanted) - len(put))


def remove_user(settings: Settings, admin: Any, user: str) -> list[Quota]:
    """Remove every quota of ``user`` (a disabled organisation's)."""
    gone = [q for q in current(settings, admin) if q.user == user]
    alter(admin, [], gone)
    return gone
