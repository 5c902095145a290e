"""The topic plan (``topic_plan.toml``) expanded for a profile, and reconciled with a cluster.

``ensure`` creates what is missing and reports drift in what exists; it never deletes or
silently alters a topic, because changing partitions or retention on a live cluster is a
decision for an operator, not a side effect.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from referral_broker import parties as party_registry
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, TopicPlanError

if TYPE_CHECKING:
    from kafka import KafkaAdminClient  # kafka-python has no type information: this is Any to mypy

ROLES = ("intake", "out", "status", "archive", "audit", "audit_heads", "dlq", "keys", "orgs", "deliveries")


@dataclass(frozen=True)
class TopicSpec:
    name: str
    role: str
    party: str | None
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(hash=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "party": self.party,
            "partitions": self.partitions,
            "replication_factor": self.replication_factor,
            "configs": dict(self.configs),
        }


@cache
def _load_plan_doc() -> dict[str, Any]:
    text = resources.files("referral_broker.cluster").joinpath("topic_plan.toml").read_text("utf-8")
    return tomllib.loads(text)


def plan(profile: str = "local", prefix: str = "", parties: list[str] | None = None) -> list[TopicSpec]:
    """Every topic of the plan under ``profile``; ``prefix`` namespaces them (tests, tenants).

    Per-party topics are expanded for ``parties`` (names), by default every party of the
    installed organisation registry (``referral_broker.parties``)."""
    if parties is None:
        return list(_plan(profile, prefix, party_registry.generation()))
    return [s for s in _specs(profile, prefix, tuple(parties))]


@cache
def _plan(profile: str, prefix: str, generation: int) -> tuple[TopicSpec, ...]:
    del generation  # part of the cache key only: a new registry, a new plan
    return _specs(profile, prefix, tuple(party_registry.all_parties()))


def _durability(profile: str) -> dict[str, Any]:
    doc = _load_plan_doc()
    durability = dict(doc["production"])
    if profile != "production":
        try:
            durability.update(doc["profiles"][profile])
        except KeyError:
            raise TopicPlanError(f"topic plan has no profile '{profile}'") from None
    return durability


def _specs(profile: str, prefix: str, names_: tuple[str, ...]) -> tuple[TopicSpec, ...]:
    doc = _load_plan_doc()
    durability = _durability(profile)
    known = party_registry.all_parties()
    specs: list[TopicSpec] = []
    for entry in doc["topic"]:
        if entry["role"] not in ROLES:
            raise TopicPlanError(f"topic plan: {entry['name']} has unknown role {entry['role']!r}")
        configs = {
            "retention.ms": str(entry["retention_ms"]),
            "cleanup.policy": entry["cleanup_policy"],
            "min.insync.replicas": str(durability["min_insync_replicas"]),
            "unclean.leader.election.enable": str(durability["unclean_leader_election_enable"]).lower(),
        }
        if "segment_ms" in entry:  # bounds how long past retention a record can live (shredding)
            configs["segment.ms"] = str(entry["segment_ms"])
        names: list[tuple[str, str | None]]
        if "{party}" in entry["name"]:
            kinds = entry["parties"]
            names = [
                (entry["name"].format(party=p), p)
                for p in names_
                if p in known and known[p].kind in kinds
            ]
        else:
            names = [(entry["name"], None)]
        for name, party in names:
            specs.append(
                TopicSpec(
                    name=prefix + name,
                    role=entry["role"],
                    party=party,
                    partitions=min(entry["partitions"], durability.get("max_partitions", 1 << 16)),
                    replication_factor=durability["replication_factor"],
                    configs=configs,
                )
            )
    return tuple(specs)


def fixed_plan(profile: str = "local", prefix: str = "") -> list[TopicSpec]:
    """The topics that are not per party (archive, audit, dead letters, keys, organisations)."""
    return list(_specs(profile, prefix, ()))


@cache
def _templates() -> dict[str, tuple[str, tuple[str, ...]]]:
    """role -> (name template, party kinds it exists for; empty when not per party)."""
    return {e["role"]: (e["name"], tuple(e.get("parties", ()))) for e in _load_plan_doc()["topic"]}


def topic_name(settings: Settings, role: str, party: str | None = None) -> str:
    """The one way code finds a topic's name: by role and party, under the configured prefix."""
    found = _templates().get(role)
    if found is None:
        raise TopicPlanError(f"the topic plan has no topic with role '{role}'")
    template, kinds = found
    if bool(kinds) != (party is not None):
        what = f"role '{role}'" + (f" for party '{party}'" if party else "")
        raise TopicPlanError(f"the topic plan has no topic with {what}")
    if party is None:
        return settings.kafka_topic_prefix + template
    known = party_registry.all_parties().get(party)
    if known is None or known.kind not in kinds:
        raise TopicPlanError(f"the topic plan has no topic with role '{role}' for party '{party}'")
    return settings.kafka_topic_prefix + template.format(party=party)


def party_of_topic(settings: Settings, role: str, topic: str) -> str | None:
    """The party a per-party topic belongs to (``referrals.intake.school-110123`` ->
    ``school-110123``), or None when ``topic`` is not a topic of that role."""
    template, kinds = _templates().get(role, ("", ()))
    head, _, tail = (settings.kafka_topic_prefix + template).partition("{party}")
    if not kinds or not topic.startswith(head) or not topic.endswith(tail):
        return None
    party = topic[len(head) : len(topic) - len(tail) if tail else None]
    return party or None


def topic_pattern(settings: Settings, roles: tuple[str, ...]) -> str:
    """A regular expression matching every per-party topic of ``roles`` (the router subscribes
    with it, so a newly registered organisation's topics are read without a restart)."""
    import re

    alternatives = []
    for role in roles:
        template, _ = _templates()[role]
        head, _, tail = (settings.kafka_topic_prefix + template).partition("{party}")
        alternatives.append(re.escape(head) + "[a-z0-9-]+" + re.escape(tail))
    return "^(?:" + "|".join(alternatives) + ")$"


@dataclass
class TopicState:
    spec: TopicSpec
    exists: bool
    created: bool = False
    drift: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.spec.as_dict(),
            "exists": self.exists,
            "created": self.created,
            "drift": self.drift,
        }


def _describe(admin: KafkaAdminClient, specs: list[TopicSpec]) -> dict[str, TopicState]:
    from kafka.admin import ConfigResource, ConfigResourceType

    existing = set(admin.list_topics())
    states = {s.name: TopicState(s, s.name in existing) for s in specs}
    present = [s for s in specs if s.name in existing]
    if not present:
        return states
    for meta in admin.describe_topics([s.name for s in present]):
        state = states[meta["name"]]
        parts = meta.get("partitions") or []
        if len(parts) != state.spec.partitions:
            state.drift.append(f"partitions: plan {state.spec.partitions}, cluster {len(parts)}")
        if (
            parts
            and len(parts[0].get("replicas") or parts[0].get("replica_nodes") or [])
            != state.spec.replication_factor
        ):
            found = len(parts[0].get("replicas") or parts[0].get("replica_nodes") or [])
            state.drift.append(f"replication factor: plan {state.spec.replication_factor}, cluster {found}")
    resources_ = [ConfigResource(ConfigResourceType.TOPIC, s.name) for s in present]
    described = admin.describe_configs(resources_, config_filter="all")
    for name, entries in described.get("topic", {}).items():
        state = states[name]
        for key, want in state.spec.configs.items():
            have = entries.get(key, {})
            value = have.get("value") if isinstance(have, dict) else have
            if value is not None and str(value) != want:
                state.drift.append(f"{key}: plan {want}, cluster {value}")
    return states


def _wait_for_leaders(admin: KafkaAdminClient, names: list[str], timeout_s: float) -> None:
    """New topics are usable once every partition has a leader; producing earlier fails."""
    import time

    deadline = time.monotonic() + timeout_s
    pending = list(names)
    while pending:
        described = admin.describe_topics(pending)
        pending = [
            t["name"]
            for t in described
            if t.get("error_code")
            or not t.get("partitions")
            or any(p.get("leader_id", p.get("leader", -1)) in (-1, None) for p in t["partitions"])
        ]
        if pending and time.monotonic() > deadline:
            raise TopicPlanError(f"{len(pending)} new topics have no partition leader after {timeout_s:.0f}s")
        if pending:
            time.sleep(0.1)


def admin_client(settings: Settings, bootstrap: str) -> KafkaAdminClient:
    from kafka.errors import KafkaError

    from referral_broker.cluster.security import admin_with, client_security

    try:  # with the settings' security (TLS, SCRAM); a refused login raises its own error
        return admin_with(settings, bootstrap, client_security(settings, bootstrap))
    except KafkaError as exc:
        raise BrokerError(
            f"cannot reach Kafka at {bootstrap}: {type(exc).__name__}; start it with "
            "'referral-broker kafka start' or check KAFKA_BOOTSTRAP_SERVERS"
        ) from exc


def list_topics(settings: Settings, bootstrap: str) -> list[TopicState]:
    specs = plan(settings.kafka_topic_profile, settings.kafka_topic_prefix)
    admin = admin_client(settings, bootstrap)
    try:
        return list(_describe(admin, specs).values())
    finally:
        admin.close()


def ensure_topics(settings: Settings, bootstrap: str, *, read_registry: bool = True) -> list[TopicState]:
    """Create every missing topic of the plan; report drift on the ones that exist.

    The fixed topics come first (the organisation registry is one of them); then, unless
    ``read_registry`` is false, the registry topic is read and installed
    (``parties.use_cluster_registry``), and every registered organisation's topics are ensured."""
    profile, prefix = settings.kafka_topic_profile, settings.kafka_topic_prefix
    states = _ensure(settings, bootstrap, fixed_plan(profile, prefix))
    if read_registry:
        party_registry.use_cluster_registry(settings, bootstrap)
    fixed = {s.spec.name for s in states}
    rest = [s for s in plan(profile, prefix) if s.name not in fixed]
    return states + _ensure(settings, bootstrap, rest)


def ensure_party_topics(settings: Settings, bootstrap: str, parties: list[str]) -> list[TopicState]:
    """Create the per-party topics of ``parties`` (``orgs add`` of a new organisation)."""
    specs = [s for s in plan(settings.kafka_topic_profile, settings.kafka_topic_prefix, parties) if s.party]
    return _ensure(settings, bootstrap, specs)


def ensure_with_county(settings: Settings, bootstrap: str, county: Path | None = None) -> list[TopicState]:
    """``topics ensure``, then ``orgs import`` of a county file (the shipped demo county by
    default; idempotent) and its organisations' topics: a demo or benchmark namespace, ready."""
    from referral_broker.organisations import import_file

    states = ensure_topics(settings, bootstrap)
    report = import_file(settings, bootstrap, county)
    return states + provision_parties(settings, bootstrap, report.added + report.unchanged + report.kept_disabled)


def provision_parties(settings: Settings, bootstrap: str, parties: list[str]) -> list[TopicState]:
    """After organisations were registered: install the registry as it is now and create
    their topics (``orgs add``, ``orgs import``)."""
    party_registry.use_cluster_registry(settings, bootstrap)
    return ensure_party_topics(settings, bootstrap, parties)


CREATE_BATCH_PARTITIONS = 500


def _chunks(specs: list[TopicSpec], max_partitions: int) -> list[list[TopicSpec]]:
    chunks: list[list[TopicSpec]] = []
    size = 0
    for spec in specs:
        if not chunks or size + spec.partitions > max_partitions:
            chunks.append([])
            size = 0
        chunks[-1].append(spec)
        size += spec.partitions
    return chunks


def _ensure(settings: Settings, bootstrap: str, specs: list[TopicSpec]) -> list[TopicState]:
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    if not specs:
        return []
    admin = admin_client(settings, bootstrap)
    try:
        states = _describe(admin, specs)
        missing = [st.spec for st in states.values() if not st.exists]
        # KRaft's controller refuses one operation of too many records (a topic, each
        # partition and each config is a record; ~20,000 for 1,000 organisations' topics), so
        # topics are created in requests of at most CREATE_BATCH_PARTITIONS partitions.
        for chunk in _chunks(missing, CREATE_BATCH_PARTITIONS):
            request = {
                s.name: {
                    "num_partitions": s.partitions,
                    "replication_factor": s.replication_factor,
                    "configs": s.configs,
                }
                for s in chunk
            }
            try:
                admin.create_topics(request, timeout_ms=settings.kafka_request_timeout_ms)
            except TopicAlreadyExistsError:
                pass  # a concurrent ensure created them: fine, they are re-described below
            except KafkaError as exc:
                hint = (
                    "; if the cluster has fewer brokers than the plan's replication factor, use the local "
                    "profile (REFERRAL_BROKER_TOPIC_PROFILE=local)"
                    if "replication" in str(exc).lower()
                    else ""
                )
                raise TopicPlanError(
                    f"creating {len(chunk)} topics ({chunk[0].name} ...) failed: {type(exc).__name__}: "
                    f"{str(exc)[:200]}{hint}"
                ) from exc
            for spec in chunk:
                states[spec.name].created = True
                states[spec.name].exists = True
            # Usable once every partition has a leader (bounded by the configured timeout).
            _wait_for_leaders(admin, [s.name for s in chunk], settings.kafka_request_timeout_ms / 1000)
        return list(states.values())
    finally:
        admin.close()


@dataclass(frozen=True)
class GroupLag:
    group: str
    topic: str
    committed: int
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "topic": self.topic,
            "committed": self.committed,
            "end": self.end,
            "lag": self.lag,
        }


def consumer_lag(settings: Settings, bootstrap: str, groups: list[str] | None = None) -> list[GroupLag]:
    """Committed offsets against end offsets (read_committed), summed per group and topic,
    for the groups that read this plan's topics (or the ``groups`` given)."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    names = {s.name for s in plan(settings.kafka_topic_profile, settings.kafka_topic_prefix)}
    admin = admin_client(settings, bootstrap)
    try:
        if groups is None:
            groups = sorted(g["group_id"] if isinstance(g, dict) else g[0] for g in admin.list_groups())
        committed = {g: admin.list_group_offsets({g: None}).get(g, {}) for g in groups}
    except KafkaError as exc:
        raise BrokerError(f"reading consumer groups failed: {type(exc).__name__}") from exc
    finally:
        admin.close()
    wanted = {tp for offsets in committed.values() for tp in offsets if tp.topic in names}
    if not wanted:
        return []
    from referral_broker.cluster.security import client_security

    probe = KafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        client_id=f"{settings.kafka_client_id}-lag",
        bootstrap_timeout_ms=settings.kafka_request_timeout_ms,
        **client_security(settings, bootstrap).kafka_kwargs(),
    )
    try:
        ends = probe.end_offsets(list(wanted))
    except KafkaError as exc:
        raise BrokerError(f"reading end offsets failed: {type(exc).__name__}") from exc
    finally:
        probe.close()
    totals: dict[tuple[str, str], list[int]] = {}
    for group, offsets in committed.items():
        for tp, meta in offsets.items():
            if tp in ends:
                entry = totals.setdefault((group, tp.topic), [0, 0])
                entry[0] += max(meta.offset, 0)
                entry[1] += ends[tp]
    return [GroupLag(g, t, c, e) for (g, t), (c, e) in sorted(totals.items())]
