"""Kafka ACLs generated from data: the organisation registry, the topic plan and the prefix.

Nothing here is written by hand per organisation. :func:`plan` turns the registry (who exists,
which kind, active or disabled) and the topic plan (``topic_plan.toml``: which per-party topics a
kind has, the fixed topics) into a list of :class:`Binding` (Kafka's own vocabulary: principal,
resource type, pattern type, name, operation, permission). :func:`apply` makes the cluster hold
exactly that list within the project's namespace; :func:`check` reports the drift.

**Identities** (SCRAM users), every one named ``<prefix><name>`` so that two deployments (or two
tests) that share a cluster under different prefixes never share a user:

* one per organisation, named by its party name (``school-110123``); a district team's user is
  the one its inbox runs as;
* ``router``, ``keyadmin`` (writes the keys topic and the organisation registry), ``ops``;
* the broker and the administrator are super users and are in no plan.

**Rules** (every topic name is under the prefix):

* an organisation WRITEs its own intake and status topics and READs them back (its outbox
  settles messages left in doubt by reading its own topic; nobody else writes there), READs its
  own out topic (LITERAL names throughout), READs keys and the registry, within its own
  consumer-group prefix ``receiver-<party>-``. A district team's inbox also has its groups
  ``inbox.<team>`` and ``inbox.<team>.delivery``, READs the audit decisions and WRITEs its access events (audit, and its chain's heads
  under the transactional id ``audit-writer-inbox-<team>``) and the
  records it cannot open (dead letters). Where one party's group prefix is the start of
  another's (``charity-1190001`` and the linked ``charity-1190001-1``) the shorter one is DENIED
  the longer one's prefix, so no organisation can join another's group;
* the router READs every intake and status topic (PREFIXED), WRITEs every out topic (PREFIXED),
  the archive, audit, dead letters, the audit chain heads and the delivery ledger, READs the
  heads, the ledger, keys and the registry, its group ``referral-router`` and its transactional ids ``referral-router-*``;
* only ``keyadmin`` writes the keys topic (and the registry); everyone reads the keys topic;
* ``ops`` DESCRIBEs every topic and group and the cluster (lag, health), READs the audit, its
  chain heads (``audit verify``) and the dead letters, and never an out topic;
* a disabled organisation gets no bindings at all.

**Ours**: with a prefix, a binding is the project's when its resource name or its principal
starts with the prefix; with no prefix the project owns the cluster and every binding is ours.
:func:`apply` deletes extra bindings only among ours.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from referral_broker.cluster.topics import _templates
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, ConfigError
from referral_broker.organisations import Organisation, OrgKind, Registry

ROUTER = "router"
KEYADMIN = "keyadmin"
OPS = "ops"
SERVICES = (ROUTER, KEYADMIN, OPS)
ROUTER_GROUP = "referral-router"  # consumers/router.py GROUP; its transactional ids add "-<instance>"
CLUSTER_NAME = "kafka-cluster"  # the one name Kafka gives the CLUSTER resource

# The topic plan's roles this module has rules for (plan() refuses a plan with any other).
RULED_ROLES = ("intake", "out", "status", "archive", "audit", "audit_heads", "dlq", "keys", "orgs", "deliveries")

# Operations that imply DESCRIBE (Kafka's authorizer: READ, WRITE, DELETE, ALTER imply DESCRIBE).
_IMPLIES_DESCRIBE = {"READ", "WRITE", "DELETE", "ALTER", "ALL"}


@dataclass(frozen=True, order=True)
class Binding:
    """One Kafka ACL binding. ``principal`` is the user name (without ``User:``)."""

    principal: str
    resource: str  # TOPIC | GROUP | TRANSACTIONAL_ID | CLUSTER
    pattern: str  # LITERAL | PREFIXED
    name: str
    operation: str  # READ | WRITE | DESCRIBE | ...
    permission: str = "ALLOW"  # ALLOW | DENY
    host: str = "*"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"{self.permission} User:{self.principal} {self.operation} "
            f"{self.resource}:{self.pattern}:{self.name}"
        )

    def matches(self, resource: str, name: str) -> bool:
        if resource != self.resource:
            return False
        if self.pattern == "PREFIXED":
            return name.startswith(self.name)
        return name == self.name or self.name == "*"


@dataclass(frozen=True)
class Identity:
    """A SCRAM user of the plan: ``user`` as Kafka knows it, its ``role`` and organisation."""

    user: str
    role: str  # organisation | router | keyadmin | ops
    party: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"user": self.user, "role": self.role, "party": self.party}


def user_name(settings: Settings, name: str) -> str:
    """The SCRAM user of an organisation's party name or a service (``router``...)."""
    return settings.kafka_topic_prefix + name


def _party_kind(org: Organisation) -> str:
    if org.kind is OrgKind.DISTRICT_TEAM:
        return "district_team"
    if org.kind is OrgKind.RESEARCH:
        return "research"
    return "partner"


def _topic(settings: Settings, role: str, party: str | None = None) -> str | None:
    """The topic of ``role`` (for ``party`` when per party), or None when the plan gives that
    kind of party no such topic."""
    template, _kinds = _templates()[role]
    if party is None:
        return settings.kafka_topic_prefix + template
    return settings.kafka_topic_prefix + template.format(party=party)


def _has(role: str, org: Organisation) -> bool:
    _template, kinds = _templates()[role]
    return _party_kind(org) in kinds


def receiver_group_prefix(settings: Settings, party: str) -> str:
    """consumers/receiving.py names an organisation's groups ``<prefix>receiver-<party>-<name>``."""
    return f"{settings.kafka_topic_prefix}receiver-{party}-"


def inbox_audit_writer(settings: Settings, team: str) -> str:
    """The transactional id of a team's access-event chain (consumers/inbox/outbound.py)."""
    return f"{settings.kafka_topic_prefix}audit-writer-inbox-{team}"


def inbox_group(settings: Settings, team: str) -> str:
    """consumers/inbox/ingest.py ``group_id``: ``<prefix>inbox.<team>``."""
    return f"{settings.kafka_topic_prefix}inbox.{team}"


def inbox_delivery_group(settings: Settings, team: str) -> str:
    """consumers/inbox/delivery.py: the group in which an inbox serving ``team`` alone reads
    the audit to learn which statuses reached the referrer, ``<prefix>inbox.<team>.delivery``
    (one per team: inboxes of two teams must not share the audit's partitions)."""
    return f"{inbox_group(settings, team)}.delivery"


def identities(settings: Settings, registry: Registry) -> list[Identity]:
    """Every identity of the plan: the active organisations, then the services."""
    found = [
        Identity(user_name(settings, o.party), "organisation", o.party)
        for o in sorted(registry.organisations(active_only=True), key=lambda o: o.party)
    ]
    clash = sorted({i.party for i in found if i.party} & set(SERVICES))
    if clash:
        raise ConfigError(f"organisation party name {clash[0]} is the name of a service identity")
    return found + [Identity(user_name(settings, s), s) for s in SERVICES]


def plan(settings: Settings, registry: Registry) -> list[Binding]:
    """Every binding the cluster must hold for ``registry`` under ``settings``' prefix (sorted)."""
    prefix = settings.kafka_topic_prefix
    unknown = sorted(set(_templates()) - set(RULED_ROLES))
    if unknown:  # a topic nobody may use would be refused to everyone: say so, loudly
        raise ConfigError(
            f"the topic plan has roles with no ACL rule in referral_broker/cluster/acls.py: {', '.join(unknown)}"
        )
    out: list[Binding] = []

    def allow(user: str, resource: str, pattern: str, name: str, *ops: str) -> None:
        out.extend(Binding(user, resource, pattern, name, op) for op in ops)

    keys, orgs_topic = _topic(settings, "keys"), _topic(settings, "orgs")
    audit, dlq = _topic(settings, "audit"), _topic(settings, "dlq")
    assert keys and orgs_topic and audit and dlq
    active = sorted(registry.organisations(active_only=True), key=lambda o: o.party)
    identities(settings, registry)  # refuses a party named like a service
    for org in active:
        user = user_name(settings, org.party)
        for role in ("intake", "status"):
            if _has(role, org):
                allow(user, "TOPIC", "LITERAL", _topic(settings, role, org.party) or "", "WRITE", "READ")
        if _has("out", org):
            allow(user, "TOPIC", "LITERAL", _topic(settings, "out", org.party) or "", "READ")
        allow(user, "TOPIC", "LITERAL", keys, "READ")
        allow(user, "TOPIC", "LITERAL", orgs_topic, "READ")
        mine = receiver_group_prefix(settings, org.party)
        allow(user, "GROUP", "PREFIXED", mine, "READ")
        for other in active:  # a longer party name that starts with this one's name and '-'
            theirs = receiver_group_prefix(settings, other.party)
            if other.party != org.party and theirs.startswith(mine):
                out.append(Binding(user, "GROUP", "PREFIXED", theirs, "ALL", "DENY"))
        if org.kind is OrgKind.DISTRICT_TEAM:
            allow(user, "GROUP", "LITERAL", inbox_group(settings, org.party), "READ")
            allow(user, "GROUP", "LITERAL", inbox_delivery_group(settings, org.party), "READ")
            allow(user, "TOPIC", "LITERAL", audit, "READ", "WRITE")
            allow(user, "TOPIC", "LITERAL", _topic(settings, "audit_heads") or "", "READ", "WRITE")
            allow(user, "TRANSACTIONAL_ID", "LITERAL", inbox_audit_writer(settings, org.party), "WRITE")
            allow(user, "TOPIC", "LITERAL", dlq, "WRITE")

    router = user_name(settings, ROUTER)
    for role in ("intake", "status"):
        head = prefix + _templates()[role][0].partition("{party}")[0]
        allow(router, "TOPIC", "PREFIXED", head, "READ")
    allow(router, "TOPIC", "PREFIXED", prefix + _templates()["out"][0].partition("{party}")[0], "WRITE")
    for role in ("archive", "audit", "dlq"):
        allow(router, "TOPIC", "LITERAL", _topic(settings, role) or "", "WRITE")
    allow(router, "TOPIC", "LITERAL", _topic(settings, "deliveries") or "", "WRITE", "READ")
    allow(router, "TOPIC", "LITERAL", _topic(settings, "audit_heads") or "", "WRITE", "READ")
    allow(router, "TOPIC", "LITERAL", keys, "READ")
    allow(router, "TOPIC", "LITERAL", orgs_topic, "READ")
    allow(router, "GROUP", "LITERAL", prefix + ROUTER_GROUP, "READ")
    allow(router, "TRANSACTIONAL_ID", "PREFIXED", f"{prefix}{ROUTER_GROUP}-", "WRITE")

    keyadmin = user_name(settings, KEYADMIN)
    allow(keyadmin, "TOPIC", "LITERAL", keys, "WRITE", "READ")
    allow(keyadmin, "TOPIC", "LITERAL", orgs_topic, "WRITE", "READ")

    ops = user_name(settings, OPS)
    allow(ops, "TOPIC", "PREFIXED", prefix or "*", "DESCRIBE", "DESCRIBE_CONFIGS")
    allow(ops, "GROUP", "PREFIXED", prefix or "*", "DESCRIBE")
    allow(ops, "CLUSTER", "LITERAL", CLUSTER_NAME, "DESCRIBE")
    allow(ops, "TOPIC", "LITERAL", audit, "READ")
    allow(ops, "TOPIC", "LITERAL", _topic(settings, "audit_heads") or "", "READ")  # audit verify
    allow(ops, "TOPIC", "LITERAL", dlq, "READ")
    return sorted(_fix_wildcards(set(out)))


def _fix_wildcards(bindings: set[Binding]) -> set[Binding]:
    """With no prefix, 'every topic' is the LITERAL wildcard ``*`` (a PREFIXED empty name is
    not allowed by Kafka)."""
    return {
        Binding(b.principal, b.resource, "LITERAL", "*", b.operation, b.permission, b.host)
        if b.pattern == "PREFIXED" and b.name == "*"
        else b
        for b in bindings
    }


def allowed(bindings: Iterable[Binding], user: str, resource: str, name: str, operation: str) -> bool:
    """What Kafka's StandardAuthorizer decides for ``bindings`` (no super users): a matching
    DENY wins, then a matching ALLOW of the operation, of ALL, or (for DESCRIBE) of an operation
    that implies it; nothing matching is a refusal."""
    relevant = [b for b in bindings if b.principal == user and b.matches(resource, name)]
    if any(b.permission == "DENY" and b.operation in (operation, "ALL") for b in relevant):
        return False
    for b in relevant:
        if b.permission != "ALLOW":
            continue
        if b.operation in (operation, "ALL"):
            return True
        if operation == "DESCRIBE" and b.operation in _IMPLIES_DESCRIBE:
            return True
        if operation == "DESCRIBE_CONFIGS" and b.operation == "ALTER_CONFIGS":
            return True
    return False


# -- the cluster -----------------------------------------------------------------------------------
def _to_kafka(b: Binding) -> Any:
    from kafka.admin import (
        ACL,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourceType,
    )

    return ACL(
        f"User:{b.principal}",
        b.host,
        ACLOperation[b.operation],
        ACLPermissionType[b.permission],
        ResourcePattern(ResourceType[b.resource], b.name, ACLResourcePatternType[b.pattern]),
    )


def _from_kafka(acl: Any) -> Binding | None:
    principal = str(acl.principal)
    if not principal.startswith("User:"):
        return None
    rp = acl.resource_pattern
    return Binding(
        principal[len("User:") :],
        rp.resource_type.name,
        rp.pattern_type.name,
        rp.resource_name,
        acl.operation.name,
        acl.permission_type.name,
        acl.host,
    )


def _error(exc: BaseException, action: str) -> BrokerError:
    from referral_broker.cluster.security import authorisation_error

    if "securitydisabled" in type(exc).__name__.lower() or "SecurityDisabled" in str(exc):
        return BrokerError(f"{action} failed: this cluster has no authorizer (started with --insecure?)")
    return authorisation_error(exc, action, "ACLs") or BrokerError(f"{action} failed: {type(exc).__name__}")


def _failed(err: Any) -> bool:
    """kafka-python hands back an error class (``NoError`` when fine) or instance, or None."""
    return err is not None and bool(getattr(err, "errno", 0))


def ours(settings: Settings, b: Binding) -> bool:
    prefix = settings.kafka_topic_prefix
    if not prefix:
        return True
    return b.name.startswith(prefix) or b.principal.startswith(prefix)


def current(settings: Settings, admin: Any) -> list[Binding]:
    """The project's bindings on the cluster (see the module's note on 'ours')."""
    from kafka.admin import (
        ACLFilter,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePatternFilter,
        ResourceType,
    )
    from kafka.errors import KafkaError

    flt = ACLFilter(
        None,
        None,
        ACLOperation.ANY,
        ACLPermissionType.ANY,
        ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY),
    )
    try:
        found, err = admin.describe_acls(flt)
    except KafkaError as exc:
        raise _error(exc, "describe") from None
    if _failed(err):
        raise _error(err() if isinstance(err, type) else err, "describe")
    return sorted({b for b in (_from_kafka(a) for a in found) if b is not None and ours(settings, b)})


@dataclass
class Drift:
    missing: list[Binding]
    extra: list[Binding]

    @property
    def clean(self) -> bool:
        return not self.missing and not self.extra

    def as_dict(self) -> dict[str, Any]:
        return {
            "missing": [b.as_dict() for b in self.missing],
            "extra": [b.as_dict() for b in self.extra],
            "clean": self.clean,
        }


def drift(settings: Settings, admin: Any, wanted: list[Binding]) -> Drift:
    have = set(current(settings, admin))
    want = set(wanted)
    return Drift(sorted(want - have), sorted(have - want))


@dataclass
class Applied:
    created: list[Binding]
    deleted: list[Binding]
    kept: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "created": [b.as_dict() for b in self.created],
            "deleted": [b.as_dict() for b in self.deleted],
            "kept": self.kept,
        }


def create(admin: Any, bindings: list[Binding]) -> None:
    from kafka.errors import KafkaError

    if not bindings:
        return
    try:
        result = admin.create_acls([_to_kafka(b) for b in bindings])
    except KafkaError as exc:
        raise _error(exc, "create") from None
    failed = result.get("failed") or []
    if failed:  # create_acls does not raise: failures come back as (acl, error) or error classes
        first = failed[0]
        err = first[1] if isinstance(first, tuple) else first
        refusal = err() if isinstance(err, type) else err
        raise _error(refusal, "create") if isinstance(refusal, BaseException) else BrokerError(
            f"creating {len(failed)} ACL bindings failed"
        )


def delete(admin: Any, bindings: list[Binding]) -> None:
    from kafka.admin import ACLFilter, ResourcePatternFilter
    from kafka.errors import KafkaError

    if not bindings:
        return
    filters = []
    for b in bindings:
        acl = _to_kafka(b)
        rp = acl.resource_pattern
        filters.append(
            ACLFilter(
                acl.principal,
                acl.host,
                acl.operation,
                acl.permission_type,
                ResourcePatternFilter(rp.resource_type, rp.resource_name, rp.pattern_type),
            )
        )
    try:
        results = admin.delete_acls(filters)
    except KafkaError as exc:
        raise _error(exc, "delete") from None
    for _flt, _deleted, err in results:
        if _failed(err):
            raise _error(err() if isinstance(err, type) else err, "delete")


def apply(settings: Settings, admin: Any, wanted: list[Binding]) -> Applied:
    """Make the cluster hold exactly ``wanted`` among the project's bindings (idempotent)."""
    found = drift(settings, admin, wanted)
    create(admin, found.missing)
    delete(admin, found.extra)
    return Applied(found.missing, found.extra, len(wanted) - len(found.missing))


def revoke_principal(settings: Settings, admin: Any, user: str) -> list[Binding]:
    """Delete every binding of ``user`` (a disabled organisation's)."""
    gone = [b for b in current(settings, admin) if b.principal == user]
    delete(admin, gone)
    return gone


def wait_until_applied(check: Any, timeout_s: float = 20.0) -> None:
    """ACL changes reach the broker's authorizer through the metadata log: call ``check``
    (returns True when the change is visible to clients) until it is, or time out."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise BrokerError(f"ACL changes were not in effect after {timeout_s:.0f}s")
        time.sleep(0.2)
