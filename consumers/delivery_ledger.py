"""What the router delivered: for each referral, who referred it and which organisations each
version went to. Statuses are checked against it: a status is accepted only from an
organisation that received that referral, and goes only to that referral's referrer.

Kept on a compacted topic (role ``deliveries``, key = referral id), written by the router in
the same transaction as the deliveries themselves, signed by the hub; every router follows it
(:meth:`DeliveryLedger.catch_up` before each batch), so a status routed by another router
instance is checked against the same facts. Entries hold organisation names and referral ids,
no personal data. A record that is not hub-signed is ignored and counted (a party that can
write the topic must not be able to grant itself a referral).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, ReferralBrokerError
from referral_broker.folders import private_folder
from referral_broker.identity import Identity
from referral_broker.parties import HUB
from referral_broker.sealing import OutgoingMessage
from referral_broker.sealing.envelope import H_KIND, H_SENDER, sign_plain
from referral_broker.structured_log import get_logger

log = get_logger(__name__)
KIND = "delivery"


@dataclass
class Delivered:
    referrer: str
    versions: dict[int, set[str]] = field(default_factory=dict)  # version -> recipients

    def to_json(self) -> dict[str, Any]:
        return {"referrer": self.referrer, "versions": {str(v): sorted(r) for v, r in self.versions.items()}}

    @classmethod
    def from_json(cls, doc: Any) -> Delivered:
        if not isinstance(doc, dict) or not isinstance(doc.get("referrer"), str):
            raise ValueError("not a delivery entry")
        versions = {int(v): {str(p) for p in parties} for v, parties in dict(doc.get("versions") or {}).items()}
        return cls(doc["referrer"], versions)


class _Entries:
    """Committed entries by referral id, in a private SQLite file that lives as long as the
    ledger (a cache of the topic: no journal, no fsync; a crash loses nothing the topic lacks)."""

    def __init__(self, folder: Path) -> None:
        private_folder(folder)
        _remove_orphans(folder)
        fd, name = tempfile.mkstemp(prefix=f"delivery-ledger-{os.getpid()}-", suffix=".sqlite", dir=folder)  # 0600
        os.close(fd)
        self.path = Path(name)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE entry (referral_id TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID")

    def get(self, referral_id: str) -> Delivered | None:
        row = self._db.execute("SELECT doc FROM entry WHERE referral_id = ?", (referral_id,)).fetchone()
        return Delivered.from_json(json.loads(row[0])) if row else None

    def put(self, entries: dict[str, Delivered]) -> None:
        if entries:
            self._db.executemany(
                "INSERT OR REPLACE INTO entry VALUES (?, ?)",
                [(k, json.dumps(e.to_json(), sort_keys=True)) for k, e in entries.items()],
            )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM entry").fetchone()[0])

    def close(self) -> None:
        self._db.close()
        self.path.unlink(missing_ok=True)


def _remove_orphans(folder: Path) -> None:
    """Files left by routers that died without closing their ledger (SIGKILL, power cut): the
    process id in the name is no longer running. A reused id keeps its file (harmless)."""
    for path in folder.glob("delivery-ledger-*-*.sqlite"):
        pid = path.name.split("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass  # another user's live process


@dataclass
class _Run:
    """Entries of one of this router's committed transactions, written back to back to one
    partition of the ledger: offsets ``first`` to ``last``, and what they were (key, digest)."""

    first: int
    last: int
    owns: list[tuple[bytes, bytes]]


# How long after its commit an own entry is still watched for (and read back unverified): its
# commit markers reach the partition within moments; one not read back by then never will be.
OWN_GRACE_S = 60.0


@dataclass
class DeliveryLedger:
    settings: Settings
    bootstrap: str
    hub: Identity
    timeout_s: float = 30.0
    refused: int = 0
    verified: int = 0  # entries read from the topic whose signature was checked
    _pending: dict[str, Delivered] = field(default_factory=dict, init=False, repr=False)
    # this router's committed entries not yet read back: (referral id, digest of the value) ->
    # when committed (monotonic)
    _own: dict[tuple[bytes, bytes], float] = field(default_factory=dict, init=False, repr=False)
    _sent: set[tuple[bytes, bytes]] = field(default_factory=set, init=False, repr=False)
    _store: _Entries | None = field(default=None, init=False, repr=False)
    _consumer: Any = field(default=None, init=False, repr=False)
    # this transaction's entries as sent: where they will be written (a future) and what they are
    _written: list[tuple[Any, tuple[bytes, bytes]]] = field(default_factory=list, init=False, repr=False)
    # this router's committed entries not read back yet, by partition, a run per transaction
    _runs: dict[int, list[_Run]] = field(default_factory=dict, init=False, repr=False)
    skipped: int = 0  # own entries a catch-up passed over without reading them back

    @property
    def topic(self) -> str:
        return topic_name(self.settings, "deliveries")

    @property
    def _entries(self) -> _Entries:
        if self._store is None:
            self._store = _Entries(self.settings.paths_data_dir / "router")
        return self._store

    def __len__(self) -> int:
        """Referrals with a committed entry (as this router has read or written them)."""
        return len(self._entries)

    def lookup(self, referral_id: str) -> Delivered | None:
        return self._pending.get(referral_id) or self._entries.get(referral_id)

    def record(self, referral_id: str, version: int, referrer: str, recipients: set[str]) -> OutgoingMessage:
        """Note a routed version and return the message that makes it durable (sent inside the
        router's transaction; it awaits the batch's signature). It counts for this router's
        lookups at once, and for good only after :meth:`commit` (an aborted transaction's
        entries are dropped by :meth:`abort`)."""
        known = self.lookup(referral_id)
        entry = Delivered(referrer, {v: set(r) for v, r in known.versions.items()} if known else {})
        entry.versions[version] = set(recipients)
        self._pending[referral_id] = entry
        value = json.dumps(entry.to_json(), sort_keys=True).encode()
        self._sent.add((referral_id.encode(), hashlib.sha256(value).digest()))
        topic, key = self.topic, referral_id.encode()
        return sign_plain(self.hub.keystore, topic=topic, key=key, value=value, kind=KIND, sign=False)

    def sent(self, message: OutgoingMessage, written: Any) -> None:
        """Note where an entry of :meth:`record` went (``Producer.send``'s future), so once its
        transaction is committed a catch-up can pass over it instead of reading it back."""
        self._written.append((written, (message.key, hashlib.sha256(message.value).digest())))

    def commit(self) -> None:
        self._entries.put(self._pending)
        self._own.update(dict.fromkeys(self._sent, time.monotonic()))
        self._note_runs()
        self._pending.clear()
        self._sent.clear()

    def abort(self) -> None:
        self._pending.clear()
        self._sent.clear()
        self._written.clear()

    def _note_runs(self) -> None:
        """The committed transaction's entries as one run per partition, where they were
        written back to back; where they were not (or where one went is unknown), that
        partition's (every partition's) runs are dropped and its catch-ups read as before."""
        written, self._written = self._written, []
        by_partition: dict[int, list[tuple[int, tuple[bytes, bytes]]]] = {}
        for future, own in written:
            meta = future.value if future.is_done and future.succeeded() else None
            if meta is None:
                self._runs.clear()
                return
            by_partition.setdefault(meta.partition, []).append((meta.offset, own))
        for partition, entries in by_partition.items():
            entries.sort(key=lambda e: e[0])
            first, last = entries[0][0], entries[-1][0]
            if last - first + 1 != len(entries):  # another writer's records between them
                self._runs.pop(partition, None)
                continue
            self._runs.setdefault(partition, []).append(_Run(first, last, [own for _, own in entries]))

    def _pass_own(self, consumer: Any, tp: Any, end: int) -> None:
        """Seek past this router's own committed entries when they are all that lies between
        the position and ``end`` (the last stable offset): runs of its own records, each with
        one offset after it, its transaction's commit marker. Every transaction of a run below
        ``end`` is decided, so its marker is below ``end`` and is one of those offsets: with
        one offset a run and nothing else left over, no other writer's record is there. Any
        other shape, and the records are read as before (own ones recognised by digest)."""
        runs = self._runs.get(tp.partition)
        if not runs:
            return
        position = consumer.position(tp)
        while runs and runs[0].last < position:
            runs.pop(0)  # read back already
        cursor, passed = position, 0
        for run in runs:
            if run.first != cursor or run.last + 2 > end:
                break
            cursor = run.last + 2
            passed += 1
        if passed == 0 or cursor != end:
            return
        for run in runs[:passed]:
            for own in run.owns:
                self._own.pop(own, None)
            self.skipped += len(run.owns)
        del runs[:passed]
        consumer.seek(tp, end)

    def _follow(self) -> Any:
        from referral_broker.cluster.clients import build_consumer

        if self._consumer is None:
            consumer = build_consumer(self.settings, self.bootstrap, [self.topic], group_id=None)
            if not consumer.assignment():
                consumer.close()
                raise BrokerError(f"the delivery ledger topic {self.topic} does not exist; run 'referral-broker topics ensure'")
            consumer.seek_to_beginning(*consumer.assignment())
            self._consumer = consumer
        return self._consumer

    def end_offsets(self, also: list[Any]) -> dict[Any, int]:
        """The ledger's end offsets and those of ``also`` (another topic's partitions, as this
        consumer reads: committed data only), in one request: the router asks for the
        registry's with them before every batch, one round trip instead of two."""
        from kafka.errors import KafkaError

        consumer = self._follow()
        own = list(consumer.assignment())
        try:
            try:
                return dict(consumer.end_offsets([*own, *also]))
            except KeyError:
                # kafka-python raises on a partition whose leader it does not know yet, having
                # asked for its metadata (the next call has it): the other topic's reader asks
                # for its own ends this once
                return dict(consumer.end_offsets(own))
        except KafkaError as exc:
            self._lost(consumer)
            raise BrokerError(f"reading the delivery ledger failed: {type(exc).__name__}") from exc

    def _lost(self, consumer: Any) -> None:
        # a consumer that lost its partition leader (a node died) can keep timing out after
        # the cluster recovered: the next catch-up reads the ledger again with a new one
        self._consumer = None
        with contextlib.suppress(Exception):
            consumer.close()

    def catch_up(self, end: dict[Any, int] | None = None) -> None:
        """Apply entries committed since the last call (by this router or another), up to the
        end offsets as of this call (``end``: :meth:`end_offsets`' just now)."""
        from kafka.errors import KafkaError

        from referral_broker.cluster.clients import end_offsets, read_to_end

        consumer = self._follow()
        try:
            partitions = list(consumer.assignment())
            end = end_offsets(consumer, partitions, end)
            for tp in partitions:
                self._pass_own(consumer, tp, end.get(tp, 0))
            what = "the delivery ledger"
            reading = read_to_end(consumer, partitions, end, what=what, timeout_s=self.timeout_s)
            for batch in reading:
                changed: dict[str, Delivered] = {}
                for record in batch:
                    self._apply(record, changed)
                self._entries.put(changed)
            self._forget_unseen()
        except KafkaError as exc:
            self._lost(consumer)
            raise BrokerError(f"reading the delivery ledger failed: {type(exc).__name__}") from exc

    def _apply(self, record: Any, changed: dict[str, Delivered]) -> None:
        if self._own and record.value is not None:
            own = (record.key, hashlib.sha256(record.value).digest())
            if own in self._own:
                del self._own[own]
                return  # this router's own entry, byte for byte: made here, applied at commit
        try:
            headers = self.hub.opener.verify(record)
            if headers.get(H_SENDER, b"").decode() != HUB or headers.get(H_KIND, b"").decode() != KIND:
                raise ValueError("not a hub-signed delivery entry")
            entry = Delivered.from_json(json.loads(record.value))
            key = record.key.decode("ascii")
            self.verified += 1
        except (ReferralBrokerError, ValueError, TypeError, UnicodeDecodeError, AttributeError):
            self.refused += 1
            log.warning(
                "delivery ledger record refused", topic=record.topic, partition=record.partition, offset=record.offset
            )
            return
        known = changed.get(key) or self._entries.get(key)
        if known is None:
            changed[key] = entry
        else:  # a later write of the same referral: versions add up (this router's may be newer)
            known.referrer = entry.referrer
            for version, recipients in entry.versions.items():
                known.versions[version] = recipients
            changed[key] = known

    def _forget_unseen(self) -> None:
        """Stop watching for own entries committed over ``OWN_GRACE_S`` ago and still not read
        back (compacted away by a later entry of the same referral). Not those just committed: a
        commit returns before its markers reach the ledger's partitions, so the end a catch-up
        reads to can still be short of them, and the next catch-up reads them."""
        if not self._own:
            return
        cutoff = time.monotonic() - OWN_GRACE_S
        for own in [own for own, at in self._own.items() if at < cutoff]:
            del self._own[own]

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._store is not None:
            self._store.close()
            self._store = None
        # the next catch-up reads the whole topic into a new file, this router's entries too
        self._own.clear()
        self._runs.clear()
        self.abort()
