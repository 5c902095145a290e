"""Urgent referrals first: an urgent referral from one partner is not routed behind another
partner's queued batch (issue 20: it should land in seconds whatever else is queued)."""

from __future__ import annotations

import threading
import time

import pytest
from county import DWP, SCHOOL
from kafka import TopicPartition
from test_router import read_all, referrals_from

from referral_broker.cluster.clients import Record, build_producer, poll_records
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.dead_letters import read_dead_letters
from referral_broker.consumers.router import (
    FETCH_PARTITION_BYTES,
    MAX_POLL_RECORDS,
    URGENT,
    Router,
    RouterStats,
    priority_symbols,
    urgent_first,
)
from referral_broker.identity import H_PRIORITY
from referral_broker.parties import all_parties
from referral_broker.producers.intake import IntakeSender
from referral_broker.schemas.registry import referral_schema, versions_of
from referral_broker.sealing.key_admin import init_parties

BACKLOG = 1200
# the transaction under way (at most 200 referrals) and one fetch (3 partitions of 64 KiB)
MOST_AHEAD = 400


@pytest.fixture
def broker(topics: Settings, kafka_bootstrap: str) -> Settings:
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    return topics


def _record(topic: str, partition: int, offset: int, priority: bytes | None) -> Record:
    headers = [("rb-kind", b"referral")] + ([(H_PRIORITY, priority)] if priority is not None else [])
    return Record(topic, partition, offset, b"k", b"v", headers, 0)


def test_urgent_first_puts_whole_partitions_holding_an_urgent_referral_first() -> None:
    dwp = [_record("in.dwp", p, o, b"routine") for o in range(3) for p in (0, 1)]
    school = [_record("in.school", 0, 7, b"routine"), _record("in.school", 0, 8, b"urgent")]
    older = [_record("in.police", 2, 4, None)]  # a sender from before the header: routine
    batch = dwp[:3] + school + older + dwp[3:]
    first, rest = urgent_first(batch)
    # the urgent one's partition, whole and in order (its routine record before it goes too)
    assert first == school
    assert rest == dwp[:3] + older + dwp[3:]  # the rest in the order it was read
    assert urgent_first(dwp + older) == [dwp + older]  # nothing urgent: one transaction
    assert urgent_first(school) == [school]  # all of it urgent: one transaction


def test_the_priorities_a_header_may_name_are_the_schemas_own() -> None:
    """Read from the schema, not written out: a priority added to the enum is shown in a dead
    letter's reason, and the urgent lane's symbol is one of them in every shipped version."""
    assert priority_symbols(referral_schema()) == {b"routine", b"high", b"urgent"}
    for version in versions_of("referral"):
        assert URGENT in priority_symbols(version.schema)
    grown = referral_schema()
    for f in grown["fields"]:
        if f["name"] == "priority":
            f["type"]["symbols"].append("immediate")
    assert b"immediate" in priority_symbols(grown)


def test_an_urgent_referral_is_routed_before_another_partners_queued_batch(
    broker: Settings, kafka_bootstrap: str
) -> None:
    """DWP's batch is queued, then a school's urgent referral (queued too), then the router
    starts; a second urgent referral comes while the router is busy with the batch. The first
    is routed before any of the batch (its partition goes first); the second waits at most for
    the transaction under way and what one fetch brought (64 KiB a partition), not for the batch
    (with Kafka's 1 MiB fetches it waited for all of it, and so did the first)."""
    batch = referrals_from(DWP, BACKLOG, seed=31, priority="routine")
    queued, busy = referrals_from(SCHOOL, 2, seed=32, priority="urgent")
    with IntakeSender(broker, kafka_bootstrap, DWP) as dwp:
        dwp.send_referrals(batch)  # queued first, all of it
    with IntakeSender(broker, kafka_bootstrap, SCHOOL) as school:
        school.send_referrals([queued])
        intake = read_all(broker, kafka_bootstrap, topic_name(broker, "intake", SCHOOL))
        assert [dict(r.headers)[H_PRIORITY] for r in intake] == [b"urgent"]  # signed beside it
        sealed_size = max(len(r.value or b"") for r in read_all(broker, kafka_bootstrap, topic_name(broker, "intake", DWP)))
        assert FETCH_PARTITION_BYTES // sealed_size < 200 // 3  # one fetch of the 3 partitions fits a poll

        router = Router(broker, kafka_bootstrap)
        done: list[RouterStats] = []
        worker = threading.Thread(target=lambda: done.append(router.run(stop_when_idle=3)), daemon=True)
        worker.start()
        deadline = time.monotonic() + 120
        while router.stats.routed < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert router.stats.routed >= 20, "the router did not start on the batch"
        busy_sent_ms = time.time() * 1000
        school.send_referrals([busy])
        worker.join(timeout=600)
    assert done and done[0].routed == BACKLOG + 2 and done[0].dead_lettered == 0
    # the order the router routed in: its archive copies, one per referral, by produce time
    archive = read_all(broker, kafka_bootstrap, topic_name(broker, "archive"))
    at = {(r.key or b"").decode(): r.timestamp_ms for r in archive}
    batch_at = [at[str(r["referral_id"])] for r in batch]
    assert len(at) == BACKLOG + 2
    assert sum(1 for t in batch_at if t < at[str(queued["referral_id"])]) == 0
    waited_for = sum(1 for t in batch_at if busy_sent_ms <= t < at[str(busy["referral_id"])])
    left = sum(1 for t in batch_at if t >= busy_sent_ms)
    assert left > 2 * MOST_AHEAD  # the batch was still there to wait for
    assert waited_for < MOST_AHEAD, f"{waited_for} of the {left} referrals of DWP's batch left were routed first"


def test_a_priority_header_that_is_not_the_referrals_own_is_refused(broker: Settings, kafka_bootstrap: str) -> None:
    """The header only orders the queue, but it is a signed claim: a sender whose header says
    urgent for a routine referral gets a dead letter naming the mismatch."""
    [routine] = referrals_from(SCHOOL, 1, seed=33, priority="routine")
    with IntakeSender(broker, kafka_bootstrap, SCHOOL) as school:
        message = school.sealer.sealer.seal(
            routine,
            school.sealer.referral_schema,
            topic=topic_name(broker, "intake", SCHOOL),
            recipient="council",
            referral_id=str(routine["referral_id"]),
            referral_version=int(routine["version"]),
            extra_headers=((H_PRIORITY, b"urgent"),),
        )
    producer = build_producer(broker, kafka_bootstrap)
    try:
        message.send(producer)
        producer.flush()
    finally:
        producer.close()
    stats = Router(broker, kafka_bootstrap).run(stop_when_idle=3)
    assert stats.routed == 0 and stats.dead_lettered == 1
    [(_, dead)] = list(read_dead_letters(broker, kafka_bootstrap))
    assert "rb-priority header (urgent) is not the referral's priority (routine)" in dead.reason


def _tp(key: tuple[str, int]) -> TopicPartition:
    return TopicPartition(*key)


def _queue_routine(settings: Settings, bootstrap: str, count: int, seed: int) -> int:
    """DWP's queued batch of ``count`` routine referrals; the largest sealed value's size."""
    with IntakeSender(settings, bootstrap, DWP) as dwp:
        dwp.send_referrals(referrals_from(DWP, count, seed=seed, priority="routine"))
    return max(len(r.value or b"") for r in read_all(settings, bootstrap, topic_name(settings, "intake", DWP)))


def test_a_backlog_is_routed_in_full_transactions_though_one_fetch_holds_fewer(
    broker: Settings, kafka_bootstrap: str
) -> None:
    """A fetch of DWP's 3 partitions brings fewer sealed referrals than a transaction takes;
    the router tops each batch up while more waits on the broker, so a backlog is routed in
    transactions of MAX_POLL_RECORDS, not of what one fetch brought (each transaction costs
    the broker markers on every partition it wrote to)."""
    sealed_size = _queue_routine(broker, kafka_bootstrap, BACKLOG, seed=34)
    one_fetch = 3 * (FETCH_PARTITION_BYTES // sealed_size + 1)
    assert one_fetch < MAX_POLL_RECORDS  # the small fetches alone would not fill a transaction
    stats = Router(broker, kafka_bootstrap).run(stop_when_idle=3)
    assert stats.routed == BACKLOG and stats.dead_lettered == 0
    # BACKLOG / one_fetch (8 or more) without the top-up; 6 when each transaction holds 200
    assert stats.batches <= BACKLOG // MAX_POLL_RECORDS + 1 < BACKLOG / one_fetch, stats.batches


def test_a_rebalance_while_topping_up_drops_the_batch_to_be_read_again(broker: Settings, kafka_bootstrap: str) -> None:
    """Partitions revoked while a batch is topped up (what the group's revocation callback
    records): nothing read under the old membership is routed; the consumer is rewound to the
    batch's first records, so the next poll reads them all again."""
    _queue_routine(broker, kafka_bootstrap, 300, seed=35)
    router = Router(broker, kafka_bootstrap)
    consumer = router._consumer()
    try:
        batch: list[Record] = []
        deadline = time.monotonic() + 60
        while not batch and time.monotonic() < deadline:
            batch = poll_records(consumer, timeout_ms=500, max_records=20)
        assert batch, "nothing was read from DWP's intake"
        first: dict[tuple[str, int], int] = {}
        for r in batch:
            first.setdefault((r.topic, r.partition), r.offset)
        router._revoked.add(_tp(next(iter(first))))  # a partition of the batch, as _on_revoked records it inside a poll
        assert router._topped_up(consumer, batch) == []
        assert not router._revoked
        # every partition of the batch rewound to its first record there: the next poll reads it all again
        assert {(tp.topic, tp.partition): consumer.position(tp) for tp in map(_tp, first)} == first
    finally:
        consumer.close()
