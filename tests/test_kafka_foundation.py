"""The foundation against the real broker: topic plan, durable producer, committing consumer."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from county import OTHER_SCHOOL, SCHOOL
from kafka import TopicPartition
from kafka.producer import sender as kafka_sender
from kafka.structs import OffsetAndMetadata

from referral_broker.cluster.clients import (
    TRANSACTION_RETRY_BACKOFF_MS,
    build_consumer,
    build_producer,
    commit_batch,
    drain,
    next_offsets,
    read_to_end,
)
from referral_broker.cluster.topics import ensure_topics, list_topics, plan, topic_name
from referral_broker.config import Settings
from referral_broker.errors import BrokerError


def test_plan_carries_production_values_and_local_override() -> None:
    prod = {s.name: s for s in plan("production")}
    local = {s.name: s for s in plan("local")}
    assert prod.keys() == local.keys()
    intake = prod[f"referrals.intake.{SCHOOL}"]
    assert intake.replication_factor == 3
    assert intake.configs["min.insync.replicas"] == "2"
    assert intake.configs["unclean.leader.election.enable"] == "false"
    assert local[f"referrals.intake.{SCHOOL}"].replication_factor == 1
    assert local[f"referrals.intake.{SCHOOL}"].configs["min.insync.replicas"] == "1"
    # every organisation has its own topics (a literal ACL per organisation); no partner kind has any
    assert {f"referrals.{role}.{OTHER_SCHOOL}" for role in ("intake", "out", "status")} <= prod.keys()
    assert not any(name.endswith((".schools", ".health", ".charities")) for name in prod)
    assert prod["keys.directory"].configs["cleanup.policy"] == "compact"
    roles = {s.role for s in prod.values()}
    assert roles == {"intake", "out", "status", "archive", "audit", "audit_heads", "dlq", "keys", "orgs", "deliveries"}


def test_names_put_the_party_last_for_prefix_acls() -> None:
    for spec in plan("production"):
        if spec.party:
            assert spec.name.endswith("." + spec.party)


def test_ensure_creates_then_is_idempotent(namespace: Settings, kafka_bootstrap: str) -> None:
    settings = namespace
    first = ensure_topics(settings, kafka_bootstrap)
    assert all(s.created for s in first)
    second = ensure_topics(settings, kafka_bootstrap)
    assert not any(s.created for s in second)
    assert all(s.exists and not s.drift for s in second)
    listed = {s.spec.name: s for s in list_topics(settings, kafka_bootstrap)}
    assert listed[topic_name(settings, "dlq")].exists


def test_ensure_reports_drift(namespace: Settings, kafka_bootstrap: str) -> None:
    settings = namespace
    # the shipped county's topics (this namespace's registry is empty: no organisation topics)
    ensure_topics(settings, kafka_bootstrap, read_registry=False)
    drifted = settings.replace(kafka_topic_profile="local")  # an organisation's intake: local plans 3, test 2
    states = ensure_topics(drifted, kafka_bootstrap, read_registry=False)
    intake = next(s for s in states if s.spec.name == topic_name(drifted, "intake", SCHOOL))
    assert any(d.startswith("partitions: plan 3, cluster 2") for d in intake.drift), intake


def test_round_trip_with_project_producer_and_consumer(topics: Settings, kafka_bootstrap: str) -> None:
    topic = topic_name(topics, "intake", SCHOOL)
    sent = {f"ref-{i}": uuid.uuid4().bytes for i in range(50)}
    with build_producer(topics, kafka_bootstrap) as producer:
        for key, value in sent.items():
            producer.send(topic, value, key=key.encode(), headers=[("rb-test", b"1")])
        assert producer.flush() == 50
    group = f"g-{uuid.uuid4().hex[:8]}"
    consumer = build_consumer(topics, kafka_bootstrap, [topic], group_id=group)
    got: dict[str, bytes] = {}
    try:
        for batch in drain(consumer, idle_s=3):
            for r in batch:
                got[r.key.decode()] = r.value
                assert ("rb-test", b"1") in r.headers
            commit_batch(consumer, batch)
            if len(got) == len(sent):
                break
    finally:
        consumer.close()
    assert got == sent
    # committed: a new consumer in the same group reads nothing more
    again = build_consumer(topics, kafka_bootstrap, [topic], group_id=group)
    try:
        leftovers = [r for batch in drain(again, idle_s=2) for r in batch]
    finally:
        again.close()
    assert leftovers == []


def test_transactional_producer_hides_aborted_records(topics: Settings, kafka_bootstrap: str) -> None:
    topic = topic_name(topics, "dlq")
    producer = build_producer(topics, kafka_bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:8]}")
    try:
        producer.begin()
        producer.send(topic, b"aborted", key=b"a")
        producer.flush()
        producer.abort()
        producer.begin()
        producer.send(topic, b"committed", key=b"c")
        producer.commit()
    finally:
        producer.close()
    consumer = build_consumer(topics, kafka_bootstrap, [topic], group_id=None)
    try:
        values = [r.value for batch in drain(consumer, idle_s=2) for r in batch]
    finally:
        consumer.close()
    assert values == [b"committed"]


def test_read_to_end_ends_at_the_end_offsets_past_markers_and_names_what_stalled(
    topics: Settings, kafka_bootstrap: str
) -> None:
    """The one reader of "everything up to the end offsets as of now" (the registry, the ledger,
    the key directory, the audit readers...): an aborted transaction and the commit markers
    end the log with no record to show for them, so it must go by positions, not records; and a
    partition that cannot reach its end must fail with what was being read, never hang."""
    topic = topic_name(topics, "dlq")
    producer = build_producer(topics, kafka_bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:8]}")
    try:
        producer.begin()
        producer.send(topic, b"kept", key=b"k")
        producer.commit()
        producer.begin()
        producer.send(topic, b"aborted", key=b"a")
        producer.flush()
        producer.abort()
    finally:
        producer.close()
    consumer = build_consumer(topics, kafka_bootstrap, [topic], group_id=None)
    try:
        partitions = list(consumer.assignment())
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        assert sum(end.values()) == 4  # a record and its marker, an aborted one and its marker
        reading = read_to_end(consumer, partitions, end, what="the t topic", timeout_s=30)
        assert [r.value for batch in reading for r in batch] == [b"kept"]
        assert all(consumer.position(tp) == end[tp] for tp in partitions)
        beyond = {tp: offset + 1 for tp, offset in end.items()}
        for stall, said in ((False, "timed out after 1s"), (True, "stalled before its end")):
            started = time.monotonic()
            with pytest.raises(BrokerError, match=f"^reading the t topic {said}$"):
                list(read_to_end(consumer, partitions, beyond, what="the t topic", timeout_s=1.0, stall=stall))
            assert time.monotonic() - started < 10
    finally:
        consumer.close()


def test_linger_holds_records_again_after_a_transaction_ends(topics: Settings, kafka_bootstrap: str) -> None:
    """kafka-python's sender begins a flush to finish a transaction whose records it still
    holds, and never ends it: every later record then went out alone, at once. After our
    commit or abort, a record must wait for ``linger_ms`` again."""
    topic = topic_name(topics, "dlq")
    producer = build_producer(
        topics, kafka_bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:8]}", linger_ms=3_000
    )
    held: dict[str, bool] = {}
    try:
        for end in ("commit", "abort"):
            producer.begin()
            producer.send(topic, b"held until the transaction ends", key=b"k")  # not sent yet
            getattr(producer, end)()
            producer.begin()
            producer.send(topic, b"next", key=b"k")
            time.sleep(1.0)  # well past a send, well inside the linger
            held[end] = not producer._pending[-1][1].is_done
            producer.commit()
    finally:
        producer.close()
    assert held == {"commit": True, "abort": True}


def test_a_transactional_retry_waits_20_ms_not_the_produce_backoff(
    topics: Settings, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kafka-python's sender sleeps before it sends a transactional request again (a new
    transaction's first AddPartitionsToTxn, refused while the last one's markers are still
    being written). It slept 100 ms, on the network thread; Kafka's clients wait 20 ms. A
    consumer offset for a topic that does not exist is refused as retriable every time, so
    the sender retries it for as long as we watch."""
    slept: list[float] = []

    class Clock:
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        def sleep(self, seconds: float) -> None:
            slept.append(seconds)
            time.sleep(seconds)

    monkeypatch.setattr(kafka_sender, "time", Clock())
    producer = build_producer(topics, kafka_bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:8]}")
    plain = build_producer(topics, kafka_bootstrap)
    try:
        producer.begin()
        manager = producer._producer._transaction_manager
        missing = TopicPartition(f"{topics.kafka_topic_prefix}no-such-topic-{uuid.uuid4().hex[:6]}", 0)
        manager.send_offsets_to_transaction({missing: OffsetAndMetadata(1, "", -1)}, "rb-test-retries")
        producer._producer._sender.wakeup()
        time.sleep(1.5)
        retries = list(slept)
        produce_backoff = producer._producer._accumulator.config["retry_backoff_ms"]
        plain_backoff = plain._producer._sender.config["retry_backoff_ms"]
    finally:
        producer.abandon()  # its offset commit would be retried for ever
        plain.close()
    assert len(retries) >= 10, retries  # 100 ms a retry would allow at most 15 in 1.5 s, with round trips fewer
    assert set(retries) == {TRANSACTION_RETRY_BACKOFF_MS / 1000}
    assert produce_backoff == 100 and plain_backoff == 100  # a record's retries keep Kafka's default


def test_an_abandoned_producer_sends_nothing_it_held(topics: Settings, kafka_bootstrap: str) -> None:
    """What a router does with the producer of a failed batch: records it still held never
    reach the log (``close`` would flush them, after their transaction was given up)."""
    topic = topic_name(topics, "dlq")
    producer = build_producer(
        topics, kafka_bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:8]}", linger_ms=3_000
    )
    producer.begin()
    producer.send(topic, b"held", key=b"k")
    producer.abandon()
    time.sleep(4.0)  # past the linger: a sender still running would have sent it by now
    consumer = build_consumer(topics, kafka_bootstrap, [topic], group_id=None, isolation_level="read_uncommitted")
    try:
        written = consumer.end_offsets(list(consumer.assignment()))
    finally:
        consumer.close()
    assert sum(written.values()) == 0
    assert not producer._producer._sender.is_alive()


def test_small_polls_commit_exactly_and_caught_up_groups_show_no_lag(
    topics: Settings, kafka_bootstrap: str
) -> None:
    from referral_broker.cluster.topics import consumer_lag

    topic = topic_name(topics, "audit")
    producer = build_producer(topics, kafka_bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:8]}")
    try:
        for batch in range(4):  # each commit leaves a transaction marker after its records
            producer.begin()
            for i in range(5):
                producer.send(topic, f"{batch}-{i}".encode(), key=b"k")
            producer.commit()
    finally:
        producer.close()
    group = f"{topics.kafka_topic_prefix}g-{uuid.uuid4().hex[:6]}"
    consumer = build_consumer(topics, kafka_bootstrap, [topic], group_id=group, max_poll_records=3)
    seen = []
    try:
        for batch in drain(consumer, idle_s=3):
            seen += [r.value for r in batch]
            commit_batch(consumer, batch)
    finally:
        consumer.close()
    assert sorted(seen) == sorted(f"{b}-{i}".encode() for b in range(4) for i in range(5))
    lag = consumer_lag(topics, kafka_bootstrap, [group])
    assert [(r.topic, r.lag) for r in lag] == [(topic, 0)]
    assert lag[0].end > 20  # the markers are there, and counted as read


def test_offsets_announced_ahead_commit_in_one_round_trip_and_abort_with_the_rest(
    topics: Settings, kafka_bootstrap: str
) -> None:
    """``begin(offsets_for=group)`` sends the transaction's AddOffsetsToTxn at once, so the
    commit sends only TxnOffsetCommit and EndTxn. Committed: the group's offsets and the output
    land together; aborted: neither; a commit for another group than announced still commits
    its offsets (kafka-python's own two steps)."""
    source, target = topic_name(topics, "audit"), topic_name(topics, "dlq")
    feed = build_producer(topics, kafka_bootstrap)
    try:
        for i in range(9):
            feed.send(source, f"in-{i}".encode(), key=b"k")
        feed.flush()
    finally:
        feed.close()
    group = f"{topics.kafka_topic_prefix}g-{uuid.uuid4().hex[:6]}"
    consumer = build_consumer(topics, kafka_bootstrap, [source], group_id=group, max_poll_records=3)
    producer = build_producer(topics, kafka_bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:8]}")
    manager = producer._producer._transaction_manager
    sent: list[str] = []  # each transactional request once, however often it was retried
    handlers: list[Any] = []  # kept, so that no id is reused
    enqueue = manager._enqueue_request

    def record(handler: Any) -> None:
        if not any(handler is h for h in handlers):
            handlers.append(handler)
            sent.append(type(handler.request).__name__.removesuffix("Request"))
        enqueue(handler)

    manager._enqueue_request = record
    requests: dict[str, list[str]] = {}
    announced_early: list[bool] = []
    try:
        batches = iter(drain(consumer, idle_s=3))
        for end in ("commit", "abort", "commit-other-group"):
            batch = next(batches)
            sent.clear()
            producer.begin(offsets_for="another-group" if end == "commit-other-group" else group)
            for r in batch:
                producer.send(target, r.value.replace(b"in", end.encode()), key=b"k")
            deadline = time.monotonic() + 5
            while producer._offsets_ahead is not None and not producer._offsets_ahead[1].is_done:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            announced_early.append("AddOffsetsToTxn" in sent)  # before any commit was asked for
            if end == "abort":
                producer.abort()
            else:
                producer.commit(next_offsets(batch, consumer), consumer.group_metadata())
            requests[end] = [name for name in sent if name not in ("AddPartitionsToTxn", "FindCoordinator")]
            if end == "abort":
                for tp in consumer.assignment():
                    committed = consumer.committed(tp)
                    consumer.seek(tp, committed or 0)
    finally:
        producer.close()
    output = build_consumer(topics, kafka_bootstrap, [target], group_id=None)
    try:
        values = sorted(r.value for batch in drain(output, idle_s=2) for r in batch)
        committed = consumer.committed(TopicPartition(batch[0].topic, batch[0].partition))
    finally:
        output.close()
        consumer.close()
    assert announced_early == [True, True, True]
    assert requests == {
        "commit": ["AddOffsetsToTxn", "TxnOffsetCommit", "EndTxn"],
        "abort": ["AddOffsetsToTxn", "EndTxn"],
        "commit-other-group": ["AddOffsetsToTxn", "AddOffsetsToTxn", "TxnOffsetCommit", "EndTxn"],
    }
    # the aborted batch was read again and committed under the third transaction
    assert values == sorted(
        [f"commit-{i}".encode() for i in range(3)] + [f"commit-other-group-{i}".encode() for i in range(3, 6)]
    )
    assert committed == 6
