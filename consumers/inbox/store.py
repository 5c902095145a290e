"""The inbox store: SQLite (stdlib, WAL) at ``settings.inbox_db_path``.

Tables:
    records     every routed record exactly as consumed, one row per (team, referral id, version):
                the raw sealed key, headers and value. Its primary key is what makes ingest
                idempotent: a re-delivered version is recognised and changes nothing.
    referrals   one row per (team, referral id): the clear operational summary the list shows,
                the current version, the state and the allocated worker.
    events      every decided transition (who, when, what, the state before and after, the
                reason code from a closed list); the rows with ``notify`` are the outbox: they
                hold the status message already sealed and signed (a decline's reason in words
                exists only inside it), marked ``published_at`` once Kafka has it.
    users       local accounts: argon2 hashes only, a team, a disabled flag.
    sessions    signed-in sessions (the cookie holds a signed id), so signing out ends them.
    meta        the app's cookie-signing secret, created on first use.

It never holds an opened (decrypted) value: the sealed record is opened in memory by the web
view. Every state change goes through :func:`consumers.inbox.states.transition` inside one
``BEGIN IMMEDIATE`` transaction, so two members acting at once cannot both win.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from referral_broker.consumers.inbox.records import (
    OutboundRecord,
    ReferralSummary,
    SealedRecord,
    WithheldField,
    headers_from_json,
    headers_to_json,
)
from referral_broker.consumers.inbox.states import Action, ReferralState, Transition, transition
from referral_broker.errors import ReferralBrokerError

SCHEMA_VERSION = 1

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
    PRIMARY KEY (team, referral_id)
);
CREATE INDEX IF NOT EXISTS referrals_by_state ON referrals (team, state, received_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    team TEXT NOT NULL, referral_id TEXT NOT NULL, version INTEGER NOT NULL, at TEXT NOT NULL,
    actor TEXT NOT NULL, action TEXT NOT NULL, state_before TEXT NOT NULL, state_after TEXT NOT NULL,
    reason_code TEXT, allocated_to TEXT, notify INTEGER NOT NULL,
    status_key BLOB, status_headers TEXT, status_value BLOB, published_at TEXT
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
"""

# Priorities sort most urgent first; unknown values after the known ones, alphabetically.
PRIORITY_ORDER = ("immediate", "urgent", "high", "medium", "normal", "routine", "low")


class StoreError(ReferralBrokerError):
    """The inbox database cannot be used (unreadable file, newer schema, integrity failure)."""


class UnknownReferralError(StoreError):
    """No referral with that id in that team's inbox."""


class UserExistsError(StoreError):
    pass


class UnknownUserError(StoreError):
    pass


def utc(at: datetime) -> str:
    """Stored times: UTC ISO 8601 with microseconds, so text order is time order."""
    if at.tzinfo is None:
        raise ValueError("store times must be timezone-aware")
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


# (the decided transition, the referral as it was) -> the sealed status message for it.
StatusEncoder = Callable[["Transition", "ReferralRow"], OutboundRecord]


@dataclass(frozen=True)
class ReferralRow:
    team: str
    referral_id: str
    version: int
    received_at: datetime
    updated_at: datetime
    referrer: str
    referrer_organisation: str | None
    concern_types: tuple[str, ...]
    priority: str
    district: str | None
    withheld: tuple[WithheldField, ...]
    no_onward: tuple[str, ...]
    state: ReferralState
    allocated_to: str | None


@dataclass(frozen=True)
class EventRow:
    id: int
    team: str
    referral_id: str
    version: int
    at: datetime
    actor: str
    action: Action
    state_before: ReferralState
    state_after: ReferralState
    reason_code: str | None
    allocated_to: str | None
    notify: bool
    status_record: OutboundRecord | None
    published_at: datetime | None


@dataclass(frozen=True)
class UserRow:
    username: str
    team: str
    role: str
    password_hash: str
    disabled: bool
    created_at: datetime


@dataclass(frozen=True)
class SessionRow:
    id: str
    username: str
    csrf_token: str
    created_at: datetime


@dataclass(frozen=True)
class IngestResult:
    """What storing one record did: ``new`` referral, ``updated`` (a newer version),
    ``older`` (an older version arriving late: kept, not shown) or ``duplicate`` (re-delivery)."""

    outcome: str
    referral_id: str
    version: int
    transition: Transition | None = None


class InboxStore:
    """One SQLite connection, serialised by a lock; open one store per process or thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
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
        with suppress(OSError):
            self.path.chmod(0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> InboxStore:
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

    # --- ingest -----------------------------------------------------------------------------

    def ingest(self, team: str, summary: ReferralSummary, record: SealedRecord) -> IngestResult:
        """Store one routed record; a re-delivered (referral id, version) changes nothing."""
        received = utc(datetime.fromtimestamp(record.timestamp_ms / 1000, UTC))
        with self._write() as db:
            cur = db.execute(
                'INSERT INTO records (team, referral_id, version, received_at, topic, partition, "offset",'
                " key, headers, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (
                    team,
                    summary.referral_id,
                    summary.version,
                    received,
                    record.topic,
                    record.partition,
                    record.offset,
                    record.key,
                    headers_to_json(record.headers),
                    record.value,
                ),
            )
            if cur.rowcount == 0:
                return IngestResult("duplicate", summary.referral_id, summary.version)
            current = db.execute(
                "SELECT version, state FROM referrals WHERE team = ? AND referral_id = ?",
                (team, summary.referral_id),
            ).fetchone()
            fields = (
                summary.referrer,
                summary.referrer_organisation,
                json.dumps(list(summary.concern_types)),
                summary.priority,
                summary.district,
                json.dumps([[w.path, w.reason] for w in summary.withheld]),
                json.dumps(list(summary.no_onward)),
            )
            if current is None:
                db.execute(
                    "INSERT INTO referrals (team, referral_id, version, received_at, updated_at, referrer,"
                    " referrer_organisation, concern_types, priority, district, withheld, no_onward, state,"
                    " allocated_to) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                    (team, summary.referral_id, summary.version, received, received, *fields, "new"),
                )
                return IngestResult("new", summary.referral_id, summary.version)
            if summary.version < current["version"]:
                return IngestResult("older", summary.referral_id, summary.version)
            decided = transition(
                ReferralState(current["state"]), Action.RECEIVE_UPDATE, at=parse_time(received)
            )
            db.execute(
                "UPDATE referrals SET version = ?, updated_at = ?, referrer = ?, referrer_organisation = ?,"
                " concern_types = ?,"
                " priority = ?, district = ?, withheld = ?, no_onward = ?, state = ?"
                " WHERE team = ? AND referral_id = ?",
                (summary.version, received, *fields, decided.after.value, team, summary.referral_id),
            )
            self._insert_event(db, team, summary.referral_id, summary.version, "referrer", decided)
            return IngestResult("updated", summary.referral_id, summary.version, decided)

    # --- reading ----------------------------------------------------------------------------

    @staticmethod
    def _referral(row: sqlite3.Row) -> ReferralRow:
        return ReferralRow(
            team=row["team"],
            referral_id=row["referral_id"],
            version=row["version"],
            received_at=parse_time(row["received_at"]),
            updated_at=parse_time(row["updated_at"]),
            referrer=row["referrer"],
            referrer_organisation=row["referrer_organisation"],
            concern_types=tuple(json.loads(row["concern_types"])),
            priority=row["priority"],
            district=row["district"],
            withheld=tuple(WithheldField(p, r) for p, r in json.loads(row["withheld"])),
            no_onward=tuple(json.loads(row["no_onward"])),
            state=ReferralState(row["state"]),
            allocated_to=row["allocated_to"],
        )

    def list_referrals(
        self,
        team: str,
        *,
        states: Sequence[ReferralState] | None = None,
        priority: str | None = None,
        concern_type: str | None = None,
        referrer: str | None = None,
        allocated_to: str | None = None,
        sort: str = "age",
        newest_first: bool = False,
    ) -> list[ReferralRow]:
        """The team's referrals, filtered; ``sort`` is ``age``, ``priority`` or ``referrer``."""
        where, params = ["team = ?"], [team]
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params += [ReferralState(s).value for s in states]
        if priority:
            where.append("priority = ?")
            params.append(priority)
        if referrer:
            where.append("referrer = ?")
            params.append(referrer)
        if allocated_to:
            where.append("allocated_to = ?")
            params.append(allocated_to)
        if concern_type:
            where.append("EXISTS (SELECT 1 FROM json_each(concern_types) WHERE value = ?)")
            params.append(concern_type)
        rank = "CASE priority " + " ".join(f"WHEN '{p}' THEN {i}" for i, p in enumerate(PRIORITY_ORDER))
        rank += f" ELSE {len(PRIORITY_ORDER)} END"
        age = "received_at DESC" if newest_first else "received_at ASC"
        order = {
            "age": age,
            "priority": f"{rank}, priority, received_at ASC",
            "referrer": f"referrer, {age}",
        }.get(sort)
        if order is None:
            raise ValueError(f"unknown sort '{sort}'")
        sql = f"SELECT * FROM referrals WHERE {' AND '.join(where)} ORDER BY {order}, referral_id"
        return [self._referral(r) for r in self._read(sql, params)]

    def counts_by_state(self, team: str) -> dict[ReferralState, int]:
        rows = self._read("SELECT state, count(*) AS n FROM referrals WHERE team = ? GROUP BY state", [team])
        counts = dict.fromkeys(ReferralState, 0)
        counts.update({ReferralState(r["state"]): r["n"] for r in rows})
        return counts

    def filter_choices(self, team: str) -> dict[str, list[str]]:
        """The values present in a team's inbox, for the filter drop-downs."""
        pick = lambda sql: [r[0] for r in self._read(sql, [team])]
        return {
            "priority": pick("SELECT DISTINCT priority FROM referrals WHERE team = ? ORDER BY 1"),
            "referrer": pick("SELECT DISTINCT referrer FROM referrals WHERE team = ? ORDER BY 1"),
            "concern_type": pick(
                "SELECT DISTINCT j.value FROM referrals, json_each(referrals.concern_types) AS j"
                " WHERE team = ? ORDER BY 1"
            ),
        }

    def get_referral(self, team: str, referral_id: str) -> ReferralRow | None:
        rows = self._read("SELECT * FROM referrals WHERE team = ? AND referral_id = ?", [team, referral_id])
        return self._referral(rows[0]) if rows else None

    def teams_holding(self, referral_id: str) -> list[str]:
        """Which teams' inboxes hold this id (to audit a cross-team attempt, never to show it)."""
        return [r[0] for r in self._read("SELECT team FROM referrals WHERE referral_id = ?", [referral_id])]

    def record_of(self, team: str, referral_id: str, version: int | None = None) -> SealedRecord:
        """The raw sealed record of the given (or current) version."""
        if version is None:
            row = self.get_referral(team, referral_id)
            if row is None:
                raise UnknownReferralError(f"no referral {referral_id} in the inbox of {team}")
            version = row.version
        rows = self._read(
            'SELECT topic, partition, "offset", key, headers, value, received_at FROM records'
            " WHERE team = ? AND referral_id = ? AND version = ?",
            [team, referral_id, version],
        )
        if not rows:
            raise UnknownReferralError(f"no version {version} of referral {referral_id} in {team}")
        r = rows[0]
        return SealedRecord(
            topic=r["topic"],
            partition=r["partition"],
            offset=r["offset"],
            key=r["key"],
            value=r["value"],
            headers=headers_from_json(r["headers"]),
            timestamp_ms=int(parse_time(r["received_at"]).timestamp() * 1000),
        )

    def record_count(self, team: str | None = None) -> int:
        if team is None:
            return int(self._read("SELECT count(*) FROM records")[0][0])
        return int(self._read("SELECT count(*) FROM records WHERE team = ?", [team])[0][0])

    # --- transitions ------------------------------------------------------------------------

    @staticmethod
    def _insert_event(
        db: sqlite3.Connection,
        team: str,
        referral_id: str,
        version: int,
        actor: str,
        decided: Transition,
        reason_code: str | None = None,
        allocated_to: str | None = None,
        status: OutboundRecord | None = None,
    ) -> int:
        cur = db.execute(
            "INSERT INTO events (team, referral_id, version, at, actor, action, state_before, state_after,"
            " reason_code, allocated_to, notify, status_key, status_headers, status_value, published_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (
                team,
                referral_id,
                version,
                utc(decided.at),
                actor,
                decided.action.value,
                decided.before.value,
                decided.after.value,
                reason_code,
                allocated_to,
                int(status is not None),
                status.key if status else None,
                headers_to_json(status.headers) if status else None,
                status.value if status else None,
            ),
        )
        return int(cur.lastrowid or 0)

    def apply(
        self,
        team: str,
        referral_id: str,
        action: Action,
        *,
        actor: str,
        at: datetime,
        encode_status: StatusEncoder,
        reason_code: str | None = None,
        allocated_to: str | None = None,
    ) -> Transition:
        """Decide and record ``action`` atomically, with its sealed status message in the outbox;
        raise (storing nothing) when it is refused.

        ``reason_code`` is a code from a closed list (free text travels only sealed, inside the
        status message ``encode_status`` builds); ``allocated_to`` names an active member of the
        same team for ``allocate``.
        """
        with self._write() as db:
            row = db.execute(
                "SELECT * FROM referrals WHERE team = ? AND referral_id = ?", (team, referral_id)
            ).fetchone()
            if row is None:
                raise UnknownReferralError(f"no referral {referral_id} in the inbox of {team}")
            referral = self._referral(row)
            decided = transition(referral.state, action, at=at)
            if decided.action is Action.ALLOCATE:
                if not allocated_to:
                    raise ValueError("allocate needs a worker")
                member = db.execute(
                    "SELECT 1 FROM users WHERE username = ? AND team = ? AND disabled = 0",
                    (allocated_to, team),
                ).fetchone()
                if member is None:
                    raise UnknownUserError(f"no active member '{allocated_to}' in {team}")
                db.execute(
                    "UPDATE referrals SET allocated_to = ? WHERE team = ? AND referral_id = ?",
                    (allocated_to, team, referral_id),
                )
            db.execute(
                "UPDATE referrals SET state = ? WHERE team = ? AND referral_id = ?",
                (decided.after.value, team, referral_id),
            )
            status = encode_status(decided, referral) if decided.notifies_referrer else None
            self._insert_event(
                db,
                team,
                referral_id,
                referral.version,
                actor,
                decided,
                reason_code,
                allocated_to if decided.action is Action.ALLOCATE else None,
                status,
            )
            return decided

    @staticmethod
    def _event(r: sqlite3.Row) -> EventRow:
        status = None
        if r["status_value"] is not None:
            status = OutboundRecord(
                r["status_key"], r["status_value"], headers_from_json(r["status_headers"])
            )
        return EventRow(
            id=r["id"],
            team=r["team"],
            referral_id=r["referral_id"],
            version=r["version"],
            at=parse_time(r["at"]),
            actor=r["actor"],
            action=Action(r["action"]),
            state_before=ReferralState(r["state_before"]),
            state_after=ReferralState(r["state_after"]),
            reason_code=r["reason_code"],
            allocated_to=r["allocated_to"],
            notify=bool(r["notify"]),
            status_record=status,
            published_at=parse_time(r["published_at"]) if r["published_at"] else None,
        )

    def events(self, team: str, referral_id: str) -> list[EventRow]:
        rows = self._read(
            "SELECT * FROM events WHERE team = ? AND referral_id = ? ORDER BY id", [team, referral_id]
        )
        return [self._event(r) for r in rows]

    def pending_status(self, team: str | None = None, limit: int = 500) -> list[EventRow]:
        """The outbox: status messages Kafka has not confirmed yet, oldest first."""
        sql = "SELECT * FROM events WHERE notify = 1 AND published_at IS NULL"
        params: list[Any] = []
        if team is not None:
            sql += " AND team = ?"
            params.append(team)
        rows = self._read(sql + " ORDER BY id LIMIT ?", [*params, limit])
        return [self._event(r) for r in rows]

    def mark_published(self, event_ids: Sequence[int], at: datetime) -> None:
        with self._write() as db:
            db.executemany(
                "UPDATE events SET published_at = ? WHERE id = ? AND published_at IS NULL",
                [(utc(at), i) for i in event_ids],
            )

    # --- users and sessions -----------------------------------------------------------------

    @staticmethod
    def _user(r: sqlite3.Row) -> UserRow:
        return UserRow(
            r["username"],
            r["team"],
            r["role"],
            r["password_hash"],
            bool(r["disabled"]),
            parse_time(r["created_at"]),
        )

    def add_user(self, username: str, team: str, role: str, password_hash: str, *, at: datetime) -> UserRow:
        with self._write() as db:
            if db.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
                raise UserExistsError(f"user '{username}' already exists")
            db.execute(
                "INSERT INTO users (username, team, role, password_hash, disabled, created_at)"
                " VALUES (?, ?, ?, ?, 0, ?)",
                (username, team, role, password_hash, utc(at)),
            )
        user = self.get_user(username)
        assert user is not None
        return user

    def get_user(self, username: str) -> UserRow | None:
        rows = self._read("SELECT * FROM users WHERE username = ?", [username])
        return self._user(rows[0]) if rows else None

    def list_users(self, team: str | None = None) -> list[UserRow]:
        if team is None:
            return [self._user(r) for r in self._read("SELECT * FROM users ORDER BY team, username")]
        rows = self._read("SELECT * FROM users WHERE team = ? ORDER BY username", [team])
        return [self._user(r) for r in rows]

    def set_password_hash(self, username: str, password_hash: str) -> None:
        """Used to upgrade a hash whose argon2 parameters are out of date."""
        with self._write() as db:
            db.execute("UPDATE users SET password_hash = ? WHERE username = ?", (password_hash, username))

    def set_disabled(self, username: str, disabled: bool = True) -> UserRow:
        """Disable (or re-enable) an account; disabling also ends its sessions."""
        with self._write() as db:
            cur = db.execute("UPDATE users SET disabled = ? WHERE username = ?", (int(disabled), username))
            if cur.rowcount == 0:
                raise UnknownUserError(f"no user '{username}'")
            if disabled:
                db.execute("DELETE FROM sessions WHERE username = ?", (username,))
        user = self.get_user(username)
        assert user is not None
        return user

    def create_session(self, username: str, *, at: datetime) -> SessionRow:
        session = SessionRow(secrets.token_urlsafe(32), username, secrets.token_urlsafe(32), at)
        with self._write() as db:
            db.execute(
                "INSERT INTO sessions (id, username, csrf_token, created_at) VALUES (?, ?, ?, ?)",
                (session.id, username, session.csrf_token, utc(at)),
            )
        return session

    def get_session(self, session_id: str) -> SessionRow | None:
        rows = self._read("SELECT * FROM sessions WHERE id = ?", [session_id])
        if not rows:
            return None
        r = rows[0]
        return SessionRow(r["id"], r["username"], r["csrf_token"], parse_time(r["created_at"]))

    def delete_session(self, session_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def purge_sessions(self, older_than: datetime) -> int:
        with self._write() as db:
            return db.execute("DELETE FROM sessions WHERE created_at < ?", (utc(older_than),)).rowcount
