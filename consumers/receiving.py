"""What arrives at a recipient: its out topic, verified and opened with its own key.

Each message yields either a :class:`Received` (the fields granted to this recipient, the
fields withheld and why, what it may not pass on) or a :class:`Refused` naming why it could
not be opened. A refused message is reported, never silently skipped, and never half-shown.
Offsets are committed for the recipient's consumer group only after the caller has the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from referral_broker.cluster.clients import Record, build_consumer, commit_batch, drain
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, ReferralBrokerError
from referral_broker.identity import (
    H_DECISION,
    H_NO_ONWARD,
    H_REFERRER,
    H_WITHHELD,
    Identity,
    load_identity,
    no_onward_from,
    withheld_from,
)


@dataclass(frozen=True)
class Received:
    referral_id: str
    version: int
    kind: str  # referral | status
    sender: str
    referrer: str | None
    record: dict[str, Any] = field(repr=False)
    withheld: dict[str, str] = field(default_factory=dict)
    no_onward_sharing: tuple[str, ...] = ()
    decision_id: str | None = None
    partition: int = -1
    offset: int = -1


@dataclass(frozen=True)
class Refused:
    topic: str
    partition: int
    offset: int
    reason: str


def _header(extra: tuple[tuple[str, bytes], ...], name: str) -> bytes | None:
    return next((v for k, v in extra if k == name), None)


def open_record(identity: Identity, record: Record) -> Received | Refused:
    """Verify and open one record addressed to ``identity``'s party."""
    try:
        opened = identity.open(record)
        extra = opened.extra_headers
        withheld = withheld_from(_header(extra, H_WITHHELD))
        no_onward = no_onward_from(_header(extra, H_NO_ONWARD))
    except BrokerError:
        raise
    except ReferralBrokerError as exc:
        return Refused(record.topic, record.partition, record.offset, f"{type(exc).__name__}: {exc}")
    referrer = _header(extra, H_REFERRER)
    decision = _header(extra, H_DECISION)
    return Received(
        referral_id=opened.referral_id,
        version=opened.referral_version,
        kind=opened.kind,
        sender=opened.sender,
        referrer=referrer.decode() if referrer else None,
        record=opened.record,
        withheld=withheld,
        no_onward_sharing=no_onward,
        decision_id=decision.decode() if decision else None,
        partition=record.partition,
        offset=record.offset,
    )


def receive(
    settings: Settings,
    bootstrap: str,
    party: str,
    *,
    stop_when_idle: float = 5.0,
    group_id: str | None = "default",
    identity: Identity | None = None,
) -> Iterator[Received | Refused]:
    """Everything on ``party``'s out topic not yet received by its group (``group_id=None``:
    everything, committing nothing)."""
    identity = identity or load_identity(settings, bootstrap, party)
    group = None if group_id is None else f"{settings.kafka_topic_prefix}receiver-{party}-{group_id}"
    consumer = build_consumer(settings, bootstrap, [topic_name(settings, "out", party)], group_id=group)
    try:
        for batch in drain(consumer, idle_s=stop_when_idle):
            for record in batch:
                yield open_record(identity, record)
            if group is not None:
                commit_batch(consumer, batch)
    finally:
        consumer.close()
