"""The account side of the inbox store: local users (argon2 hashes only) and their sessions.

Apart from the referrals and events (:mod:`store_referrals`) because only sign-in, the
``inbox users`` commands and allocation read these tables, and nothing here touches a referral.
"""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass
from datetime import datetime

from referral_broker.consumers.inbox.store_database import StoreDatabase, parse_time, utc
from referral_broker.errors import UnknownUserError, UserExistsError


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


class UserTables(StoreDatabase):
    """The users and sessions tables (see :class:`consumers.inbox.store.InboxStore`)."""

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
