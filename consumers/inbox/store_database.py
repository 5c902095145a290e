"""The inbox database itself: one SQLite file (stdlib, WAL) at ``settings.inbox_db_path``.

It exists so the referral tables (:mod:`store_referrals`) and the account tables
(:mod:`store_users`) share one connection, one lock, one write transaction and one versioned
schema without either knowing about the other's rows.

Tables:
    records     every routed record exactly as consumed, one row per (team, referral id, version):
                the raw sealed key, headers and value. Its primary key is what makes ingest
                idempotent: a re-delivered version is recognised and changes nothing.
    referrals   one row per (team, referral id): the clear operational summary the list sorts
                and filters on (when the referral was made, its priority and risk flags, the
                date a decision is due), the current version, the state and the allocated
                worker. Names, dates of birth and postcodes are never here: the list opens them
                from ``records`` for the page it shows.
    events      every decided transition (who, when, what, the state before and after, the
                reason code from a closed list); the rows with ``notify`` are the outbox: they
                hold the status message already sealed and signed (a decline's reason in words
                exists only inside it), marked ``published_at`` once Kafka has it. Case notes,
                information recorded and the exact words sent to the referrer are in
                ``sealed_text``: sealed for the team under the case key, like the records.
                ``status_id`` names the status message; ``delivered_at`` is set when the
                inbox saw the router deliver it to the referrer (``delivery``).
    users       local accounts: argon2 hashes only, a team, a disabled flag.
    sessions    signed-in sessions (the cookie holds a signed id), so signing out ends them.
    decisions   the router's audited sharing decision for each referral a team received (its
                purpose, legal ground, basis, override reference, policy version: names and
                codes, never values), read from the audit topic, so the referral page shows why
                this team has this referral.
    meta        the app's cookie-signing secret, created on first use.
    sign_in_throttle  failed sign-ins counted per account and per client address (each named by
                a keyed hash of the typed name or the address, so a password typed into the
                username box is never stored; the account's name only when it is an account),
                the time the next attempt is allowed and, once locked, until when (``throttle``).
    sign_in_locks     every lockout: what was locked, when, until when, after how many failures,
                and when and how it was released (by time or by an administrator).
    duplicates  per team, how many copies of records the inbox already had were recognised and
                not stored again (re-delivered, replayed, or conflicting: same referral id and
                version under another decision id), with the last one seen (ids only).
    shredded    tombstones: per team, a referral whose case was shredded (``retention shred``):
                when, by whom, which case key was destroyed. Its records, referrals row, events
                and decisions are deleted; a copy arriving later is recognised and not stored.

The file, its ``-wal`` and ``-shm`` files are created 0600 (and its folder 0700 when this
creates it) before the first connection: SQLite gives the ``-wal`` and ``-shm`` files the
database file's mode, and they hold the cookie secret and session ids too.

The schema is declared once here, for all tables, because ``SCHEMA_VERSION`` versions the file
as a whole.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from referral_broker.errors import StoreError
from referral_broker.folders import private_folder
from referral_broker.structured_log import get_logger

log = get_logger(__name__)

SCHEMA_VERSION = 5  # 2: events.status_topic (the topic a status was signed for)
# 3: referrals.created_at, due_date, flags, decision_id; events.sealed_text, status_id, delivered_at
# 4: sign_in_throttle, sign_in_locks, duplicates (new tables only: created by _SCHEMA on open)
# 5: shredded (a new table only)

FILE_MODE = 0o600
SIDE_FILES = ("-wal", "-shm")

_V3_COLUMNS = (
    "ALTER TABLE referrals ADD COLUMN created_at TEXT",
    "ALTER TABLE referrals ADD COLUMN due_date TEXT",
    "ALTER TABLE referrals ADD COLUMN flags TEXT NOT NULL DEFAULT '[]'",
    "ALTER TABLE referrals ADD COLUMN decision_id TEXT",
    "ALTER TABLE events ADD COLUMN sealed_text BLOB",
    "ALTER TABLE events ADD COLUMN status_id TEXT",
    "ALTER TABLE events ADD COLUMN delivered_at TEXT",
)
_V3_INDEXES = """
CREATE INDEX IF NOT EXISTS referrals_by_due ON referrals (team, due_date);
CREATE INDEX IF NOT EXISTS referrals_by_allocation ON referrals (team, allocated_to, state);
CREATE INDEX IF NOT EXISTS events_by_status_id ON events (status_id);
CREATE TABLE IF NOT EXISTS decisions (
    decision_id TEXT PRIMARY KEY, team TEXT NOT NULL, referral_id TEXT NOT NULL, version INTEGER NOT NULL,
    purpose TEXT, ground TEXT NOT NULL, basis TEXT, override_reference TEXT, policy_version INTEGER,
    decided_at TEXT NOT NULL
);
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    team TEXT NOT NULL, referral_id TEXT NOT NULL, version INTEGER NOT NULL,
    received_at TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL,
    key BLOB, headers TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (team, referral_id, version)
);
CREATE TABLE IF NOT EXISTS referrals (
    team TEXT NOT NULL, referral_id TEXT NOT NULL, version INTEGER NOT NULL,
    received_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    referrer TEXT NOT NULL, referrer_organisation TEXT, concern_types TEXT NOT NULL,
    priority TEXT NOT NULL, district TEXT,
    withheld TEXT NOT NULL, no_onward TEXT NOT NULL, state TEXT NOT NULL, allocated_to TEXT,
    created_at TEXT, due_date TEXT, flags TEXT NOT NULL DEFAULT '[]', decision_id TEXT,
    PRIMARY KEY (team, referral_id)
);
CREATE INDEX IF NOT EXISTS referrals_by_state ON referrals (team, state, received_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    team TEXT NOT NULL, referral_id TEXT NOT NULL, version INTEGER NOT NULL, at TEXT NOT NULL,
    actor TEXT NOT NULL, action TEXT NOT NULL, state_before TEXT NOT NULL, state_after TEXT NOT NULL,
    reason_code TEXT, allocated_to TEXT, notify INTEGER NOT NULL,
    status_key BLOB, status_headers TEXT, status_value BLOB, published_at TEXT, status_topic TEXT,
    sealed_text BLOB, status_id TEXT, delivered_at TEXT
);
CREATE INDEX IF NOT EXISTS events_by_referral ON events (team, referral_id, id);
CREATE INDEX IF NOT EXISTS events_outbox ON events (notify, published_at);
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY, team TEXT NOT NULL, role TEXT NOT NULL, password_hash TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, username TEXT NOT NULL REFERENCES users (username),
    csrf_token TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sign_in_throttle (
    subject TEXT PRIMARY KEY, scope TEXT NOT NULL, username TEXT,
    failures INTEGER NOT NULL, last_attempt_at TEXT NOT NULL, next_allowed_at TEXT,
    locked_at TEXT, locked_until TEXT, lock_id INTEGER
);
CREATE TABLE IF NOT EXISTS sign_in_locks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, scope TEXT NOT NULL, subject TEXT NOT NULL, username TEXT,
    failures INTEGER NOT NULL, locked_at TEXT NOT NULL, locked_until TEXT NOT NULL,
    released_at TEXT, released_by TEXT
);
CREATE TABLE IF NOT EXISTS duplicates (
    team TEXT NOT NULL, kind TEXT NOT NULL, count INTEGER NOT NULL, last_seen_at TEXT NOT NULL,
    last_referral_id TEXT NOT NULL, last_version INTEGER NOT NULL,
    PRIMARY KEY (team, kind)
);
CREATE TABLE IF NOT EXISTS shredded (
    team TEXT NOT NULL, referral_id TEXT NOT NULL, shredded_at TEXT NOT NULL, shredded_by TEXT NOT NULL,
    case_key_id TEXT, PRIMARY KEY (team, referral_id)
);
"""


def utc(at: datetime) -> str:
    """Stored times: UTC ISO 8601 with microseconds, so text order is time order."""
    if at.tzinfo is None:
        raise ValueError("store times must be timezone-aware")
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def private_files(path: Path) -> None:
    """Before SQLite opens ``path``: its folder 0700 if this creates it, and the database and its
    ``-wal``/``-shm`` files 0600, created empty if missing (an empty file is a new database, an
    empty ``-wal`` or ``-shm`` a clean one), so no moment exists when any of them is readable by
    others. An existing folder others can enter is logged, not changed (it may hold more)."""
    folder = path.parent
    if not folder.exists():
        private_folder(folder)
    elif folder.stat().st_mode & 0o077:
        log.warning("inbox database folder is open to others", mode=oct(stat.S_IMODE(folder.stat().st_mode)))
    for name in (path.name, *(path.name + side for side in SIDE_FILES)):
        target = folder / name
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
                os.fchmod(fd, FILE_MODE)  # a file made by an older inbox, or under another umask
        finally:
            os.close(fd)


class StoreDatabase:
    """One SQLite connection, serialised by a lock; open one store per process or thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            private_files(self.path)
            self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the inbox database {self.path}: {type(exc).__name__}") from exc
        self._lock = threading.RLock()
        self._check_schema_version()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before reading so decisions see the latest state."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _check_schema_version(self) -> None:
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) > SCHEMA_VERSION:
                raise StoreError(
                    f"the inbox database {self.path} has schema version {row['value']}, newer than "
                    f"this program's {SCHEMA_VERSION}; upgrade referral-broker"
                )
            elif int(row["value"]) < SCHEMA_VERSION:
                found = int(row["value"])
                if found == 1:
                    # v1 kept no topic with a status; such rows are published to the team's status
                    # topic, the only one a v1 inbox ever signed for
                    db.execute("ALTER TABLE events ADD COLUMN status_topic TEXT")
                if found <= 2:
                    # v2 rows have no creation time (the list falls back to receipt) and no due
                    # date (sorted after the dated ones until a new version arrives)
                    for statement in _V3_COLUMNS:
                        table, column = statement.split()[2], statement.split()[5]
                        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                        if column not in have:
                            db.execute(statement)
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        with self._lock:
            self._db.executescript(_V3_INDEXES)

    # --- meta -------------------------------------------------------------------------------

    def secret_key(self) -> str:
        """The cookie-signing secret: random, made once, kept in the database (mode 0600)."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'session_secret'").fetchone()
            if row is not None:
                return str(row["value"])
            secret = secrets.token_urlsafe(48)
            db.execute("INSERT INTO meta VALUES ('session_secret', ?)", (secret,))
            return secret
