"""Ingest: one consumer per district team, from ``referrals.out.<team>`` into the inbox store.

Each record is verified and summarised through the injected :class:`RecordFormat` (its clear,
operational part; nothing is opened), then stored raw and sealed. Offsets are committed only
after the batch is stored, so a crash re-delivers and the store's (team, referral id, version)
key recognises what it already has: a re-delivery, a replayed copy (the same referral id,
version and decision id at another offset) or a conflicting one (another decision id) is
counted by kind (``IngestStats.copies``, the store's ``duplicates``, ``inbox status``), logged,
and neither stored nor shown again. A record that fails verification or does not parse goes to
the dead-letter topic with the reason, its source topic, partition and offset and its original
bytes; it is never shown and never silently dropped.

A new urgent referral is mailed to the team as a link (``notices``), when mail is configured.
The same worker also retries the team's status outbox, so an action taken while Kafka was away
reaches the referrer once it is back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from referral_broker.cluster.clients import (
    IdleTimer,
    Producer,
    Record,
    build_consumer,
    build_producer,
    commit_batch,
    poll_records,
)
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.dead_letters import dead_letter
from referral_broker.consumers.inbox.background import BackgroundWorker
from referral_broker.consumers.inbox.notices import UrgentNotifier
from referral_broker.consumers.inbox.outbound import Outbound
from referral_broker.consumers.inbox.records import RecordFormat
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.consumers.inbox.store_referrals import REDELIVERED
from referral_broker.errors import BrokerError, ReferralBrokerError
from referral_broker.structured_log import get_logger

log = get_logger(__name__)

DLQ_STAGE = "inbox-ingest"
JOIN_TIMEOUT_S = 120.0


@dataclass
class IngestStats:
    new: int = 0
    updated: int = 0
    older: int = 0
    duplicate: int = 0  # copies of records the store already had, of every kind in ``copies``
    dead_lettered: int = 0
    status_published: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    copies: dict[str, int] = field(default_factory=dict)  # redelivered / replayed / conflicting

    def as_dict(self) -> dict[str, object]:
        return {
            "new": self.new,
            "updated": self.updated,
            "older": self.older,
            "duplicate": self.duplicate,
            "copies": dict(sorted(self.copies.items())),
            "dead_lettered": self.dead_lettered,
            "status_published": self.status_published,
        }


def group_id(settings: Settings, team: str) -> str:
    """One consumer group per team, namespaced like the topics (tests run side by side)."""
    return f"{settings.kafka_topic_prefix}inbox.{team}"


class TeamIngest(BackgroundWorker):
    """Reads one team's out topic into the store. Use :meth:`run` (blocking) or, in a server,
    :meth:`start` / :meth:`stop` (a thread that is always joined; a failed run is run again)."""

    def __init__(
        self,
        settings: Settings,
        team: str,
        store: InboxStore,
        record_format: RecordFormat,
        *,
        clock: Callable[[], datetime] | None = None,
        poll_timeout_ms: int = 500,
        notifier: UrgentNotifier | None = None,
    ) -> None:
        super().__init__()
        self.label = f"ingest {team}"
        self.thread_name = f"inbox-ingest-{team}"
        self.notifier = notifier
        self.settings = settings
        self.team = team
        self.store = store
        self.record_format = record_format
        self.clock = clock or (lambda: datetime.now(UTC))
        self.poll_timeout_ms = poll_timeout_ms
        self.topic = topic_name(settings, "out", team)
        self.dlq_topic = topic_name(settings, "dlq")
        self.stats = IngestStats()

    def _handle(self, record: Record, producer: Producer) -> None:
        sealed = record
        try:
            if record.value is None:
                raise ReferralBrokerError("record has no value (tombstone)")
            summary = self.record_format.summarise(sealed, self.team)
            if record.key is not None and record.key != summary.referral_id.encode("utf-8"):
                raise ReferralBrokerError("message key does not match the referral id")
        except Exception as exc:
            # the shared dead-letter form: original bytes + reason (never a value), source, stage
            dead_letter(self.settings, record, exc, DLQ_STAGE).send(producer)
            self.stats.dead_lettered += 1
            kind = type(exc).__name__
            self.stats.reasons[kind] = self.stats.reasons.get(kind, 0) + 1
            log.warning(
                "record dead-lettered",
                team=self.team,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                reason=kind,
            )
            return
        result = self.store.ingest(self.team, summary, sealed)
        setattr(self.stats, result.outcome, getattr(self.stats, result.outcome) + 1)
        if result.copy is not None:
            self.stats.copies[result.copy] = self.stats.copies.get(result.copy, 0) + 1
            # a consumer restart re-delivers; a replay or a conflicting copy is someone's doing
            report = log.info if result.copy == REDELIVERED else log.warning
            report(
                "copy of a stored record recognised, not stored again",
                team=self.team,
                referral_id=result.referral_id,
                version=result.version,
                reason=result.copy,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )
            return
        if self.notifier is not None and result.outcome == "new" and summary.priority == "urgent":
            self.notifier.urgent_arrived(self.team, result.referral_id)
        log.info(
            "record stored",
            team=self.team,
            referral_id=result.referral_id,
            version=result.version,
            status=result.outcome,
        )

    def run(self, *, stop_when_idle: float | None = None) -> IngestStats:
        """Consume until :meth:`stop` is called or nothing arrived for ``stop_when_idle`` seconds."""
        producer = build_producer(self.settings, self.settings.bootstrap_servers)
        outbound = Outbound(self.settings, self.record_format, producer)
        consumer = build_consumer(
            self.settings,
            self.settings.bootstrap_servers,
            [self.topic],
            group_id=group_id(self.settings, self.team),
        )
        try:
            # idle time counts once the group has given us partitions; none within the join
            # timeout is an error even when serving without an idle stop
            idle = IdleTimer(consumer, stop_when_idle or 0.0, assign_timeout_s=JOIN_TIMEOUT_S)
            while not self._stop.is_set():
                batch = poll_records(consumer, self.poll_timeout_ms)
                self.error = None  # the cluster answers again
                for record in batch:
                    self._handle(record, producer)
                if batch:
                    producer.flush()  # dead letters durable before the offsets move past them
                    commit_batch(consumer, batch)
                    idle.activity()
                self._retry_outbox(outbound)
                if not batch and idle.expired() and stop_when_idle is not None:
                    break
        finally:
            consumer.close()
            producer.close()
        return self.stats

    def _retry_outbox(self, outbound: Outbound) -> None:
        try:
            self.stats.status_published += outbound.publish_pending(
                self.store, now=self.clock(), team=self.team
            )
        except BrokerError as exc:
            log.warning("status outbox retry failed", team=self.team, error=str(exc))

