"""The router's stall watch against a real broker: records waiting on partitions a consumer
cannot read on is a stall, said at most once a period; partitions read to their end are idle.

The held-offsets case (no position at all: an open transaction holds the group's offsets) runs
with a real router in ``test_faults_router.py``; here a consumer whose partitions are paused is
the other kind, a consumer that fetches nothing while records wait."""

from __future__ import annotations

import time
from typing import Any

from referral_broker.cluster.clients import build_consumer, build_producer, poll_records
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.router_stall import StallWatch

PARTY = "district-fenland"


def read_all(consumer: Any, watch: StallWatch, expected: int) -> int:
    """Poll until ``expected`` records are read (30 s at most), telling ``watch`` of each batch
    read; how many were read."""
    read, deadline = 0, time.monotonic() + 30
    while read < expected and time.monotonic() < deadline:
        got = poll_records(consumer, 500)
        read += len(got)
        if got:
            watch.progress()
    return read


def test_a_consumer_that_fetches_nothing_while_records_wait_is_stalled(topics: Settings, kafka_bootstrap: str) -> None:
    topic = topic_name(topics, "out", PARTY)
    producer = build_producer(topics, kafka_bootstrap)
    for i in range(40):
        producer.send(topic, value=b"x", key=b"k%d" % i)
    producer.flush()
    producer.close()
    consumer = build_consumer(topics, kafka_bootstrap, [topic], group_id=f"{topics.kafka_topic_prefix}stall-test")
    try:
        now = [1000.0]
        watch = StallWatch(after_s=5, clock=lambda: now[0])
        assert read_all(consumer, watch, 40) == 40
        now[0] += 6
        assert watch.check(consumer) is None  # every partition read to its end: idle, not stalled
        producer = build_producer(topics, kafka_bootstrap)
        for i in range(30):
            producer.send(topic, value=b"y", key=b"k%d" % i)
        producer.flush()
        producer.close()
        consumer.pause(*consumer.assignment())  # fetches nothing from now on
        assert poll_records(consumer, 1000) == []
        now[0] += 3
        assert watch.check(consumer) is None  # looked 3 s ago: not again before the period
        now[0] += 3
        stall = watch.check(consumer)
        assert stall is not None
        assert (stall.records, stall.unpositioned, stall.assigned) == (30, 0, len(consumer.assignment()))
        assert 1 <= stall.behind <= stall.assigned and stall.seconds == 12
        assert "hold 30 record(s) this router has not been able to fetch" in stall.reason
        assert not watch.rebuild_due(stall, longest_transaction_s=20)  # 12 s: a transaction may still be open
        now[0] += 20
        later = watch.check(consumer)
        assert later is not None and watch.rebuild_due(later, longest_transaction_s=20)
        now[0] += 6
        again = watch.check(consumer)
        assert again is not None and not watch.rebuild_due(again, longest_transaction_s=20)  # once a stall
        consumer.resume(*consumer.assignment())
        assert read_all(consumer, watch, 30) == 30
        now[0] += 6
        assert watch.check(consumer) is None
    finally:
        consumer.close()
