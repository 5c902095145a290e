"""Dead letters: what could not be processed, kept with the reason and nothing lost.

A dead letter is the original record byte for byte (key, value and headers, so a replay after
a fix verifies exactly as the original would have) plus ``rb-dlq-*`` headers naming the
reason, the stage, and the source topic, partition and offset. Reasons come from our own
errors, which never carry values; an unexpected exception contributes only its type name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from referral_broker.cluster.clients import Record, build_consumer, build_producer, drain
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.errors import ReferralBrokerError
from referral_broker.sealing import OutgoingMessage

H_REASON = "rb-dlq-reason"
H_STAGE = "rb-dlq-stage"
H_SOURCE_TOPIC = "rb-dlq-source-topic"
H_SOURCE_PARTITION = "rb-dlq-source-partition"
H_SOURCE_OFFSET = "rb-dlq-source-offset"
H_AT = "rb-dlq-at"
DLQ_HEADERS = (H_REASON, H_STAGE, H_SOURCE_TOPIC, H_SOURCE_PARTITION, H_SOURCE_OFFSET, H_AT)


def reason_for(exc: BaseException) -> str:
    """A dead-letter reason: our errors' own value-free text; for anything else, its type."""
    if isinstance(exc, ReferralBrokerError):
        return f"{type(exc).__name__}: {exc}"[:2000]
    return f"internal error ({type(exc).__name__}); see the router log"


def dead_letter(settings: Settings, record: Record, exc: BaseException, stage: str) -> OutgoingMessage:
    headers = [(k, v) for k, v in record.headers if not k.startswith("rb-dlq-")]
    headers += [
        (H_REASON, reason_for(exc).encode("utf-8")),
        (H_STAGE, stage.encode()),
        (H_SOURCE_TOPIC, record.topic.encode()),
        (H_SOURCE_PARTITION, str(record.partition).encode()),
        (H_SOURCE_OFFSET, str(record.offset).encode()),
        (H_AT, str(int(time.time() * 1000)).encode()),
    ]
    return OutgoingMessage(topic_name(settings, "dlq"), record.key or b"", record.value or b"", headers)


@dataclass(frozen=True)
class DeadLetter:
    offset: int
    partition: int
    key: str | None
    reason: str
    stage: str
    source_topic: str
    source_partition: int
    source_offset: int
    at_ms: int
    size: int

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _parse(record: Record) -> DeadLetter:
    h = {k: v for k, v in record.headers if k in DLQ_HEADERS}
    text = lambda name: h.get(name, b"").decode("utf-8", "replace")
    number = lambda name: int(text(name)) if text(name).isdigit() else -1
    key = record.key.decode("utf-8", "replace")[:64] if record.key else None
    return DeadLetter(
        offset=record.offset,
        partition=record.partition,
        key=key,
        reason=text(H_REASON),
        stage=text(H_STAGE),
        source_topic=text(H_SOURCE_TOPIC),
        source_partition=number(H_SOURCE_PARTITION),
        source_offset=number(H_SOURCE_OFFSET),
        at_ms=number(H_AT),
        size=len(record.value or b""),
    )


def read_dead_letters(
    settings: Settings, bootstrap: str, *, idle_s: float = 2.0
) -> Iterator[tuple[Record, DeadLetter]]:
    """Every dead letter currently on the topic (read without a group: listing changes nothing)."""
    consumer = build_consumer(settings, bootstrap, [topic_name(settings, "dlq")], group_id=None)
    try:
        for batch in drain(consumer, idle_s=idle_s):
            for record in batch:
                yield record, _parse(record)
    finally:
        consumer.close()


def replay(
    settings: Settings,
    bootstrap: str,
    *,
    select: Callable[[DeadLetter], bool] = lambda d: True,
    progress: Callable[[int], object] = lambda n: None,
) -> int:
    """Send selected dead letters back to their source topic exactly as they first arrived.

    A replayed record is processed afresh: if the cause is fixed it is routed, otherwise it
    lands in dead letters again with its reason. Listing is not consuming, so replaying the
    same letter twice sends it twice; the referral id + version makes that visible downstream.
    """
    producer = build_producer(settings, bootstrap)
    count = 0
    try:
        for record, letter in read_dead_letters(settings, bootstrap):
            if not letter.source_topic or not select(letter):
                continue
            headers = [(k, v) for k, v in record.headers if k not in DLQ_HEADERS]
            producer.send(letter.source_topic, record.value or b"", key=record.key, headers=headers)
            count += 1
            progress(1)
        producer.flush()
    finally:
        producer.close()
    return count
