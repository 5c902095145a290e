"""What leaves a partner: validated canonical referrals (and status messages), sealed for the
council's hub alone, signed by the partner and produced to the partner's own topics.

Nothing is sent from a set that has an invalid record unless the caller asked to skip invalid
ones (the adapters decide that); every send is confirmed durable before this returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from referral_broker.cluster.clients import build_producer
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.identity import Identity, load_identity
from referral_broker.parties import HUB, all_parties
from referral_broker.schemas.registry import referral_schema, status_schema
from referral_broker.schemas.validation import ensure_valid


@dataclass(frozen=True)
class Sent:
    referral_id: str
    version: int
    topic: str


class IntakeSender:
    """Sends as one party. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self, settings: Settings, bootstrap: str, party: str, *, identity: Identity | None = None
    ) -> None:
        self.settings = settings
        self.party = party
        self.identity = identity or load_identity(settings, bootstrap, party)
        self.producer = build_producer(settings, bootstrap)
        self.canonical = referral_schema()
        self.status = status_schema()

    def send_referrals(
        self, records: Iterable[dict[str, Any]], *, progress: Callable[[int], None] = lambda n: None
    ) -> list[Sent]:
        """Validate, seal for the hub, sign and send each referral; confirm all before returning."""
        topic = topic_name(self.settings, "intake", self.party)
        sent: list[Sent] = []
        for record in records:
            ensure_valid(record, self.canonical)
            self._seal_for_hub(record, self.canonical, topic, "referral").send(self.producer)
            sent.append(Sent(str(record["referral_id"]), record["version"], topic))
            if len(sent) % 500 == 0:
                self.producer.flush()
                progress(500)
        self.producer.flush()
        progress(len(sent) % 500)
        return sent

    def send_status(self, status: dict[str, Any]) -> Sent:
        """A status (accepted, declined with reason, more information needed...) for the referrer,
        carried back through the router."""
        ensure_valid(status, self.status, context="status", known_parties=all_parties())
        topic = topic_name(self.settings, "status", self.party)
        self._seal_for_hub(status, self.status, topic, "status").send(self.producer)
        self.producer.flush()
        return Sent(str(status["referral_id"]), status["version"], topic)

    def _seal_for_hub(self, record: dict[str, Any], schema: dict[str, Any], topic: str, kind: str) -> Any:
        """Only the council's hub can open what a partner sends; the router re-seals per recipient."""
        return self.identity.sealer.seal(
            record,
            schema,
            topic=topic,
            recipient=HUB,
            referral_id=str(record["referral_id"]),
            referral_version=record["version"],
            kind=kind,
        )

    def close(self) -> None:
        self.producer.close()

    def __enter__(self) -> IntakeSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
