"""Reading and writing partner files: UTF-8 checks, CSV headers, JSON documents, safe writes.

Everything wrong with a file as a whole (not UTF-8, UTF-16, malformed CSV or JSON, a missing
or unknown column) raises :class:`PartnerInputError` naming the file and the line; problems
with one record are the caller's to report. Messages name files, lines and columns only:
never a cell's or a document's content.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import ijson

from referral_broker.errors import EmptyInputError, PartnerInputError

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
        # A stream is read more than once (sniffed, then read): each reading starts where the
        # caller's stream was.
        start = source.tell() if source.seekable() else None
        try:
            yield source
        finally:
            if start is not None:
                source.seek(start)


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


def read_csv(
    source: Source,
    columns: list[str],
    *,
    warnings: list[str] | None = None,
    optional: Collection[str] = (),
) -> Iterator[tuple[int, dict[str, str] | str]]:
    """Rows of a UTF-8 CSV with ``columns`` (any order), numbered from 1 (first data row).

    A row is a dict of column -> cell, or a short reason when the row itself is broken (a
    wrong number of cells), so the caller can reject that record and carry on. Columns outside
    ``columns`` are refused, unless ``warnings`` is given: then they are ignored and named there
    (a school MIS adds its own columns: admission number, tutor group). Columns in ``optional``
    may be missing from the header (added to the format later); a row then has no such key.
    """
    name = source_name(source)
    kind = sniff(source)
    if kind == "empty":
        raise EmptyInputError(f"{name}: the file is empty: no header row and no records")
    if kind in ("xml", "json"):
        raise PartnerInputError(f"{name}: the file is {kind.upper()}, not CSV")
    with _opened(source) as handle:
        reader = csv.reader(_decoded_lines(handle, name), strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise EmptyInputError(f"{name}: the file is empty: no header row and no records")
            header = _canonical_header(header, columns)
            extra = _check_header(header, columns, name, allow_extra=warnings is not None, optional=optional)
            if extra and warnings is not None:
                warnings.append(
                    f"{name}: line 1 (header): column(s) not used, ignored: "
                    + ", ".join(f'"{c}"' for c in extra[:20])
                    + (f" (and {len(extra) - 20} more)" if len(extra) > 20 else "")
                )
            number = 0
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank lines between records are common in hand-edited files
                number += 1
                if len(row) != len(header):
                    yield number, f"has {len(row)} cells where the header has {len(header)}"
                else:
                    yield number, dict(zip(header, row, strict=True))
            if number == 0:
                raise EmptyInputError(f"{name}: the file has a header row but no records")
        except csv.Error as exc:
            raise PartnerInputError(f"{name}: line {reader.line_num}: malformed CSV ({exc})") from None


_OTHER_DELIMITERS = {";": "semicolons", "\t": "tabs", "|": "vertical bars"}


def _form(column: str) -> str:
    return " ".join(column.replace("_", " ").split()).casefold()


def _canonical_header(header: list[str], columns: list[str]) -> list[str]:
    """The header with each cell named as the format names its column when they differ only in
    capitals, spacing or underscores ("REFERRAL ID", "Referral_Id "): MIS exports and hand-kept
    spreadsheets differ in just these, and they cannot name another column."""
    by_form = {_form(c): c for c in columns}
    return [by_form.get(_form(cell), cell.strip()) for cell in header]


def _check_header(
    header: list[str], columns: list[str], name: str, *, allow_extra: bool, optional: Collection[str] = ()
) -> list[str]:
    """Refuse a header without every column but the ``optional`` ones (or, unless
    ``allow_extra``, with others); return the columns it has beyond ``columns``."""
    if len(header) == 1 and len(columns) > 1:
        for delimiter, said in _OTHER_DELIMITERS.items():
            if header[0].count(delimiter) >= 2:
                raise PartnerInputError(
                    f"{name}: line 1 (header): the columns are separated by {said}, not commas; "
                    "save the file as comma-separated CSV (in Excel: 'CSV UTF-8 (Comma delimited)')"
                )
    doubled = sorted({c for c in header if header.count(c) > 1})
    missing = [c for c in columns if c not in header and c not in optional]
    unknown = [c for c in header if c not in columns]
    reasons = []
    if missing:
        reasons.append("missing column(s) " + ", ".join(f'"{c}"' for c in missing))
    if unknown and (missing or not allow_extra):
        # A misspelt column would otherwise be dropped without anyone noticing (with a column
        # missing, an extra one may be its misspelling, so it is named even where extras are fine).
        reasons.append("unknown column(s) " + ", ".join(f'"{c}"' for c in unknown[:10]))
    if doubled:
        reasons.append("repeated column(s) " + ", ".join(f'"{c}"' for c in doubled))
    if reasons:
        raise PartnerInputError(f"{name}: line 1 (header): " + "; ".join(reasons))
    return unknown


def read_json(source: Source) -> Any:
    """One UTF-8 JSON document, read whole (small files; the adapters stream with ``iter_json``)."""
    name = source_name(source)
    with _opened(source) as handle:
        data = handle.read()
    return _parse_whole_json(data, name)


def _parse_whole_json(data: bytes | str, name: str) -> Any:
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


# --- what a file is, by its content -----------------------------------------------------------


def sniff(source: Source) -> str:
    """What the file holds, from its first bytes: "empty", "xml", "json" or "text" (CSV)."""
    name = source_name(source)
    with _opened(source) as handle:
        head = handle.read(4096)
    raw = head.encode("utf-8") if isinstance(head, str) else head
    _check_start(raw[:64], name)
    text = raw.removeprefix(_UTF8_BOM).lstrip()
    if not text:
        return "empty"
    if text.startswith(b"<"):
        return "xml"
    if text.startswith((b"{", b"[")):
        return "json"
    return "text"


# --- JSON, streamed ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JsonItem:
    """One record of a JSON file: its number, its value, and the paths of keys it repeats."""

    number: int
    value: Any
    duplicates: tuple[str, ...] = ()


def _object_type(found: list[str]) -> type[dict[str, Any]]:
    """A dict that notes a key set twice (JSON allows it; the last value would silently win)."""

    class JsonObject(dict[str, Any]):
        def __setitem__(self, key: str, value: Any) -> None:
            if key in self:
                found.append(key)
                self.__dict__.setdefault("repeated", []).append(key)
            dict.__setitem__(self, key, value)

    return JsonObject


def _repeated_paths(value: Any, path: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(value, dict):
        for key in getattr(value, "__dict__", {}).get("repeated", []):
            found.append(f"{path}.{key}" if path else key)
        for key, item in value.items():
            found.extend(_repeated_paths(item, f"{path}.{key}" if path else key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_repeated_paths(item, f"{path}[{index}]"))
    return found


@contextlib.contextmanager
def _binary(source: Source) -> Iterator[IO[bytes]]:
    with _opened(source) as handle:
        if isinstance(handle.read(0), str):
            text = cast(IO[str], handle)
            yield io.BytesIO(text.read().encode("utf-8"))  # a text stream is in memory already
        else:
            yield cast(IO[bytes], handle)


def iter_json(source: Source, *, list_key: str | None = None) -> Iterator[JsonItem]:
    """The records of a JSON file, one at a time, so memory stays flat however large the file.

    A top-level array yields each item (numbered from 1); a top-level object is one record,
    unless ``list_key`` names an array in it (a FHIR Bundle's ``entry``): then each item of that
    array is yielded as it is read, numbered from 1 (``json_head`` reads the rest). Keys
    repeated within an object are reported in ``duplicates``. A broken file raises
    PartnerInputError with the line and column; an empty file or array EmptyInputError.
    """
    name = source_name(source)
    kind = sniff(source)
    if kind == "empty":
        raise EmptyInputError(f"{name}: the file is empty: no records")
    if kind == "xml":
        raise PartnerInputError(f"{name}: the file is XML, not JSON")
    found: list[str] = []
    mapping = _object_type(found)
    count = 0
    try:
        with _binary(source) as handle:
            start = handle.tell()
            first = handle.read(4096).removeprefix(_UTF8_BOM).lstrip()[:1]
            handle.seek(start)
            if first == b"[":
                prefix = "item"
            elif list_key is not None:
                prefix = f"{list_key}.item"
            else:
                prefix = ""
            for value in ijson.items(handle, prefix, map_type=mapping, use_float=True):
                count += 1
                duplicates: tuple[str, ...] = ()
                if found:
                    duplicates = tuple(_repeated_paths(value))
                    found.clear()
                yield JsonItem(count, value, duplicates)
            if first == b"[" and count == 0:
                raise EmptyInputError(f"{name}: the JSON array is empty: no records")
    except ijson.JSONError:
        _raise_json_error(source, name)
        raise PartnerInputError(f"{name}: malformed JSON") from None


def json_head(source: Source, skip: str) -> tuple[Any, tuple[str, ...]]:
    """A top-level object without its (large) ``skip`` array, and the keys it repeats; a
    top-level array is ``[]``. Stops reading at ``skip`` when the Bundle's own fields came first."""
    name = source_name(source)
    found: list[str] = []
    mapping = _object_type(found)
    try:
        with _binary(source) as handle:
            head = _json_head(handle, skip, mapping)
    except ijson.JSONError:
        _raise_json_error(source, name)
        raise PartnerInputError(f"{name}: malformed JSON") from None
    return head, tuple(_repeated_paths(head)) if found else ()


def _json_head(handle: IO[bytes], skip: str, mapping: type[dict[str, Any]]) -> Any:
    head: dict[str, Any] = mapping()
    builder: ijson.ObjectBuilder | None = None
    key: str | None = None
    events = ijson.parse(handle, use_float=True)
    for prefix, event, value in events:
        if prefix == "" and event in ("start_map", "end_map"):
            if event == "end_map":
                break
            continue
        if prefix == "" and event == "start_array":
            return []  # a top-level array: not an object
        if prefix == "" and event == "map_key":
            if builder is not None and key is not None:
                head[key] = builder.value
            key, builder = value, None
            if key == skip and "resourceType" in head and "type" in head:
                return head  # the rest is the array, already read (Bundle fields come first)
            continue
        if key == skip:
            continue
        if builder is None:
            builder = ijson.ObjectBuilder(map_type=mapping)
        builder.event(event, value)
    if builder is not None and key is not None:
        head[key] = builder.value
    return head


def _raise_json_error(source: Source, name: str) -> None:
    """The exact line and column of a JSON syntax error (read whole: only on the error path)."""
    with _opened(source) as handle:
        data = handle.read()
    _parse_whole_json(data, name)


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
