"""Case keys in append-only journals: one file per writing process, not one file per case.

Creating a file costs about 0.75 ms of CPU on the ext4 volumes measured here (a new inode and
a folder entry), and a new case key was a new file, then an fsync of its own: 1.1-1.2 ms a new
case, a tenth of the router's CPU a referral. Appending an entry to a journal the process
already has open costs about 4 us, and one ``fdatasync`` makes a whole batch durable.

A journal is ``<cases>/journals/<tag>.journal`` (0600, created whole by one process, which is
its only appender). Its entries are fixed-size slots, so an entry is found without any index:
a case-key id *is* its place, ``j<tag>.<slot>``, and opening a message reads 128 bytes there.
A slot::

    0    1  marker: b"K" a live key, b"X" destroyed (the rest zeroed)
    1    1  entry format (1)
    2    1  length of the case id
    3   64  case id, zero-padded
    67   8  created at (seconds since the epoch, big-endian double)
    75  32  the key
    107 17  zero
    124  4  CRC-32 of bytes 0-123 (a torn or damaged slot is never taken for a key)

Shredding overwrites every slot of the case in place (zeroes, marker ``X``) and fsyncs; it
finds them by scanning the journals, which only retention does. Two routers that meet the same
new case each append a key of their own: each message names its key, so both open, and a shred
destroys both.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from referral_broker.errors import KeyNotFoundError, KeyStorePermissionError, SealingError
from referral_broker.sealing.keystore import check_private_stat

SLOT = 128
LIVE, DESTROYED = b"K", b"X"
ENTRY_FORMAT = 1
_BODY = struct.Struct(">cBB64sd32s")  # marker, format, case-id length, case id, created at, key
_CRC_AT = SLOT - 4
_DESTROYED_SLOT = DESTROYED + bytes(SLOT - 1)
KEY_ID = re.compile(r"^j([0-9a-f]{8})\.(0|[1-9][0-9]{0,11})$")
SUFFIX = ".journal"
# journals open for reading at once (each process reads those its messages name)
_OPEN_MAX = 64


def is_journal_key_id(case_key_id: str) -> bool:
    return KEY_ID.match(case_key_id) is not None


@dataclass(frozen=True)
class Entry:
    case_id: str
    case_key_id: str
    created_at: float
    key: bytes


def _place(case_key_id: str) -> tuple[str, int]:
    """The journal tag and slot a case-key id names (checked before it names a file)."""
    found = KEY_ID.match(case_key_id)
    if found is None:
        raise KeyNotFoundError(f"case key {case_key_id} is not a journal key id")
    return found.group(1), int(found.group(2))


def _slot(case_id: str, created_at: float, key: bytes) -> bytes:
    raw = case_id.encode("ascii")
    body = _BODY.pack(LIVE, ENTRY_FORMAT, len(raw), raw, created_at, key).ljust(_CRC_AT, b"\0")
    return body + struct.pack(">I", zlib.crc32(body))


def _parse(tag: str, slot: int, data: bytes) -> Entry | None:
    """The live entry in ``data`` (one slot), or None: destroyed, torn or damaged."""
    if len(data) != SLOT or data[:1] != LIVE:
        return None
    if struct.unpack(">I", data[_CRC_AT:])[0] != zlib.crc32(data[:_CRC_AT]):
        return None
    _marker, version, length, raw, created_at, key = _BODY.unpack_from(data)
    if version != ENTRY_FORMAT or length > 64:
        return None
    return Entry(raw[:length].decode("ascii", "replace"), f"j{tag}.{slot}", created_at, key)


def _open_checked(path: Path, flags: int) -> int:
    """An fd on ``path``, refused as :func:`~referral_broker.sealing.keystore.check_private`
    refuses (a regular file of ours, 0600), checked on the open file, so a swapped path cannot
    slip in between the check and the use."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyNotFoundError(f"case-key journal {path.name} does not exist") from None
    except OSError as exc:
        raise KeyStorePermissionError(f"case-key journal {path} cannot be opened ({exc.strerror})") from None
    try:
        check_private_stat(os.fstat(fd), path, is_dir=False)
    except BaseException:
        os.close(fd)
        raise
    return fd


class CaseJournals:
    """The journals of one case-key store: this process's appends, and reads of any."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._tag: str | None = None  # this process's journal, made on its first key
        self._fd: int | None = None
        self._pid = 0  # the process that made it: a forked child starts a journal of its own
        self._slots = 0
        self._unsynced = 0
        self._new_file = False
        self._lost: OSError | None = None  # a given-up journal's keys that could not be synced
        self._readers: dict[str, int] = {}  # tag -> fd, the most recently used last

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for fd in [*self._readers.values(), *([self._fd] if self._fd is not None else [])]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._readers.clear()
            self._fd = self._tag = None

    # -- appending ----------------------------------------------------------------------------
    def append(self, case_id: str, created_at: float, key: bytes, *, durable: bool) -> str:
        """Append a new key of ``case_id``; returns its case-key id. ``durable``: fsync now
        (otherwise :meth:`sync` must run before anything sealed under it leaves the process)."""
        slot_bytes = _slot(case_id, created_at, key)
        with self._lock:
            if self._fd is not None and self._pid != os.getpid():
                with contextlib.suppress(OSError):
                    os.close(self._fd)  # the parent's: this process never appends to it
                self._fd = None
            if self._fd is None:
                self._start()
            assert self._fd is not None and self._tag is not None
            try:
                written = os.write(self._fd, slot_bytes)
            except OSError:
                self._abandon()
                raise
            if written != SLOT:  # a full disk: the torn tail is never read as a key
                self._abandon()
                raise SealingError(f"case-key journal {self._tag}: short write ({written} of {SLOT} bytes)")
            slot = self._slots
            self._slots += 1
            self._unsynced += 1
            key_id = f"j{self._tag}.{slot}"
        if durable:
            self.sync()
        return key_id

    def _start(self) -> None:
        for _ in range(8):
            tag = secrets.token_hex(4)
            path = self.folder / f"{tag}{SUFFIX}"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            self._tag, self._fd, self._slots, self._new_file, self._pid = tag, fd, 0, True, os.getpid()
            self._unsynced = 0
            return
        raise SealingError("cannot create a case-key journal (eight names taken)")

    def _abandon(self) -> None:
        """Stop appending to a journal whose tail may be torn; the next key starts a new one
        (its synced slots stay readable, and an unsynced one was never used)."""
        if self._fd is not None:
            if self._unsynced:
                try:
                    os.fsync(self._fd)  # what was appended whole before stays durable
                except OSError as exc:
                    self._lost = exc  # the next sync raises: its batch must not commit
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = self._tag = None
        self._unsynced = 0

    def sync(self) -> int:
        """fdatasync this process's journal (and its folder once, after creating it). Returns
        how many keys became durable; none pending: no syscall."""
        with self._lock:
            if self._lost is not None:
                lost, self._lost = self._lost, None
                raise SealingError(f"case keys of a journal given up were not made durable ({lost.strerror})")
            if not self._unsynced or self._fd is None:
                return 0
            os.fdatasync(self._fd)
            if self._new_file:
                fd = os.open(self.folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._new_file = False
            done, self._unsynced = self._unsynced, 0
        return done

    @property
    def unsynced(self) -> int:
        return self._unsynced

    # -- reading ------------------------------------------------------------------------------
    def read(self, case_key_id: str) -> Entry | None:
        """The live entry ``case_key_id`` names; None when its slot is destroyed or damaged.
        Raises KeyNotFoundError when the id names no slot."""
        tag, slot = _place(case_key_id)
        data = os.pread(self._reader(tag), SLOT, slot * SLOT)
        if len(data) < SLOT:
            raise KeyNotFoundError(f"case key {case_key_id} is not in its journal")
        return _parse(tag, slot, data)

    def _reader(self, tag: str) -> int:
        with self._lock:
            fd = self._readers.pop(tag, None)
            if fd is None:
                fd = _open_checked(self.folder / f"{tag}{SUFFIX}", os.O_RDONLY)
                while len(self._readers) >= _OPEN_MAX:
                    os.close(self._readers.pop(next(iter(self._readers))))
            self._readers[tag] = fd
            return fd

    def tags(self) -> list[str]:
        """The tags of every journal in the folder (any process's)."""
        names = (p.name for p in self.folder.glob(f"*{SUFFIX}"))
        return sorted(n[: -len(SUFFIX)] for n in names if re.fullmatch(rf"[0-9a-f]{{8}}{re.escape(SUFFIX)}", n))

    def scan(self, tag: str, start: int) -> tuple[list[Entry], int]:
        """The live entries of journal ``tag`` from slot ``start`` on, and the slot to scan from
        next time: a damaged or destroyed slot is passed over, but one at the very end that is
        neither whole nor destroyed may be an append under way, so it is read again next time."""
        found: list[Entry] = []
        fd = _open_checked(self.folder / f"{tag}{SUFFIX}", os.O_RDONLY)
        try:
            slot = start
            while len(chunk := os.pread(fd, SLOT * 4096, slot * SLOT)) >= SLOT:
                whole = len(chunk) // SLOT
                for i in range(whole):
                    data = chunk[i * SLOT : (i + 1) * SLOT]
                    entry = _parse(tag, slot, data)
                    if entry is not None:
                        found.append(entry)
                    elif data != _DESTROYED_SLOT and i == whole - 1 and len(chunk) < SLOT * 4096:
                        return found, slot  # the last slot, not yet readable: again next time
                    slot += 1
        finally:
            os.close(fd)
        return found, slot

    # -- destroying ---------------------------------------------------------------------------
    def destroy(self, case_key_id: str) -> None:
        """Overwrite the slot in place with zeroes (marker X), then fsync it. The caller holds
        the store's lock or owns the slot. (Not through an O_APPEND fd: Linux's pwrite would
        append.) On copy-on-write or flash storage the overwrite is a best effort, as for files."""
        tag, slot = _place(case_key_id)
        fd = _open_checked(self.folder / f"{tag}{SUFFIX}", os.O_RDWR)
        try:
            if os.fstat(fd).st_size < (slot + 1) * SLOT:
                raise KeyNotFoundError(f"case key {case_key_id} is not in its journal")
            os.pwrite(fd, _DESTROYED_SLOT, slot * SLOT)
            os.fsync(fd)
        finally:
            os.close(fd)
