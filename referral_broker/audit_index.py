"""The hub's local index of the audit topic, so ``audit subject`` reads only the records about
one person instead of the whole trail (issue 16, Build 2).

A 0600 SQLite file in a 0700 folder of the hub's data dir (``<data>/audit-index/<audit
topic>.sqlite3``) maps

* a subject key (the keyed hash a decision's ``subject_keys`` holds) to the decisions that name
  it, by (partition, offset), and
* a referral (case) to every audit record keyed by it, by (partition, offset),

both as the first 8 bytes of a keyed hash: the subject key itself for the first, HMAC-SHA256 of
the referral id under the hub's subject secret for the second. It holds no identifier, no
referral id and no value, only truncated keyed hashes and offsets. Truncation only makes a
lookup read a record it did not need: every candidate is decoded, matched and its signature
checked by :func:`referral_broker.audit_log.subject_history` exactly as a full scan would, so
the index can make a lookup faster, never different.

It is brought up to date before each lookup: from the next offset it has not read in each
partition to the end (``read_committed``), a decision's subject keys found in its raw Avro value
(each is a 64-character hex string, written after its length ``\\x80\\x01``; something else that
looks the same only adds a candidate). A missing file is built from the start; a file that is
not a database, was made for another topic or under another secret, or a partition whose end is
now before what the index read (the topic was recreated) is dropped and rebuilt, each with a
message saying why.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from referral_broker.cluster.clients import Record
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, StoreError
from referral_broker.folders import private_folder

INDEX_FORMAT = "1"
CHUNK = 20_000  # records indexed per SQLite transaction while catching up
SEEK_GAP = 2_000  # a wanted offset further than this past the position is seeked to, not read up to
_SUBJECT_KEY = re.compile(rb"\x80\x01([0-9a-f]{64})")
_DECISION = b"audit.decision"
_CHECKPOINT = b"audit.checkpoint"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS position (partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS record (
    partition INTEGER NOT NULL, offset INTEGER NOT NULL, rid INTEGER NOT NULL,
    PRIMARY KEY (partition, offset)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS record_rid ON record (rid);
CREATE TABLE IF NOT EXISTS subject (
    key INTEGER NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
    PRIMARY KEY (key, partition, offset)
) WITHOUT ROWID;
"""


def index_path(settings: Settings) -> Path:
    from referral_broker.cluster.topics import topic_name

    return settings.paths_data_dir / "audit-index" / f"{topic_name(settings, 'audit')}.sqlite3"


def _h8(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big", signed=True)


class IndexDamaged(Exception):
    """The index cannot be used as it is: rebuild it (the message says why, no value)."""


@dataclass
class CatchUp:
    """What bringing the index up to date did."""

    read: int = 0  # audit records read from Kafka
    indexed: int = 0  # of them, records added to the index
    seconds: float = 0.0
    rebuilt: str | None = None  # why the index was built from the start, when it was


class AuditIndex:
    """One open index file; :meth:`open` makes, checks or rebuilds it."""

    def __init__(self, path: Path, db: sqlite3.Connection, secret: bytes, topic: str) -> None:
        self.path = path
        self._db = db
        self._secret = secret
        self.topic = topic

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: Settings, secret: bytes) -> tuple[AuditIndex, str | None]:
        """The index and, when it had to be (re)made from nothing, why (for the user)."""
        from referral_broker.cluster.topics import topic_name

        path = index_path(settings)
        topic = topic_name(settings, "audit")
        why: str | None = None
        if not path.exists():
            why = "there was no audit index yet"
        else:
            index: AuditIndex | None = None
            try:  # a file that is not a database fails at its first statement (a pragma, or check)
                index = cls._connect(path, secret, topic)
                index.check()
                return index, None
            except IndexDamaged as exc:
                why = str(exc)
            except sqlite3.DatabaseError as exc:
                why = f"the audit index was unreadable ({str(exc)[:60]})"
            if index is not None:
                index.close()
            cls.remove(path)
        return cls._connect(path, secret, topic, fresh=True), why

    @classmethod
    def _connect(cls, path: Path, secret: bytes, topic: str, *, fresh: bool = False) -> AuditIndex:
        private_folder(path.parent)
        os.chmod(path.parent, 0o700)
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
        try:
            db = sqlite3.connect(path, isolation_level=None, timeout=120)
        except sqlite3.Error as exc:
            raise StoreError(f"the audit index {path} cannot be opened ({type(exc).__name__})") from None
        try:
            db.execute("PRAGMA cache_size = -65536")  # 64 MiB: hashed keys insert at random places
        except sqlite3.DatabaseError:
            db.close()
            raise
        index = cls(path, db, secret, topic)
        if not fresh:
            return index  # check() reads it: a file that is not a database fails there
        try:
            db.execute("PRAGMA journal_mode=DELETE")
            db.executescript(_SCHEMA)
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [("format", INDEX_FORMAT), ("topic", topic), ("secret", index._fingerprint())],
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"the audit index {path} cannot be written ({type(exc).__name__})") from None
        return index

    def _fingerprint(self) -> str:
        return hmac.new(self._secret, b"audit-index/secret", hashlib.sha256).hexdigest()[:16]

    def check(self) -> None:
        """IndexDamaged when the file is not this topic's index under this secret."""
        meta = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        if meta.get("format") != INDEX_FORMAT:
            raise IndexDamaged("the audit index was written in another format")
        if meta.get("topic") != self.topic:
            raise IndexDamaged("the audit index was made for another audit topic")
        if meta.get("secret") != self._fingerprint():
            raise IndexDamaged("the audit index was made under another subject secret")
        self._db.execute("SELECT count(*) FROM position").fetchone()

    @staticmethod
    def remove(path: Path) -> None:
        for p in (path, path.with_name(path.name + "-journal")):
            if p.exists():
                p.unlink()

    def close(self) -> None:
        self._db.close()

    # -- hashes -------------------------------------------------------------------------------
    def _case(self, rid: bytes) -> int:
        return _h8(hmac.digest(self._secret, b"audit-index/case:" + rid, "sha256"))

    @staticmethod
    def _subject(key_hex: str | bytes) -> int:
        value = int(key_hex[:16], 16)  # the first 8 bytes of the hash, as a signed 64-bit integer
        return value - (1 << 64) if value >= 1 << 63 else value

    # -- reading ------------------------------------------------------------------------------
    def positions(self) -> dict[int, int]:
        return {int(p): int(o) for p, o in self._db.execute("SELECT partition, next_offset FROM position")}

    def size(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM record").fetchone()[0])

    def for_subject(self, key_hex: str) -> dict[int, list[int]]:
        """Every record of every referral one of whose decisions names ``key_hex``."""
        rows = self._db.execute(
            "SELECT DISTINCT r2.partition, r2.offset FROM subject s"
            " JOIN record r1 ON r1.partition = s.partition AND r1.offset = s.offset"
            " JOIN record r2 ON r2.rid = r1.rid"
            " WHERE s.key = ?",
            (self._subject(key_hex),),
        )
        return _grouped(rows)

    def for_case(self, referral_id: str) -> dict[int, list[int]]:
        rows = self._db.execute(
            "SELECT partition, offset FROM record WHERE rid = ?", (self._case(referral_id.encode()),)
        )
        return _grouped(rows)

    # -- writing ------------------------------------------------------------------------------
    def add(self, records: list[Record], positions: dict[int, int]) -> int:
        """Index ``records`` and move each partition's position on to ``positions`` (never
        back), in one transaction. Another process catching up at the same time adds the same
        rows, which are ignored."""
        rows: list[tuple[int, int, int]] = []
        subjects: list[tuple[int, int, int]] = []
        cases: dict[bytes, int] = {}  # a referral's records come together: hash each id once
        for r in records:
            if r.key is None or r.value is None:
                continue
            kind = next((bytes(v) for n, v in r.headers if n == "rb-kind"), b"")
            if kind == _CHECKPOINT:
                continue
            case = cases.get(r.key)
            if case is None:
                case = cases[r.key] = self._case(r.key)
            rows.append((r.partition, r.offset, case))
            if kind == _DECISION:
                for found in set(_SUBJECT_KEY.findall(r.value)):
                    subjects.append((self._subject(found), r.partition, r.offset))
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("INSERT OR IGNORE INTO record VALUES (?, ?, ?)", rows)
            self._db.executemany("INSERT OR IGNORE INTO subject VALUES (?, ?, ?)", subjects)
            self._db.executemany(
                "INSERT INTO position VALUES (?, ?) ON CONFLICT (partition) DO UPDATE"
                " SET next_offset = max(next_offset, excluded.next_offset)",
                list(positions.items()),
            )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return len(rows)


def _grouped(rows: Iterator[Any] | sqlite3.Cursor) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for partition, offset in rows:
        out.setdefault(int(partition), []).append(int(offset))
    return {p: sorted(o) for p, o in out.items()}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process at a time opens, rebuilds and catches up the index (a lookup that finds
    another building it waits for it rather than take a half-made file for a damaged one)."""
    import fcntl

    private_folder(path.parent)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def _consumer(settings: Settings, bootstrap: str, topic: str, **overrides: Any) -> Iterator[Any]:
    from referral_broker.cluster.clients import build_consumer

    consumer = build_consumer(settings, bootstrap, [topic], group_id=None, **overrides)
    try:
        if not consumer.assignment():
            raise BrokerError(f"the audit topic {topic} does not exist; run 'referral-broker topics ensure'")
        yield consumer
    finally:
        consumer.close()


def catch_up(
    index: AuditIndex,
    settings: Settings,
    bootstrap: str,
    *,
    progress: Callable[[int], object] | None = None,
    stall_s: float = 30.0,
) -> CatchUp:
    """Read the audit topic from where the index stopped to its end and index what is new.
    IndexDamaged when a partition now ends before what the index read (a recreated topic)."""
    from kafka.errors import KafkaError

    from referral_broker.cluster.clients import read_to_end

    started = time.monotonic()
    result = CatchUp()
    try:
        # big fetches and no CRC check: this pass only finds candidates; each one a lookup uses
        # is read again, checked and its signature verified
        with _consumer(
            settings, bootstrap, index.topic,
            max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024, check_crcs=False,
        ) as consumer:
            partitions = sorted(consumer.assignment(), key=lambda tp: tp.partition)
            end = consumer.end_offsets(partitions)
            start = consumer.beginning_offsets(partitions)
            done = index.positions()
            for tp in partitions:
                had = done.get(tp.partition, 0)
                if had > end.get(tp, 0):
                    raise IndexDamaged(
                        f"the audit topic's partition {tp.partition} now ends before what the index read "
                        "(the topic was recreated)"
                    )
                consumer.seek(tp, max(had, start.get(tp, 0)))
                if had >= end.get(tp, 0):
                    consumer.pause(tp)
            pending: list[Record] = []
            what = f"the audit topic {index.topic}"
            for batch in read_to_end(consumer, partitions, end, what=what, timeout_s=stall_s, stall=True):
                pending.extend(batch)
                result.read += len(batch)
                if batch and progress is not None:
                    progress(len(batch))
                if len(pending) >= CHUNK:
                    result.indexed += index.add(pending, {tp.partition: consumer.position(tp) for tp in partitions})
                    pending = []
            if result.read:
                reached = {tp.partition: consumer.position(tp) for tp in partitions}
                result.indexed += index.add(pending, reached)
            else:  # nothing new: still record where each partition ends
                index.add([], {tp.partition: max(done.get(tp.partition, 0), end.get(tp, 0)) for tp in partitions})
    except KafkaError as exc:
        raise BrokerError(f"reading the audit topic failed: {type(exc).__name__}") from exc
    result.seconds = time.monotonic() - started
    return result


def fetch(
    settings: Settings, bootstrap: str, topic: str, wanted: dict[int, list[int]], *, stall_s: float = 30.0
) -> list[Record]:
    """The committed records at exactly these offsets, by partition and offset. An offset no
    longer on the topic (aged out) or not a committed record is simply not returned."""
    from kafka import TopicPartition
    from kafka.errors import KafkaError

    from referral_broker.cluster.clients import poll_records

    wanted = {p: sorted(set(o)) for p, o in wanted.items() if o}
    if not wanted:
        return []
    out: list[Record] = []
    try:
        # small fetches: each seek reads about one producer batch, not megabytes
        with _consumer(settings, bootstrap, topic, max_partition_fetch_bytes=32 * 1024) as consumer:
            known = {tp.partition: tp for tp in consumer.assignment()}
            tps = [known[p] for p in wanted if p in known]
            consumer.assign(tps)
            end = consumer.end_offsets(tps)
            todo = {tp: [o for o in wanted[tp.partition] if o < end.get(tp, 0)] for tp in tps}
            todo = {tp: offsets for tp, offsets in todo.items() if offsets}
            for tp in tps:
                if tp in todo:
                    consumer.seek(tp, todo[tp][0])
                else:
                    consumer.pause(tp)
            deadline = time.monotonic() + stall_s
            while todo:
                batch = poll_records(consumer, 500)
                if batch:
                    deadline = time.monotonic() + stall_s
                elif time.monotonic() > deadline:
                    raise BrokerError(f"reading records of the audit topic {topic} stalled")
                for r in batch:
                    offsets = todo.get(TopicPartition(r.topic, r.partition))
                    if offsets and r.offset in offsets:
                        out.append(r)
                for tp in list(todo):
                    position = consumer.position(tp)
                    left = [o for o in todo[tp] if o >= position]
                    if not left:
                        del todo[tp]
                        consumer.pause(tp)
                        continue
                    todo[tp] = left
                    if left[0] - position > SEEK_GAP:
                        consumer.seek(tp, left[0])
    except KafkaError as exc:
        raise BrokerError(f"reading the audit topic failed: {type(exc).__name__}") from exc
    unique = {(r.partition, r.offset): r for r in out}
    return [unique[k] for k in sorted(unique)]


def indexed_records(
    settings: Settings,
    bootstrap: str,
    secret: bytes,
    *,
    key: str | None = None,
    case: str | None = None,
    note: Callable[[str], object] = lambda message: None,
    progress: Callable[[int], object] | None = None,
) -> tuple[list[Record], dict[str, Any]]:
    """The audit records a subject lookup must read (a superset of those about the subject, in
    partition and offset order), after bringing the index up to date; and what the index did.
    ``note`` is told, in one sentence, when the index is built or rebuilt and why."""
    with _locked(index_path(settings)):
        return _indexed_records(settings, bootstrap, secret, key=key, case=case, note=note, progress=progress)


def _indexed_records(
    settings: Settings,
    bootstrap: str,
    secret: bytes,
    *,
    key: str | None,
    case: str | None,
    note: Callable[[str], object],
    progress: Callable[[int], object] | None,
) -> tuple[list[Record], dict[str, Any]]:
    earlier: str | None = None  # why the first attempt dropped the index
    for attempt in (1, 2):
        index, why = AuditIndex.open(settings, secret)
        why = earlier or why
        if why and not earlier:
            note(f"{why}: building it from the whole audit topic once ({index.path})")
        try:
            caught = catch_up(index, settings, bootstrap, progress=progress)
            wanted: dict[int, list[int]] = {}
            if key is not None:
                wanted = index.for_subject(key)
            if case is not None:
                for p, offsets in index.for_case(case).items():
                    wanted[p] = sorted(set(wanted.get(p, [])) | set(offsets))
            size = index.size()
        except (IndexDamaged, sqlite3.DatabaseError) as exc:
            index.close()
            if attempt == 2:
                raise StoreError(f"the audit index {index.path} cannot be rebuilt ({type(exc).__name__})") from None
            reason = str(exc) if isinstance(exc, IndexDamaged) else f"the audit index was unreadable ({str(exc)[:60]})"
            note(f"{reason}: rebuilding it from the whole audit topic once ({index.path})")
            AuditIndex.remove(index.path)
            earlier = reason
            continue
        index.close()
        caught.rebuilt = why
        records = fetch(settings, bootstrap, index.topic, wanted)
        info = {
            "path": str(index.path),
            "records_indexed": size,
            "new_records_read": caught.read,
            "catch_up_seconds": round(caught.seconds, 2),
            "rebuilt": why,
            "candidates": sum(len(o) for o in wanted.values()),
        }
        return records, info
    raise AssertionError("unreachable")


def refresh(
    settings: Settings, bootstrap: str, secret: bytes, *, rebuild: bool = False,
    note: Callable[[str], object] = lambda message: None, progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Bring the index up to date (from nothing with ``rebuild``); what it holds and did."""
    if rebuild:
        with _locked(index_path(settings)):
            AuditIndex.remove(index_path(settings))
    _, info = indexed_records(settings, bootstrap, secret, note=note, progress=progress)
    info.pop("candidates", None)
    return info
