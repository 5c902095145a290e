"""Per-case keys for crypto-shredding, held in the hub's key store (never in Kafka).

The council's long-lived copies of a case (the case archive and the district-team topics) are
sealed so that opening them needs the case's key (wrap modes 2 and 3 in
:mod:`referral_broker.sealing.wrapping`): each message's data key is derived from a random
share wrapped to the recipient's X25519 key AND from the case key. The case key itself never
leaves this store, so destroying it (:meth:`CaseKeyStore.shred`) makes every copy of the case
unreadable, in Kafka's immutable log and in any backup of it, while other cases still open.

Layout, beside the hub's own keys (folders 0700, files 0600, checked on every access)::

    <keys_dir>/council/cases/journals/<tag>.journal
                                              case keys, appended by one process each
                                              (:mod:`referral_broker.sealing.case_journal`)
    <keys_dir>/council/cases/<case id>.key    a case key of a store from before the journals
                                              (read and shredded, never written)
    <keys_dir>/council/cases/holds.json       legal holds: case id -> reason, placed at
    <keys_dir>/council/cases/shredded/<case id>.json
                                              its tombstone: case id, case-key ids, shredded at
    <keys_dir>/council/cases/shredded.json    tombstones written before per-case files (read,
                                              never written: stores from before keep theirs)

A case under legal hold cannot be shredded (:class:`LegalHoldError`). Every use of a case key
checks its tombstone on disk, so a shred in one process takes effect in every other process at
once. A key this store read or made is kept in memory for ``KNOWN_S`` seconds at most (the
district-team and archive copies of one referral are sealed within it: one key, not two) and
dropped as soon as its case is found shredded. A tombstone is a file of its own, so checking
one costs a ``stat`` however many cases were shredded (one tombstone file for the whole store
cost a parse of every tombstone per seal: 38 ms a referral at 10,000 shredded cases). The older
single file is parsed once per change of its inode, size or modification time.

**A case may have several keys.** A case's key is made by the process sealing for it, in its
own journal, when it holds none of the case in memory: two routers, or one router a minute
later, make two. Each message names the key it was sealed under (its case-key id says where
the key is: no index, no lock, a 128-byte read), and a shred destroys every key of the case.

**One durable commit per batch** (the router): between :meth:`CaseKeyStore.defer_durability`
and :meth:`CaseKeyStore.sync`, a new case key is appended but not fsynced; ``sync`` then
fdatasyncs the journal once. The router calls ``sync`` right before it commits the Kafka
transaction whose messages are sealed under those keys, so no committed message ever names a
key a power cut could lose. Shredding is unchanged: it takes effect at once, synced or not.

This module must never write a case key anywhere but the store's 0600 journals (no Kafka, no
log, no exception text), and must never keep one after it is shredded. Auditing of shreds and holds
is done by :mod:`referral_broker.sealing.retention`, which calls this module.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from referral_broker.errors import KeyNotFoundError, LegalHoldError, SealingError, ShreddedError
from referral_broker.parties import HUB
from referral_broker.sealing.case_journal import CaseJournals, is_journal_key_id
from referral_broker.sealing.fields import KEY_SIZE
from referral_broker.sealing.keystore import (
    check_private,
    destroy_file,
    locked,
    make_private_dir,
    read_private,
    write_private,
)
from referral_broker.sealing.timefmt import to_iso

CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
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

    def __init__(self, root: Path, *, makes_keys: bool = True) -> None:
        self.root = root
        self.makes_keys = makes_keys
        self._tombstones = root / "shredded"
        self._tombstones_s = str(self._tombstones)
        self._legacy_s = str(root / "shredded.json")
        self._journals = CaseJournals(root / "journals")
        self._deferred = False  # True: new keys wait for sync()
        # the legacy shredded.json as last parsed: (inode, size, mtime in ns) -> its tombstones
        self._legacy: tuple[tuple[int, int, int], dict[str, Any]] | None = None
        # case id -> (case-key id, key, when it was read or made, monotonic)
        self._known: OrderedDict[str, tuple[str, bytes, float]] = OrderedDict()
        self._known_lock = threading.Lock()  # the inbox's web threads share one store
        # retention's view of the journals: case id -> its keys' ids; tag -> next slot to read
        self._index: dict[str, list[str]] = {}
        self._scanned: dict[str, int] = {}

    @classmethod
    def open(cls, keys_dir: Path, *, makes_keys: bool = True) -> CaseKeyStore:
        """The hub's case-key store under ``keys_dir`` (created 0700 when missing).
        ``makes_keys=False`` (a district team's inbox, whose volume may be read-only): seals
        under a key of the case the router made, and never writes a key."""
        make_private_dir(keys_dir)
        make_private_dir(keys_dir / HUB)
        make_private_dir(keys_dir / HUB / "cases")
        make_private_dir(keys_dir / HUB / "cases" / "shredded")
        journals = keys_dir / HUB / "cases" / "journals"
        if makes_keys or journals.exists():  # a store from before has none until a router runs
            make_private_dir(journals)
        return cls(keys_dir / HUB / "cases", makes_keys=makes_keys)

    # -- keys ---------------------------------------------------------------------------------
    def _key_path(self, case_id: str) -> Path:
        return self.root / f"{check_case_id(case_id)}.key"

    def key_for(self, case_id: str, *, now: float | None = None) -> tuple[str, bytes]:
        """A key of the case and its id: the one this store made or read within ``KNOWN_S``,
        or a new one appended to this process's journal. Refuses a shredded case.

        Takes no lock, so a router paused at any point cannot stall another router's seals. A
        shred writes its tombstone before it destroys the case's keys, so the tombstone is
        checked after the key is made: a key made after (or while) its case was shredded meets
        the tombstone, is destroyed again and refused.
        """
        known = self._recall(case_id)
        if known is not None:
            return known
        check_case_id(case_id)
        if not self.makes_keys:
            return self._existing_key(case_id)
        key = os.urandom(KEY_SIZE)
        case_key_id = self._journals.append(
            case_id, time.time() if now is None else now, key, durable=not self._deferred
        )
        try:
            self._refuse_shredded(case_id)
        except ShreddedError:
            self._journals.destroy(case_key_id)
            raise
        return self._remember(case_id, case_key_id, key)

    def _existing_key(self, case_id: str) -> tuple[str, bytes]:
        """A live key of the case, the last found (for a store that makes none: the inbox's
        statuses and texts are sealed under a key the router made for the case's referral)."""
        self._refuse_shredded(case_id)
        ids = self._live_keys(case_id)
        if not ids:
            raise KeyNotFoundError(
                f"no key for case {case_id} in the hub's case-key store (this process does not make case keys)"
            )
        return ids[-1], self.lookup(case_id, ids[-1])

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
        self._deferred = True

    def sync(self) -> int:
        """Make every key made since the last sync durable (one fdatasync of this process's
        journal); deferring goes on. Returns how many keys. Nothing to do: no syscall."""
        return self._journals.sync()

    @property
    def unsynced(self) -> int:
        """How many new keys await :meth:`sync`."""
        return self._journals.unsynced

    def lookup(self, case_id: str, case_key_id: str) -> bytes:
        """The key of ``case_id`` named ``case_key_id``; the :data:`CaseKeyLookup` the openers
        call. Raises :class:`ShreddedError` naming the case once it is shredded."""
        known = self._recall(case_id)
        if known is not None and known[0] == case_key_id:
            return known[1]
        self._refuse_shredded(case_id)
        if is_journal_key_id(case_key_id):
            entry = self._journals.read(case_key_id)
            if entry is None:
                self._refuse_shredded(case_id)  # destroyed this moment by a shred
                raise KeyNotFoundError(f"case key {case_key_id} is destroyed or damaged in its journal")
            if entry.case_id != case_id:
                raise KeyNotFoundError(f"case key {case_key_id} is not a key of case {case_id}")
            return self._remember(case_id, case_key_id, entry.key)[1]
        path = self._key_path(case_id)
        if not path.exists():
            raise KeyNotFoundError(f"no key for case {case_id} in the hub's case-key store")
        doc = self._read_key(path)
        if doc["case_key_id"] != case_key_id:
            raise KeyNotFoundError(f"case {case_id} has key {doc['case_key_id']}, not {case_key_id}")
        return self._remember(case_id, case_key_id, base64.b64decode(doc["key"]))[1]

    def has_key(self, case_id: str) -> bool:
        """Whether the store holds a live key of the case (retention's question: it reads the
        journals appended since it last asked)."""
        return self._key_path(case_id).exists() or bool(self._journal_keys(case_id))

    def _live_keys(self, case_id: str) -> list[str]:
        """The ids of every key of the case not destroyed: the old store's file's, then the
        journals' in the order they were made."""
        path = self._key_path(case_id)
        return ([self._read_key(path)["case_key_id"]] if path.exists() else []) + self._journal_keys(case_id)

    def _journal_keys(self, case_id: str) -> list[str]:
        self._refresh_index()
        return [k for k in self._index.get(case_id, []) if self._journals.read(k) is not None]

    def _refresh_index(self) -> None:
        for tag in self._journals.tags():
            found, self._scanned[tag] = self._journals.scan(tag, self._scanned.get(tag, 0))
            for entry in found:
                self._index.setdefault(entry.case_id, []).append(entry.case_key_id)

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
        # checked on every use of a case key: a string path and os.access (no Path, no raise)
        path = f"{self._tombstones_s}/{check_case_id(case_id)}.json"
        if os.access(path, os.F_OK):
            try:
                t = json.loads(read_private(Path(path)))
                return Shredded(case_id, t["case_key_id"], t["shredded_at"])
            except (ValueError, KeyError, TypeError):
                # fail closed: a tombstone is only ever written for a shredded case
                raise SealingError(f"tombstone file {path} is malformed") from None
        t = self._legacy_tombstones().get(case_id)
        return Shredded(case_id, t["case_key_id"], t["shredded_at"]) if t else None

    def _legacy_tombstones(self) -> dict[str, Any]:
        """shredded.json of a store from before per-case tombstones, parsed again only when
        the file changed (another process may still be of the older version and write it)."""
        try:
            if not os.access(self._legacy_s, os.F_OK):
                raise FileNotFoundError
            st = os.stat(self._legacy_s)
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
        """The ids of the case keys :meth:`shred` would destroy (comma-separated), or raise why
        it cannot."""
        self._refuse_shredded(case_id)
        hold = self.hold_of(case_id)
        if hold is not None:
            raise LegalHoldError(
                f"case {case_id} is under legal hold since {hold.placed_at} (reason: {hold.reason}); "
                "release the hold before shredding"
            )
        ids = self._live_keys(case_id)
        if not ids:
            raise KeyNotFoundError(f"no key for case {case_id} in the hub's case-key store; nothing to shred")
        return ", ".join(ids)

    def shred(self, case_id: str, *, now: float | None = None) -> Shredded:
        """Destroy every key of the case and leave a tombstone. Irreversible by design."""
        self._forget(case_id)
        with locked(self.root):
            done = self.shredded(case_id)
            if done is not None and self._destroy_keys(case_id):
                return done  # finish a shred that was interrupted
            case_key_id = self.check_shreddable(case_id)
            record = {"case_key_id": case_key_id, "shredded_at": to_iso(time.time() if now is None else now)}
            # Tombstone first: if the process dies between the two steps the case is already
            # refused everywhere, and a key left behind is never read again. A key appended
            # after the tombstone meets it and is destroyed by its maker (key_for).
            write_private(self._tombstone_path(case_id), json.dumps({"case_id": case_id, **record}).encode("utf-8"))
            self._destroy_keys(case_id)
        return Shredded(case_id, case_key_id, record["shredded_at"])

    def _destroy_keys(self, case_id: str) -> int:
        """Destroy every live key of the case (under the lock); returns how many. A key file is
        destroyed unread: one an interrupted shred left half overwritten no longer parses."""
        destroyed = 0
        if self._key_path(case_id).exists():
            destroy_file(self._key_path(case_id))
            destroyed += 1
        for case_key_id in self._journal_keys(case_id):
            self._journals.destroy(case_key_id)
            destroyed += 1
        return destroyed

    def check(self) -> None:
        """Re-check the store's permissions (the CLI calls this before any change)."""
        check_private(self.root, is_dir=True)
        if self.makes_keys or (self.root / "journals").exists():
            check_private(self.root / "journals", is_dir=True)
