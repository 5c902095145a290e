"""The sign-in throttle's tables: failed sign-ins per account and per client address, the
lockouts they caused, and the record of each lockout's release.

Every decision is taken inside one ``BEGIN IMMEDIATE`` transaction, and an attempt is counted
as a failure *before* the password is checked (a success takes it back), so attempts sent in
parallel cannot all slip through before the first failure is written. The rules (how many free
failures, how the delay grows, when to lock, for how long) are :class:`throttle.ThrottleRule`;
this module only applies them to rows.

Subjects are keyed hashes (``throttle.subject_key``): the typed username or the client address
is never stored, only the account's own name when the typed name is an account.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from referral_broker.consumers.inbox.store_database import StoreDatabase, parse_time, utc


class Rule(Protocol):
    @property
    def free_failures(self) -> int: ...

    @property
    def lock_after(self) -> int: ...

    def delay(self, failures: int) -> timedelta: ...

    @property
    def lockout(self) -> timedelta: ...

    @property
    def forget_after(self) -> timedelta: ...


@dataclass(frozen=True)
class Subject:
    """One thing sign-ins are counted against: an account or a client address."""

    scope: str  # "account" | "address"
    key: str  # the keyed hash (throttle.subject_key)
    username: str | None = None  # the account's name, only when it is an account
    ref: str = ""  # a short, non-reversible reference for logs and the audit


@dataclass(frozen=True)
class Verdict:
    """What the throttle says about an attempt before the password is checked."""

    allowed: bool
    scope: str | None = None  # the subject that refused it
    until: datetime | None = None  # when the next attempt is allowed (or the lock ends)
    locked: bool = False


@dataclass(frozen=True)
class LockRow:
    id: int
    scope: str
    subject: str
    username: str | None
    failures: int
    locked_at: datetime
    locked_until: datetime
    released_at: datetime | None
    released_by: str | None


@dataclass(frozen=True)
class NewLock:
    subject: Subject
    failures: int
    until: datetime
    lock_id: int


class SignInTables(StoreDatabase):
    """The sign_in_throttle and sign_in_locks tables (see :class:`consumers.inbox.store.InboxStore`)."""

    @staticmethod
    def _release(db: sqlite3.Connection, row: sqlite3.Row, at: datetime, by: str) -> None:
        if row["lock_id"] is not None:
            db.execute(
                "UPDATE sign_in_locks SET released_at = ?, released_by = ? WHERE id = ? AND released_at IS NULL",
                (utc(at), by, row["lock_id"]),
            )
        db.execute("DELETE FROM sign_in_throttle WHERE subject = ?", (row["subject"],))

    def _current(
        self, db: sqlite3.Connection, subject: Subject, rule: Rule, now: datetime
    ) -> sqlite3.Row | None:
        """The subject's row, after forgetting what time has released: an ended lock (recorded
        as released by time) or failures older than the rule's quiet period."""
        row = db.execute("SELECT * FROM sign_in_throttle WHERE subject = ?", (subject.key,)).fetchone()
        if row is None:
            return None
        if row["locked_until"] is not None:
            if parse_time(row["locked_until"]) <= now:
                self._release(db, row, parse_time(row["locked_until"]), "time")
                return None
            return row
        if now - parse_time(row["last_attempt_at"]) >= rule.forget_after:
            db.execute("DELETE FROM sign_in_throttle WHERE subject = ?", (subject.key,))
            return None
        return row

    def begin_sign_in(self, subjects: Sequence[tuple[Subject, Rule]], now: datetime) -> Verdict:
        """Refuse the attempt if any subject is locked or must still wait; otherwise count it
        (as a failure until :meth:`sign_in_succeeded` says otherwise) and set each subject's
        next allowed time."""
        with self._write() as db:
            rows = [(s, r, self._current(db, s, r, now)) for s, r in subjects]
            for s, _, row in rows:
                if row is not None and row["locked_until"] is not None:
                    return Verdict(False, s.scope, parse_time(row["locked_until"]), locked=True)
            for s, _, row in rows:
                if row is not None and row["next_allowed_at"] and parse_time(row["next_allowed_at"]) > now:
                    return Verdict(False, s.scope, parse_time(row["next_allowed_at"]))
            for s, rule, row in rows:
                failures = (row["failures"] if row is not None else 0) + 1
                delay = rule.delay(failures)
                next_allowed = utc(now + delay) if delay > timedelta(0) else None
                db.execute(
                    "INSERT INTO sign_in_throttle (subject, scope, username, failures, last_attempt_at,"
                    " next_allowed_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (subject) DO UPDATE SET"
                    " username = excluded.username, failures = excluded.failures,"
                    " last_attempt_at = excluded.last_attempt_at, next_allowed_at = excluded.next_allowed_at",
                    (s.key, s.scope, s.username, failures, utc(now), next_allowed),
                )
        return Verdict(True)

    def sign_in_failed(self, subjects: Sequence[tuple[Subject, Rule]], now: datetime) -> list[NewLock]:
        """The attempt counted by :meth:`begin_sign_in` failed: lock each subject that has now
        reached its rule's limit (returned, so the caller audits them)."""
        locks: list[NewLock] = []
        with self._write() as db:
            for s, rule in subjects:
                row = db.execute("SELECT * FROM sign_in_throttle WHERE subject = ?", (s.key,)).fetchone()
                if row is None or row["locked_until"] is not None or row["failures"] < rule.lock_after:
                    continue
                until = now + rule.lockout
                cur = db.execute(
                    "INSERT INTO sign_in_locks (scope, subject, username, failures, locked_at, locked_until)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (s.scope, s.key, s.username, row["failures"], utc(now), utc(until)),
                )
                lock_id = int(cur.lastrowid or 0)
                db.execute(
                    "UPDATE sign_in_throttle SET locked_at = ?, locked_until = ?, lock_id = ?,"
                    " next_allowed_at = ? WHERE subject = ?",
                    (utc(now), utc(until), lock_id, utc(until), s.key),
                )
                locks.append(NewLock(s, int(row["failures"]), until, lock_id))
        return locks

    def sign_in_succeeded(self, account: Subject, address: Subject, rule: Rule) -> None:
        """The password was right: the account starts again from nothing; the address takes
        back the one failure :meth:`begin_sign_in` counted (its other failures stand)."""
        with self._write() as db:
            db.execute(
                "DELETE FROM sign_in_throttle WHERE subject = ? AND locked_until IS NULL", (account.key,)
            )
            row = db.execute(
                "SELECT failures FROM sign_in_throttle WHERE subject = ? AND locked_until IS NULL",
                (address.key,),
            ).fetchone()
            if row is None:
                return
            failures = max(int(row["failures"]) - 1, 0)
            if failures == 0:
                db.execute("DELETE FROM sign_in_throttle WHERE subject = ?", (address.key,))
            elif failures <= rule.free_failures:
                db.execute(
                    "UPDATE sign_in_throttle SET failures = ?, next_allowed_at = NULL WHERE subject = ?",
                    (failures, address.key),
                )
            else:
                db.execute(
                    "UPDATE sign_in_throttle SET failures = ? WHERE subject = ?", (failures, address.key)
                )

    def unlock(self, subject_key: str, *, at: datetime, by: str) -> LockRow | None:
        """Release a subject's lock (and forget its failures); the released lock, or None when
        it was not locked."""
        with self._write() as db:
            row = db.execute("SELECT * FROM sign_in_throttle WHERE subject = ?", (subject_key,)).fetchone()
            if row is None:
                return None
            locked = row["locked_until"] is not None and parse_time(row["locked_until"]) > at
            if locked:
                self._release(db, row, at, by)
            else:  # nothing in force: an ended lock was released by time, failures are forgotten
                self._release(db, row, parse_time(row["locked_until"] or utc(at)), "time")
            if not locked or row["lock_id"] is None:
                return None
            found = db.execute("SELECT * FROM sign_in_locks WHERE id = ?", (row["lock_id"],)).fetchone()
        return self._lock_row(found) if found is not None else None

    @staticmethod
    def _lock_row(r: sqlite3.Row) -> LockRow:
        return LockRow(
            r["id"],
            r["scope"],
            r["subject"],
            r["username"],
            r["failures"],
            parse_time(r["locked_at"]),
            parse_time(r["locked_until"]),
            parse_time(r["released_at"]) if r["released_at"] else None,
            r["released_by"],
        )

    def sign_in_locks(self, *, active_at: datetime | None = None) -> list[LockRow]:
        """Every lockout recorded (oldest first), or only those in force at ``active_at``."""
        if active_at is None:
            rows = self._read("SELECT * FROM sign_in_locks ORDER BY id")
        else:
            rows = self._read(
                "SELECT * FROM sign_in_locks WHERE released_at IS NULL AND locked_until > ? ORDER BY id",
                [utc(active_at)],
            )
        return [self._lock_row(r) for r in rows]

    def failures_of(self, subject_key: str) -> int:
        """Failed sign-ins currently counted against a subject (0 when none)."""
        rows = self._read("SELECT failures FROM sign_in_throttle WHERE subject = ?", [subject_key])
        return int(rows[0]["failures"]) if rows else 0
