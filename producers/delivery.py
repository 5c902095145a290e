"""Delivering a party's outbox to Kafka, once.

A run first settles the messages in doubt (handed to a producer by an earlier run that never
recorded the acknowledgement: killed, or the cluster failed mid-flush): it reads their topic
from the offsets recorded before that attempt and marks delivered those it finds there (by the
SHA-256 of the sealed value, unique per sealing); the others go back to plain queued. Then,
per batch: mark the batch attempted, produce it, flush, mark it delivered. The first broker
failure stops the run and leaves the rest queued, for ``referral-broker outbox flush`` or the
next ``send``. Only after the settling step does a run produce anything, so a message is never
produced twice unless the first copy is still invisible on the topic when the next run reads
it (the killed process's request already accepted by the broker but not yet appended: a
window of milliseconds that a run started by a person does not hit).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from kafka.errors import KafkaError

from referral_broker.cluster.clients import Producer, build_consumer, build_producer, read_to_end
from referral_broker.config import Settings
from referral_broker.errors import BrokerError
from referral_broker.structured_log import get_logger

from .adapter_metrics import SEND_METRICS
from .outbox import Outbox, digest

log = get_logger(__name__)

BATCH = 500


class Delivered(NamedTuple):
    """What a run remembers of a delivered message: not its sealed bytes (a 100k-row send kept
    every row's value and headers until it ended, 700 MB)."""

    topic: str
    message_id: str
    kind: str
    referral_id: str
    version: int


@dataclass
class Delivery:
    """Delivers ``outbox`` to the cluster at ``bootstrap``; call :meth:`run` as often as new
    messages are queued. ``reachable`` turns False at the first broker failure (``error``)."""

    outbox: Outbox
    settings: Settings
    bootstrap: str
    reachable: bool = True
    error: str | None = None
    delivered: list[Delivered] = field(default_factory=list)
    found: int = 0  # in doubt from an earlier run, found already on the topic
    count: int = 0  # messages this run delivered (all of them, kept in ``delivered`` or not)
    keep: bool = True  # False: a long send that reads states from the outbox keeps no list
    _producer: Producer | None = None
    _settled: bool = False
    _marked: set[str] = field(default_factory=set)
    _after: int = 0

    def run(self, progress: Callable[[int], object] = lambda n: None) -> bool:
        """Deliver every queued message; False when the cluster stopped it (see ``error``)."""
        if not self.reachable:
            return False
        try:
            if not self._settled:
                self._settle()
                self._settled = True
            while rows := self.outbox.queued(limit=BATCH, after=self._after):
                self._watermarks({r.topic for r in rows})
                if self._producer is None:
                    # Give up on a batch after four request timeouts (60 s by default): the
                    # outbox keeps it, so waiting longer only keeps the user waiting.
                    timeout_ms = 4 * self.settings.kafka_request_timeout_ms
                    self._producer = build_producer(self.settings, self.bootstrap, delivery_timeout_ms=timeout_ms)
                ids = [r.id for r in rows]
                self.outbox.mark_attempted(ids)
                began = time.monotonic()
                for r in rows:
                    self._producer.send(r.topic, r.value, r.key, r.headers)
                self._producer.flush(timeout_s=4 * self.settings.kafka_request_timeout_ms / 1000 + 10)
                self.outbox.mark_delivered(ids)
                SEND_METRICS.seconds.labels("deliver").observe(time.monotonic() - began)
                SEND_METRICS.sent(rows)
                self.count += len(rows)
                if self.keep:
                    self.delivered.extend(Delivered(r.topic, r.message_id, r.kind, r.referral_id, r.version) for r in rows)
                self._after = rows[-1].id
                progress(len(rows))
        except BrokerError as exc:
            SEND_METRICS.delivery_failures.inc()
            self.reachable = False
            self.error = str(exc)
            log.warning("outbox delivery stopped; the rest stays queued", error=type(exc).__name__)
            return False
        return True

    def close(self) -> None:
        if self._producer is not None:
            # Closing after a failed flush may fail too: the outbox already says what is queued.
            with contextlib.suppress(KafkaError):
                self._producer.close()
            self._producer = None

    def __enter__(self) -> Delivery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the steps --------------------------------------------------------------------------
    def _settle(self) -> None:
        for topic, wanted in self.outbox.in_doubt().items():
            found = self._find_on_topic(topic, dict(wanted))
            if found:
                self.outbox.mark_delivered(found)
            self.outbox.reset_attempted(set(wanted.values()) - set(found))
            self.found += len(found)
            log.info("outbox messages in doubt settled", topic=topic, found=len(found), count=len(wanted))

    def _find_on_topic(self, topic: str, wanted: dict[bytes, int], timeout_s: float = 60.0) -> list[int]:
        """Row ids of ``wanted`` (digest -> row id) present on ``topic`` after its watermark."""
        marks = self.outbox.watermark(topic)
        consumer = build_consumer(self.settings, self.bootstrap, [topic], group_id=None)
        found: list[int] = []
        try:
            partitions = list(consumer.assignment())
            try:
                end = consumer.end_offsets(partitions)
                start = consumer.beginning_offsets(partitions)
                for tp in partitions:
                    consumer.seek(tp, max(marks.get(tp.partition, 0), start.get(tp, 0)))
            except KafkaError as exc:
                raise BrokerError(f"reading {topic} back failed: {type(exc).__name__}") from None
            for batch in read_to_end(consumer, partitions, end, what=f"{topic} back", timeout_s=timeout_s):
                for record in batch:
                    row = wanted.pop(digest(record.value or b""), None)
                    if row is not None:
                        found.append(row)
                if not wanted:
                    break
        finally:
            consumer.close()
        return found

    def _watermarks(self, topics: set[str]) -> None:
        """Before this run first produces to a topic, record where its partitions end, so a
        later run knows where to look for messages this one leaves in doubt."""
        for topic in sorted(topics - self._marked):
            consumer = build_consumer(self.settings, self.bootstrap, [topic], group_id=None)
            try:
                partitions = list(consumer.assignment())
                if not partitions:
                    raise BrokerError(f"topic {topic} does not exist ('referral-broker topics ensure')")
                try:
                    end = consumer.end_offsets(partitions)
                except KafkaError as exc:
                    raise BrokerError(f"reading the end of {topic} failed: {type(exc).__name__}") from None
            finally:
                consumer.close()
            self.outbox.set_watermark(topic, {tp.partition: end.get(tp, 0) for tp in partitions})
            self._marked.add(topic)

