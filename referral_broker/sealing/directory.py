"""The public key directory: every party's key ids, public signing (Ed25519) and encryption
(X25519) keys, validity window and status (active, retired, revoked).

The hub publishes it on the compacted ``keys`` topic (message key = key id, value = the entry
as JSON) and it can be saved to and loaded from a JSON file. Loading from the topic reads every
partition to its end offset, so a reader never acts on a half-read directory.

Statuses only move forward: active -> retired -> revoked (or active -> revoked). A revoked
entry stays revoked even if an older "active" copy of it is read later (a replayed or
re-ordered record cannot un-revoke a key).

Trust: whoever may write the ``keys`` topic decides which public keys count; in production a
Kafka ACL lets only the hub write it. This module must never hold, accept or publish a private
key: an entry has public halves only and ``from_json`` refuses any other field.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from referral_broker.config import Settings
from referral_broker.errors import (
    BrokerError,
    ConfigError,
    KeyNotFoundError,
    RevokedKeyError,
    SealingError,
    SignatureError,
)
from referral_broker.sealing.timefmt import from_iso, to_iso

KEY_ID = re.compile(r"^(?P<party>[a-z][a-z0-9-]{1,40})\.(?P<serial>[0-9a-f]{12})$")
# A signature may claim a time this far ahead of the verifier's clock (clock skew between parties).
CLOCK_SKEW_S = 300.0


class KeyStatus(StrEnum):
    ACTIVE = "active"
    RETIRED = "retired"
    REVOKED = "revoked"


_RANK = {KeyStatus.ACTIVE: 0, KeyStatus.RETIRED: 1, KeyStatus.REVOKED: 2}


def check_key_id(key_id: str) -> str:
    """Key ids are ``<party>.<12 hex>``: they name files, so nothing else is accepted."""
    if not isinstance(key_id, str) or not KEY_ID.match(key_id):
        raise KeyNotFoundError(
            f"malformed key id {key_id[:60]!r}" if isinstance(key_id, str) else "malformed key id"
        )
    return key_id


def party_of(key_id: str) -> str:
    match = KEY_ID.match(check_key_id(key_id))
    assert match is not None  # check_key_id refused anything else
    return match["party"]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise SealingError(f"key directory: {what} is not base64") from None
    if len(raw) != 32:
        raise SealingError(f"key directory: {what} must be 32 bytes")
    return raw


@dataclass(frozen=True)
class KeyEntry:
    """One key id of one party: public halves only."""

    key_id: str
    party: str
    signing_public: bytes
    encryption_public: bytes
    not_before: float
    not_after: float
    status: KeyStatus
    revoked_at: float | None = None

    def signing_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.signing_public)

    def encryption_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.encryption_public)

    def valid_at(self, ts: float) -> bool:
        return self.not_before <= ts < self.not_after

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "key_id": self.key_id,
            "party": self.party,
            "status": self.status.value,
            "signing_public": _b64(self.signing_public),
            "encryption_public": _b64(self.encryption_public),
            "not_before": to_iso(self.not_before),
            "not_after": to_iso(self.not_after),
        }
        if self.revoked_at is not None:
            doc["revoked_at"] = to_iso(self.revoked_at)
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> KeyEntry:
        allowed = {
            "key_id",
            "party",
            "status",
            "signing_public",
            "encryption_public",
            "not_before",
            "not_after",
            "revoked_at",
        }
        if not isinstance(doc, dict):
            raise SealingError("key directory: an entry must be a JSON object")
        unknown = sorted(set(doc) - allowed)
        if unknown:
            raise SealingError(f"key directory: unknown entry fields {', '.join(unknown)} (public keys only)")
        try:
            key_id = check_key_id(doc["key_id"])
            party = doc["party"]
            if party_of(key_id) != party:
                raise SealingError(f"key directory: key {key_id} is not a key of party {party}")
            return cls(
                key_id=key_id,
                party=party,
                signing_public=_unb64(doc["signing_public"], f"signing key of {key_id}"),
                encryption_public=_unb64(doc["encryption_public"], f"encryption key of {key_id}"),
                not_before=from_iso(doc["not_before"]),
                not_after=from_iso(doc["not_after"]),
                status=KeyStatus(doc["status"]),
                revoked_at=from_iso(doc["revoked_at"]) if doc.get("revoked_at") else None,
            )
        except KeyError as exc:
            raise SealingError(f"key directory: entry lacks {exc.args[0]!r}") from None
        except (ValueError, TypeError) as exc:
            raise SealingError(f"key directory: malformed entry ({type(exc).__name__})") from None


class KeyDirectory:
    """Every party's public keys, and the checks senders and receivers make against them."""

    def __init__(self, entries: Iterable[KeyEntry] = ()) -> None:
        self._entries: dict[str, KeyEntry] = {}
        for e in entries:
            self.merge(e)

    def merge(self, entry: KeyEntry) -> KeyEntry:
        """Add or update an entry; status never moves backwards (revoked is final)."""
        old = self._entries.get(entry.key_id)
        if old is not None:
            if (old.signing_public, old.encryption_public) != (entry.signing_public, entry.encryption_public):
                raise SealingError(f"key directory: key {entry.key_id} already exists with other public keys")
            if _RANK[entry.status] < _RANK[old.status]:
                return old
        self._entries[entry.key_id] = entry
        return entry

    def entries(self, party: str | None = None) -> list[KeyEntry]:
        found = [e for e in self._entries.values() if party is None or e.party == party]
        return sorted(found, key=lambda e: (e.party, e.not_before, e.key_id))

    def get(self, key_id: str) -> KeyEntry:
        entry = self._entries.get(key_id)
        if entry is None:
            raise KeyNotFoundError(f"key {key_id} is not in the key directory")
        return entry

    def __contains__(self, key_id: str) -> bool:
        return key_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def encryption_key_for(self, party: str, now: float | None = None) -> KeyEntry:
        """The key to seal new messages to ``party`` with: its newest active, valid key. A
        revoked key is never chosen, and when it is all the party has the error names it."""
        now = time.time() if now is None else now
        mine = self.entries(party)
        usable = [e for e in mine if e.status is KeyStatus.ACTIVE and e.valid_at(now)]
        if usable:
            return max(usable, key=lambda e: e.not_before)
        revoked = [e for e in mine if e.status is KeyStatus.REVOKED]
        if revoked and not any(e.status is KeyStatus.ACTIVE for e in mine):
            newest = max(revoked, key=lambda e: e.not_before)
            raise RevokedKeyError(
                f"key {newest.key_id} of {party} is revoked and {party} has no active key; "
                f"{party} must run 'keys rotate'"
            )
        if any(e.status is KeyStatus.ACTIVE for e in mine):
            raise KeyNotFoundError(f"{party} has no key valid at {to_iso(now)} (expired or not yet valid)")
        raise KeyNotFoundError(f"{party} has no active key in the key directory")

    def require_sendable(self, key_id: str, party: str, now: float | None = None) -> KeyEntry:
        """Refuse to seal to (or sign with) a key that is not ``party``'s active, valid key."""
        now = time.time() if now is None else now
        entry = self.get(key_id)
        if entry.party != party:
            raise SealingError(f"key {key_id} belongs to {entry.party}, not {party}")
        if entry.status is KeyStatus.REVOKED:
            raise RevokedKeyError(f"key {key_id} of {party} is revoked; it cannot be used for new messages")
        if entry.status is not KeyStatus.ACTIVE or not entry.valid_at(now):
            raise SealingError(f"key {key_id} of {party} is {entry.status.value} or outside its validity")
        return entry

    def signer(self, key_id: str, party: str, signed_at: float, now: float | None = None) -> Ed25519PublicKey:
        """The public key to verify ``party``'s signature with, or raise: unknown key, another
        party's key, revoked key (whenever it signed: a revoked key may be in other hands), a
        signing time outside the key's validity, or a signing time in the future."""
        now = time.time() if now is None else now
        entry = self._entries.get(key_id)
        if entry is None:
            raise KeyNotFoundError(f"message is signed with key {key_id}, which is not in the key directory")
        if entry.party != party:
            raise SignatureError(f"message from {party} is signed with key {key_id} of {entry.party}")
        if entry.status is KeyStatus.REVOKED:
            raise RevokedKeyError(f"message is signed with revoked key {key_id} of {party}")
        if not entry.valid_at(signed_at):
            raise SignatureError(
                f"message claims signing time {to_iso(signed_at)}, outside the validity of key {key_id}"
            )
        if signed_at > now + CLOCK_SKEW_S:
            raise SignatureError(f"message claims signing time {to_iso(signed_at)}, in the future")
        return entry.signing_key()

    # -- JSON file ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": 1, "keys": [e.to_json() for e in self.entries()]}

    @classmethod
    def from_json(cls, doc: Any) -> KeyDirectory:
        if not isinstance(doc, dict) or doc.get("format") != 1 or not isinstance(doc.get("keys"), list):
            raise SealingError("key directory file: expected {'format': 1, 'keys': [...]}")
        return cls(KeyEntry.from_json(e) for e in doc["keys"])

    def save_file(self, path: Path) -> None:
        """Write atomically (a reader never sees half a file). Public keys only: mode 0644."""
        # The folder is made 0700: the file is public, but it usually sits in the key store's
        # folder, which must not be created open to others before the first key store is.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load_file(cls, path: Path) -> KeyDirectory:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"key directory file {path} does not exist") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise SealingError(f"key directory file {path} cannot be read: {type(exc).__name__}") from None
        return cls.from_json(doc)


def directory_file(settings: Settings) -> Path:
    """Where ``keys`` commands keep a JSON copy of the entries they published (a fallback for
    readers that start while Kafka is unreachable, and a file to hand to another system)."""
    return settings.keys_dir / "directory.json"


def record_in_file(path: Path, entries: Iterable[KeyEntry]) -> KeyDirectory:
    """Merge ``entries`` into the JSON directory file at ``path`` (created when missing)."""
    directory = KeyDirectory.load_file(path) if path.exists() else KeyDirectory()
    for entry in entries:
        directory.merge(entry)
    directory.save_file(path)
    return directory


# -- the compacted keys topic ------------------------------------------------------------------
def publish(settings: Settings, bootstrap: str, entries: Iterable[KeyEntry]) -> int:
    """Produce each entry to the ``keys`` topic (key = key id) and wait until all are durable."""
    from referral_broker.cluster.clients import publish_records
    from referral_broker.cluster.topics import topic_name

    records = (
        (entry.key_id.encode("ascii"), json.dumps(entry.to_json(), sort_keys=True).encode("utf-8"))
        for entry in entries
    )
    return publish_records(settings, bootstrap, topic_name(settings, "keys"), records, kind=b"key")


def load_topic(settings: Settings, bootstrap: str, *, timeout_s: float = 30.0) -> KeyDirectory:
    """Read the whole ``keys`` topic up to its end offsets (as of the call) into a directory."""
    from kafka.errors import KafkaError

    from referral_broker.cluster.clients import build_consumer, poll_records
    from referral_broker.cluster.topics import topic_name

    topic = topic_name(settings, "keys")
    consumer = build_consumer(settings, bootstrap, [topic], group_id=None)
    directory = KeyDirectory()
    try:
        partitions = list(consumer.assignment())
        try:
            consumer.seek_to_beginning(*partitions)
            end = consumer.end_offsets(partitions)
        except KafkaError as exc:
            raise BrokerError(f"reading the key directory failed: {type(exc).__name__}") from exc
        deadline = time.monotonic() + timeout_s
        remaining = {tp for tp in partitions if end.get(tp, 0) > 0}
        while remaining:
            if time.monotonic() > deadline:
                raise BrokerError(f"reading the key directory from {topic} timed out after {timeout_s:.0f}s")
            for record in poll_records(consumer, 500):
                if record.value is None:  # tombstone: the entry was removed
                    directory._entries.pop(record.key.decode("ascii", "replace") if record.key else "", None)
                else:
                    try:
                        directory.merge(KeyEntry.from_json(json.loads(record.value)))
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        raise SealingError(
                            f"key directory record at {topic}/{record.partition}@{record.offset} is not JSON"
                        ) from None
            remaining = {tp for tp in remaining if consumer.position(tp) < end[tp]}
        return directory
    finally:
        consumer.close()
