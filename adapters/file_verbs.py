"""The file-level verbs partner systems call: load, stream and render native files.

``load_file`` returns every referral of a file or raises listing every rejected record, unless
``skip_invalid``; ``iter_file`` streams a large file in two passes so that nothing is yielded
(and so nothing sent) before the whole file is known to be good. Statuses have the same verbs.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from referral_broker.errors import PartnerInputError, Problem, ValidationError

from .base import ParsedRecord, PartnerAdapter, Rendered, get_adapter
from .native_files import Source, source_name

EXAMPLES = Path(__file__).resolve().parent / "examples"
# Urgent referrals a stream keeps from its first pass to yield ahead of the rest (bounded, so a
# file of nothing but urgent rows still streams in flat memory: the rest keep file order).
URGENT_AHEAD = 1000


@dataclass
class LoadResult:
    """A whole file: the good records (canonical) and, with ``skip_invalid``, the rejected ones;
    ``warnings`` says what was read without refusing anything (columns ignored, say)."""

    records: list[ParsedRecord] = field(default_factory=list)
    rejected: list[ParsedRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def referrals(self) -> list[dict[str, Any]]:
        return [parsed.record for parsed in self.records if parsed.record is not None]


def example_file(kind: str) -> Path:
    """The synthetic example file of a partner kind's native format."""
    return EXAMPLES / f"{kind}{get_adapter(kind).native_suffix}"


def is_urgent(record: Mapping[str, Any] | None) -> bool:
    """A canonical referral the senders put ahead of the rest of its file."""
    return record is not None and record.get("priority") == "urgent"


def raise_rejected(rejected: list[ParsedRecord], what: str, name: str) -> None:
    problems = [problem for parsed in rejected for problem in parsed.problems]
    raise ValidationError(
        problems, f"{what} in {name} ({len(rejected)} record(s) rejected, nothing accepted)"
    )


class Repeats:
    """Each (id, version) a file holds, by record number: a file holds each once.

    Kept as 24 bytes a record (UUID, version, record number) in one buffer, the one thing a
    streamed file keeps per record, sorted once at the end to find the repeats."""

    def __init__(self, adapter: PartnerAdapter, family: str) -> None:
        self.entries = bytearray()
        key = "referral_id" if family == "referral" else "status_id"
        self.key = key
        self.label = (adapter.referral_map if family == "referral" else adapter.status_map).native_label(key)

    def note(self, parsed: ParsedRecord) -> None:
        if parsed.record is not None:
            identity = self.identity(parsed)
            version = int(parsed.record["version"]) & 0xFFFFFFFF
            self.entries += identity + version.to_bytes(4, "big") + parsed.number.to_bytes(4, "big")

    def __len__(self) -> int:
        return len(self.entries) // 24

    def entry(self, at: int) -> tuple[bytes, int, int]:
        """The ``at``-th record noted: its id's 16 bytes, its version and its record number."""
        start = at * 24
        return (
            bytes(self.entries[start : start + 16]),
            int.from_bytes(self.entries[start + 16 : start + 20], "big"),
            int.from_bytes(self.entries[start + 20 : start + 24], "big"),
        )

    def repeated(self) -> dict[int, list[int]]:
        """Record number -> the other records with the same id and version."""
        size = len(self.entries) // 24
        order = sorted(range(size), key=lambda i: self.entries[i * 24 : i * 24 + 20])
        out: dict[int, list[int]] = {}
        start = 0
        for position in range(1, size + 1):
            same = position < size and (
                self.entries[order[position] * 24 : order[position] * 24 + 20]
                == self.entries[order[start] * 24 : order[start] * 24 + 20]
            )
            if same:
                continue
            if position - start > 1:
                numbers = sorted(
                    int.from_bytes(self.entries[order[i] * 24 + 20 : order[i] * 24 + 24], "big")
                    for i in range(start, position)
                )
                for number in numbers:
                    out[number] = [n for n in numbers if n != number]
            start = position
        return out

    def alone(self, candidates: list[ParsedRecord]) -> list[ParsedRecord]:
        """Those of ``candidates`` whose id no other record of the file holds (any version)."""
        ids = {self.identity(p): p.number for p in candidates if p.record is not None}
        kept = self.alone_numbers(ids)
        return [p for p in candidates if p.number in kept]

    def identity(self, parsed: ParsedRecord) -> bytes:
        """The record's id as the 16 bytes :meth:`note` keeps."""
        assert parsed.record is not None
        return uuid.UUID(str(parsed.record[self.key])).bytes

    def alone_numbers(self, ids: dict[bytes, int]) -> set[int]:
        """Of ``ids`` (id bytes -> record number), the numbers of the records whose id no other
        record of the file holds (any version)."""
        ids = dict(ids)
        with memoryview(self.entries) as view:
            for start in range(0, len(view), 24):
                found = ids.get(bytes(view[start : start + 16]))
                if found is not None and int.from_bytes(view[start + 20 : start + 24], "big") != found:
                    ids.pop(bytes(view[start : start + 16]))
        return set(ids.values())

    def reject_repeated(self, rejected: list[ParsedRecord], source: str) -> int:
        """Add each record that repeats another's id and version to ``rejected`` (kept sorted by
        record number) and return how many were good before. Only numbers and ids were kept, so
        the repeated records are named, not re-read."""
        repeated = self.repeated()
        if repeated:
            rejected.extend(self.reject(ParsedRecord(source, n, None), others) for n, others in repeated.items())
            rejected.sort(key=lambda parsed: parsed.number)
        return len(repeated)

    def reject(self, parsed: ParsedRecord, others: list[int]) -> ParsedRecord:
        where = f'"{self.label}" ({self.key})' if self.label else self.key
        what = "referral id and version" if self.key == "referral_id" else "status id and version"
        shown = ", ".join(map(str, others))
        problem = Problem(where, f"the same {what} as record {shown}: a file holds each once", parsed.number)
        return ParsedRecord(parsed.source, parsed.number, None, (problem,))


def _load(
    adapter: PartnerAdapter, records: Iterator[ParsedRecord], skip_invalid: bool, what: str, family: str
) -> LoadResult:
    result = LoadResult()
    name = "<stream>"
    repeats = Repeats(adapter, family)
    parsed_all: list[ParsedRecord] = []
    for parsed in records:
        name = parsed.source
        repeats.note(parsed)
        parsed_all.append(parsed)
    repeated = repeats.repeated()
    for parsed in parsed_all:
        if parsed.number in repeated:
            parsed = repeats.reject(parsed, repeated[parsed.number])
        (result.records if parsed.ok else result.rejected).append(parsed)
    result.warnings = list(adapter.warnings)
    if result.rejected and not skip_invalid:
        raise_rejected(result.rejected, what, name)
    return result


def load_file(
    kind: str, source: Source, *, skip_invalid: bool = False, now: dt.datetime | None = None
) -> LoadResult:
    """Every referral in a partner's native file, validated.

    Raises ValidationError listing every rejected record (file, record number, field) and
    returns nothing when any record is bad, unless ``skip_invalid``: then the good records come
    back with ``rejected`` listing the others. A broken file (encoding, columns, malformed CSV
    or JSON) raises PartnerInputError either way.
    """
    adapter = get_adapter(kind)
    return _load(adapter, adapter.parse(source, now=now), skip_invalid, "referrals", "referral")


def load_statuses(
    kind: str,
    source: Source,
    *,
    party: str | None = None,
    skip_invalid: bool = False,
    now: dt.datetime | None = None,
) -> LoadResult:
    """Every status message in a partner's native status file, validated (as ``load_file``);
    ``party`` is the organisation whose file it is (each status's ``from_party``)."""
    adapter = get_adapter(kind)
    parsed = adapter.parse_statuses(source, party=party, now=now)
    return _load(adapter, parsed, skip_invalid, "status messages", "status")


def file_identity(path: Path) -> tuple[int, int, int]:
    """Size, modification time and inode: what :func:`check_unchanged` compares, so a file that
    changes while it is read in several passes (or by several processes) is refused."""
    try:
        found = path.stat()
    except FileNotFoundError:
        raise PartnerInputError(f"{source_name(path)}: file not found") from None
    return (found.st_size, found.st_mtime_ns, found.st_ino)


def check_unchanged(path: Path, identity: tuple[int, int, int]) -> None:
    if file_identity(path) != identity:
        raise PartnerInputError(f"{source_name(path)}: the file changed while it was being read")


class FileStream:
    """The referrals of a (large) file, streamed with bounded memory in two passes.

    Constructing it runs the first pass: every record is converted and validated and only the
    rejected ones are kept, so a bad file raises before anything is yielded (or, with
    ``skip_invalid``, ``rejected`` is complete before the first record is sent). Iterating runs
    the second pass and yields the good records; ``total`` is their count, for progress bars.
    The second pass converts again but does not repeat validation (the sender validates each
    record it seals anyway); a file that changes between or during the passes (size, mtime or
    inode) raises PartnerInputError.

    With ``urgent_first`` (the senders), urgent referrals are yielded before the rest, kept from
    the first pass (at most ``URGENT_AHEAD`` of them), so an urgent row at the end of a 100k-row
    batch is sent, and routed, seconds after the file is checked rather than minutes. Only a
    referral that is the one record of its id in the file moves: its versions keep their order.
    """

    def __init__(
        self,
        kind: str,
        path: str | os.PathLike[str],
        *,
        skip_invalid: bool,
        now: dt.datetime | None,
        on_checked: Callable[[int], object] | None = None,
        urgent_first: bool = False,
    ) -> None:
        self.adapter = get_adapter(kind)
        self.path = Path(path)
        self.now = now or dt.datetime.now(dt.UTC)
        self.rejected: list[ParsedRecord] = []
        self.total = 0
        self._identity = file_identity(self.path)
        repeats = Repeats(self.adapter, "referral")
        ahead: list[ParsedRecord] = []
        for checked, parsed in enumerate(self.adapter.parse(self.path, now=self.now), 1):
            if parsed.ok:
                self.total += 1
                repeats.note(parsed)
                if urgent_first and len(ahead) < URGENT_AHEAD and is_urgent(parsed.record):
                    ahead.append(parsed)
            else:
                self.rejected.append(parsed)
            if on_checked is not None:
                on_checked(checked)
        self._check_unchanged()
        self.total -= repeats.reject_repeated(self.rejected, source_name(self.path))
        self._ahead = repeats.alone(ahead) if ahead else []
        self.warnings = list(self.adapter.warnings)
        if self.rejected and not skip_invalid:
            raise_rejected(self.rejected, "referrals", source_name(self.path))

    def _check_unchanged(self) -> None:
        check_unchanged(self.path, self._identity)

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[ParsedRecord]:
        self._check_unchanged()
        yield from self._ahead
        skipped = {parsed.number for parsed in self.rejected} | {parsed.number for parsed in self._ahead}
        for parsed in self.adapter._reconvert(self.path, now=self.now):
            if parsed.number in skipped:
                continue
            if not parsed.ok:
                self._check_unchanged()
                raise PartnerInputError(
                    f"{source_name(self.path)}: record {parsed.number} changed between passes"
                )
            yield parsed
        self._check_unchanged()


def iter_file(
    kind: str,
    path: str | os.PathLike[str],
    *,
    skip_invalid: bool = False,
    now: dt.datetime | None = None,
    on_checked: Callable[[int], object] | None = None,
    urgent_first: bool = False,
) -> FileStream:
    """The streaming variant of ``load_file`` for large files (a DWP batch of 100k rows).

    Returns once the whole file is checked (``on_checked`` is called with the running count
    during that pass, for a progress bar); iterate the result to get the good records, in file
    order, or with ``urgent_first`` the urgent ones first (see :class:`FileStream`).
    """
    return FileStream(kind, path, skip_invalid=skip_invalid, now=now, on_checked=on_checked, urgent_first=urgent_first)


def render_file(
    kind: str,
    records: Iterable[Mapping[str, Any]],
    out: str | os.PathLike[str] | IO[str],
    *,
    name: str | None = None,
    fmt: str | None = None,
) -> Rendered:
    """Canonical referrals or recipient views as a partner's native file (``fmt``: one of the
    kind's further formats, e.g. health "xml", schools "ctf"; None: its own)."""
    return get_adapter(kind).render(records, out, name=name, fmt=fmt)


def render_statuses(
    kind: str,
    statuses: Iterable[Mapping[str, Any]],
    out: str | os.PathLike[str] | IO[str],
    *,
    name: str | None = None,
    fmt: str | None = None,
) -> Rendered:
    """Canonical status messages as a partner's native status file."""
    return get_adapter(kind).render_statuses(statuses, out, name=name, fmt=fmt)
