"""Direct sending, without the outbox: canonical referrals (and status messages), sealed for the
council's hub alone, signed by the party and produced to its own topics, confirmed before return.

Partners send through :class:`~referral_broker.producers.sending.PartnerSender`, which keeps
each sealed message in a durable outbox first; this sender is for in-process producers (the
router benchmark, test fixtures) that hold their records in memory and can simply send again.

Each referral is validated exactly once: a :class:`~referral_broker.producers.checked.CheckedReferral`
was validated by the reader that made it, anything else is validated here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from referral_broker.cluster.clients import build_producer
from referral_broker.config import Settings
from referral_broker.identity import Identity, load_identity

from .checked import CheckedReferral, check_referrals
from .hub_seal import HubSealer


@dataclass(frozen=True)
class Sent:
    referral_id: str
    version: int
    topic: str


def as_checked(records: Iterable[dict[str, Any] | CheckedReferral]) -> Iterator[CheckedReferral]:
    """Checked referrals pass through; anything else is validated here (once)."""
    for record in records:
        if isinstance(record, CheckedReferral):
            yield record
        else:
            yield from check_referrals([record])


class IntakeSender:
    """Sends as one party. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self, settings: Settings, bootstrap: str, party: str, *, identity: Identity | None = None
    ) -> None:
        self.settings = settings
        self.party = party
        self.identity = identity or load_identity(settings, bootstrap, party)
        self.sealer = HubSealer(self.identity.sealer, settings, party)
        self.canonical = self.sealer.referral_schema
        self.producer = build_producer(settings, bootstrap)

    def send_referrals(
        self,
        records: Iterable[dict[str, Any] | CheckedReferral],
        *,
        progress: Callable[[int], None] = lambda n: None,
    ) -> list[Sent]:
        """Seal for the hub, sign and send each referral; confirm all before returning."""
        sent: list[Sent] = []
        for checked in as_checked(records):
            message = self.sealer.referral(checked.record)
            message.send(self.producer)
            sent.append(Sent(checked.referral_id, checked.version, message.topic))
            if len(sent) % 500 == 0:
                self.producer.flush()
                progress(500)
        self.producer.flush()
        progress(len(sent) % 500)
        return sent

    def send_status(self, status: dict[str, Any]) -> Sent:
        """A status (accepted, declined with reason, more information needed...) for the referrer,
        carried back through the router (validated and sealed by the one status sealer)."""
        message = self.sealer.status(status)
        message.send(self.producer)
        self.producer.flush()
        return Sent(str(status["referral_id"]), int(status["version"]), message.topic)

    def close(self) -> None:
        self.producer.close()

    def __enter__(self) -> IntakeSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
