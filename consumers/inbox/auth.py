"""Who may use the inbox: local accounts, signed session cookies and CSRF tokens.

Passwords are stored only as argon2id hashes (argon2-cffi's defaults, re-hashed on sign-in when
the defaults move). The session cookie carries a random session id signed with itsdangerous and
a timestamp, so a forged or stale cookie is refused before the database is asked; the session
row makes signing out (and disabling an account) end it for real. Each session has its own CSRF
token, compared in constant time; the sign-in form, which comes before any session, uses a
signed double-submit token instead.

Usernames are staff identifiers, not referral data; they may appear in audit events. Passwords
never leave this module in any form but a hash.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.consumers.inbox.store_users import SessionRow, UserRow
from referral_broker.errors import AuthError, ConfigError
from referral_broker.parties import all_parties

USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
MIN_PASSWORD_LENGTH = 12

_hasher = PasswordHasher()
# Verifying against this when the user is unknown keeps the timing of "no such user" and
# "wrong password" alike, so sign-in does not reveal which usernames exist.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def district_teams() -> list[str]:
    return sorted(p.name for p in all_parties().values() if p.kind == "district_team")


def check_team(team: str) -> str:
    if team not in district_teams():
        raise ConfigError(f"unknown district team '{team}'; district teams: {', '.join(district_teams())}")
    return team


def check_new_credentials(username: str, password: str) -> None:
    if not USERNAME.match(username):
        raise ConfigError(
            "username must be 2-64 characters: lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")


DEFAULT_ROLE = "Early Help practitioner"


def add_user(
    store: InboxStore, username: str, team: str, password: str, *, at: datetime, role: str = DEFAULT_ROLE
) -> UserRow:
    """Create a local account for a member of a district team. ``role`` (not the name) is what
    status messages tell the referrer about who acted."""
    check_team(team)
    check_new_credentials(username, password)
    role = role.strip()
    if not role or len(role) > 80:
        raise ConfigError("role must be 1-80 characters, e.g. 'Early Help practitioner'")
    return store.add_user(username, team, role, _hasher.hash(password), at=at)


def rehash_password(store: InboxStore, username: str, password: str) -> None:
    """Set a new password for an existing account (the demo's fresh password each run)."""
    check_new_credentials(username, password)
    if store.get_user(username) is None:
        raise ConfigError(f"no user '{username}'")
    store.set_password_hash(username, _hasher.hash(password))


def authenticate(store: InboxStore, username: str, password: str) -> UserRow:
    """The account, if the password matches and it is enabled; one opaque error otherwise."""
    user = store.get_user(username.strip().lower())
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        raise AuthError("the username or password is not right") from None
    if user is None or user.disabled:
        raise AuthError("the username or password is not right")
    if _hasher.check_needs_rehash(user.password_hash):
        store.set_password_hash(user.username, _hasher.hash(password))
    return user


@dataclass(frozen=True)
class SignedIn:
    """The member behind a request, with the session's CSRF token."""

    user: UserRow
    session: SessionRow


class SessionCodec:
    """Signs session ids into cookie values and checks their age."""

    def __init__(self, secret: str, max_age_s: int) -> None:
        self.secret = secret  # also keys the sign-in throttle's subject hashes (throttle.subject_key)
        self._sessions = URLSafeTimedSerializer(secret, salt="inbox-session")
        self._signin = URLSafeTimedSerializer(secret, salt="inbox-sign-in-csrf")
        self.max_age_s = max_age_s

    def dump(self, session_id: str) -> str:
        return self._sessions.dumps(session_id)

    def load(self, cookie: str) -> tuple[str | None, bool]:
        """(session id, expired): the id when the signature is good and the cookie young enough."""
        try:
            return str(self._sessions.loads(cookie, max_age=self.max_age_s)), False
        except SignatureExpired:
            return None, True
        except BadSignature:
            return None, False

    def sign_in_token(self) -> tuple[str, str]:
        """A (cookie value, form value) pair for the sign-in form's double-submit check."""
        token = secrets.token_urlsafe(24)
        return self._signin.dumps(token), token

    def check_sign_in_token(self, cookie: str | None, form_value: str | None) -> bool:
        if not cookie or not form_value:
            return False
        try:
            token = self._signin.loads(cookie, max_age=3600)
        except BadSignature:
            return False
        return hmac.compare_digest(str(token), form_value)


def resolve_session(
    store: InboxStore, codec: SessionCodec, cookie: str | None, *, now: datetime
) -> tuple[SignedIn | None, bool]:
    """(who is signed in, whether a session just expired) for a request's session cookie.

    Only reads: a GET must change nothing, so an expired session is left for the purge at the
    next sign-in and a disabled member's sessions were already ended by disabling."""
    if not cookie:
        return None, False
    session_id, expired = codec.load(cookie)
    if session_id is None:
        return None, expired
    session = store.get_session(session_id)
    if session is None:
        return None, False
    if now - session.created_at > timedelta(seconds=codec.max_age_s):
        return None, True
    user = store.get_user(session.username)
    if user is None or user.disabled:
        return None, False
    return SignedIn(user, session), False


def csrf_ok(signed_in: SignedIn, submitted: str | None) -> bool:
    return bool(submitted) and hmac.compare_digest(signed_in.session.csrf_token, str(submitted))
