"""Sign-in throttling: per account and per client address, growing delays, then a lockout.

Each sign-in attempt is counted against two subjects: the account typed (whether or not it
exists, so a locked "account" tells nobody whether it is real) and the client address (an IPv6
address by its /64, the block one machine is usually given). After a rule's free failures every
further failure makes the next attempt wait longer (1 s, 2 s, 4 s ... up to a minute); an attempt
made while a subject must wait is refused without checking the password. At the rule's limit
the subject is locked for the lockout period: every attempt is refused, even with the right
password, until the time passes or an administrator runs ``referral-broker inbox unlock USER``
(or ``--address ADDRESS``). A lockout is written to the inbox's own record (``sign_in_locks``),
to the access audit (``sign_in_locked``) and to the log, which names it only by a short keyed
hash (``ref``), the scope and the counts: no username, no address.

Failures are forgotten after a quiet period; a right password clears the account's count and
takes back the attempt's own count from the address (the address's other failures stand, so
one good account cannot launder an address that is guessing at others).

Subjects are stored as keyed hashes (HMAC-SHA256 under the app's secret), never the typed name
or the address: a password typed into the username box must not end up on disk.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.consumers.inbox.store_signin import Subject

ACCOUNT = "account"
ADDRESS = "address"


@dataclass(frozen=True)
class ThrottleRule:
    """How one kind of subject is throttled."""

    free_failures: int  # failures allowed with no delay
    lock_after: int  # failures that lock the subject
    base_delay_s: float = 1.0  # the first delay; each further failure doubles it
    max_delay_s: float = 60.0
    lockout_s: float = 15 * 60.0
    forget_after_s: float = 15 * 60.0  # a quiet period after which failures are forgotten

    def __post_init__(self) -> None:
        if not 0 <= self.free_failures < self.lock_after:
            raise ValueError("a throttle rule needs 0 <= free_failures < lock_after")

    def delay(self, failures: int) -> timedelta:
        """How long to wait after the ``failures``-th counted failure."""
        over = failures - self.free_failures
        if over <= 0:
            return timedelta(0)
        return timedelta(seconds=min(self.base_delay_s * 2 ** min(over - 1, 32), self.max_delay_s))

    @property
    def lockout(self) -> timedelta:
        return timedelta(seconds=self.lockout_s)

    @property
    def forget_after(self) -> timedelta:
        return timedelta(seconds=self.forget_after_s)


@dataclass(frozen=True)
class SignInPolicy:
    """The rules the inbox applies: an account locks after 10 failures, an address (which may
    be a shared office) after 50."""

    account: ThrottleRule = field(default_factory=lambda: ThrottleRule(free_failures=3, lock_after=10))
    address: ThrottleRule = field(default_factory=lambda: ThrottleRule(free_failures=10, lock_after=50))


def normalise_address(address: str | None) -> str:
    """The client address as it is counted: IPv4 as is, IPv6 by its /64, anything else as typed."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address.strip().lower()
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def subject_key(secret: str, scope: str, value: str) -> str:
    """The stored name of a subject: a keyed hash, so the value itself is never on disk."""
    message = f"inbox-sign-in-throttle\0{scope}\0{value}".encode()
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def account_subject(store: InboxStore, secret: str, username: str) -> Subject:
    typed = username.strip().lower()
    key = subject_key(secret, ACCOUNT, typed)
    known = store.get_user(typed)
    return Subject(ACCOUNT, key, known.username if known else None, key[:12])


def address_subject(secret: str, address: str | None) -> Subject:
    key = subject_key(secret, ADDRESS, normalise_address(address))
    return Subject(ADDRESS, key, None, key[:12])


def wait_seconds(until: datetime, now: datetime) -> int:
    """Whole seconds until ``until`` (at least 1), for ``Retry-After`` and the page."""
    return max(1, math.ceil((until - now).total_seconds()))
