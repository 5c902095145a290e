"""Direct sending, without the outbox: canonical referrals (and status messages), sealed for the
council's hub alone, signed by the party and produced to its own topics, confirmed before return.

Partners send through :class:`~referral_broker.producers.sending.PartnerSender`, which keeps
each sealed message in a durable outbox first; this sender is for in-process producers (the
router benchmark, test fixtures) that hold their records in memory and can simply send again.

Each referral is validated exactly once: a :class:`~referral_broker.producers.checked.CheckedReferral`
was validated by the reader that made it, anything else is validated here.
"""

from __future__ import annotations

import uuid
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from referral_broker.cluster.clients import build_producer
from referral_broker.config import Settings
from referral_broker.identity import Identity, load_identity
from referral_broker.sealing.envelope import OutgoingMessage

from .checked import CheckedReferral, referral_checker
from .hub_seal import HubSealer


@dataclass(frozen=True)
class Sent:
    referral_id: str
    version: int
    topic: str


class SentList(Sequence[Sent]):
    """What a send did with each row, kept compact: 25 bytes a row (a referral id that is a
    UUID as its 16 bytes, the version, the topic's index) instead of some 300 as objects, so a
    1M-row batch's report is 25 MB and the send's memory stays flat. Reads as a list of
    :class:`Sent`; an id in any other form is kept as it is."""

    def __init__(self, items: Iterable[Sent] = ()) -> None:
        self._ids = bytearray()
        self._versions = array("q")
        self._topic_at = array("B")
        self._topics: list[str] = []
        self._other: dict[int, str] = {}  # row -> a referral id not in canonical UUID form
        for item in items:
            self.append(item)

    def append(self, sent: Sent) -> None:
        row = len(self._versions)
        if sent.topic not in self._topics:
            if len(self._topics) == 256:
                raise ValueError("a send report spans at most 256 topics")
            self._topics.append(sent.topic)
        try:
            parsed = uuid.UUID(sent.referral_id)
        except ValueError:
            parsed = None
        if parsed is not None and str(parsed) == sent.referral_id:
            self._ids += parsed.bytes
        else:
            self._ids += bytes(16)
            self._other[row] = sent.referral_id
        self._versions.append(sent.version)
        self._topic_at.append(self._topics.index(sent.topic))

    def _at(self, row: int) -> Sent:
        rid = self._other.get(row) or str(uuid.UUID(bytes=bytes(self._ids[row * 16 : row * 16 + 16])))
        return Sent(rid, self._versions[row], self._topics[self._topic_at[row]])

    def __len__(self) -> int:
        return len(self._versions)

    @overload
    def __getitem__(self, index: int) -> Sent: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sent]: ...

    def __getitem__(self, index: int | slice) -> Sent | list[Sent]:
        if isinstance(index, slice):
            return [self._at(row) for row in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("send report row out of range")
        return self._at(index)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    def __repr__(self) -> str:
        return f"SentList({list(self)!r})"


def as_checked(records: Iterable[dict[str, Any] | CheckedReferral]) -> Iterator[CheckedReferral]:
    """Checked referrals pass through; anything else is validated here (once), all against
    one :func:`~.checked.referral_checker`."""
    check: Callable[[dict[str, Any]], CheckedReferral] | None = None
    for record in records:
        if isinstance(record, CheckedReferral):
            yield record
        else:
            check = check or referral_checker()
            yield check(record)


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
        """Seal each referral for the hub and send it; confirm all before returning. Each 500
        go out under one signature (the router verifies one for all of them)."""
        sent: list[Sent] = []
        waiting: list[OutgoingMessage] = []

        def send_waiting() -> None:
            for message in self.sealer.sign_batch(waiting):
                message.send(self.producer)
            self.producer.flush()
            progress(len(waiting))
            waiting.clear()

        for checked in as_checked(records):
            waiting.append(self.sealer.referral(checked.record, sign=False))
            sent.append(Sent(checked.referral_id, checked.version, waiting[-1].topic))
            if len(waiting) == 500:
                send_waiting()
        send_waiting()
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
