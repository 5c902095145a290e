"""The public key directory: every party's key ids, public signing (Ed25519) and encryption
(X25519) keys, validity window and status (active, retired, revoked).

The hub publishes it on the compacted ``keys`` topic (message key = key id, value = the entry
as JSON) and it can be saved to and loaded from a JSON file. Loading from the topic reads every
partition to its end offset, so a reader never acts on a half-read directory.

Statuses only move forward: active -> retired -> revoked (or active -> revoked). A revoked
entry stays revoked even if an older "active" copy of it is read later (a replayed or
re-ordered record cannot un-revoke a key).

Trust (see :mod:`.trust`): every record on the topic and in the file is an entry **signed by
the council's root key**; readers verify it against their pinned trust anchor. A record that is
unsigned, signed by anything else, malformed, a key-id collision (same key id, other public
keys), a tombstone, or a replay that would move a key's status backwards is **refused and
reported** (:attr:`KeyDirectory.refused`, the ``referral_key_directory_refused_records``
counter, one log line), never fatal to loading the rest. Revocation is final: a revocation is
published under its key id *and* under its own message key ``revoked:<key id>``, and each
reader remembers the revocations it has seen in its key store (``revocations-seen.json``), so
tombstoning or compacting the topic cannot bring a revoked key back to a reader that saw it.
A Kafka ACL on the topic (Trust I) is a second wall, not the first.

This module must never hold, accept or publish a private key: an entry has public halves only
and ``from_json`` refuses any other field.
"""

from __future__ import annotations

import base64
import functools
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
from referral_broker.folders import private_folder
from referral_broker.sealing.timefmt import from_iso, to_iso
from referral_broker.sealing.trust import (
    COLLISION,
    MALFORMED,
    MISPLACED,
    REPLAY,
    TOMBSTONE,
    UNSIGNED,
    Refused,
    RootKey,
    TrustAnchor,
    ensure_root,
    load_anchor,
    report,
    verify_record,
)
from referral_broker.structured_log import get_logger

KEY_ID = re.compile(r"^(?P<party>[a-z][a-z0-9-]{1,40})\.(?P<serial>[0-9a-f]{12})$")
# A revocation is published again under this message key, so tombstoning the key id alone
# cannot remove it.
REVOKED_PREFIX = "revoked:"
SEEN_REVOCATIONS = "revocations-seen.json"
# A signature may claim a time this far ahead of the verifier's clock (clock skew between parties).
CLOCK_SKEW_S = 300.0

log = get_logger(__name__)


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


@functools.lru_cache(maxsize=1024)
def _ed25519_public(raw: bytes) -> Ed25519PublicKey:
    """A public key object built once per key, not once per message verified; kept outside
    :class:`KeyEntry` so an entry stays plain data (a worker process is sent its directory)."""
    return Ed25519PublicKey.from_public_bytes(raw)


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
        return _ed25519_public(self.signing_public)

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


def _claimed(doc: Any, message_key: str | None) -> tuple[str | None, str | None]:
    """The key id and party a record claims, when well formed (for reporting only)."""
    candidates: list[Any] = []
    if isinstance(doc, dict):
        inner = doc.get("entry")
        candidates += [inner.get("key_id") if isinstance(inner, dict) else None, doc.get("key_id")]
    if message_key:
        candidates += [message_key.removeprefix(REVOKED_PREFIX)]
    for candidate in candidates:
        if isinstance(candidate, str) and KEY_ID.match(candidate):
            return candidate, party_of(candidate)
    return None, None


@dataclass(frozen=True)
class Refusal:
    """A record that was not taken into the directory: where it was, what it claimed, why."""

    where: str  # "<topic>/<partition>@<offset>", or a file name and position
    category: str  # one of trust.CATEGORIES
    reason: str
    key_id: str | None  # as claimed, only when it is a well-formed key id
    party: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "party": self.party,
            "status": "refused",
            "refused": self.category,
            "reason": self.reason,
            "where": self.where,
        }


class KeyDirectory:
    """Every party's public keys, and the checks senders and receivers make against them.

    Entries read from the topic or a file carry their root-signed record (their *proof*);
    entries built in memory (tests, benchmarks) carry none and cannot be saved to a file.
    """

    def __init__(self, entries: Iterable[KeyEntry] = ()) -> None:
        self._entries: dict[str, KeyEntry] = {}
        # the same entries by party: a seal looks up its recipient's key, not the whole county's
        self._by_party: dict[str, dict[str, KeyEntry]] = {}
        self._proofs: dict[str, dict[str, Any]] = {}
        self.refused: list[Refusal] = []
        for e in entries:
            self.merge(e)

    def merge(self, entry: KeyEntry, proof: dict[str, Any] | None = None) -> KeyEntry:
        """Add or update an entry; status never moves backwards (revoked is final)."""
        old = self._entries.get(entry.key_id)
        if old is not None:
            if (old.signing_public, old.encryption_public) != (entry.signing_public, entry.encryption_public):
                raise SealingError(f"key directory: key {entry.key_id} already exists with other public keys")
            if _RANK[entry.status] < _RANK[old.status]:
                return old
        self._entries[entry.key_id] = entry
        if old is not None:
            self._by_party[old.party].pop(old.key_id, None)
        self._by_party.setdefault(entry.party, {})[entry.key_id] = entry
        if proof is not None:
            self._proofs[entry.key_id] = proof
        else:
            self._proofs.pop(entry.key_id, None)
        return entry

    def refuse(
        self, where: str, category: str, reason: str, *, key_id: str | None = None, party: str | None = None
    ) -> None:
        # a reason can quote what a record claims (a field name, a party): printable ASCII only,
        # bounded, so a forged record cannot write arbitrary text into logs and listings
        reason = "".join(c if " " <= c <= "~" else "?" for c in reason)[:200]
        self.refused.append(Refusal(where, category, reason, key_id, party))
        report(where, category, reason, key_id=key_id, party=party)

    def accept(
        self, doc: Any, anchor: TrustAnchor | None, *, where: str, message_key: str | None = None
    ) -> KeyEntry | None:
        """Take one root-signed record in; returns the record's own entry, or None when it was
        refused (recorded in :attr:`refused` with the reason, never raised)."""
        key_id, party = _claimed(doc, message_key)
        try:
            try:
                entry = KeyEntry.from_json(verify_record(anchor, doc))
            except SealingError as exc:
                raise Refused(MALFORMED, str(exc).removeprefix("key directory: ")) from None
            if message_key is not None:
                if message_key not in (entry.key_id, REVOKED_PREFIX + entry.key_id):
                    raise Refused(MISPLACED, "the record's message key does not name its key id")
                if message_key.startswith(REVOKED_PREFIX) and entry.status is not KeyStatus.REVOKED:
                    raise Refused(MISPLACED, "a record under a revocation key that is not a revocation")
            try:
                self.merge(entry, doc)
            except SealingError:
                raise Refused(
                    COLLISION,
                    f"key id {entry.key_id} already exists with other public keys; the first one stays",
                ) from None
            return entry
        except Refused as refused:
            self.refuse(where, refused.category, refused.reason, key_id=key_id, party=party)
            return None

    def absorb(self, other: KeyDirectory) -> None:
        """Merge another directory's signed entries and refusals into this one (collisions are
        refused, not raised; an older status is silently kept newer)."""
        for entry in other.entries():
            try:
                self.merge(entry, other._proofs.get(entry.key_id))
            except SealingError:
                self.refuse(
                    "directory file",
                    COLLISION,
                    f"key id {entry.key_id} already exists with other public keys; the first one stays",
                    key_id=entry.key_id,
                    party=entry.party,
                )
        self.refused.extend(r for r in other.refused if r not in self.refused)

    def proof(self, key_id: str) -> dict[str, Any] | None:
        """The root-signed record this entry was read from, when it was read from one."""
        return self._proofs.get(key_id)

    def entries(self, party: str | None = None) -> list[KeyEntry]:
        found = self._entries.values() if party is None else self._by_party.get(party, {}).values()
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
        """The file form: the root-signed record of every entry (an unsigned one is refused)."""
        unsigned = [key_id for key_id in sorted(self._entries) if key_id not in self._proofs]
        if unsigned:
            raise SealingError(
                f"key directory: {unsigned[0]} is not signed by the council's root; "
                "certify it ('keys certify') before saving it"
            )
        return {"format": 2, "records": [self._proofs[e.key_id] for e in self.entries()]}

    @classmethod
    def from_json(
        cls, doc: Any, anchor: TrustAnchor | None, *, where: str = "directory file"
    ) -> KeyDirectory:
        """A directory from its file form; every record is verified against ``anchor`` and
        one that does not verify is refused (listed in :attr:`refused`), not raised."""
        directory = cls()
        if isinstance(doc, dict) and doc.get("format") == 1 and isinstance(doc.get("keys"), list):
            for n, item in enumerate(doc["keys"]):  # the unsigned format of before: nothing counts
                key_id, party = _claimed(item, None)
                directory.refuse(
                    f"{where}#{n}",
                    UNSIGNED,
                    "not signed by the council's root (an unsigned entry)",
                    key_id=key_id,
                    party=party,
                )
            return directory
        if not isinstance(doc, dict) or doc.get("format") != 2 or not isinstance(doc.get("records"), list):
            raise SealingError("key directory file: expected {'format': 2, 'records': [...]}")
        for n, record in enumerate(doc["records"]):
            directory.accept(record, anchor, where=f"{where}#{n}")
        return directory

    def save_file(self, path: Path) -> None:
        """Write atomically (a reader never sees half a file). Public keys only: mode 0644."""
        # The folder is made 0700: the file is public, but it usually sits in the key store's
        # folder, which must not be created open to others before the first key store is.
        private_folder(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load_file(cls, path: Path, anchor: TrustAnchor | None) -> KeyDirectory:
        """The directory in a JSON file, each record verified against ``anchor``."""
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"key directory file {path} does not exist") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SealingError(f"key directory file {path} cannot be read: {type(exc).__name__}") from None
        return cls.from_json(doc, anchor, where=path.name)

    @classmethod
    def load_local(cls, settings: Settings) -> KeyDirectory:
        """This machine's directory file, verified against its pinned trust anchor."""
        return cls.load_file(directory_file(settings), load_anchor(settings))


def directory_file(settings: Settings) -> Path:
    """Where ``keys`` commands keep a JSON copy of the entries they published (a fallback for
    readers that start while Kafka is unreachable, and a file to hand to another system)."""
    return settings.keys_dir / "directory.json"


def sign_entries(
    root: RootKey, entries: Iterable[KeyEntry], *, now: float | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """(message key, root-signed record) for each entry; a revocation twice, also under
    ``revoked:<key id>``."""
    signed_at = time.time() if now is None else now
    out: list[tuple[str, dict[str, Any]]] = []
    for entry in entries:
        record = root.sign(entry.to_json(), signed_at=signed_at)
        out.append((entry.key_id, record))
        if entry.status is KeyStatus.REVOKED:
            out.append((REVOKED_PREFIX + entry.key_id, record))
    return out


def record_in_file(
    path: Path, records: Iterable[tuple[str, dict[str, Any]]], anchor: TrustAnchor
) -> KeyDirectory:
    """Merge signed ``records`` into the JSON directory file at ``path`` (created when missing)."""
    directory = KeyDirectory.load_file(path, anchor) if path.exists() else KeyDirectory()
    for n, (_key, record) in enumerate(records):
        directory.accept(record, anchor, where=f"new record #{n}")
    directory.save_file(path)
    return directory


# -- the compacted keys topic ------------------------------------------------------------------
def publish_signed(settings: Settings, bootstrap: str, records: Iterable[tuple[str, dict[str, Any]]]) -> int:
    """Produce signed records to the ``keys`` topic and wait until all are durable."""
    from referral_broker.cluster.clients import publish_records
    from referral_broker.cluster.topics import topic_name

    raw = (
        (key.encode("ascii"), json.dumps(record, sort_keys=True).encode("utf-8")) for key, record in records
    )
    return publish_records(settings, bootstrap, topic_name(settings, "keys"), raw, kind=b"key")


def publish(settings: Settings, bootstrap: str, entries: Iterable[KeyEntry]) -> int:
    """Sign each entry with the root held here (made first on a fresh local setup, see
    :func:`.trust.ensure_root`) and produce it to the ``keys`` topic (key = key id)."""
    return publish_signed(settings, bootstrap, sign_entries(ensure_root(settings), entries))


def _recall(settings: Settings, anchor: TrustAnchor | None, directory: KeyDirectory) -> set[str]:
    """Merge the revocations this machine has seen before; returns their key ids."""
    path = settings.keys_dir / SEEN_REVOCATIONS
    if anchor is None or not path.exists():
        return set()
    try:
        from referral_broker.sealing.keystore import read_private

        doc = json.loads(read_private(path))
        records = doc["records"] if isinstance(doc, dict) and isinstance(doc.get("records"), list) else []
    except (SealingError, OSError, ValueError, KeyError) as exc:
        log.warning("remembered revocations unreadable", path=str(path), error=type(exc).__name__)
        return set()
    seen = set()
    for n, record in enumerate(records):
        entry = directory.accept(record, anchor, where=f"{SEEN_REVOCATIONS}#{n}")
        if entry is not None and entry.status is KeyStatus.REVOKED:
            seen.add(entry.key_id)
    return seen


def _remember(settings: Settings, directory: KeyDirectory, seen: set[str]) -> None:
    """Keep every revocation read so far in this machine's key store folder (0600)."""
    revoked = {
        e.key_id: directory.proof(e.key_id) for e in directory.entries() if e.status is KeyStatus.REVOKED
    }
    records = [proof for key_id, proof in sorted(revoked.items()) if proof is not None]
    if {key_id for key_id, proof in revoked.items() if proof is not None} <= seen:
        return
    try:
        from referral_broker.sealing.keystore import make_private_dir, write_private

        make_private_dir(settings.keys_dir)
        write_private(
            settings.keys_dir / SEEN_REVOCATIONS,
            json.dumps({"format": 1, "records": records}, indent=1).encode("utf-8"),
        )
    except (SealingError, OSError) as exc:
        log.warning(
            "revocations could not be remembered", path=str(settings.keys_dir), error=type(exc).__name__
        )


def load_topic(settings: Settings, bootstrap: str, *, timeout_s: float = 30.0) -> KeyDirectory:
    """Read the whole ``keys`` topic up to its end offsets (as of the call) into a directory,
    verifying every record against the pinned trust anchor (refusals in ``.refused``)."""
    from kafka.errors import KafkaError

    from referral_broker.cluster.clients import build_consumer, read_to_end
    from referral_broker.cluster.topics import topic_name

    anchor = load_anchor(settings)
    topic = topic_name(settings, "keys")
    directory = KeyDirectory()
    seen = _recall(settings, anchor, directory)
    # the last record read under each plain key-id message key: (where, its own status)
    last: dict[str, tuple[str, KeyStatus]] = {}
    consumer = build_consumer(settings, bootstrap, [topic], group_id=None)
    try:
        partitions = list(consumer.assignment())
        try:
            consumer.seek_to_beginning(*partitions)
            end = consumer.end_offsets(partitions)
        except KafkaError as exc:
            raise BrokerError(f"reading the key directory failed: {type(exc).__name__}") from exc
        named = f"the key directory from {topic}"
        for batch in read_to_end(consumer, partitions, end, what=named, timeout_s=timeout_s):
            for record in batch:
                where = f"{topic}/{record.partition}@{record.offset}"
                key = record.key.decode("ascii", "replace") if record.key else ""
                if record.value is None:
                    key_id, party = _claimed(None, key)
                    what = "revocation" if key.startswith(REVOKED_PREFIX) else "entry"
                    directory.refuse(
                        where,
                        TOMBSTONE,
                        f"a tombstone (deletion) of a key directory {what}: entries are never deleted; ignored",
                        key_id=key_id,
                        party=party,
                    )
                    continue
                try:
                    doc = json.loads(record.value)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    key_id, party = _claimed(None, key)
                    directory.refuse(where, MALFORMED, "the record is not JSON", key_id=key_id, party=party)
                    continue
                entry = directory.accept(doc, anchor, where=where, message_key=key)
                if entry is not None and key == entry.key_id:
                    last[key] = (where, entry.status)
    finally:
        consumer.close()
    # A key whose newest record says less than the directory knows (an "active" record after
    # its revocation, say) was replayed or re-ordered: the directory keeps the later status.
    for key_id, (where, status) in sorted(last.items()):
        current = directory.get(key_id)
        if _RANK[status] < _RANK[current.status]:
            directory.refuse(
                where,
                REPLAY,
                f"an {status.value!r} record of key {key_id} after it was {current.status.value}: "
                "status never moves back (revocation is final); ignored",
                key_id=key_id,
                party=current.party,
            )
    _remember(settings, directory, seen)
    return directory
