"""Per-case keys for crypto-shredding, held in the hub's key store (never in Kafka).

The council's long-lived copies of a case (the case archive and the district-team topics) are
sealed so that opening them needs the case's key (wrap modes 2 and 3 in
:mod:`referral_broker.sealing.wrapping`): each message's data key is derived from a random
share wrapped to the recipient's X25519 key AND from the case key. The case key itself never
leaves this store, so destroying it (:meth:`CaseKeyStore.shred`) makes every copy of the case
unreadable, in Kafka's immutable log and in any backup of it, while other cases still open.

Layout, beside the hub's own keys (folders 0700, files 0600, checked on every access)::

    <keys_dir>/council/cases/<case id>.key    {"case_id", "case_key_id", "created_at", "key"}
    <keys_dir>/council/cases/holds.json       legal holds: case id -> reason, placed at
    <keys_dir>/council/cases/shredded/<case id>.json
                                              its tombstone: case id, case-key id, shredded at
    <keys_dir>/council/cases/shredded.json    tombstones written before per-case files (read,
                                              never written: stores from before keep theirs)

A case under legal hold cannot be shredded (:class:`LegalHoldError`). Every use of a case key
checks its tombstone on disk, so a shred in one process takes effect in every other process at
once. A key this store read or made is kept in memory for ``KNOWN_S`` seconds at most (the
district-team and archive copies of one referral are sealed within it: one read, not two) and
dropped as soon as its case is found shredded. A tombstone
is a file of its own, so checking one costs a ``stat`` however many cases were shredded (one
tombstone file for the whole store cost a parse of every tombstone per seal: 38 ms a referral
at 10,000 shredded cases). The older single file is parsed once per change of its inode, size
or modification time.

**One durable commit per batch** (the router): between :meth:`CaseKeyStore.defer_durability`
and :meth:`CaseKeyStore.sync`, a new case key is written (whole, 0600, without a lock) but
not fsynced; ``sync`` then fsyncs every key file created since, and the folder once. The router
calls ``sync`` right before it commits the Kafka transaction whose messages are sealed under
those keys, so no committed message ever names a key a power cut could lose, and a batch of
new cases costs one group of fsyncs instead of two per case (a scattered fsync costs ~5 ms
here, one of a group ~2 ms). A key another process created moments ago (its file younger than
``RECENT_S``) is added to the group too, as its creator may not have synced it yet. Shredding
is unchanged: it reads and destroys the file under the lock, whatever was synced.

This module must never write a case key anywhere but its own 0600 file (no Kafka, no log, no
exception text), and must never keep one after it is shredded. Auditing of shreds and holds
is done by :mod:`referral_broker.sealing.retention`, which calls this module.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from referral_broker.errors import KeyNotFoundError, LegalHoldError, SealingError, ShreddedError
from referral_broker.parties import HUB
from referral_broker.sealing.fields import KEY_SIZE
from referral_broker.sealing.keystore import (
    check_private,
    create_private,
    destroy_file,
    fsync_paths,
    locked,
    make_private_dir,
    read_private,
    write_private,
)
from referral_broker.sealing.timefmt import to_iso

CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A key file younger than this, read while deferring, may be another router's not yet synced key.
RECENT_S = 120.0
# How long, and how many, keys this store read or made stay in memory (each use still checks
# the case's tombstone on disk).
KNOWN_S = 10.0
KNOWN_MAX = 1024


def check_case_id(case_id: str) -> str:
    """Case ids name files: letters, digits, '.', '_' and '-' only, at most 64 characters."""
    if not isinstance(case_id, str) or not CASE_ID.match(case_id):
        raise SealingError("malformed case id (letters, digits, '.', '_', '-'; at most 64 characters)")
    return case_id


@dataclass(frozen=True)
class Hold:
    case_id: str
    reason: str
    placed_at: str


@dataclass(frozen=True)
class Shredded:
    case_id: str
    case_key_id: str
    shredded_at: str


class CaseKeyStore:
    """The hub's case keys, legal holds and shred tombstones."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tombstones = root / "shredded"
        # the legacy shredded.json as last parsed: (inode, size, mtime in ns) -> its tombstones
        self._legacy: tuple[tuple[int, int, int], dict[str, Any]] | None = None
        # key files written since the last sync() while deferring (None: every write is durable)
        self._unsynced: dict[Path, None] | None = None
        # case id -> (case-key id, key, when it was read or made, monotonic)
        self._known: OrderedDict[str, tuple[str, bytes, float]] = OrderedDict()
        self._known_lock = threading.Lock()  # the inbox's web threads share one store

    @classmethod
    def open(cls, keys_dir: Path) -> CaseKeyStore:
        """The hub's case-key store under ``keys_dir`` (created 0700 when missing)."""
        make_private_dir(keys_dir)
        make_private_dir(keys_dir / HUB)
        make_private_dir(keys_dir / HUB / "cases")
        make_private_dir(keys_dir / HUB / "cases" / "shredded")
        return cls(keys_dir / HUB / "cases")

    # -- keys ---------------------------------------------------------------------------------
    def _key_path(self, case_id: str) -> Path:
        return self.root / f"{check_case_id(case_id)}.key"

    def key_for(self, case_id: str, *, now: float | None = None) -> tuple[str, bytes]:
        """The case's key id and key, created on first use. Refuses a shredded case.

        Takes no lock, so a router paused at any point cannot stall another router's seals: an
        existing key file is read as it is (never replaced once made), a new one is created
        whole or not at all (:func:`~referral_broker.sealing.keystore.create_private`; of two
        routers racing, both use the winner's). A shred writes its tombstone before it destroys
        the key, so the tombstone is checked after the key is read or made: a key read half
        destroyed, or made after (or while) its case was shredded, meets the tombstone and is
        refused (and a key so made is destroyed again).
        """
        known = self._recall(case_id)
        if known is not None:
            return known
        path = self._key_path(case_id)
        try:
            doc: dict[str, Any] | None = self._read_key(path)
        except (FileNotFoundError, KeyNotFoundError):  # none yet (or unlinked as it was read)
            doc = None
        except (OSError, SealingError):
            self._refuse_shredded(case_id)  # being shredded this moment
            raise
        made = doc is None
        if doc is None:
            doc = {
                "case_id": case_id,
                "case_key_id": secrets.token_hex(6),
                "created_at": to_iso(time.time() if now is None else now),
                "key": base64.b64encode(os.urandom(KEY_SIZE)).decode("ascii"),
            }
            if not create_private(path, json.dumps(doc).encode("utf-8"), durable=self._unsynced is None):
                return self.key_for(case_id, now=now)  # another router made it first: use theirs
        try:
            self._refuse_shredded(case_id)
        except ShreddedError:
            if made:
                with contextlib.suppress(FileNotFoundError):
                    destroy_file(path)
            raise
        if made and self._unsynced is not None:
            self._unsynced[path] = None
        elif not made:
            self._note_recent(path)
        return self._remember(case_id, doc["case_key_id"], base64.b64decode(doc["key"]))

    def _recall(self, case_id: str) -> tuple[str, bytes] | None:
        """A key this store read or made within ``KNOWN_S``, once its case is checked again."""
        with self._known_lock:
            entry = self._known.get(case_id)
            if entry is not None and time.monotonic() - entry[2] >= KNOWN_S:
                del self._known[case_id]
                entry = None
        if entry is None:
            return None
        self._refuse_shredded(case_id)
        return entry[0], entry[1]

    def _remember(self, case_id: str, case_key_id: str, key: bytes) -> tuple[str, bytes]:
        with self._known_lock:
            self._known[case_id] = (case_key_id, key, time.monotonic())
            self._known.move_to_end(case_id)
            while len(self._known) > KNOWN_MAX:
                self._known.popitem(last=False)
        return case_key_id, key

    def _forget(self, case_id: str) -> None:
        with self._known_lock:
            self._known.pop(case_id, None)

    # -- durability ---------------------------------------------------------------------------
    def defer_durability(self) -> None:
        """From now on, new case keys are made durable by :meth:`sync`, not one by one. The
        caller must call ``sync`` before anything sealed under them leaves the process."""
        if self._unsynced is None:
            self._unsynced = {}

    def sync(self) -> int:
        """Make every key written since the last sync durable (each file, then the folder once);
        deferring goes on. Returns how many files were synced. Nothing to do: no syscall."""
        if not self._unsynced:
            return 0
        pending, self._unsynced = list(self._unsynced), {}
        try:
            return fsync_paths(self.root, pending)
        except BaseException:
            self._unsynced.update(dict.fromkeys(pending))  # try them again with the next sync
            raise

    @property
    def unsynced(self) -> int:
        """How many key files await :meth:`sync`."""
        return len(self._unsynced or ())

    def _note_recent(self, path: Path) -> None:
        if self._unsynced is None or path in self._unsynced:
            return
        try:
            if time.time() - path.stat().st_mtime < RECENT_S:
                self._unsynced[path] = None
        except FileNotFoundError:
            pass

    def lookup(self, case_id: str, case_key_id: str) -> bytes:
        """The key of ``case_id`` if it is ``case_key_id``; the :data:`CaseKeyLookup` the
        openers call. Raises :class:`ShreddedError` naming the case once it is shredded."""
        known = self._recall(case_id)
        if known is not None and known[0] == case_key_id:
            return known[1]
        path = self._key_path(case_id)
        self._refuse_shredded(case_id)
        if not path.exists():
            raise KeyNotFoundError(f"no key for case {case_id} in the hub's case-key store")
        doc = self._read_key(path)
        if doc["case_key_id"] != case_key_id:
            raise KeyNotFoundError(f"case {case_id} has key {doc['case_key_id']}, not {case_key_id}")
        return self._remember(case_id, case_key_id, base64.b64decode(doc["key"]))[1]

    def has_key(self, case_id: str) -> bool:
        return self._key_path(case_id).exists()

    def _read_key(self, path: Path) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(read_private(path))
            if len(base64.b64decode(doc["key"])) != KEY_SIZE:
                raise ValueError
            return doc
        except (ValueError, KeyError, TypeError):
            raise SealingError(f"case key file {path} is malformed") from None

    # -- holds --------------------------------------------------------------------------------
    def _read_json(self, name: str) -> dict[str, Any]:
        path = self.root / name
        if not path.exists():
            return {}
        try:
            doc: dict[str, Any] = json.loads(read_private(path))
        except json.JSONDecodeError:
            raise SealingError(f"{path} is not valid JSON") from None
        return doc

    def _write_json(self, name: str, doc: dict[str, Any]) -> None:
        write_private(self.root / name, json.dumps(doc, indent=2, sort_keys=True).encode("utf-8"))

    def holds(self) -> list[Hold]:
        return [
            Hold(c, h["reason"], h["placed_at"]) for c, h in sorted(self._read_json("holds.json").items())
        ]

    def hold_of(self, case_id: str) -> Hold | None:
        h = self._read_json("holds.json").get(check_case_id(case_id))
        return Hold(case_id, h["reason"], h["placed_at"]) if h else None

    def hold(self, case_id: str, reason: str, *, now: float | None = None) -> Hold:
        """Place a legal hold: the case's key cannot be shredded until it is released."""
        check_case_id(case_id)
        reason = " ".join(reason.split())
        if not reason:
            raise SealingError("a legal hold needs a reason")
        with locked(self.root):
            self._refuse_shredded(case_id)
            holds = self._read_json("holds.json")
            holds[case_id] = {"reason": reason, "placed_at": to_iso(time.time() if now is None else now)}
            self._write_json("holds.json", holds)
        return Hold(case_id, reason, holds[case_id]["placed_at"])

    def release(self, case_id: str) -> Hold:
        """Lift the legal hold on ``case_id``; returns the hold that was lifted."""
        check_case_id(case_id)
        with locked(self.root):
            holds = self._read_json("holds.json")
            if case_id not in holds:
                raise SealingError(f"case {case_id} is not under legal hold")
            lifted = holds.pop(case_id)
            self._write_json("holds.json", holds)
        return Hold(case_id, lifted["reason"], lifted["placed_at"])

    # -- shredding ----------------------------------------------------------------------------
    def _tombstone_path(self, case_id: str) -> Path:
        return self._tombstones / f"{check_case_id(case_id)}.json"

    def shredded(self, case_id: str) -> Shredded | None:
        path = self._tombstone_path(case_id)
        if path.exists():
            try:
                t = json.loads(read_private(path))
                return Shredded(case_id, t["case_key_id"], t["shredded_at"])
            except (ValueError, KeyError, TypeError):
                # fail closed: a tombstone is only ever written for a shredded case
                raise SealingError(f"tombstone file {path} is malformed") from None
        t = self._legacy_tombstones().get(case_id)
        return Shredded(case_id, t["case_key_id"], t["shredded_at"]) if t else None

    def _legacy_tombstones(self) -> dict[str, Any]:
        """shredded.json of a store from before per-case tombstones, parsed again only when
        the file changed (another process may still be of the older version and write it)."""
        path = self.root / "shredded.json"
        try:
            st = path.stat()
        except FileNotFoundError:
            self._legacy = None
            return {}
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._legacy is None or self._legacy[0] != signature:
            self._legacy = (signature, self._read_json("shredded.json"))
        return self._legacy[1]

    def _refuse_shredded(self, case_id: str) -> None:
        t = self.shredded(case_id)
        if t is not None:
            self._forget(case_id)
            raise ShreddedError(
                f"case {case_id} was shredded at {t.shredded_at} (case key {t.case_key_id} destroyed); "
                "its messages can no longer be opened"
            )

    def check_shreddable(self, case_id: str) -> str:
        """The case-key id that :meth:`shred` would destroy, or raise why it cannot."""
        path = self._key_path(case_id)
        self._refuse_shredded(case_id)
        hold = self.hold_of(case_id)
        if hold is not None:
            raise LegalHoldError(
                f"case {case_id} is under legal hold since {hold.placed_at} (reason: {hold.reason}); "
                "release the hold before shredding"
            )
        if not path.exists():
            raise KeyNotFoundError(f"no key for case {case_id} in the hub's case-key store; nothing to shred")
        key_id: str = self._read_key(path)["case_key_id"]
        return key_id

    def shred(self, case_id: str, *, now: float | None = None) -> Shredded:
        """Destroy the case key and leave a tombstone. Irreversible by design."""
        self._forget(case_id)
        with locked(self.root):
            done = self.shredded(case_id)
            if done is not None and self._key_path(case_id).exists():
                destroy_file(self._key_path(case_id))  # finish a shred that was interrupted
                return done
            case_key_id = self.check_shreddable(case_id)
            record = {"case_key_id": case_key_id, "shredded_at": to_iso(time.time() if now is None else now)}
            # Tombstone first: if the process dies between the two steps the case is already
            # refused everywhere, and the key file left behind is never read again.
            write_private(self._tombstone_path(case_id), json.dumps({"case_id": case_id, **record}).encode("utf-8"))
            destroy_file(self._key_path(case_id))
        return Shredded(case_id, case_key_id, record["shredded_at"])

    def check(self) -> None:
        """Re-check the store's permissions (the CLI calls this before any change)."""
        check_private(self.root, is_dir=True)
