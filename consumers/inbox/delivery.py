"""Learning that the referrer was told: the inbox watches the referrers' out topics for the
status messages the router delivered, and marks each of its own (by ``status_id``) delivered.
The same reader keeps the router's audited sharing decisions for the inbox's teams (from the
audit topic: purpose, legal ground, basis; signed by the hub, no values), so a referral's page
says why the team has it as the router decided it.

The inbox cannot open what the router sealed for a referrer, and does not need to: a status
message's ``status_id`` and ``from_party`` are operational, clear on the wire, and the message
is signed by the hub, so the inbox checks the signature and reads those two fields only. Until
a status is seen there the referral's history says "Sending", never "Referrer told".
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from referral_broker.cluster.clients import Record, build_consumer, commit_batch, poll_records
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.inbox.records import RecordFormat
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.errors import ReferralBrokerError, TopicPlanError
from referral_broker.parties import all_parties
from referral_broker.structured_log import get_logger

log = get_logger(__name__)


def referrer_topics(settings: Settings) -> list[str]:
    """The out topics of every party a district team's status can be delivered to (the
    referring partners; the hub, the teams and research recipients refer nobody)."""
    found = []
    for name, party in all_parties().items():
        if party.kind in ("district_team", "research", "hub"):
            continue
        try:
            found.append(topic_name(settings, "out", name))
        except TopicPlanError:  # a party the topic plan gives no out topic receives nothing
            continue
    return sorted(found)


class DeliveryWatcher:
    """A thread (``start`` / ``stop``, always joined) marking the teams' statuses delivered."""

    def __init__(
        self,
        settings: Settings,
        store: InboxStore,
        record_format: RecordFormat,
        teams: Sequence[str],
        *,
        clock: Callable[[], datetime] | None = None,
        poll_timeout_ms: int = 500,
    ) -> None:
        self.settings = settings
        self.store = store
        self.record_format = record_format
        self.teams = tuple(teams)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.poll_timeout_ms = poll_timeout_ms
        self.delivered = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        consumer = build_consumer(
            self.settings,
            self.settings.bootstrap_servers,
            [*referrer_topics(self.settings), topic_name(self.settings, "audit")],
            group_id=f"{self.settings.kafka_topic_prefix}inbox.delivery",
        )
        try:
            while not self._stop.is_set():
                batch = poll_records(consumer, self.poll_timeout_ms)
                for record in batch:
                    if dict(record.headers).get("rb-kind") == b"audit.decision":
                        self._decision(record)
                        continue
                    try:
                        found = self.record_format.delivered_status(record)
                    except ReferralBrokerError as exc:  # not ours to dead-letter: the receiver does
                        log.warning("status on a referrer topic not verified", error=type(exc).__name__)
                        continue
                    if found is None or found[0] not in self.teams:
                        continue
                    if self.store.mark_delivered(self.teams, found[1], self.clock()):
                        self.delivered += 1
                if batch:
                    commit_batch(consumer, batch)
        finally:
            consumer.close()

    def _decision(self, record: Record) -> None:
        try:
            decision = self.record_format.sharing_decision(record)
        except ReferralBrokerError as exc:
            log.warning("audit decision not verified", error=type(exc).__name__)
            return
        if decision and decision.get("recipient") in self.teams and decision.get("delivered"):
            self.store.record_decision(str(decision["recipient"]), decision)

    def start(self) -> None:
        self._stop.clear()

        def target() -> None:
            try:
                self.run()
            except BaseException as exc:  # surfaced through .error and the log; the thread ends
                self.error = exc
                log.error("delivery watcher stopped", error=type(exc).__name__)

        self._thread = threading.Thread(target=target, name="inbox-delivery")
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
