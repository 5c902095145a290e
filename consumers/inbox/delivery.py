"""Learning that the referrer was told: the router audits every status it relays (purpose
``status-to-referrer``, ``conditions_met`` naming the answering party and the ``status_id``),
so the inbox reads the audit topic and marks each of its own statuses delivered when the
router's hub-signed record of relaying it appears. The same reader keeps the router's audited
sharing decisions for the inbox's teams (purpose, legal ground, basis; signed by the hub, no
values), so a referral's page says why the team has it as the router decided it.

The inbox reads no other organisation's topic (Kafka ACLs give a team its own out and status
topics and the audit topic only). Until the relay is audited the referral's history says
"Sending", never "Referrer told".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from referral_broker.cluster.acls import inbox_delivery_group
from referral_broker.cluster.clients import Record, build_consumer, commit_batch, poll_records
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.inbox.background import BackgroundWorker
from referral_broker.consumers.inbox.records import RecordFormat
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.errors import ReferralBrokerError
from referral_broker.structured_log import get_logger

log = get_logger(__name__)


class DeliveryWatcher(BackgroundWorker):
    """A thread (``start`` / ``stop``, always joined) marking the teams' statuses delivered."""

    label = "delivery watcher"
    thread_name = "inbox-delivery"

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
        super().__init__()
        self.settings = settings
        self.store = store
        self.record_format = record_format
        self.teams = tuple(teams)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.poll_timeout_ms = poll_timeout_ms
        self.delivered = 0

    @property
    def group_id(self) -> str:
        """An inbox serving one team reads as that team's Kafka identity, in the team's own
        group (``acls.inbox_delivery_group``); one serving several (the administrator, the
        demo) in the shared ``inbox.delivery``."""
        if len(self.teams) == 1:
            return inbox_delivery_group(self.settings, self.teams[0])
        return f"{self.settings.kafka_topic_prefix}inbox.delivery"

    def run(self) -> None:
        consumer = build_consumer(
            self.settings,
            self.settings.bootstrap_servers,
            [topic_name(self.settings, "audit")],
            group_id=self.group_id,
        )
        try:
            while not self._stop.is_set():
                batch = poll_records(consumer, self.poll_timeout_ms)
                self.error = None  # the cluster answers again
                for record in batch:
                    if dict(record.headers).get("rb-kind") == b"audit.decision":
                        self._decision(record)
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
        if not decision:
            return
        if decision.get("purpose") == "status-to-referrer":  # one of ours relayed to its referrer?
            met = dict(c.split(":", 1) for c in decision.get("conditions_met") or [] if ":" in c)
            ours = met.get("received-by") in self.teams and bool(met.get("status"))
            if ours and self.store.mark_delivered(self.teams, met["status"], self.clock()):
                self.delivered += 1
            return
        if decision.get("recipient") in self.teams and decision.get("delivered"):
            self.store.record_decision(str(decision["recipient"]), decision)

