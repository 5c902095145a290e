"""The ops view (``referral-broker status``): the flow's health at a glance, read from the cluster.

What it reads, and nothing else (no record is ever opened):

* **topics**: every topic of the plan that exists, with its end offsets (``read_committed``:
  the last stable offset, transaction markers included) sampled twice ``interval_s`` apart,
  so each has a rate in offsets per second; planned topics that do not exist are listed;
* **consumer groups**: for every group of this prefix with committed offsets on the plan's
  topics (the router's, the receivers', the inbox's), the lag per topic and the **oldest
  unprocessed age**: the timestamp of the first committed record past the group's committed
  offset, per partition, the oldest of them;
* **dead letters**: depth, how many are recent (newer than ``dead_letter_hours``), the newest
  and oldest time, counts by stage and source topic (from the router's ``rb-dlq-*`` headers,
  read by a function the caller passes in: the core does not import the consumers);
* **key directory**: entries and refused records (category, where, claimed key id), as
  :func:`referral_broker.identity.load_directory` reports them.

The **verdict** is ``healthy`` or ``degraded`` with every reason, each a sentence naming
counts, topics, groups and stages only (never a referral id or a field value):

* dead letters newer than ``dead_letter_hours``;
* a group whose oldest unprocessed record is older than ``max_lag_age_s``;
* any refused key-directory record;
* a planned topic missing.

An unreachable broker is a :class:`~referral_broker.errors.BrokerError` (its own exit code);
the CLI still prints a degraded verdict naming it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from referral_broker.cluster.topics import TopicSpec, admin_client, plan
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, ReferralBrokerError

HEALTHY = "healthy"
DEGRADED = "degraded"


class DeadLetterLike(Protocol):
    """What the ops view needs of a dead letter (``consumers.dead_letters.DeadLetter``)."""

    @property
    def at_ms(self) -> int: ...

    @property
    def stage(self) -> str: ...

    @property
    def source_topic(self) -> str: ...


DeadLetterReader = Callable[[Settings, str], Iterable[DeadLetterLike]]


@dataclass(frozen=True)
class Thresholds:
    interval_s: float = 3.0  # between the two samples of end offsets (the rates)
    max_lag_age_s: float = 300.0  # a group's oldest unprocessed record older than this: degraded
    dead_letter_hours: float = 24.0  # dead letters newer than this: degraded


@dataclass
class TopicStatus:
    name: str
    role: str
    party: str | None
    partitions: int
    end: int
    rate_per_s: float | None


@dataclass
class GroupStatus:
    group: str
    topic: str
    committed: int
    end: int
    lag: int
    oldest_unprocessed_at: str | None = None
    oldest_unprocessed_age_s: float | None = None


@dataclass
class DeadLetterStatus:
    depth: int = 0
    recent: int = 0
    window_hours: float = 24.0
    newest_at: str | None = None
    oldest_at: str | None = None
    by_stage: dict[str, int] = field(default_factory=dict)
    by_source_topic: dict[str, int] = field(default_factory=dict)


@dataclass
class KeyDirectoryStatus:
    entries: int = 0
    refused: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class Status:
    at: str
    bootstrap: str
    prefix: str
    verdict: str
    reasons: list[str]
    thresholds: dict[str, float]
    topics: list[TopicStatus] = field(default_factory=list)
    missing_topics: list[str] = field(default_factory=list)
    groups: list[GroupStatus] = field(default_factory=list)
    dead_letters: DeadLetterStatus = field(default_factory=DeadLetterStatus)
    key_directory: KeyDirectoryStatus = field(default_factory=KeyDirectoryStatus)

    @property
    def healthy(self) -> bool:
        return self.verdict == HEALTHY

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(ms: int | float | None) -> str | None:
    if ms is None or ms < 0:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def unreachable(settings: Settings, bootstrap: str, exc: BrokerError, thresholds: Thresholds) -> Status:
    """The status when the cluster cannot be read: degraded, with the error as the reason."""
    return Status(
        at=_iso(time.time() * 1000) or "",
        bootstrap=bootstrap,
        prefix=settings.kafka_topic_prefix,
        verdict=DEGRADED,
        reasons=[f"broker unreachable: {exc}"],
        thresholds=asdict(thresholds),
    )


# -- reading the cluster ----------------------------------------------------------------------
def _probe_consumer(settings: Settings, bootstrap: str) -> Any:
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    from referral_broker.cluster.security import client_security

    try:
        return KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            client_id=f"{settings.kafka_client_id}-status",
            bootstrap_timeout_ms=settings.kafka_request_timeout_ms,
            request_timeout_ms=max(settings.kafka_request_timeout_ms, 30_000),
            **client_security(settings, bootstrap).kafka_kwargs(),
        )
    except KafkaError as exc:
        raise BrokerError(f"cannot reach Kafka at {bootstrap}: {type(exc).__name__}") from exc


def _end_offsets(consumer: Any, partitions: list[Any]) -> dict[Any, int]:
    from kafka.errors import KafkaError

    if not partitions:
        return {}
    try:
        return dict(consumer.end_offsets(partitions))
    except KafkaError as exc:
        raise BrokerError(f"reading end offsets failed: {type(exc).__name__}") from exc


def _committed_offsets(settings: Settings, bootstrap: str, names: set[str]) -> dict[str, dict[Any, int]]:
    """Group -> topic partition -> committed offset, for the groups of this prefix that have
    committed on one of ``names``."""
    from kafka.errors import KafkaError

    prefix = settings.kafka_topic_prefix
    admin = admin_client(settings, bootstrap)
    try:
        listed = [g["group_id"] if isinstance(g, dict) else g[0] for g in admin.list_groups()]
        groups = sorted(g for g in listed if g.startswith(prefix))
        out: dict[str, dict[Any, int]] = {}
        for group in groups:
            offsets = admin.list_group_offsets({group: None}).get(group, {})
            mine = {tp: meta.offset for tp, meta in offsets.items() if tp.topic in names and meta.offset >= 0}
            if mine:
                out[group] = mine
        return out
    except KafkaError as exc:
        raise BrokerError(f"reading consumer groups failed: {type(exc).__name__}") from exc
    finally:
        admin.close()


def _first_timestamps(
    settings: Settings, bootstrap: str, starts: dict[Any, int], timeout_s: float = 8.0
) -> tuple[dict[Any, int], set[Any]]:
    """For each topic partition, the timestamp (ms) of the first committed record at or after
    its start offset; and the partitions where there is none up to the end (only transaction
    markers or aborted records: nothing left to process)."""
    from kafka import TopicPartition
    from kafka.errors import KafkaError

    from referral_broker.cluster.clients import poll_records

    consumer = _probe_consumer(settings, bootstrap)
    found: dict[Any, int] = {}
    try:
        consumer.assign(list(starts))
        for tp, offset in starts.items():
            consumer.seek(tp, offset)
        ends = _end_offsets(consumer, list(starts))
        pending = {tp for tp in starts if ends.get(tp, 0) > starts[tp]}
        nothing = {tp for tp in starts if tp not in pending}
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for record in poll_records(consumer, 300):
                tp = TopicPartition(record.topic, record.partition)
                if tp in pending:
                    found[tp] = record.timestamp_ms
                    pending.discard(tp)
                    consumer.pause(tp)
            try:
                drained = {tp for tp in pending if consumer.position(tp) >= ends[tp]}
            except KafkaError as exc:
                raise BrokerError(f"reading positions failed: {type(exc).__name__}") from exc
            nothing |= drained
            pending -= drained
    finally:
        consumer.close()
    return found, nothing


def _key_directory(settings: Settings, bootstrap: str) -> KeyDirectoryStatus:
    from referral_broker.identity import load_directory

    try:
        directory = load_directory(settings, bootstrap)
    except BrokerError:
        raise
    except ReferralBrokerError as exc:  # e.g. an unreadable trust anchor: reported, not fatal
        return KeyDirectoryStatus(error=f"{type(exc).__name__}: {exc}")
    refusals = [
        {"where": r.where, "category": r.category, "key_id": r.key_id, "party": r.party, "reason": r.reason}
        for r in directory.refused
    ]
    return KeyDirectoryStatus(
        entries=len(directory),
        refused=len(refusals),
        by_reason=dict(Counter(r.category for r in directory.refused)),
        refusals=refusals,
    )


def _dead_letters(
    settings: Settings, bootstrap: str, reader: DeadLetterReader | None, thresholds: Thresholds, now: float
) -> DeadLetterStatus:
    out = DeadLetterStatus(window_hours=thresholds.dead_letter_hours)
    if reader is None:
        return out
    cutoff_ms = (now - thresholds.dead_letter_hours * 3600) * 1000
    stages: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    newest = oldest = None
    for letter in reader(settings, bootstrap):
        out.depth += 1
        stages[letter.stage or "unknown"] += 1
        sources[letter.source_topic or "unknown"] += 1
        if letter.at_ms >= 0:
            newest = letter.at_ms if newest is None else max(newest, letter.at_ms)
            oldest = letter.at_ms if oldest is None else min(oldest, letter.at_ms)
            if letter.at_ms >= cutoff_ms:
                out.recent += 1
    out.newest_at, out.oldest_at = _iso(newest), _iso(oldest)
    out.by_stage, out.by_source_topic = dict(sorted(stages.items())), dict(sorted(sources.items()))
    return out


def collect(
    settings: Settings,
    bootstrap: str,
    *,
    thresholds: Thresholds | None = None,
    dead_letters: DeadLetterReader | None = None,
    specs: list[TopicSpec] | None = None,
) -> Status:
    """Read the cluster once (two samples of end offsets ``interval_s`` apart) and judge it."""
    from kafka import TopicPartition

    thresholds = thresholds or Thresholds()
    specs = specs if specs is not None else plan(settings.kafka_topic_profile, settings.kafka_topic_prefix)
    by_name = {s.name: s for s in specs}
    admin = admin_client(settings, bootstrap)  # BrokerError when the cluster does not answer
    try:
        existing = set(admin.list_topics())
    except Exception as exc:
        raise BrokerError(f"listing topics failed: {type(exc).__name__}") from exc
    finally:
        admin.close()
    present = [s for s in specs if s.name in existing]
    missing = sorted(s.name for s in specs if s.name not in existing)

    consumer = _probe_consumer(settings, bootstrap)
    try:
        partitions = [
            TopicPartition(s.name, p) for s in present for p in sorted(consumer.partitions_for_topic(s.name) or [])
        ]
        started = time.monotonic()
        first = _end_offsets(consumer, partitions)
        # the slow readings happen between the two samples
        now = time.time()
        # a missing topic is reported as missing; reading it would only wait for it
        roles = {s.role for s in present}
        letters = _dead_letters(settings, bootstrap, dead_letters if "dlq" in roles else None, thresholds, now)
        keys = _key_directory(settings, bootstrap) if "keys" in roles else KeyDirectoryStatus()
        committed = _committed_offsets(settings, bootstrap, set(by_name))
        remaining = thresholds.interval_s - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
        second = _end_offsets(consumer, partitions)
        elapsed = time.monotonic() - started
    finally:
        consumer.close()

    topics: list[TopicStatus] = []
    for spec in present:
        tps = [tp for tp in partitions if tp.topic == spec.name]
        end1 = sum(first.get(tp, 0) for tp in tps)
        end2 = sum(second.get(tp, 0) for tp in tps)
        rate = round((end2 - end1) / elapsed, 3) if elapsed > 0 else None
        topics.append(TopicStatus(spec.name, spec.role, spec.party, len(tps), end2, rate))

    # the oldest unprocessed record of each group: the first record past its committed offset
    groups: list[GroupStatus] = []
    for group, offsets in sorted(committed.items()):
        ends = {tp: second.get(tp, first.get(tp, offset)) for tp, offset in offsets.items()}
        behind = {tp: offset for tp, offset in offsets.items() if ends[tp] > offset}
        stamps, nothing = _first_timestamps(settings, bootstrap, behind) if behind else ({}, set())
        now = time.time()
        per_topic: dict[str, GroupStatus] = {}
        for tp, offset in sorted(offsets.items(), key=lambda kv: (kv[0].topic, kv[0].partition)):
            entry = per_topic.get(tp.topic)
            if entry is None:
                entry = per_topic[tp.topic] = GroupStatus(group, tp.topic, 0, 0, 0)
                groups.append(entry)
            entry.committed += offset
            entry.end += ends[tp]
            if tp not in nothing:  # past the offset only markers or aborted records: no lag
                entry.lag += max(0, ends[tp] - offset)
            ts = stamps.get(tp)
            if ts is not None:
                age = round(max(0.0, now - ts / 1000), 1)
                if entry.oldest_unprocessed_age_s is None or age > entry.oldest_unprocessed_age_s:
                    entry.oldest_unprocessed_age_s = age
                    entry.oldest_unprocessed_at = _iso(ts)

    status = Status(
        at=_iso(now * 1000) or "",
        bootstrap=bootstrap,
        prefix=settings.kafka_topic_prefix,
        verdict=HEALTHY,
        reasons=[],
        thresholds=asdict(thresholds),
        topics=topics,
        missing_topics=missing,
        groups=groups,
        dead_letters=letters,
        key_directory=keys,
    )
    judge(status, thresholds)
    return status


def judge(status: Status, thresholds: Thresholds) -> None:
    """Set ``status.verdict`` and ``status.reasons`` from what was read."""
    reasons: list[str] = []
    dl = status.dead_letters
    if dl.recent:
        stages = ", ".join(f"{stage} {n}" for stage, n in dl.by_stage.items())
        reasons.append(
            f"{dl.recent} dead letters in the last {thresholds.dead_letter_hours:g} h "
            f"(newest {dl.newest_at}; by stage: {stages})"
        )
    for g in status.groups:
        age = g.oldest_unprocessed_age_s
        if g.lag and age is not None and age > thresholds.max_lag_age_s:
            reasons.append(
                f"group {g.group} is {g.lag} behind on {g.topic}; its oldest unprocessed record is "
                f"{age:.0f} s old (threshold {thresholds.max_lag_age_s:g} s)"
            )
    keys = status.key_directory
    if keys.refused:
        by = ", ".join(f"{k} {n}" for k, n in sorted(keys.by_reason.items()))
        reasons.append(f"{keys.refused} key directory records refused ({by})")
    if keys.error:
        reasons.append(f"key directory unreadable: {keys.error}")
    if status.missing_topics:
        shown = ", ".join(status.missing_topics[:5]) + (" ..." if len(status.missing_topics) > 5 else "")
        reasons.append(f"{len(status.missing_topics)} planned topics missing ({shown})")
    status.reasons = reasons
    status.verdict = DEGRADED if reasons else HEALTHY
