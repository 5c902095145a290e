"""What a partner system calls to send: a whole file of referrals, or one status message.

    sender = PartnerSender(settings, bootstrap, "schools")
    report = sender.send_file("export.csv")     # validate all, seal, keep in the outbox, deliver
    with OutboxDrain(settings, bootstrap, "schools"): ...  # long-running: deliver what is queued
    report.delivered, report.queued, report.already_sent, report.rejected
    flush_outbox(settings, bootstrap, "schools")  # deliver what an earlier send left queued

The file is read and validated whole (:func:`~referral_broker.producers.checked.check_file`)
before anything touches Kafka. Each good record is sealed for the hub, signed, and written to
the party's outbox (:mod:`~referral_broker.producers.outbox`) before it is produced; the outbox
marks it delivered when Kafka acknowledges it. A native file of 4 MB or more is checked and
sealed by worker processes, one a core (:mod:`~referral_broker.producers.file_pool`), and kept
and delivered here in the same order. A referral (id, version) already in the outbox
is not sent again, nor sealed again: sending the same file twice sends it once. When the cluster cannot be
reached, or fails mid-file, the rest stays queued and ``report.queued`` says which; nothing is
lost and ``referral-broker outbox flush`` (or the next ``send``) delivers it once.

Sealing needs the key directory: it is read from the ``keys`` topic, or, when the cluster cannot
be reached, from the local copy (``<data>/keys/directory.json``), so a file can still be sealed
and queued during an outage.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from referral_broker.config import Settings
from referral_broker.errors import BrokerError, DeliveryPendingError
from referral_broker.identity import Identity, load_directory, load_identity
from referral_broker.parties import get_party, require_sender
from referral_broker.sealing import KeyDirectory
from referral_broker.sealing.envelope import OutgoingMessage, sign_awaiting
from referral_broker.structured_log import get_logger

from .checked import CheckedFile, CheckedReferral, check_file, read_canonical_lines
from .delivery import BATCH, Delivery
from .file_pool import SealedReferral
from .hub_seal import REFERRAL_KIND, STATUS_KIND, HubSealer
from .intake import Sent, SentList, as_checked
from .outbox import DELIVERED, Entry, Outbox, referral_message_id, status_message_id

log = get_logger(__name__)
T = TypeVar("T")

__all__ = [
    "FlushReport",
    "OutboxDrain",
    "PartnerSender",
    "SendReport",
    "flush_outbox",
    "read_canonical_lines",
]


@dataclass
class SendReport:
    """What became of each good record of a file (ids only), and the rejected ones."""

    delivered: SentList = field(default_factory=SentList)  # acknowledged by Kafka in this run
    queued: SentList = field(default_factory=SentList)  # in the outbox, not yet acknowledged
    already_sent: SentList = field(default_factory=SentList)  # delivered by an earlier run
    rejected: list[str] = field(default_factory=list)  # "file: record N: path: reason", no values
    earlier: int = 0  # messages queued by earlier runs that this run delivered as well
    error: str | None = None  # why delivery stopped, when it did (no values)

    @property
    def sent(self) -> SentList:
        """Delivered in this run (the name the API had before the outbox)."""
        return self.delivered

    def raise_if_pending(self, party: str) -> None:
        if self.queued:
            raise DeliveryPendingError(pending_message(len(self.delivered), len(self.queued), party, self.error))


def pending_message(delivered: int, queued: int, party: str, error: str | None) -> str:
    why = f" ({error})" if error else ""
    return (
        f"{delivered} delivered, {queued} queued in the outbox{why}; "
        f"'referral-broker outbox flush --as {party}' delivers them"
    )


@dataclass
class FlushReport:
    delivered: list[tuple[str, str, int]]  # (kind, referral id, version)
    found: int  # in doubt after a crash and found already on the topic
    queued: list[tuple[str, str, int]]
    error: str | None = None


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _message(checked: CheckedReferral | SealedReferral, sealer: HubSealer) -> OutgoingMessage:
    """The referral's sealed message: sealed here (awaiting the batch's signature), or sealed
    and signed by a pool worker."""
    if not isinstance(checked, SealedReferral):
        return sealer.referral(checked.record, sign=False)
    if checked.message is None:  # the outbox is this process's alone while it sends
        raise BrokerError(f"referral {checked.referral_id} version {checked.version} left the outbox during the send")
    return checked.message


def _signed(entries: list[Entry], sealer: HubSealer) -> list[Entry]:
    """The batch's entries with the messages sealed here signed together, under one signature."""
    messages = sign_awaiting([e.message for e in entries], sealer.sign_batch)
    return [e if m is e.message else replace(e, message=m) for e, m in zip(entries, messages, strict=True)]


class PartnerSender:
    """Sends as one party through its outbox. Nothing connects until a send.

    ``offline`` (why the cluster is known to be unreachable, e.g. the CLI's reachability check
    failed) skips every connection: messages are sealed with the local key directory and queued.
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        party: str,
        *,
        identity: Identity | None = None,
        offline: str | None = None,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.party = require_sender(party).name
        self._identity = identity
        self.offline = offline

    def send_file(
        self,
        path: str | Path,
        *,
        fmt: str = "native",
        skip_invalid: bool = False,
        progress: Callable[[int], object] = lambda n: None,
        on_total: Callable[[int], object] = lambda n: None,
        on_checked: Callable[[int], object] | None = None,
    ) -> SendReport:
        """Validate every record of the file first (PartnerInputError, nothing sent, if any is
        invalid, unless ``skip_invalid``), then seal, keep and deliver the good ones."""
        checked = check_file(
            self.party, path, fmt=fmt, skip_invalid=skip_invalid, on_checked=on_checked, settings=self.settings
        )
        on_total(checked.total)
        return self.send_checked(checked, progress=progress)

    def send_checked(
        self,
        records: CheckedFile | Iterable[CheckedReferral | dict[str, Any]],
        *,
        progress: Callable[[int], object] = lambda n: None,
    ) -> SendReport:
        """Seal each referral for the hub, keep it in the outbox, deliver; see :class:`SendReport`.

        Each batch is read back from the outbox once delivered (a run that fails leaves the rest
        queued, so a batch's states are final then), and only the report's compact rows are
        kept: a 1M-row file is sent in flat memory."""
        try:
            return self._send(records, progress)
        finally:
            if isinstance(records, CheckedFile):
                records.close()

    def _send(
        self, records: CheckedFile | Iterable[CheckedReferral | dict[str, Any]], progress: Callable[[int], object]
    ) -> SendReport:
        report = SendReport(rejected=list(records.rejected) if isinstance(records, CheckedFile) else [])
        with Outbox.open(self.settings, self.party) as outbox:
            identity, reachable = self._load_identity()
            sealer = HubSealer(identity.sealer, self.settings, self.party)
            topic = sealer.intake_topic
            items: Iterable[CheckedReferral | SealedReferral] = (
                records.pool.sealed(identity.directory, kept=lambda mids: outbox.kept(topic, mids))
                if isinstance(records, CheckedFile) and records.pool is not None
                else as_checked(records)
            )
            with self._delivery(outbox, reachable) as delivery:
                delivery.run(progress)  # settle what a killed run left in doubt; earlier queue
                # delivered by this run before the file (an earlier run's queue): "delivered"
                initial = {r.message_id for r in delivery.delivered if r.topic == topic}
                delivery.delivered.clear()
                delivery.keep = False
                mark = outbox.last_id()  # rows kept from here on are this file's
                # ids an earlier run kept, met once in this input; a checked file holds each id
                # and version once (repeats are refused), so a re-sent 1M-row file keeps none
                from_earlier: set[str] = set()
                may_repeat = not isinstance(records, CheckedFile)
                for batch in _batches(items, BATCH):
                    ids = [referral_message_id(c.referral_id, c.version) for c in batch]
                    kept = outbox.kept(topic, ids)
                    rows: list[tuple[str, Sent, str | None]] = []
                    in_batch: set[str] = set()
                    entries = []
                    for checked, mid in zip(batch, ids, strict=True):
                        sent = Sent(checked.referral_id, checked.version, topic)
                        was = kept.get(mid)
                        if mid in in_batch or (was is not None and (was[1] > mark or mid in from_earlier)):
                            report.already_sent.append(sent)  # the same referral version twice in one file: once
                            continue
                        in_batch.add(mid)
                        rows.append((mid, sent, None if was is None else was[0]))
                        if was is None:
                            entries.append(
                                Entry(_message(checked, sealer), mid, REFERRAL_KIND, checked.referral_id, checked.version)
                            )
                        elif may_repeat:
                            from_earlier.add(mid)
                    outbox.add(_signed(entries, sealer))
                    delivery.run(progress)
                    now = outbox.states(topic, [mid for mid, _, _ in rows])
                    for mid, sent, state in rows:
                        if now.get(mid) != DELIVERED:
                            report.queued.append(sent)
                        elif state == DELIVERED and mid not in initial:
                            report.already_sent.append(sent)  # by an earlier run (or found in doubt)
                        else:
                            report.delivered.append(sent)
                report.error = delivery.error
                report.earlier = delivery.count - len(report.delivered)
        log.info(
            "send finished",
            party=self.party,
            count=len(report.delivered),
            queued=len(report.queued),
            already_sent=len(report.already_sent),
        )
        return report

    def send_status(self, status: dict[str, Any]) -> Sent:
        """A status (accepted, declined with reason, more information needed...) for the referrer,
        carried back through the router: validated and sealed by the one status sealer, kept in
        the outbox, delivered. Raises DeliveryPendingError when it stays queued."""
        with Outbox.open(self.settings, self.party) as outbox:
            identity, reachable = self._load_identity()
            sealer = HubSealer(identity.sealer, self.settings, self.party)
            message = sealer.status(status)
            mid = status_message_id(str(status["status_id"]))
            sent = Sent(str(status["referral_id"]), int(status["version"]), message.topic)
            outbox.add([Entry(message, mid, STATUS_KIND, sent.referral_id, sent.version)])
            with self._delivery(outbox, reachable) as delivery:
                delivery.run()
                state = outbox.states(message.topic, [mid]).get(mid)
        if state != DELIVERED:
            raise DeliveryPendingError(pending_message(0, 1, self.party, delivery.error))
        return sent

    def _delivery(self, outbox: Outbox, reachable: bool) -> Delivery:
        return Delivery(outbox, self.settings, self.bootstrap, reachable=reachable, error=self.offline)

    def _load_identity(self) -> tuple[Identity, bool]:
        """The party's identity, and whether the cluster answered while loading it."""
        if self._identity is not None:
            return self._identity, self.offline is None
        try:
            if self.offline is not None:
                raise BrokerError(self.offline)
            directory = load_directory(self.settings, self.bootstrap)
            reachable = True
        except BrokerError as exc:
            local = self.settings.keys_dir / "directory.json"
            if not local.exists():
                raise
            log.info("key directory topic unreachable; sealing with the local copy", error=str(exc))
            directory = KeyDirectory.load_local(self.settings)
            reachable = False
        identity = load_identity(self.settings, self.bootstrap, self.party, directory=directory)
        if reachable:
            self._identity = identity
        return identity, reachable


def flush_outbox(
    settings: Settings,
    bootstrap: str,
    party: str,
    *,
    progress: Callable[[int], object] = lambda n: None,
    offline: str | None = None,
) -> FlushReport:
    """Deliver everything ``party``'s outbox holds queued, once (nothing when ``offline``)."""
    with Outbox.open(settings, party) as outbox:
        with Delivery(outbox, settings, bootstrap, reachable=offline is None, error=offline) as delivery:
            delivery.run(progress)
        return FlushReport(
            [(r.kind, r.referral_id, r.version) for r in delivery.delivered],
            delivery.found,
            outbox.queued_referrals(),
            delivery.error,
        )


def outbox_status(settings: Settings, party: str) -> dict[str, Any]:
    """Counts by state and the queued messages (ids only); touches no network."""
    with Outbox.open(settings, party) as outbox:
        counts = outbox.summary()
        queued = outbox.queued_referrals()
    return {
        "party": get_party(party).name,
        "path": str(outbox.path),
        "queued": [{"kind": k, "referral_id": rid, "version": v} for k, rid, v in queued],
        "counts": counts,
    }


class OutboxDrain:
    """Delivers what ``party``'s outbox holds queued, in the background, for long-running
    processes that send (a partner's integration service, ``outbox flush --every``).

    Every ``interval_s`` it flushes when something is queued; after a failed flush it waits
    longer (doubling, up to ``max_interval_s``) so an outage is not hammered, and it logs one
    line per change between reachable and not. A ``send`` in the same moment finds the outbox
    busy and is retried on the next tick, never lost: the outbox is the record.
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        party: str,
        *,
        interval_s: float = 5.0,
        max_interval_s: float = 120.0,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.party = get_party(party).name
        self.interval_s = interval_s
        self.max_interval_s = max_interval_s
        self.delivered = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        """One pass: True when nothing is left queued."""
        try:
            with Outbox.open(self.settings, self.party) as outbox:
                if not outbox.queued_referrals():
                    return True
            report = flush_outbox(self.settings, self.bootstrap, self.party)
        except BrokerError as exc:  # the outbox in use by a send, or the cluster unreachable
            self.failures += 1
            log.warning("outbox drain: will retry", party=self.party, error=str(exc))
            return False
        self.delivered += len(report.delivered)
        if report.delivered:
            log.info("outbox drain delivered", party=self.party, count=len(report.delivered))
        if report.queued:
            self.failures += 1
            log.warning("outbox drain: still queued", party=self.party, count=len(report.queued))
        return not report.queued

    def run(self) -> None:
        """Drain until :meth:`stop`; backs off while the cluster is away."""
        wait = self.interval_s
        while not self._stop.is_set():
            wait = self.interval_s if self.tick() else min(wait * 2, self.max_interval_s)
            self._stop.wait(wait)

    def start(self) -> OutboxDrain:
        self._thread = threading.Thread(target=self.run, name=f"outbox-drain-{self.party}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> OutboxDrain:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
