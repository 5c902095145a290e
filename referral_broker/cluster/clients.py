"""The one place that builds Kafka producers and consumers, so every stage gets the same
durability: ``acks=all`` with idempotence, retries bounded by a delivery timeout, delivery
errors raised (never swallowed), consumers that commit only after processing and read only
committed transactional data.

Every client carries the security settings of ``cluster/security.py`` (TLS, SCRAM). A refused
login, an untrusted certificate or the wrong protocol fails the constructor at once with its
own error; an ACL refusal is ``NotAuthorisedError`` ("not authorised to write topic T").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, UnknownTopicOrPartitionError
from kafka.partitioner.default import DefaultPartitioner, murmur2
from kafka.producer.transaction_manager import (
    AddOffsetsToTxnHandler,
    ConsumerGroupMetadata,
    TransactionState,
    TxnOffsetCommitHandler,
)

from referral_broker.cluster.security import admin_with, authorisation_error, client_security, connecting
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, NotAuthorisedError
from referral_broker.structured_log import get_logger

log = get_logger(__name__)

Headers = list[tuple[str, bytes]]

# Kafka's own wait before trying a transactional request again while the last transaction is
# still completing (its clients' ADD_PARTITIONS_RETRY_BACKOFF_MS): see Producer.__init__.
TRANSACTION_RETRY_BACKOFF_MS = 20


def _translate(exc: KafkaError, what: str, bootstrap: str, action: str = "use", resource: str | None = None) -> BrokerError:
    refused = authorisation_error(exc, action, resource)
    if refused is not None:
        return refused
    name = type(exc).__name__
    if "bootstrap" in str(exc).lower():
        return BrokerError(
            f"cannot reach Kafka at {bootstrap} ({what}); start it with 'referral-broker kafka "
            "start' or check KAFKA_BOOTSTRAP_SERVERS"
        )
    return BrokerError(f"{what} failed: {name}")


class KeyedPartitioner(DefaultPartitioner):  # type: ignore[misc]  # kafka-python is untyped
    """kafka-python's keyed choice of partition (murmur2 of the key, as Java's), remembering
    the last keys' hashes: its murmur2 is pure Python (about 16 µs), and a router sends a
    referral's 9 messages under the same key, to several topics, one after another. A few
    keys are enough, and a long send's memory stays flat (``test_send_report``): a 4,096-key
    cache held 150-200 bytes a row more for a 5,000-row file than for a 1,000-row one."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._hashes: dict[bytes, int] = {}

    def partition(
        self, topic: str, key: Any, serialized_key: bytes | None, value: Any, serialized_value: Any, cluster: Any
    ) -> int:
        if serialized_key is None:
            return int(super().partition(topic, key, serialized_key, value, serialized_value, cluster))
        found = self._hashes.get(serialized_key)
        if found is None:
            if len(self._hashes) >= self.size:
                self._hashes.clear()
            found = self._hashes[serialized_key] = murmur2(serialized_key) & 0x7FFFFFFF
        partitions = sorted(cluster.partitions_for_topic(topic))
        return int(partitions[found % len(partitions)])


def build_producer(
    settings: Settings, bootstrap: str, *, transactional_id: str | None = None, **overrides: Any
) -> Producer:
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": settings.kafka_client_id,
        "acks": "all",
        "enable_idempotence": True,
        # Retries are bounded by time, not count (Kafka's own default): a freshly created or
        # moving partition answers NotLeader for a while, and a count runs out too soon.
        "retries": 2**31 - 1,
        "delivery_timeout_ms": 60_000,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        "bootstrap_timeout_ms": settings.kafka_request_timeout_ms,
        "max_block_ms": settings.kafka_request_timeout_ms,
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "allow_auto_create_topics": False,
        "partitioner": KeyedPartitioner(),
    }
    if transactional_id:
        config["transactional_id"] = transactional_id
    security = client_security(settings, bootstrap)
    config.update(security.kafka_kwargs())
    config.update(overrides)
    # kafka-python waits for a transaction's offsets, commit or abort without a bound; after
    # the transaction timeout the coordinator has aborted it anyway, so wait no longer than that.
    wait_s = max(config["request_timeout_ms"], config.get("transaction_timeout_ms", 60_000)) / 1000
    try:
        with connecting(security, bootstrap, "creating a producer"):
            kafka_producer = KafkaProducer(**config)
        return Producer(kafka_producer, bootstrap, transactional=bool(transactional_id), transaction_wait_s=wait_s)
    except KafkaError as exc:
        raise _translate(exc, "creating a producer", bootstrap) from exc


def publish_records(
    settings: Settings, bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]], *, kind: bytes
) -> int:
    """Produce (key, value) records to a compacted directory-style topic, each with header
    ``rb-kind``, and wait until all are durable; returns how many. The key directory and the
    organisation registry publish this way."""
    producer = build_producer(settings, bootstrap)
    try:
        count = 0
        for key, value in records:
            producer.send(topic, value=value, key=key, headers=[("rb-kind", kind)])
            count += 1
        producer.flush()
        return count
    finally:
        producer.close()


class _AddOffsetsAhead(AddOffsetsToTxnHandler):  # type: ignore[misc]
    """kafka-python's AddOffsetsToTxn without the TxnOffsetCommit it chains on success: the
    offsets are not known yet (:meth:`Producer._add_offsets_ahead`)."""

    def handle_response(self, response: Any) -> None:
        if response.error_code == 0:
            self.transaction_manager._transaction_started = True
            self._result.done()
        else:
            super().handle_response(response)


class Producer:
    """A thin wrapper whose sends either succeed durably or raise :class:`BrokerError`."""

    def __init__(
        self, producer: KafkaProducer, bootstrap: str, *, transactional: bool, transaction_wait_s: float = 60.0
    ) -> None:
        self._producer = producer
        self._bootstrap = bootstrap
        self._pending: list[tuple[str, Any]] = []
        self.transactional = transactional
        self.transaction_wait_s = transaction_wait_s
        self._offsets_ahead: tuple[str, Any] | None = None  # (group, the AddOffsetsToTxn's result)
        self._committing: Any = None  # the EndTxn(commit)'s result, once sent
        if transactional:
            self._shorten_transactional_retry_backoff()
            try:
                producer.init_transactions()
            except KafkaError as exc:
                producer.close(timeout=0)  # its sender thread would otherwise outlive the error
                tid = producer.config.get("transactional_id")
                raise _translate(exc, "initialising transactions", bootstrap, "write", tid) from exc

    def _shorten_transactional_retry_backoff(self) -> None:
        """Back off ``TRANSACTION_RETRY_BACKOFF_MS`` before a transactional request is tried again.

        A transaction's first AddPartitionsToTxn is sometimes refused with CONCURRENT_TRANSACTIONS
        (1-7 times in 1,400 transactions of a router at 200/s): the coordinator is still writing
        the markers of the one just committed. Kafka's clients (and kafka-python's own handler)
        then retry after 20 ms, but kafka-python's sender sleeps its ``retry_backoff_ms``
        (100 ms) before every transactional retry, on the network thread: the whole batch, and
        every referral queued behind it, waited 100 ms more. The sender uses its own copy of the
        setting only for that sleep (every transactional retry, a coordinator lookup in an
        outage too) and for how long it polls before looking again; produce retries keep the
        producer's 100 ms."""
        sender = getattr(self._producer, "_sender", None)
        if sender is not None and "retry_backoff_ms" in sender.config:
            sender.config["retry_backoff_ms"] = min(sender.config["retry_backoff_ms"], TRANSACTION_RETRY_BACKOFF_MS)

    def send(
        self, topic: str, value: bytes, key: bytes | None = None, headers: Headers | None = None
    ) -> Any:
        """Queue one record; :meth:`flush` (or a transaction's commit) confirms it or raises.
        Returns kafka-python's future of its ``RecordMetadata`` (partition and offset)."""
        try:
            future = self._producer.send(topic, value=value, key=key, headers=headers or [])
        except KafkaError as exc:
            raise _translate(exc, f"sending to {topic}", self._bootstrap, "write", topic) from exc
        self._pending.append((topic, future))
        return future

    def flush(self, timeout_s: float = 60.0) -> int:
        """Wait for every queued record; raise on the first delivery failure."""
        pending, self._pending = self._pending, []
        topic = None
        try:
            self._producer.flush(timeout=timeout_s)
            for sent in pending:
                topic = sent[0]
                sent[1].get(timeout=timeout_s)
        except KafkaError as exc:
            # a topic this identity may not write: flush() succeeds, the record's future fails
            raise _translate(exc, "delivering records", self._bootstrap, "write", topic) from exc
        return len(pending)

    def begin(self, offsets_for: str | None = None) -> None:
        """Begin a transaction. With ``offsets_for`` (a consumer group), the transaction's
        offsets are announced for that group at once (:meth:`_add_offsets_ahead`), so that
        :meth:`commit` with that group's offsets is one round trip shorter."""
        self._offsets_ahead = None
        try:
            self._producer.begin_transaction()
            if offsets_for is not None:
                self._offsets_ahead = (offsets_for, self._add_offsets_ahead(offsets_for))
        except KafkaError as exc:  # e.g. ProducerFencedError once the coordinator timed it out
            raise _translate(exc, "beginning a transaction", self._bootstrap) from exc

    def _add_offsets_ahead(self, group_id: str) -> Any:
        """Send the transaction's AddOffsetsToTxn for ``group_id`` now, in the background.

        kafka-python's ``send_offsets_to_transaction`` sends AddOffsetsToTxn (the coordinator
        adds the group's offsets partition to the transaction) and only on its answer the
        TxnOffsetCommit: two round trips at the end of every batch, then EndTxn. The first
        needs only the group's name, so it goes out while the batch is routed; it also opens
        the transaction on the broker from the start of the batch. Errors are kafka-python's
        own handler's (a refusal while the last transaction's markers are written is retried)."""
        manager = self._producer._transaction_manager
        handler = _AddOffsetsAhead(manager, ConsumerGroupMetadata(group_id=group_id), {})
        with manager._lock:
            manager._enqueue_request(handler)
        self._producer._sender.wakeup()
        return handler.result

    def _txn_offset_commit(self, manager: Any, offsets: dict[TopicPartition, Any], group_metadata: Any) -> Any:
        """The TxnOffsetCommit that kafka-python sends once AddOffsetsToTxn is answered, sent
        now: :meth:`_add_offsets_ahead` has had its answer."""
        with manager._lock:
            manager._maybe_fail_with_error()
            manager._pending_txn_offset_commits.update(offsets)
            handler = TxnOffsetCommitHandler(manager, group_metadata, manager._pending_txn_offset_commits, None)
            manager._enqueue_request(handler)
        return handler.result

    def _finish(self, step: Callable[[Any], Any], what: str) -> None:
        """One transactional round trip, waited for at most ``transaction_wait_s``.

        kafka-python's own ``send_offsets_to_transaction``/``commit_transaction``/
        ``abort_transaction`` wait on the result with no timeout, and a request lost with a
        broker that died under it is never answered: the caller would hang after the broker
        is back. This drives the same transaction manager calls with a bounded wait. A
        timeout leaves the outcome open (the commit may still land), so the caller must
        rebuild the producer under the same transactional id, which settles it, and resume
        from the committed offsets."""
        manager = self._producer._transaction_manager
        if manager is None:
            raise BrokerError(f"{what}: this producer has no transactional id")
        result = step(manager)
        self._producer._sender.wakeup()
        if not result.wait(timeout_ms=int(self.transaction_wait_s * 1000)):
            raise BrokerError(f"{what} got no answer within {self.transaction_wait_s:.0f}s")

    def commit(self, offsets: dict[TopicPartition, Any] | None = None, group_metadata: Any = None) -> None:
        """Commit the open transaction, with the consumer offsets it covers when given."""
        ahead, self._offsets_ahead = self._offsets_ahead, None
        try:
            if offsets and ahead is not None and ahead[0] == getattr(group_metadata, "group_id", None):
                self._finish(lambda m: ahead[1], "adding a consumer group to a transaction")
                self._finish(
                    lambda m: self._txn_offset_commit(m, offsets, group_metadata),
                    "adding consumer offsets to a transaction",
                )
            elif offsets:
                self._finish(
                    lambda m: m.send_offsets_to_transaction(offsets, group_metadata),
                    "adding consumer offsets to a transaction",
                )
            self._finish(self._begin_commit, "committing a transaction")
            self._pending.clear()
            self._end_completion_flush()
        except KafkaError as exc:
            group = getattr(group_metadata, "group_id", None)
            raise _translate(exc, "committing a transaction", self._bootstrap, "read", group) from exc

    def _begin_commit(self, manager: Any) -> Any:
        self._committing = manager.begin_commit()
        return self._committing

    def end_interrupted(self) -> str:
        """End the transaction that a stop interrupted, as far as it had gone: ``"aborted"``
        when it was still open; ``"committed"`` when its commit had been sent (the coordinator
        has it: an abort is refused then, so this waits for the answer); ``"ended"`` when it
        had already ended. Raises when the abort or the commit fails or gets no answer in
        ``transaction_wait_s``; the caller then fences the transactional id."""
        manager = self._producer._transaction_manager
        with manager._lock:
            state = manager._current_state
        if state == TransactionState.READY:
            return "ended"
        if state == TransactionState.COMMITTING_TRANSACTION and self._committing is not None:
            sent = self._committing
            self._finish(lambda m: sent, "committing a transaction")  # its answer, waited for as a commit's
            return "committed"
        self.abort()
        return "aborted"

    def abort(self) -> None:
        self._pending.clear()
        self._offsets_ahead = None
        try:
            self._finish(lambda m: m.begin_abort(), "aborting a transaction")
        except KafkaError as exc:
            raise _translate(exc, "aborting a transaction", self._bootstrap) from exc
        self._end_completion_flush()

    def _end_completion_flush(self) -> None:
        """End the flush kafka-python's sender began to finish the transaction just settled.

        To complete a transaction whose records are not all delivered yet, its sender calls
        ``begin_flush()`` and nothing ever ends it. Left counted, every later record is sent
        the moment it is queued, as if ``linger_ms`` were 0: a router then sent about one
        produce request a referral, and its network thread cost 1.5 ms of CPU a referral.
        Only the caller's thread flushes this producer, so once the transaction is settled
        any flush still counted is the sender's."""
        accumulator = self._producer._accumulator
        while accumulator.flush_in_progress():
            accumulator._flushes_in_progress.decrement()

    def close(self, timeout_s: float = 10.0) -> None:
        """Close, waiting up to ``timeout_s`` for queued records. kafka-python's close raises
        when they cannot be delivered (the cluster is away, or the transaction they belong to
        is being given up) and leaves its sender running: stop it without them."""
        try:
            self._producer.close(timeout=timeout_s)
        except KafkaError:
            self._stop_sender(timeout_s)
            self._producer._closed = True  # nothing left for __del__ to flush

    def abandon(self, timeout_s: float = 5.0) -> None:
        """Stop at once, sending nothing this producer still holds: for one whose transaction
        is given up. ``close`` flushes first, so records of a transaction that has already been
        aborted or fenced could reach the log after it ended (a broker back from an outage
        while a new producer takes over). Waits up to ``timeout_s`` for the sender to stop."""
        self._stop_sender(timeout_s)  # before anything can make the held records ready
        with contextlib.suppress(KafkaError):
            self._producer.close(timeout=0)  # nothing is left to send: releases the rest
        self._producer._closed = True

    def _stop_sender(self, timeout_s: float) -> None:
        """Stop kafka-python's sender thread now, sending nothing more; wait up to ``timeout_s``."""
        sender = getattr(self._producer, "_sender", None)
        if sender is not None:
            sender.force_close()
            sender.join(timeout_s)

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LoggingRebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]  # kafka-python is untyped
    """Offsets are committed after each processed batch, so a revocation loses no work; the
    listener records what moved and lets the owner drop per-partition state. kafka-python
    calls it from inside ``poll()`` (and ``close()``), never while the owner is between polls.
    Partitions *lost* (the member was evicted: session timeout, unknown member) reach the
    same callback as partitions revoked."""

    def __init__(self, group: str, on_revoked: Callable[[list[TopicPartition]], None] | None) -> None:
        self.group = group
        self.on_revoked_cb = on_revoked

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        log.info("partitions revoked", group=self.group, count=len(revoked))
        if self.on_revoked_cb and revoked:
            self.on_revoked_cb(list(revoked))

    def on_partitions_lost(self, lost: list[TopicPartition]) -> None:
        log.warning("partitions lost: this member was evicted from the group", group=self.group, count=len(lost))
        if self.on_revoked_cb and lost:
            self.on_revoked_cb(list(lost))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned", group=self.group, count=len(assigned))


def build_consumer(
    settings: Settings,
    bootstrap: str,
    topics: Iterable[str],
    *,
    group_id: str | None,
    on_revoked: Callable[[list[TopicPartition]], None] | None = None,
    pattern: str | None = None,
    **overrides: Any,
) -> KafkaConsumer:
    """A consumer that never auto-commits and reads only committed transactional data.
    With ``pattern`` (a group member only) it subscribes to every topic matching it, now and
    as topics are created (picked up at the next metadata refresh)."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": settings.kafka_client_id,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_poll_records": 500,
        "request_timeout_ms": max(settings.kafka_request_timeout_ms, 30_000),
        "bootstrap_timeout_ms": settings.kafka_request_timeout_ms,
        "allow_auto_create_topics": False,
    }
    security = client_security(settings, bootstrap)
    config.update(security.kafka_kwargs())
    config.update(overrides)
    try:
        with connecting(security, bootstrap, "creating a consumer"):
            consumer = KafkaConsumer(**config)
        topics = list(topics)
        if security.sasl and topics:
            _check_visible(consumer, topics, security.username, lambda: admin_with(settings, bootstrap, security))
        if group_id is None:
            partitions = [
                TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or [])
            ]
            consumer.assign(partitions)
        elif pattern is not None:
            consumer.subscribe(pattern=pattern, listener=_LoggingRebalanceListener(group_id, on_revoked))
        else:
            consumer.subscribe(topics, listener=_LoggingRebalanceListener(group_id, on_revoked))
    except KafkaError as exc:
        raise _translate(exc, "creating a consumer", bootstrap, "read", group_id) from exc
    return consumer


def _check_visible(
    consumer: KafkaConsumer, topics: list[str], user: str | None, admin: Callable[[], Any]
) -> None:
    """A topic this identity may not describe reads as empty, not as an error (kafka-python
    polls it quietly forever): refuse it here. Listing all topics cannot tell a missing topic
    from a hidden one; asking for the topics by name can (UNKNOWN_TOPIC_OR_PARTITION only
    comes back to an identity allowed to describe them)."""
    try:
        visible = consumer.topics()
    except KafkaError as exc:
        consumer.close()
        raise _translate(exc, "listing topics", "the cluster", "describe") from exc
    hidden = sorted(t for t in topics if t not in visible)
    if not hidden:
        return
    consumer.close()
    missing = _missing_topics(admin, hidden)
    if missing:
        raise BrokerError(f"the topic {', '.join(missing)} does not exist; run 'referral-broker topics ensure'")
    raise NotAuthorisedError(f"not authorised to read topic {', '.join(hidden)} as user {user} (or it does not exist)")


def _missing_topics(admin: Callable[[], Any], topics: list[str]) -> list[str]:
    """The topics the cluster says do not exist; empty when it will not say (no describe right)."""
    try:
        client = admin()
    except (KafkaError, BrokerError):
        return []
    try:
        described = client.describe_topics(topics)
    except KafkaError:
        return []
    finally:
        client.close()
    unknown = UnknownTopicOrPartitionError.errno
    return sorted(d["name"] for d in described if d.get("error_code") == unknown)


@dataclass(frozen=True)
class Record:
    """A consumed record, detached from kafka-python's types."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int

    def header(self, name: str) -> bytes | None:
        """The value of the first header called ``name``, or None."""
        return next((bytes(v) for n, v in self.headers if n == name), None)


def poll_records(consumer: KafkaConsumer, timeout_ms: int = 500, max_records: int | None = None) -> list[Record]:
    try:
        batch = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
    except KafkaError as exc:
        refused = authorisation_error(exc, "read")
        raise refused or BrokerError(f"polling failed: {type(exc).__name__}") from exc
    out: list[Record] = []
    for records in batch.values():
        for r in records:
            headers = [(k, v if v is not None else b"") for k, v in (r.headers or [])]
            out.append(Record(r.topic, r.partition, r.offset, r.key, r.value, headers, r.timestamp))
    return out


class IdleTimer:
    """Idle time for ``--stop-when-idle``, counted from the moment the consumer holds
    partitions: joining a group can take seconds on a busy machine, and that is not idleness.
    No partitions within ``assign_timeout_s`` is an error, not an empty result."""

    def __init__(self, consumer: KafkaConsumer, idle_s: float, assign_timeout_s: float = 60.0) -> None:
        self.consumer = consumer
        self.idle_s = idle_s
        self.assign_timeout_s = assign_timeout_s
        self.started = time.monotonic()
        self.last: float | None = None

    def activity(self) -> None:
        self.last = time.monotonic()

    def expired(self) -> bool:
        now = time.monotonic()
        if self.last is None:
            if self.consumer.assignment():
                self.last = now
            elif now - self.started > self.assign_timeout_s:
                topics = ", ".join(sorted(self.consumer.subscription() or [])) or "the topics"
                raise BrokerError(
                    f"no partition of {topics} was assigned within {self.assign_timeout_s:.0f}s; "
                    "does the topic exist? ('referral-broker topics ensure')"
                )
            return False
        return now - self.last >= self.idle_s


def drain(consumer: KafkaConsumer, *, idle_s: float, poll_timeout_ms: int = 500) -> Iterator[list[Record]]:
    """Yield batches until nothing has arrived for ``idle_s`` seconds (see :class:`IdleTimer`)."""
    timer = IdleTimer(consumer, idle_s)
    while True:
        batch = poll_records(consumer, poll_timeout_ms)
        if batch:
            timer.activity()
            yield batch
        elif timer.expired():
            return


def commit_batch(consumer: KafkaConsumer, batch: list[Record]) -> None:
    """Commit the offsets after ``batch`` (call only once it is fully processed)."""
    if not batch:
        return
    try:
        consumer.commit(next_offsets(batch, consumer))
    except KafkaError as exc:
        refused = authorisation_error(exc, "read", consumer.config.get("group_id"))
        raise refused or BrokerError(f"committing offsets failed: {type(exc).__name__}") from exc


def end_offsets(consumer: KafkaConsumer, partitions: list[Any], known: dict[Any, int] | None = None) -> dict[Any, int]:
    """The end offsets of ``partitions``: ``known`` when it has every one of them (asked for
    just now with another topic's, in one request), else asked of the cluster now."""
    if known is not None and all(tp in known for tp in partitions):
        return known
    return dict(consumer.end_offsets(partitions))


def read_to_end(
    consumer: KafkaConsumer,
    partitions: Iterable[Any],
    end: dict[Any, int],
    *,
    what: str,
    timeout_s: float,
    stall: bool = False,
) -> Iterator[list[Record]]:
    """Each poll's records until every one of ``partitions`` is read up to its offset in
    ``end`` (a partition missing from it has nothing to read). Transaction markers and aborted
    records move a position without a record, so the positions, not the records, say when.

    Past ``timeout_s`` it raises a ``BrokerError`` naming ``what`` ("reading {what} ..."): from
    the start, or with ``stall`` since the last poll that brought records, for a reader whose
    topic may be long."""
    remaining = {tp for tp in partitions if consumer.position(tp) < end.get(tp, 0)}
    deadline = time.monotonic() + timeout_s
    while remaining:
        if time.monotonic() > deadline:
            late = "stalled before its end" if stall else f"timed out after {timeout_s:.0f}s"
            raise BrokerError(f"reading {what} {late}")
        batch = poll_records(consumer, 500)
        if batch and stall:
            deadline = time.monotonic() + timeout_s
        yield batch
        remaining = {tp for tp in remaining if consumer.position(tp) < end[tp]}


def next_offsets(batch: list[Record], consumer: KafkaConsumer | None = None) -> dict[TopicPartition, Any]:
    """The offsets to commit after ``batch``. With the consumer, its position when that is
    further on: transaction markers after the last record are then counted as read, so a
    caught-up group shows no lag."""
    from kafka.structs import OffsetAndMetadata

    after: dict[TopicPartition, int] = {}
    for r in batch:
        tp = TopicPartition(r.topic, r.partition)
        after[tp] = max(after.get(tp, 0), r.offset + 1)
    if consumer is not None:
        for tp, offset in after.items():
            after[tp] = max(offset, consumer.position(tp) or 0)
    return {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in after.items()}
