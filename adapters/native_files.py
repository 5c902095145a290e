"""Reading and writing partner files: UTF-8 checks, CSV headers, JSON documents, safe writes.

Everything wrong with a file as a whole (not UTF-8, UTF-16, malformed CSV or JSON, a missing
or unknown column) raises :class:`PartnerInputError` naming the file and the line; problems
with one record are the caller's to report. Messages name files, lines and columns only:
never a cell's or a document's content.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from referral_broker.errors import PartnerInputError

Source = str | os.PathLike[str] | IO[bytes] | IO[str]
"""A partner file: a path, or an open binary or text stream."""

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_UTF8_BOM = b"\xef\xbb\xbf"
_SAVE_AS_UTF8 = "save it as UTF-8 (in Excel: 'CSV UTF-8'; in other tools: encoding UTF-8)"


def source_name(source: Source) -> str:
    """The file's name for messages (the base name only: folders can name a family)."""
    if isinstance(source, str | os.PathLike):
        return Path(source).name
    name = getattr(source, "name", None)
    return Path(name).name if isinstance(name, str) else "<stream>"


@contextlib.contextmanager
def _opened(source: Source) -> Iterator[IO[bytes] | IO[str]]:
    if isinstance(source, str | os.PathLike):
        try:
            with open(source, "rb") as handle:
                yield handle
        except FileNotFoundError:
            raise PartnerInputError(f"{source_name(source)}: file not found") from None
    else:
        yield source


def _check_start(head: bytes, name: str) -> None:
    if head.startswith(_UTF16_BOMS) or (len(head) > 1 and b"\x00" in head[:64]):
        raise PartnerInputError(f"{name}: the file is UTF-16 or binary, not UTF-8 text; {_SAVE_AS_UTF8}")


def _decoded_lines(handle: IO[bytes] | IO[str], name: str) -> Iterator[str]:
    """Lines as text, decoded one at a time so a bad byte is reported with its line number."""
    lines: Iterable[bytes | str] = handle
    for number, raw in enumerate(lines, 1):
        if isinstance(raw, str):
            yield raw.removeprefix("\ufeff") if number == 1 else raw
            continue
        if number == 1:
            _check_start(raw, name)
            raw = raw.removeprefix(_UTF8_BOM)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PartnerInputError(
                f"{name}: line {number}: not UTF-8 text (byte {exc.start + 1} of the line); {_SAVE_AS_UTF8}"
            ) from None
        if b"\x00" in raw:
            raise PartnerInputError(f"{name}: line {number}: contains NUL bytes; {_SAVE_AS_UTF8}")


def read_csv(source: Source, columns: list[str]) -> Iterator[tuple[int, dict[str, str] | str]]:
    """Rows of a UTF-8 CSV with exactly ``columns`` (any order), numbered from 1 (first data row).

    A row is a dict of column -> cell, or a short reason when the row itself is broken (a
    wrong number of cells), so the caller can reject that record and carry on.
    """
    name = source_name(source)
    with _opened(source) as handle:
        reader = csv.reader(_decoded_lines(handle, name), strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise PartnerInputError(f"{name}: empty file, expected a header row")
            header = [cell.strip() for cell in header]
            _check_header(header, columns, name)
            number = 0
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank lines between records are common in hand-edited files
                number += 1
                if len(row) != len(header):
                    yield number, f"has {len(row)} cells where the header has {len(header)}"
                else:
                    yield number, dict(zip(header, row, strict=True))
        except csv.Error as exc:
            raise PartnerInputError(f"{name}: line {reader.line_num}: malformed CSV ({exc})") from None


def _check_header(header: list[str], columns: list[str], name: str) -> None:
    doubled = sorted({c for c in header if header.count(c) > 1})
    missing = [c for c in columns if c not in header]
    unknown = [c for c in header if c not in columns]
    reasons = []
    if missing:
        reasons.append("missing column(s) " + ", ".join(f'"{c}"' for c in missing))
    if unknown:
        # A misspelt column would otherwise be dropped without anyone noticing.
        reasons.append("unknown column(s) " + ", ".join(f'"{c}"' for c in unknown[:10]))
    if doubled:
        reasons.append("repeated column(s) " + ", ".join(f'"{c}"' for c in doubled))
    if reasons:
        raise PartnerInputError(f"{name}: line 1 (header): " + "; ".join(reasons))


def read_json(source: Source) -> Any:
    """One UTF-8 JSON document."""
    name = source_name(source)
    with _opened(source) as handle:
        data = handle.read()
    if isinstance(data, bytes):
        _check_start(data[:64], name)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise PartnerInputError(f"{name}: line {line}: not UTF-8 text; {_SAVE_AS_UTF8}") from None
    else:
        text = data.removeprefix("\ufeff")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # The decoder's message says what was expected where; it never quotes the document.
        raise PartnerInputError(
            f"{name}: line {exc.lineno} column {exc.colno}: malformed JSON ({exc.msg})"
        ) from None


def write_text(
    out: str | os.PathLike[str] | IO[str], file_name: str, write: Callable[[IO[str]], None]
) -> Path | None:
    """Write through ``write`` to a stream, or atomically to ``out/file_name`` when ``out`` is a
    folder, so a partner system polling that folder never picks up half a file."""
    if not isinstance(out, str | os.PathLike):
        write(out)
        return None
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / file_name
    fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{file_name}.", suffix=".part")
    try:
        with open(fd, "w", encoding="utf-8", newline="") as handle:
            write(handle)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target
