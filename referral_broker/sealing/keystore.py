"""A party's private keys on local disk: Ed25519 (signing) and X25519 (encryption) per key id.

Layout under ``Settings.keys_dir`` (folders 0700, files 0600, owned by the current user)::

    <keys_dir>/<party>/keyring.json     which key ids exist, their status and validity
    <keys_dir>/<party>/<key id>.key     the two private keys of one key id (raw, base64)

Permissions are checked every time a store is opened: a folder or file that group or others
can read (or that another user owns) is refused with :class:`KeyStorePermissionError` naming
the path and the fix, never silently used. Files are written atomically with mode 0600 from
the start (never created readable and then tightened).

Rotation makes a new key id active and the previous one retired; retired (and revoked) keys
stay in the store so old messages still open, until :meth:`KeyStore.destroy` removes them.
Revoked keys are never used to sign or to receive new messages.

This module must never write a private key anywhere but its own 0600 files: not to Kafka, not
to a log, not into an exception message or a ``repr``; and never into the repository.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import os
import secrets
import stat
import time
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from referral_broker.errors import (
    ConfigError,
    KeyNotFoundError,
    KeyStorePermissionError,
    RevokedKeyError,
    SealingError,
)
from referral_broker.folders import private_folder
from referral_broker.parties import get_party
from referral_broker.sealing.directory import KeyEntry, KeyStatus, check_key_id
from referral_broker.sealing.timefmt import from_iso, to_iso

KEY_VALIDITY_S = 2 * 365 * 86400
_RAW = serialization.Encoding.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_NONE = serialization.NoEncryption()


# -- private files ---------------------------------------------------------------------------
def check_private(path: Path, *, is_dir: bool) -> None:
    """Refuse a key-store path that is a symlink, not ours, or open to group/others."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise KeyNotFoundError(f"key store path {path} does not exist") from None
    check_private_stat(st, path, is_dir=is_dir)


def check_private_stat(st: os.stat_result, path: Path, *, is_dir: bool) -> None:
    """:func:`check_private` on a stat already taken (``fstat`` of a file opened with
    ``O_NOFOLLOW``, so the file checked is the file used)."""
    if stat.S_ISLNK(st.st_mode):
        raise KeyStorePermissionError(f"key store path {path} is a symbolic link; refusing to follow it")
    if is_dir != stat.S_ISDIR(st.st_mode):
        raise KeyStorePermissionError(f"key store path {path} is not a {'folder' if is_dir else 'file'}")
    if st.st_uid != os.getuid():
        raise KeyStorePermissionError(f"key store path {path} is owned by another user (uid {st.st_uid})")
    if st.st_mode & 0o077:
        want = "700" if is_dir else "600"
        raise KeyStorePermissionError(
            f"key store path {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"refusing to use it. Fix with: chmod {want} {path}"
        )


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) as 0700, or check an existing one."""
    if not path.exists():
        private_folder(path.parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    check_private(path, is_dir=True)


def _temporary(path: Path, data: bytes, durable: bool) -> Path:
    """``data`` in a new 0600 file beside ``path`` (fsynced when ``durable``), to be moved or
    linked into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:  # no buffered file object: a case key is one small write
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def write_private(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Atomically replace ``path`` with ``data``; the file is 0600 from its creation on.
    ``durable=False`` skips both fsyncs: the caller makes it durable later (``fsync_paths``)."""
    tmp = _temporary(path, data, durable)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def create_private(path: Path, data: bytes, *, durable: bool = True) -> bool:
    """Create ``path`` holding ``data`` (0600) unless it exists; True when this call made it.
    No lock: the file is written whole under a temporary name and hard-linked into place, so
    of two writers racing exactly one wins and a reader never sees it half written. On a file
    system without hard links it falls back to the folder's lock (:func:`locked`)."""
    tmp = _temporary(path, data, durable)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        with locked(path.parent):
            if os.path.lexists(path):
                return False
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if durable:
        _fsync_dir(path.parent)
    return True


def fsync_paths(folder: Path, paths: Iterable[Path]) -> int:
    """Make files written with ``durable=False`` in ``folder`` durable: each file's data, then
    the folder (their names) once. A file gone since (destroyed) is skipped. Returns how many."""
    done = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
            done += 1
        finally:
            os.close(fd)
    _fsync_dir(folder)
    return done


def read_private(path: Path) -> bytes:
    check_private(path, is_dir=False)
    return path.read_bytes()


def destroy_file(path: Path) -> None:
    """Overwrite with zeros, then unlink. On copy-on-write or flash storage the overwrite is a
    best effort; the store's volume must be encrypted and kept out of long-lived backups."""
    check_private(path, is_dir=False)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.write(bytes(size))
        fh.flush()
        os.fsync(fh.fileno())
    os.unlink(path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on a store folder, so two commands cannot interleave their updates."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# -- key pairs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyPair:
    """One key id of this party: both private keys and their public entry's metadata."""

    key_id: str
    party: str
    status: KeyStatus
    not_before: float
    not_after: float
    revoked_at: float | None
    signing: Ed25519PrivateKey = field(repr=False, compare=False)
    encryption: X25519PrivateKey = field(repr=False, compare=False)

    def public_entry(self) -> KeyEntry:
        return KeyEntry(
            key_id=self.key_id,
            party=self.party,
            signing_public=self.signing.public_key().public_bytes(_RAW, _RAW_PUB),
            encryption_public=self.encryption.public_key().public_bytes(_RAW, _RAW_PUB),
            not_before=self.not_before,
            not_after=self.not_after,
            status=self.status,
            revoked_at=self.revoked_at,
        )


def _new_key_id(party: str) -> str:
    return f"{party}.{secrets.token_hex(6)}"


class KeyStore:
    """One party's private keys. Open with :meth:`open` (checks permissions) or :meth:`create`."""

    def __init__(self, root: Path, party: str, pairs: dict[str, KeyPair]) -> None:
        self.root = root
        self.party = party
        self._pairs = pairs

    # -- opening ------------------------------------------------------------------------------
    @staticmethod
    def path_for(keys_dir: Path, party: str) -> Path:
        get_party(party)
        return keys_dir / party

    @classmethod
    def exists(cls, keys_dir: Path, party: str) -> bool:
        return (cls.path_for(keys_dir, party) / "keyring.json").exists()

    @classmethod
    def create(cls, keys_dir: Path, party: str, *, now: float | None = None) -> KeyStore:
        """A new store for ``party`` with its first active key; refuses to overwrite one."""
        root = cls.path_for(keys_dir, party)
        make_private_dir(keys_dir)
        make_private_dir(root)
        with locked(root):
            if (root / "keyring.json").exists():
                raise ConfigError(f"a key store for {party} already exists at {root}; use 'keys rotate'")
            store = cls(root, party, {})
            store._add_new(time.time() if now is None else now)
            store._save_ring()
        return store

    @classmethod
    def open(cls, keys_dir: Path, party: str) -> KeyStore:
        """Load ``party``'s store, refusing it when its permissions are loose."""
        root = cls.path_for(keys_dir, party)
        if not (root / "keyring.json").exists():
            raise KeyNotFoundError(
                f"no key store for {party} at {root}; run 'referral-broker keys init --party {party}'"
            )
        check_private(keys_dir, is_dir=True)
        check_private(root, is_dir=True)
        ring = cls._read_ring(root, party)
        pairs: dict[str, KeyPair] = {}
        for item in ring["keys"]:
            key_id = check_key_id(item.get("key_id", ""))
            if item.get("destroyed"):
                continue
            path = root / f"{key_id}.key"
            try:
                material = json.loads(read_private(path))
                if material.get("key_id") != key_id or material.get("party") != party:
                    raise SealingError(f"key file {path} does not hold key {key_id} of {party}")
                pairs[key_id] = KeyPair(
                    key_id=key_id,
                    party=party,
                    status=KeyStatus(item["status"]),
                    not_before=from_iso(item["not_before"]),
                    not_after=from_iso(item["not_after"]),
                    revoked_at=from_iso(item["revoked_at"]) if item.get("revoked_at") else None,
                    signing=Ed25519PrivateKey.from_private_bytes(
                        base64.b64decode(material["signing_private"])
                    ),
                    encryption=X25519PrivateKey.from_private_bytes(
                        base64.b64decode(material["encryption_private"])
                    ),
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                # never chain: the underlying message could quote key material
                raise SealingError(f"key file {path} or its key-ring entry is malformed") from None
        return cls(root, party, pairs)

    @staticmethod
    def _read_ring(root: Path, party: str) -> dict[str, Any]:
        try:
            ring: dict[str, Any] = json.loads(read_private(root / "keyring.json"))
        except json.JSONDecodeError:
            raise SealingError(f"key ring {root / 'keyring.json'} is not valid JSON") from None
        if ring.get("format") != 1 or ring.get("party") != party or not isinstance(ring.get("keys"), list):
            raise SealingError(f"key ring {root / 'keyring.json'} is not a key ring of {party}")
        return ring

    # -- reading ------------------------------------------------------------------------------
    def pairs(self) -> list[KeyPair]:
        return sorted(self._pairs.values(), key=lambda p: (p.not_before, p.key_id))

    def active(self, now: float | None = None) -> KeyPair:
        """The key to sign with and to be sealed to. Never a revoked or expired key."""
        now = time.time() if now is None else now
        actives = [p for p in self._pairs.values() if p.status is KeyStatus.ACTIVE]
        if not actives:
            revoked = [p for p in self._pairs.values() if p.status is KeyStatus.REVOKED]
            if revoked:
                newest = max(revoked, key=lambda p: p.not_before)
                raise RevokedKeyError(
                    f"key {newest.key_id} of {self.party} is revoked and there is no active key; "
                    f"run 'referral-broker keys rotate --party {self.party}'"
                )
            raise KeyNotFoundError(f"{self.party} has no active key; run 'referral-broker keys rotate'")
        pair = max(actives, key=lambda p: p.not_before)
        if not pair.not_before <= now < pair.not_after:
            raise SealingError(f"active key {pair.key_id} of {self.party} is outside its validity; rotate it")
        return pair

    def get(self, key_id: str) -> KeyPair:
        """Any key this store still holds, for opening messages sealed to it (retired and
        revoked keys included: revocation stops new messages, it does not strand old ones)."""
        pair = self._pairs.get(key_id)
        if pair is None:
            raise KeyNotFoundError(f"{self.party} does not hold key {key_id} (never held here, or destroyed)")
        return pair

    def public_entries(self) -> list[KeyEntry]:
        return [p.public_entry() for p in self.pairs()]

    # -- changing -----------------------------------------------------------------------------
    def rotate(self, *, now: float | None = None) -> tuple[KeyPair, list[KeyPair]]:
        """A new active key; every previously active key becomes retired. Returns the new key
        and the keys it retired (publish all of them)."""
        now = time.time() if now is None else now
        with locked(self.root):
            retired = []
            for key_id, pair in list(self._pairs.items()):
                if pair.status is KeyStatus.ACTIVE:
                    self._pairs[key_id] = replace(pair, status=KeyStatus.RETIRED)
                    retired.append(self._pairs[key_id])
            new = self._add_new(now)
            self._save_ring()
        return new, retired

    def revoke(self, key_id: str, *, now: float | None = None) -> KeyPair:
        """Mark a key revoked: never again used to sign or to be sealed to."""
        now = time.time() if now is None else now
        with locked(self.root):
            pair = self.get(key_id)
            if pair.status is not KeyStatus.REVOKED:
                pair = replace(pair, status=KeyStatus.REVOKED, revoked_at=float(int(now)))
                self._pairs[key_id] = pair
                self._save_ring()
        return pair

    def destroy(self, key_id: str) -> None:
        """Delete a retired or revoked key's private halves; messages sealed to it then no
        longer open here. The active key cannot be destroyed (rotate first)."""
        with locked(self.root):
            pair = self.get(key_id)
            if pair.status is KeyStatus.ACTIVE:
                raise SealingError(
                    f"key {key_id} is the active key of {self.party}; rotate before destroying it"
                )
            destroy_file(self.root / f"{key_id}.key")
            del self._pairs[key_id]
            self._save_ring(destroyed={key_id})

    def _add_new(self, now: float) -> KeyPair:
        now = float(int(now))  # whole seconds, as the key ring and the directory store them
        key_id = _new_key_id(self.party)
        signing, encryption = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
        material = {
            "format": 1,
            "key_id": key_id,
            "party": self.party,
            "signing_private": base64.b64encode(signing.private_bytes(_RAW, _RAW_PRIV, _NONE)).decode(),
            "encryption_private": base64.b64encode(encryption.private_bytes(_RAW, _RAW_PRIV, _NONE)).decode(),
        }
        write_private(self.root / f"{key_id}.key", json.dumps(material).encode("utf-8"))
        pair = KeyPair(
            key_id, self.party, KeyStatus.ACTIVE, now, now + KEY_VALIDITY_S, None, signing, encryption
        )
        self._pairs[key_id] = pair
        return pair

    def _save_ring(self, destroyed: AbstractSet[str] = frozenset()) -> None:
        previous: list[dict[str, Any]] = []
        if (self.root / "keyring.json").exists():
            previous = [k for k in self._read_ring(self.root, self.party)["keys"] if k.get("destroyed")]
        items = previous + [{"key_id": k, "destroyed": True} for k in sorted(destroyed)]
        for p in self.pairs():
            item: dict[str, Any] = {
                "key_id": p.key_id,
                "status": p.status.value,
                "not_before": to_iso(p.not_before),
                "not_after": to_iso(p.not_after),
            }
            if p.revoked_at is not None:
                item["revoked_at"] = to_iso(p.revoked_at)
            items.append(item)
        ring = {"format": 1, "party": self.party, "keys": items}
        write_private(self.root / "keyring.json", json.dumps(ring, indent=2).encode("utf-8"))
