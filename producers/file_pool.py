"""A large native file checked and sealed by several processes, for ``send``.

One Python process reads, validates, converts, seals and signs about 1,100 rows a second; a
100k-row DWP batch needs more than one core. The pool splits the file's records between worker
processes by chunks of ``CHUNK`` record numbers (worker ``i`` takes chunks ``i``, ``i + W``,
...). Each worker reads the whole file but converts only its own records, in two phases:

1. **check**: validate its records and report the rejected ones (problems only, never a
   value), the 24-byte index of ids and versions, and its first urgent referrals. The parent
   merges them exactly as :class:`~referral_broker.adapters.FileStream` does, so a bad file
   is refused, with the same problems, before anything is sealed or anything connects;
2. **seal**: once the sender has its key directory, convert again, seal for the hub and sign,
   and hand the sealed messages back a chunk at a time. The parent reads the chunks in record
   order (the urgent referrals that are alone in the file first), so what goes into the outbox
   and onto the topic is in the order the one-process send uses. A worker blocks while its
   next chunk waits to be read: memory stays flat however long the file.

Plaintext never leaves a worker; what crosses back is sealed, and ids. Each worker is a fresh
``python -c`` of this module, talking over a socket pair: the sender has threads (so no fork),
and unlike ``multiprocessing``'s ``spawn`` a worker never imports the caller's main script, so
a program that sends large files through ``PartnerSender`` needs no ``__main__`` guard.
A worker that fails stops the send with its reason (by type, never the text of an unexpected
error, which could hold a value); what was kept in the outbox by then is delivered or stays
queued, and sending the file again sends the rest.
"""

from __future__ import annotations

import array
import contextlib
import datetime as dt
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import uuid
import weakref
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from referral_broker.config import Settings
from referral_broker.errors import BrokerError, PartnerInputError, ReferralBrokerError
from referral_broker.sealing import KeyDirectory
from referral_broker.sealing.envelope import OutgoingMessage

CHUNK = 500  # record numbers a worker takes at a time (the outbox's batch)
MAX_WORKERS = 4
# Smaller files are checked and sealed in the sending process: starting a worker (a Python
# with the project imported) costs about 0.7 s of CPU, as much as checking 4,000 rows.
MIN_BYTES = 4_000_000
_PROGRESS = 250  # a worker reports its count this often


def workers_for(settings: Settings, path: str | os.PathLike[str]) -> int:
    """How many worker processes ``send`` uses for ``path``: 1 (none: in process) below
    ``MIN_BYTES`` or when ``[send] workers`` is 1; else that setting, or with 0 this machine's
    cores, at most ``MAX_WORKERS``."""
    configured = settings.send_workers or min(os.cpu_count() or 1, MAX_WORKERS)
    if configured <= 1:
        return 1
    try:
        size = Path(path).stat().st_size
    except OSError:
        return 1  # the check names the problem
    return configured if size >= MIN_BYTES else 1


@dataclass(frozen=True)
class SealedReferral:
    """A referral a pool worker validated, sealed for the hub and signed (ids only in clear).
    ``message`` is None for one the outbox already kept before this send: not sealed again."""

    referral_id: str
    version: int
    message: OutgoingMessage | None = field(repr=False)
    number: int = 0  # its record number in the file


@dataclass(frozen=True)
class _Job:
    kind: str
    party: str
    path: Path
    identity: tuple[int, int, int]  # size, mtime, inode at the start: the file must not change
    now: dt.datetime
    index: int
    workers: int
    chunk: int  # CHUNK and URGENT_AHEAD as the parent has them
    ahead: int
    settings: Settings


@dataclass
class _Checked:
    """One worker's first phase: counts, rejected records (problems only), the id index, and
    its first urgent referrals as (record number, id bytes)."""

    read: int
    last: int
    rejected: list[Any]
    index: bytes
    urgent: list[tuple[int, bytes]]
    warnings: list[str]  # what the reading ignored without refusing (extra columns, say)


def _is_set(bits: bytes | bytearray, number: int) -> bool:
    """Whether record ``number``'s bit is set (records kept by an earlier send: a bit each)."""
    return number >> 3 < len(bits) and bool(bits[number >> 3] >> (number & 7) & 1)


def _mine(index: int, workers: int, chunk: int) -> Callable[[int], bool]:
    """Whether a record number is worker ``index``'s (of ``workers``)."""
    return lambda number: ((number - 1) // chunk) % workers == index


_SERVE = "import sys; from referral_broker.producers.file_pool import _serve; _serve(int(sys.argv[1]))"


_running: weakref.WeakSet[_Worker] = weakref.WeakSet()


def worker_pids() -> list[int]:
    """The pids of this process's workers still running (``bench batch`` counts their CPU and RSS)."""
    return [worker.pid for worker in list(_running) if worker.is_alive()]


class _Worker:
    """One worker process, as much of ``multiprocessing.Process`` as the pool needs."""

    def __init__(self, job: _Job) -> None:
        self.conn, theirs = multiprocessing.Pipe()  # a socket pair: its end is inherited by fd
        try:
            self._popen = subprocess.Popen(  # a session of its own: the terminal's Ctrl-C is the sender's
                [sys.executable, "-c", _SERVE, str(theirs.fileno())], pass_fds=[theirs.fileno()], start_new_session=True
            )
        finally:
            theirs.close()
        self.pid = self._popen.pid
        _running.add(self)
        self.conn.send(job)

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        """None while it runs; a signal's negated number when one killed it."""
        return self._popen.poll()

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)

    def terminate(self) -> None:
        if self.is_alive():
            self._popen.terminate()


def _serve(fd: int) -> None:
    """A worker's entry point: its job is the first message on the inherited socket."""
    from referral_broker.startup_heap import own_process

    own_process()  # a fresh interpreter of ours
    conn = Connection(fd)
    try:
        job = conn.recv()
    except (EOFError, OSError):
        return  # the parent has gone already
    _work(job, conn)


def _work(job: _Job, conn: Connection) -> None:
    """A worker's whole life; every outcome is one message to the parent. Ctrl-C is the
    parent's to handle: it stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _check_then_seal(job, conn)
        failure = None
    except (EOFError, BrokenPipeError, ConnectionResetError):
        failure = None  # the parent stopped listening: it has stopped the send
    except ReferralBrokerError as exc:  # the project's errors never hold a value: sent whole
        failure = ("failed", type(exc).__name__, str(exc))
    except Exception as exc:  # named by type only: its text could hold a value
        failure = ("failed", "BrokerError", f"{type(exc).__name__} in sealing worker {job.index + 1}")
    with contextlib.suppress(OSError):
        if failure is not None:
            conn.send(failure)
        conn.close()


def _check_then_seal(job: _Job, conn: Connection) -> None:
    from referral_broker.adapters import ParsedRecord, get_adapter
    from referral_broker.adapters.file_verbs import Repeats, check_unchanged, is_urgent
    from referral_broker.identity import load_identity
    from referral_broker.startup_heap import freeze_startup_heap

    from .hub_seal import HubSealer

    adapter = get_adapter(job.kind)
    check_unchanged(job.path, job.identity)
    repeats = Repeats(adapter, "referral")
    rejected: list[ParsedRecord] = []
    urgent: list[ParsedRecord] = []
    read = last = 0
    for parsed in adapter.parse_some(job.path, _mine(job.index, job.workers, job.chunk), now=job.now):
        read, last = read + 1, parsed.number
        if not parsed.ok:
            rejected.append(parsed)
        else:
            repeats.note(parsed)
            if len(urgent) < job.ahead and is_urgent(parsed.record):
                urgent.append(parsed)
        if read % _PROGRESS == 0:
            conn.send(("progress", read))
    check_unchanged(job.path, job.identity)
    ids = [(p.number, repeats.identity(p)) for p in urgent]
    conn.send(("checked", _Checked(read, last, rejected, bytes(repeats.entries), ids, list(adapter.warnings))))
    del rejected, repeats

    order = conn.recv()
    if order[0] != "seal":
        return
    directory, skip, ahead, kept = order[1], order[2], order[3], order[4]
    identity = load_identity(job.settings, "", job.party, directory=directory)
    sealer = HubSealer(identity.sealer, job.settings, job.party)
    freeze_startup_heap()  # this process's own loop; see referral_broker.startup_heap

    def sealed(number: int, record: dict[str, Any]) -> SealedReferral:
        message = sealer.referral(record, sign=False)
        return SealedReferral(str(record["referral_id"]), int(record["version"]), message, number)

    def signed(chunk: list[SealedReferral]) -> list[SealedReferral]:
        """A chunk's messages under one signature (the router verifies one for the chunk)."""
        messages = sealer.sign_batch([s.message for s in chunk if s.message is not None])
        return [replace(s, message=m) for s, m in zip(chunk, messages, strict=True)]

    conn.send(("ahead", signed([sealed(p.number, p.record) for p in urgent if p.number in ahead and p.record is not None])))
    del urgent
    check_unchanged(job.path, job.identity)
    chunk, out = -1, list[SealedReferral]()
    mine = _mine(job.index, job.workers, job.chunk)
    # rejected, sent ahead or kept by an earlier send: not converted again
    wanted = lambda n: mine(n) and n not in skip and not _is_set(kept, n)
    for parsed in adapter.parse_some(job.path, wanted, now=job.now, validate=False):
        at = (parsed.number - 1) // job.chunk
        if at != chunk:
            if chunk >= 0:
                conn.send(("chunk", chunk, signed(out)))
            chunk, out = at, []
        if parsed.record is None:
            raise PartnerInputError(f"{parsed.source}: record {parsed.number} changed between passes")
        out.append(sealed(parsed.number, parsed.record))
    if chunk >= 0:
        conn.send(("chunk", chunk, signed(out)))
    check_unchanged(job.path, job.identity)
    conn.send(("done",))


class FilePool:
    """The worker processes of one file: constructing it runs the check phase (raising as
    :class:`~referral_broker.adapters.FileStream` does), :meth:`sealed` the seal phase.
    ``rejected``, ``total`` and ``warnings`` are then what a ``FileStream`` of the same file
    has. Close it (or use it as a context manager) when it is not sealed to the end: the dry
    run (``validate --as``) checks a large file this way and seals nothing."""

    def __init__(
        self,
        kind: str,
        party: str,
        path: str | os.PathLike[str],
        settings: Settings,
        *,
        workers: int,
        skip_invalid: bool,
        on_checked: Callable[[int], object] | None = None,
    ) -> None:
        from referral_broker.adapters import file_verbs, get_adapter
        from referral_broker.adapters.file_verbs import (
            Repeats,
            check_unchanged,
            file_identity,
            raise_rejected,
        )
        from referral_broker.adapters.native_files import source_name

        self.path = Path(path)
        self.workers = workers
        self.chunk, ahead_bound = CHUNK, file_verbs.URGENT_AHEAD
        self._identity = identity = file_identity(self.path)
        now = dt.datetime.now(dt.UTC)
        self._conns: list[Connection] = []
        self._processes: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop, self._conns, self._processes)
        try:
            for index in range(workers):
                job = _Job(kind, party, self.path, identity, now, index, workers, self.chunk, ahead_bound, settings)
                worker = _Worker(job)
                self._processes.append(worker)
                self._conns.append(worker.conn)
            checked = self._checked(on_checked)
            check_unchanged(self.path, identity)  # each worker checked too, but perhaps before a change
        except BaseException:
            self.close()
            raise
        adapter = get_adapter(kind)
        repeats = Repeats(adapter, "referral")
        repeats.entries = bytearray(b"".join(c.index for c in checked))
        self._repeats = repeats  # (id, version, record number) of every record read well
        self.already_kept = 0  # records the outbox kept before: not sealed again (see sealed())
        self._at = array.array("I")  # record number -> its entry in _repeats, once sealed() asks the outbox
        self.rejected = sorted((r for c in checked for r in c.rejected), key=lambda parsed: parsed.number)
        self.warnings = list(dict.fromkeys(w for c in checked for w in c.warnings))  # each reads the whole file
        self.total = sum(c.read for c in checked) - len(self.rejected)
        self._last = max((c.last for c in checked), default=0)
        self.total -= repeats.reject_repeated(self.rejected, source_name(self.path))
        urgent = sorted(pair for c in checked for pair in c.urgent)[:ahead_bound]
        self._ahead = repeats.alone_numbers({ident: number for number, ident in urgent}) if urgent else set()
        self._skip = {parsed.number for parsed in self.rejected} | self._ahead
        if self.rejected and not skip_invalid:
            self.close()
            raise_rejected(self.rejected, "referrals", source_name(self.path))

    def _receive(self, index: int) -> tuple[Any, ...]:
        try:
            message: tuple[Any, ...] = self._conns[index].recv()
        except (EOFError, OSError):
            raise self._stopped(index) from None
        if message[0] == "failed":
            raise _error(message[1], message[2])
        return message

    def _send(self, index: int, message: tuple[Any, ...]) -> None:
        try:
            self._conns[index].send(message)
        except OSError:
            raise self._stopped(index) from None

    def _stopped(self, index: int) -> BrokerError:
        process = self._processes[index]
        process.join(5)
        return BrokerError(f"sealing worker {index + 1} stopped (exit code {process.exitcode}); nothing more was sent")

    def _checked(self, on_checked: Callable[[int], object] | None) -> list[_Checked]:
        counts = [0] * self.workers
        results: dict[int, _Checked] = {}
        while len(results) < self.workers:
            ready = wait([c for i, c in enumerate(self._conns) if i not in results])
            for conn in ready:
                index = self._conns.index(conn)  # type: ignore[arg-type]
                message = self._receive(index)
                if message[0] == "progress":
                    counts[index] = message[1]
                elif message[0] == "checked":
                    results[index] = message[1]
                    counts[index] = message[1].read
                if on_checked is not None:
                    on_checked(sum(counts))
        return [results[i] for i in range(self.workers)]

    def __len__(self) -> int:
        return self.total

    def sealed(
        self, directory: KeyDirectory, *, kept: Callable[[list[str]], Collection[str]] | None = None
    ) -> Iterator[SealedReferral]:
        """The file's good referrals sealed for the hub with ``directory``'s keys: the urgent
        ones alone in the file first, then the rest in file order. Closes the pool at the end.

        ``kept`` (the outbox's, given message ids) names those already kept by an earlier send:
        they come in their place with no message, neither converted nor sealed again, so sending
        a sent file again costs reading it, not sealing it."""
        from referral_broker.adapters.file_verbs import check_unchanged

        if not self._finalizer.alive:
            raise BrokerError("this file's sealing workers have stopped: check the file again to send it")
        try:
            already = self._kept_before(kept) if kept is not None else bytearray()
            self.already_kept = int.from_bytes(already, "little").bit_count()
            for index in range(self.workers):
                mine = _mine(index, self.workers, self.chunk)
                ahead_here = {n for n in self._ahead if mine(n) and not _is_set(already, n)}
                self._send(index, ("seal", directory, {n for n in self._skip if mine(n)}, ahead_here, already))
            ahead = [self._placeholder(n) for n in self._ahead if _is_set(already, n)]
            for index in range(self.workers):
                ahead.extend(self._expect(index, "ahead")[1])
            yield from sorted(ahead, key=lambda referral: referral.number)
            del ahead
            held: list[tuple[float, list[SealedReferral]] | None] = [None] * self.workers
            for chunk in range((self._last + self.chunk - 1) // self.chunk):
                sealed = self._chunk(chunk, held)
                numbers = range(chunk * self.chunk + 1, (chunk + 1) * self.chunk + 1)
                placed = [self._placeholder(n) for n in numbers if _is_set(already, n) and n not in self._ahead]
                yield from sorted(sealed + placed, key=lambda referral: referral.number) if placed else sealed
            for index, waiting in enumerate(held):
                if waiting is None:
                    self._expect(index, "done")
                elif waiting[0] != math.inf:
                    raise BrokerError(f"sealing worker {index + 1} sent a chunk past the file's last record")
            check_unchanged(self.path, self._identity)
        finally:
            self.close()

    def _kept_before(self, kept: Callable[[list[str]], Collection[str]]) -> bytearray:
        """A bit a record number, set for each good record ``kept`` names (asked ``CHUNK`` at a
        time: a re-sent 1M-row file costs 125 KB here, not an object a row)."""
        from .outbox import referral_message_id

        rejected = {parsed.number for parsed in self.rejected}
        bits = bytearray(self._last // 8 + 1)
        size = len(self._repeats)
        self._at = array.array("I", bytes(4 * (self._last + 1)))  # record number -> its entry
        for start in range(0, size, CHUNK):
            ids: dict[str, int] = {}
            for at in range(start, min(start + CHUNK, size)):
                _, _, number = self._repeats.entry(at)
                self._at[number] = at
                if number not in rejected:
                    ids[referral_message_id(*self._ids(at))] = number
            for mid in kept(list(ids)):
                if mid in ids:
                    bits[ids[mid] >> 3] |= 1 << (ids[mid] & 7)
        return bits

    def _ids(self, at: int) -> tuple[str, int]:
        """The referral id and version of the ``at``-th record the check noted."""
        id_bytes, version, _ = self._repeats.entry(at)
        return str(uuid.UUID(bytes=id_bytes)), version

    def _placeholder(self, number: int) -> SealedReferral:
        """Record ``number`` as an earlier send kept it: its ids, no message."""
        return SealedReferral(*self._ids(self._at[number]), None, number)

    def _chunk(self, chunk: int, held: list[tuple[float, list[SealedReferral]] | None]) -> list[SealedReferral]:
        """Chunk ``chunk``'s sealed referrals from the worker whose it is: none when no record is
        numbered in it (numbers may skip, as in a FHIR bundle's entries), so a later chunk read
        meanwhile is held, as is the worker's end."""
        index = chunk % self.workers
        if held[index] is None:
            message = self._receive(index)
            if message[0] == "done":
                held[index] = (math.inf, [])
            elif message[0] == "chunk":
                held[index] = (message[1], message[2])
            else:
                raise BrokerError(f"sealing worker {index + 1} sent {message[0]!r}, not a chunk")
        at, referrals = held[index]  # type: ignore[misc]
        if at > chunk:
            return []
        if at < chunk:
            raise BrokerError(f"sealing worker {index + 1} sent chunk {at} after {chunk}")
        held[index] = None
        return referrals

    def _expect(self, index: int, what: str) -> tuple[Any, ...]:
        message = self._receive(index)
        if message[0] != what:
            raise BrokerError(f"sealing worker {index + 1} sent {message[0]!r}, not {what!r}")
        return message

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> FilePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error(name: str, text: str) -> ReferralBrokerError:
    """A worker's error as the same class in this process (a refused file stays a
    PartnerInputError, a revoked hub key a RevokedKeyError), else a BrokerError."""
    from referral_broker import errors

    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, ReferralBrokerError):
        try:
            return kind(text)
        except TypeError:  # an error built from more than a message
            pass
    return BrokerError(text)


def _stop(conns: list[Connection], processes: list[_Worker]) -> None:
    """Tell waiting workers to stop, then make sure they have."""
    for conn in conns:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("stop",))
        conn.close()
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.terminate()
            process.join(5)
