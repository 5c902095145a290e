"""Open transactions on this deployment's partitions, which of them hang, and aborting those.

An open transaction holds back every later record of the partitions it wrote from
``read_committed`` readers, and the consumer offsets it wrote from the group that owns them
(UNSTABLE_OFFSET_COMMIT): a router then routes nothing and says ``routing stalled``. The
coordinator ends a transaction at its timeout, so a transaction open much longer than that is
*hanging*: the coordinator no longer tracks it on that partition (KIP-664), and only an
administrator's abort marker (WriteTxnMarkers) ends it. This is ``kafka-transactions.sh
find-hanging`` and ``abort`` for one deployment, from the Python client, so a council needs no
more of Kafka's tools than the broker itself.

What is looked at: every partition of the deployment's topics (its prefix) and the partitions of
``__consumer_offsets`` that hold its groups' offsets (where they wait for their transaction).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from referral_broker.config import Settings
from referral_broker.errors import BrokerError

OFFSETS_TOPIC = "__consumer_offsets"
# The coordinator ends a transaction at its own timeout and sweeps every 10 s
# (transaction.abort.timed.out.transaction.cleanup.interval.ms): open beyond both and a margin,
# nothing will end it.
SWEEP_MARGIN_S = 60.0
# What Kafka's tool assumes of a transaction whose coordinator does not know it: open longer than
# the broker's transaction.max.timeout.ms (15 min by default), and its 5-minute margin.
UNKNOWN_HANGS_AFTER_S = 900.0 + 300.0
_ONGOING = frozenset({"Ongoing", "PrepareCommit", "PrepareAbort", "PrepareEpochFence"})


@dataclass(frozen=True)
class OpenTransaction:
    """One producer's open transaction on one partition, as its leader and its coordinator say."""

    topic: str
    partition: int
    producer_id: int
    producer_epoch: int
    coordinator_epoch: int
    first_offset: int  # the first record it holds back
    open_s: float  # since it began (the coordinator's clock), else since its producer last wrote here
    transactional_id: str | None  # None: no coordinator knows this producer id
    state: str | None
    timeout_s: float | None
    hanging: bool
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "open_s": round(self.open_s, 1)}


def _verdict(
    open_s: float, tp: Any, described: Any | None, epoch: int, older_than_s: float | None
) -> tuple[bool, str]:
    """Whether a transaction open ``open_s`` on ``tp`` hangs, and why (said either way)."""
    if older_than_s is not None and open_s > older_than_s:
        return True, f"open {open_s:.0f}s, longer than the {older_than_s:.0f}s asked"
    if described is None:
        hangs = open_s > UNKNOWN_HANGS_AFTER_S
        return hangs, "no coordinator knows its producer" + (
            f" and it has been open {open_s:.0f}s" if hangs else " yet (it may have just begun)"
        )
    state = getattr(described.state, "value", described.state)
    if state not in _ONGOING or described.producer_epoch != epoch:
        return True, f"its coordinator has it as {state}, epoch {described.producer_epoch}: no marker will come"
    if tp not in described.topic_partitions:
        return True, "its coordinator's transaction does not include this partition: no marker will come"
    limit = described.transaction_timeout_ms / 1000 + SWEEP_MARGIN_S
    if open_s > limit:
        return True, f"open {open_s:.0f}s, past its {described.transaction_timeout_ms / 1000:.0f}s timeout and the sweep"
    return False, f"ongoing, within its {described.transaction_timeout_ms / 1000:.0f}s timeout"


def offsets_partition(group: str, partitions: int) -> int:
    """The ``__consumer_offsets`` partition that holds ``group``'s offsets: Kafka's own choice,
    the group id's Java ``String.hashCode`` (UTF-16 code units, 32-bit) made non-negative,
    modulo the topic's partition count."""
    h = 0
    raw = group.encode("utf-16-be")
    for i in range(0, len(raw), 2):
        h = (31 * h + int.from_bytes(raw[i : i + 2], "big")) & 0xFFFFFFFF
    h = h - (1 << 32) if h >= 1 << 31 else h
    return (0 if h == -(1 << 31) else abs(h)) % partitions


def _partitions(admin: Any, prefix: str) -> list[Any]:
    """The deployment's topic partitions, and the ``__consumer_offsets`` partitions of its groups
    (all of them when there is no prefix: the cluster is the deployment's)."""
    from kafka import TopicPartition

    names = [t for t in admin.list_topics() if t != OFFSETS_TOPIC and t.startswith(prefix)]
    counts = {m["name"]: len(m.get("partitions") or []) for m in admin.describe_topics([*names, OFFSETS_TOPIC])}
    out = [TopicPartition(name, p) for name in names for p in range(counts.get(name, 0))]
    offsets = counts.get(OFFSETS_TOPIC, 0)
    if offsets and not prefix:
        out += [TopicPartition(OFFSETS_TOPIC, p) for p in range(offsets)]
    elif offsets:
        groups = {g["group_id"] if isinstance(g, dict) else g[0] for g in admin.list_groups()}
        held = {offsets_partition(g, offsets) for g in groups if isinstance(g, str) and g.startswith(prefix)}
        out += [TopicPartition(OFFSETS_TOPIC, p) for p in sorted(held)]
    return out


def open_transactions(
    settings: Settings, bootstrap: str, *, older_than_s: float | None = None
) -> list[OpenTransaction]:
    """Every open transaction on the deployment's partitions, each judged hanging or not;
    ``older_than_s`` also counts as hanging any open longer than that (an operator's call)."""
    from kafka.errors import KafkaError

    from referral_broker.cluster.topics import admin_client

    admin = admin_client(settings, bootstrap)
    try:
        producers = admin.describe_producers(_partitions(admin, settings.kafka_topic_prefix))
        found = [
            (tp, p)
            for tp, state in producers.items()
            for p in state.active_producers
            if p.current_transaction_start_offset >= 0
        ]
        ids = sorted({p.producer_id for _, p in found})
        listed = admin.list_transactions(producer_id_filters=ids) if ids else {}
        by_producer = {t.producer_id: t.transactional_id for rows in listed.values() for t in rows}
        described = admin.describe_transactions(sorted(set(by_producer.values()))) if by_producer else {}
    except KafkaError as exc:
        raise BrokerError(f"reading open transactions failed: {type(exc).__name__}: {exc}") from exc
    finally:
        admin.close()
    now_ms = time.time() * 1000
    out = []
    for tp, p in found:
        tid = by_producer.get(p.producer_id)
        txn = described.get(tid) if tid is not None else None
        if txn is not None and txn.producer_id != p.producer_id:
            txn = None  # the id has passed to another producer since
        began = txn.transaction_start_time_ms if txn is not None and txn.transaction_start_time_ms > 0 else None
        open_s = max(now_ms - (began if began is not None else p.last_timestamp), 0.0) / 1000
        hanging, why = _verdict(open_s, tp, txn, p.producer_epoch, older_than_s)
        out.append(
            OpenTransaction(
                topic=tp.topic,
                partition=tp.partition,
                producer_id=p.producer_id,
                producer_epoch=p.producer_epoch,
                coordinator_epoch=p.coordinator_epoch,
                first_offset=p.current_transaction_start_offset,
                open_s=open_s,
                transactional_id=tid,
                state=None if txn is None else str(txn.state.value),
                timeout_s=None if txn is None else txn.transaction_timeout_ms / 1000,
                hanging=hanging,
                why=why,
            )
        )
    return sorted(out, key=lambda t: (not t.hanging, t.topic, t.partition, t.producer_id))


def abort(settings: Settings, bootstrap: str, transaction: OpenTransaction) -> None:
    """Write an abort marker for ``transaction`` on its partition (the partition's leader checks
    the producer id and epoch). Needs the cluster's ClusterAction right: the administrator."""
    from kafka import TopicPartition
    from kafka.admin._transactions import AbortTransactionSpec
    from kafka.errors import KafkaError

    from referral_broker.cluster.topics import admin_client

    spec = AbortTransactionSpec(
        TopicPartition(transaction.topic, transaction.partition),
        transaction.producer_id,
        transaction.producer_epoch,
        transaction.coordinator_epoch,
    )
    admin = admin_client(settings, bootstrap)
    try:
        admin.abort_transaction(spec)
    except KafkaError as exc:
        raise BrokerError(
            f"aborting producer {transaction.producer_id}'s transaction on "
            f"{transaction.topic}-{transaction.partition} failed: {type(exc).__name__}"
        ) from exc
    finally:
        admin.close()
