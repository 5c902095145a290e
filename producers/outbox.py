"""A party's durable outbox: every sealed, signed message it sends is written here first.

One SQLite file per party in its data folder (``<data>/outbox/<party>.sqlite3``, folder 0700,
file 0600). It holds what goes on the wire and nothing else: the topic, the message key (the
referral id), the sealed value and signed headers, the referral id and version, and the state.
No plaintext: a record is sealed before it is written. Once Kafka acknowledges a message its
value and headers are dropped; the row stays, with a SHA-256 digest of the value, so the same
referral (id, version) or status (status id) is never sent to the same topic twice.

A message's life: ``queued`` -> (``attempted``: handed to a producer) -> ``delivered``. A sender
killed after Kafka acknowledged a message but before the outbox recorded it leaves it
``attempted``; the next delivery run (:mod:`referral_broker.producers.delivery`) looks for it
on the topic, from the offsets recorded before the attempt, and marks it delivered if found,
so a resend never duplicates it. Only one process uses a party's outbox at a time (a lock the
kernel releases when the process dies).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from referral_broker.config import Settings
from referral_broker.errors import BrokerError
from referral_broker.folders import private_folder
from referral_broker.parties import get_party
from referral_broker.sealing.envelope import OutgoingMessage

Headers = list[tuple[str, bytes]]

QUEUED = "queued"
DELIVERED = "delivered"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    topic        TEXT    NOT NULL,
    message_id   TEXT    NOT NULL,  -- '<referral id>:<version>' or 'status:<status id>'
    kind         TEXT    NOT NULL,  -- referral | status
    referral_id  TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    key          BLOB    NOT NULL,
    value        BLOB,              -- sealed bytes; NULL once delivered
    headers      TEXT,              -- JSON [[name, base64]]; NULL once delivered
    digest       BLOB    NOT NULL,  -- SHA-256 of the value: finds it on the topic after a crash
    state        TEXT    NOT NULL CHECK (state IN ('queued', 'delivered')),
    attempted    INTEGER NOT NULL DEFAULT 0,
    queued_at    REAL    NOT NULL,
    delivered_at REAL,
    UNIQUE (topic, message_id)
);
CREATE INDEX IF NOT EXISTS messages_state ON messages (state, id);
CREATE TABLE IF NOT EXISTS watermarks (
    topic     TEXT    NOT NULL,
    partition INTEGER NOT NULL,
    offset    INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
"""


def referral_message_id(referral_id: str, version: int) -> str:
    return f"{referral_id}:{version}"


def status_message_id(status_id: str) -> str:
    return f"status:{status_id}"


def digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


@dataclass(frozen=True)
class Entry:
    """A sealed message to keep: what goes on the wire, and what it is about (ids only)."""

    message: OutgoingMessage = field(repr=False)
    message_id: str
    kind: str
    referral_id: str
    version: int


@dataclass(frozen=True)
class Queued:
    """A queued message as read back for delivery."""

    id: int
    topic: str
    message_id: str
    kind: str
    referral_id: str
    version: int
    key: bytes
    value: bytes = field(repr=False)
    headers: Headers = field(repr=False)


def _headers_json(headers: Headers) -> str:
    return json.dumps([[k, base64.b64encode(v).decode("ascii")] for k, v in headers])


def _headers_from(text: str) -> Headers:
    return [(k, base64.b64decode(v)) for k, v in json.loads(text)]


def outbox_path(settings: Settings, party: str) -> Path:
    return settings.paths_data_dir / "outbox" / f"{get_party(party).name}.sqlite3"


class Outbox:
    """One party's outbox. Open with :meth:`open`; use as a context manager."""

    def __init__(self, path: Path, connection: sqlite3.Connection, lock: IO[bytes]) -> None:
        self.path = path
        self._db = connection
        self._lock = lock

    @classmethod
    def open(cls, settings: Settings, party: str) -> Outbox:
        path = outbox_path(settings, party)
        private_folder(path.parent)
        os.chmod(path.parent, 0o700)
        lock = open(path.with_suffix(".lock"), "ab")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise BrokerError(
                f"the outbox of {party} is in use by another referral-broker process; try again when it ends"
            ) from None
        # Create the file 0600 before SQLite opens it (its journal takes the same mode).
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
        try:
            db = sqlite3.connect(path, isolation_level=None)
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA secure_delete=ON")  # dropped sealed bytes are overwritten, not left in free pages
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            lock.close()
            raise BrokerError(f"the outbox {path} cannot be opened ({type(exc).__name__})") from None
        return cls(path, db, lock)

    def close(self) -> None:
        self._db.close()
        self._lock.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------
    def add(self, entries: Sequence[Entry]) -> int:
        """Keep sealed messages as queued, in one transaction; a message already kept (same
        topic and message id) is left as it is. Returns how many were new."""
        now = time.time()
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO messages (topic, message_id, kind, referral_id, version, key,"
                " value, headers, digest, state, queued_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        e.message.topic,
                        e.message_id,
                        e.kind,
                        e.referral_id,
                        e.version,
                        e.message.key,
                        e.message.value,
                        _headers_json(e.message.headers),
                        digest(e.message.value),
                        QUEUED,
                        now,
                    )
                    for e in entries
                ],
            )
            return self._db.total_changes - before

    def mark_attempted(self, ids: Iterable[int]) -> None:
        with self._transaction():
            self._db.executemany("UPDATE messages SET attempted = 1 WHERE id = ?", [(i,) for i in ids])

    def mark_delivered(self, ids: Iterable[int]) -> None:
        """Acknowledged by Kafka: drop the sealed bytes, keep the row (it stops a resend)."""
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "UPDATE messages SET state = ?, delivered_at = ?, value = NULL, headers = NULL,"
                " attempted = 0 WHERE id = ?",
                [(DELIVERED, now, i) for i in ids],
            )

    def reset_attempted(self, ids: Iterable[int]) -> None:
        with self._transaction():
            self._db.executemany("UPDATE messages SET attempted = 0 WHERE id = ?", [(i,) for i in ids])

    def set_watermark(self, topic: str, offsets: dict[int, int]) -> None:
        """Where ``topic``'s partitions ended before this run produced to it."""
        with self._transaction():
            self._db.execute("DELETE FROM watermarks WHERE topic = ?", (topic,))
            self._db.executemany(
                "INSERT INTO watermarks (topic, partition, offset) VALUES (?,?,?)",
                [(topic, p, o) for p, o in offsets.items()],
            )

    # -- reading ----------------------------------------------------------------------------
    def states(self, topic: str, message_ids: Sequence[str]) -> dict[str, str]:
        """message id -> state for those of ``message_ids`` already kept for ``topic``."""
        return {mid: state for mid, (state, _) in self.kept(topic, message_ids).items()}

    def kept(self, topic: str, message_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """message id -> (state, row id) for those of ``message_ids`` already kept for ``topic``."""
        found: dict[str, tuple[str, int]] = {}
        for start in range(0, len(message_ids), 500):
            chunk = list(message_ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT message_id, state, id FROM messages WHERE topic = ? AND message_id IN ({marks})",
                [topic, *chunk],
            )
            found.update((mid, (state, row)) for mid, state, row in rows)
        return found

    def last_id(self) -> int:
        """The highest row id so far: every row kept later has a higher one (AUTOINCREMENT)."""
        return int(self._db.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0])

    def queued(self, *, limit: int, after: int = 0) -> list[Queued]:
        rows = self._db.execute(
            "SELECT id, topic, message_id, kind, referral_id, version, key, value, headers FROM messages"
            " WHERE state = ? AND id > ? ORDER BY id LIMIT ?",
            (QUEUED, after, limit),
        ).fetchall()
        return [
            Queued(
                id=row[0],
                topic=row[1],
                message_id=row[2],
                kind=row[3],
                referral_id=row[4],
                version=row[5],
                key=row[6],
                value=row[7],
                headers=_headers_from(row[8]),
            )
            for row in rows
        ]

    def in_doubt(self) -> dict[str, dict[bytes, int]]:
        """Messages handed to a producer whose acknowledgement was never recorded:
        topic -> {digest: row id}."""
        out: dict[str, dict[bytes, int]] = {}
        for row_id, topic, found in self._db.execute(
            "SELECT id, topic, digest FROM messages WHERE state = ? AND attempted = 1", (QUEUED,)
        ):
            out.setdefault(topic, {})[bytes(found)] = row_id
        return out

    def watermark(self, topic: str) -> dict[int, int]:
        rows = self._db.execute("SELECT partition, offset FROM watermarks WHERE topic = ?", (topic,))
        return dict(rows.fetchall())

    def summary(self) -> dict[str, int]:
        counts = {QUEUED: 0, DELIVERED: 0}
        counts.update(dict(self._db.execute("SELECT state, count(*) FROM messages GROUP BY state")))
        return counts

    def queued_referrals(self) -> list[tuple[str, str, int]]:
        """(kind, referral id, version) of every queued message, oldest first."""
        return [
            (kind, rid, version)
            for kind, rid, version in self._db.execute(
                "SELECT kind, referral_id, version FROM messages WHERE state = ? ORDER BY id", (QUEUED,)
            )
        ]

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise BrokerError(f"the outbox could not be written ({type(exc).__name__})") from None

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
        except sqlite3.Error as exc:
            raise BrokerError(f"the outbox could not be written ({type(exc).__name__})") from None
        if exc_type is not None and issubclass(exc_type, sqlite3.Error):
            # A full disk or a damaged file: nothing of this transaction was kept.
            raise BrokerError(f"the outbox could not be written ({exc_type.__name__})") from None
