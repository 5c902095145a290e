"""What the inbox writes to Kafka: status messages for the referrer and access audit events.

Status messages (``referrals.status.<team>``) leave through the store's outbox: the action and
its sealed, signed status message are committed together in SQLite, then
:meth:`Outbound.publish_pending` sends whatever Kafka has not confirmed, so a broker hiccup
delays a status but never loses it, and a retry resends the same bytes (same ``status_id``).

Access events (``audit.decisions``) are written synchronously, before the page that caused
them is shown: if the audit cannot be written, the referral is not shown. They name who, when,
which team and which referral id, and the outcome; never a value from a referral, and never a
typed username that is not an account (it might be a password typed into the wrong box). They
are Avro (``schemas/audit_access.v1.avsc``) signed by the team (``rb-kind: inbox.access``)
beside the router's signed decisions (``rb-kind: audit.decision``), and each is the next record
of the team's own audit chain (``inbox-<team>``, see ``referral_broker/audit_chain.py``): one
Kafka transaction writes the event and the chain's head, so ``audit verify`` names an access
event deleted, edited or reordered as it does a routing decision.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from referral_broker.audit_chain import AuditChain
from referral_broker.cluster.acls import inbox_audit_writer
from referral_broker.cluster.clients import Producer, build_producer
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.inbox.records import RecordFormat
from referral_broker.consumers.inbox.states import Transition
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.consumers.inbox.store_referrals import ReferralRow
from referral_broker.parties import HUB, all_parties
from referral_broker.schemas import codec
from referral_broker.schemas.registry import shared_schema
from referral_broker.structured_log import get_logger

# one process's outbounds (the web server's, the ingest loop's) publish in turn
_PUBLISHING = threading.Lock()

log = get_logger(__name__)

ACCESS_EVENT_FAMILY = "audit_access"
ACCESS_EVENT_KIND = "inbox.access"


class AccessKind(StrEnum):
    VIEWED = "referral_viewed"
    DENIED_OTHER_TEAM = "referral_access_denied"
    NOT_FOUND = "referral_not_found"
    SIGN_IN_REFUSED = "sign_in_refused"
    SIGNED_IN = "signed_in"
    SIGN_IN_THROTTLED = "sign_in_throttled"  # refused unchecked: the subject must wait or is locked
    SIGN_IN_LOCKED = "sign_in_locked"  # an account or address locked (count: its failures)
    EXPORTED = "view_exported"  # a view of the list downloaded as CSV (count: its rows)
    NOTE_ADDED = "case_note_added"
    INFORMATION_RECORDED = "information_recorded"
    # the family objects to research use; the hub takes it in (objections.sync_inbox)
    RESEARCH_OBJECTION = "research_objection"


@dataclass(frozen=True)
class AccessEvent:
    """One access to (or attempt at) the inbox, as the audit topic records it."""

    kind: AccessKind
    at: datetime
    member: str | None
    team: str | None
    referral_id: str | None = None
    version: int | None = None
    count: int | None = None
    # sign-in throttling: "account" or "address", and the subject's short keyed hash (never the
    # typed name or the address itself)
    scope: str | None = None
    subject_ref: str | None = None

    def as_record(self) -> dict[str, Any]:
        """The ``audit_access`` record."""
        return {
            "event_id": str(uuid.uuid4()),
            "kind": self.kind.value,
            "at": self.at.astimezone(UTC),
            "member": self.member,
            "team": self.team,
            "referral_id": self.referral_id,
            "version": self.version,
            "count": self.count,
            "scope": self.scope,
            "subject_ref": self.subject_ref if self.scope is not None else None,
        }


def access_event_value(event: AccessEvent) -> tuple[bytes, bytes]:
    """(key, value): keyed by referral id so one referral's trail stays in order."""
    key = (event.referral_id or event.team or "inbox").encode("utf-8")
    return key, codec.encode(event.as_record(), shared_schema(ACCESS_EVENT_FAMILY))


def inbox_chain(team: str) -> str:
    """The audit chain an inbox signing as ``team`` writes (``audit_chain.chain_owner``)."""
    return f"inbox-{team}"


def status_record(
    decided: Transition,
    referral: ReferralRow,
    *,
    actor_role: str,
    reason: str | None,
    status_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """The ``status.v1`` record for a decided transition (pure: the caller seals it)."""
    if decided.status_code is None:
        raise ValueError(f"{decided.action.value} is not reported to the referrer")
    return {
        "status_id": str(status_id or uuid.uuid4()),
        "referral_id": referral.referral_id,
        "version": referral.version,
        "from_party": referral.team,
        # The referring party; a kind that is not itself a party (a district team referring
        # onward) goes to the hub, whose router knows the sender.
        "to_party": referral.referrer if referral.referrer in all_parties() else HUB,
        "status": decided.status_code,
        "reason": reason,
        "at": decided.at,
        "actor_role": actor_role,
    }


class Outbound:
    """The inbox's one producer: audit events now, status messages from the outbox."""

    def __init__(
        self, settings: Settings, record_format: RecordFormat, producer: Producer | None = None
    ) -> None:
        self.settings = settings
        self.record_format = record_format
        self._producer = producer or build_producer(settings, settings.bootstrap_servers)
        # one chain and one transactional producer per team signing access events
        self._chains: dict[str, tuple[AuditChain, Producer]] = {}
        # Web requests run in a thread pool; the producer wrapper's flush is per caller.
        self._audit_lock = threading.Lock()

    def close(self) -> None:
        self._producer.close()
        with self._audit_lock:
            for _chain, producer in self._chains.values():
                producer.close()
            self._chains.clear()

    def _chain(self, signer: str) -> tuple[AuditChain, Producer]:
        if signer not in self._chains:

            def sign(**signing: Any) -> Any:
                return self.record_format.sign_event(
                    signer, signing["topic"], signing["key"], signing["value"], signing["kind"],
                    extra_headers=signing.get("extra_headers", ()),
                )

            producer = build_producer(
                self.settings,
                self.settings.bootstrap_servers,
                transactional_id=inbox_audit_writer(self.settings, signer),  # what the ACL plan grants
            )
            chain = AuditChain(self.settings, self.settings.bootstrap_servers, inbox_chain(signer), sign)
            self._chains[signer] = (chain, producer)
        return self._chains[signer]

    def audit(self, event: AccessEvent) -> None:
        """Write one access event durably as the next record of the team's chain (with its head,
        in one transaction), or raise :class:`BrokerError` (nothing is shown then)."""
        key, value = access_event_value(event)
        signer = self.record_format.signer(event.team)
        with self._audit_lock:
            chain, producer = self._chain(signer)
            try:
                chain.write_one(producer, key, value, ACCESS_EVENT_KIND)
            except BaseException:
                producer.abandon()  # sends nothing it held; the next event's producer fences the rest
                del self._chains[signer]
                raise
        log.info("access audited", team=event.team, member=event.member, decision=event.kind.value)

    def publish_pending(self, store: InboxStore, *, now: datetime, team: str | None = None) -> int:
        """Send every status message still in the outbox; mark those Kafka confirmed. The web
        server's and the ingest loop's outbounds in one process take turns (``_PUBLISHING``), so
        a status is not sent by both at once; across processes a status may still be sent
        twice, with the same ``status_id``."""
        with _PUBLISHING:
            pending = store.pending_status(team)
            for event in pending:
                assert event.status_record is not None
                record = event.status_record
                topic = record.topic or topic_name(self.settings, "status", event.team)
                self._producer.send(topic, record.value, record.key, record.headers)
            if pending:
                self._producer.flush()
                store.mark_published([e.id for e in pending], now)
                log.info("status messages published", team=team, count=len(pending))
        return len(pending)
