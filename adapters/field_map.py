"""Declarative maps between a partner's native record and a canonical record.

An adapter is mostly a table: each :class:`Field` pairs a native location (a CSV column, or a
path into a JSON document such as ``identifier[system=https://fhir.nhs.uk/Id/nhs-number].value``)
with a canonical field path and a :class:`Codec` that converts the value both ways. The same
table drives parsing, rendering, error labels ("column X (canonical.path)") and the list of
canonical paths a format carries, so the two directions cannot drift apart.

Native paths: dotted segments, each optionally followed by one selector, ``[n]`` (list index)
or ``[key=value]`` (the first list item whose ``key``, itself a dotted path, equals ``value``).
Setting a path creates what is missing. Codec failures raise ``ValueError`` with a reason
that never contains the value.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from referral_broker.schemas import identifiers

LOCAL_TIME = ZoneInfo("Europe/London")
_SEGMENT = re.compile(r"([^.\[\]]+)(?:\[([^\]]*)\])?")


# --- codecs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """Converts one value: ``parse`` native -> canonical, ``render`` canonical -> native."""

    parse: Callable[[Any], Any]
    render: Callable[[Any], Any] = lambda value: value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected text")
    return value.strip()


def _integer(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise ValueError("expected a whole number")


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in ("y", "yes", "true", "1"):
        return True
    if word in ("n", "no", "false", "0"):
        return False
    raise ValueError("expected yes or no")


def _iso_date(value: Any) -> dt.date:
    text = _text(value)
    try:
        if len(text) == 10:
            return dt.date.fromisoformat(text)
    except ValueError:
        pass
    raise ValueError("not a date in the form YYYY-MM-DD")


def _uk_date(value: Any) -> dt.date:
    day, _, rest = _text(value).partition("/")
    month, _, year = rest.partition("/")
    try:
        if len(year) == 4:
            return dt.date(int(year), int(month), int(day))
    except ValueError:
        pass
    raise ValueError("not a date in the form DD/MM/YYYY")


def _timestamp(value: Any) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(_text(value).replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("not an ISO 8601 date and time") from None
    # A partner system exporting local wall-clock time without an offset means UK time.
    return moment if moment.tzinfo else moment.replace(tzinfo=LOCAL_TIME)


def _render_timestamp(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _uuid(value: Any, prefix: str = "") -> uuid.UUID:
    text = _text(value)
    if not text.startswith(prefix):
        raise ValueError(f"expected '{prefix}' followed by a UUID")
    try:
        return uuid.UUID(text[len(prefix) :])
    except ValueError:
        raise ValueError("not a UUID") from None


TEXT = Codec(_text)
INT = Codec(_integer)
BOOL = Codec(_boolean)
YES_NO = Codec(_boolean, lambda value: "Y" if value else "N")
ISO_DATE = Codec(_iso_date, lambda v: v.isoformat())
UK_DATE = Codec(_uk_date, lambda v: v.strftime("%d/%m/%Y"))
TIMESTAMP = Codec(_timestamp, _render_timestamp)
UUID = Codec(_uuid, str)
URN_UUID = Codec(lambda v: _uuid(v, "urn:uuid:"), lambda v: f"urn:uuid:{v}")
NHS_NUMBER = Codec(lambda v: identifiers.compact_nhs_number(_text(v)))
NI_NUMBER = Codec(lambda v: identifiers.compact_ni_number(_text(v)))
UPN = Codec(lambda v: identifiers.compact_upn(_text(v)))
POSTCODE = Codec(lambda v: identifiers.normalise_postcode(_text(v)))
ODS_CODE = Codec(lambda v: identifiers.compact_ods_code(_text(v)))
CHARITY_NUMBER = Codec(lambda v: identifiers.compact_charity_number(_text(v)))
SYMBOLS = Codec(lambda v: [_text(item) for item in _list(v)], list)
SYMBOLS_CELL = Codec(
    lambda v: [part.strip() for part in _text(v).split(";") if part.strip()], lambda v: ";".join(v)
)


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("expected a list")
    return value


@dataclass(frozen=True)
class CodeTable(Codec):
    """A codec over a closed code list; ``symbols`` are the canonical values it can render."""

    symbols: frozenset[str] = frozenset()


def codes(table: Mapping[str, str]) -> CodeTable:
    """A closed code list: native code -> canonical symbol; rendering uses the first code per symbol."""
    lookup = {code.upper(): symbol for code, symbol in table.items()}
    reverse: dict[str, str] = {}
    for code, symbol in table.items():
        reverse.setdefault(symbol, code)
    allowed = ", ".join(table)

    def parse(value: Any) -> str:
        symbol = lookup.get(_text(value).upper())
        if symbol is None:
            raise ValueError(f"not one of the codes {allowed}")
        return symbol

    def render(symbol: str) -> str:
        if symbol not in reverse:
            raise ValueError("has no code in this format")
        return reverse[symbol]

    return CodeTable(parse, render, frozenset(reverse))


def list_cell(parts: tuple[tuple[str, Codec], ...], shape: str) -> Codec:
    """A list of small records in one CSV cell: items split by ``;``, parts by ``:``.

    An empty part is an absent field, so a recipient's view with some parts withheld renders
    and reads back as exactly what it holds. Parts are codes, numbers and dates: never free text.
    """

    def parse(value: Any) -> list[dict[str, Any]]:
        items = []
        for number, entry in enumerate((e for e in _text(value).split(";") if e.strip()), 1):
            texts = entry.split(":")
            if len(texts) != len(parts):
                raise ValueError(f"item {number} is not {shape}")
            item = {}
            for (key, codec), text in zip(parts, texts, strict=True):
                if text.strip():
                    try:
                        item[key] = codec.parse(text.strip())
                    except ValueError as exc:
                        raise ValueError(f"item {number}: {exc}") from None
            items.append(item)
        return items

    def render(items: list[dict[str, Any]]) -> str:
        return ";".join(
            ":".join("" if item.get(key) is None else str(codec.render(item[key])) for key, codec in parts)
            for item in items
        )

    return Codec(parse, render)


# --- native paths -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _segments(path: str) -> tuple[tuple[str, str | None], ...]:
    return tuple((m[1], m[2]) for m in _SEGMENT.finditer(path)) if path else ()


def _select(items: Any, selector: str) -> tuple[Any, int | None]:
    """The list item the selector names and its index, or (None, None)."""
    if not isinstance(items, list):
        return None, None
    if selector.isdigit():
        index = int(selector)
        return (items[index], index) if index < len(items) else (None, None)
    key, _, wanted = selector.partition("=")
    for index, item in enumerate(items):
        if get_path(item, key) == wanted:
            return item, index
    return None, None


def get_path(document: Any, path: str) -> Any:
    """The value at ``path``, or None when any step is missing."""
    node = document
    for name, selector in _segments(path):
        if not isinstance(node, dict):
            return None
        node = node.get(name)
        if selector is not None:
            node, _ = _select(node, selector)
    return node


def set_path(document: dict[str, Any], path: str, value: Any) -> None:
    """Set ``path`` to ``value``, creating dicts, lists and selected list items on the way."""
    node: Any = document
    steps = _segments(path)
    for position, (name, selector) in enumerate(steps):
        last = position == len(steps) - 1
        if selector is None:
            if last:
                node[name] = value
                return
            node = node.setdefault(name, {})
            continue
        items = node.setdefault(name, [])
        found, index = _select(items, selector)
        if selector.isdigit():
            if index is None:
                # A withheld earlier item stays null, so later items keep their positions
                # (an address's line 2 must not become its line 1).
                items.extend([None] * (int(selector) - len(items)))
                items.append(value if last else {})
                index = int(selector)
            elif last:
                items[index] = value
            if last:
                return
            found = items[index]
        elif found is None:
            key, _, wanted = selector.partition("=")
            found = {}
            set_path(found, key, wanted)
            items.append(found)
        node = found


def get_canonical(record: Any, path: str) -> Any:
    """The value at a dotted canonical path (no indexes), or None."""
    node = record
    for part in path.split(".") if path else []:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _set_canonical(record: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        record = record.setdefault(part, {})
    record[last] = value


def _is_empty(value: Any) -> bool:
    return value is None or value == [] or (isinstance(value, str) and not value.strip())


# Item positions of a repeated group whose compiled reads a table keeps (a JSON list longer
# than this is read with reads compiled for the call, so a hostile file cannot grow the cache).
ITEM_PLANS = 64


@dataclass(frozen=True)
class _Step:
    """One native value's read, compiled: where it is, how it converts, where it goes."""

    key: str | None  # the one dict key the native path is (None: walk ``native`` with get_path)
    native: str
    parse: Callable[[Any], Any] | None  # None: a Const, checked against ``allowed``
    allowed: frozenset[str] | None
    canonical: str
    parents: tuple[str, ...]
    last: str

    @classmethod
    def of(cls, entry: Field | Const, native: str) -> _Step:
        segments = _segments(native)
        key = segments[0][0] if len(segments) == 1 and segments[0][1] is None else None
        if isinstance(entry, Const):
            return cls(key, native, None, entry.allowed, "", (), "")
        *parents, last = entry.canonical.split(".")
        return cls(key, native, entry.codec.parse, None, entry.canonical, tuple(parents), last)


def _read(
    native: Any, steps: tuple[_Step, ...], target: dict[str, Any], problems: list[MappingProblem], item: str | None
) -> None:
    """Convert each step's native value into ``target`` (``item``: the canonical path of the
    repeated group's item being read, for problems; None at the top level)."""
    is_dict = isinstance(native, dict)
    for step in steps:
        if step.key is not None:
            value = native.get(step.key) if is_dict else None
        else:
            value = get_path(native, step.native)
        if step.parse is None:
            if step.allowed is not None and value not in step.allowed:
                problems.append(MappingProblem(step.native, "", f"must be one of {', '.join(sorted(step.allowed))}"))
            continue
        if _is_empty(value):
            continue
        try:
            converted = step.parse(value)
        except ValueError as exc:
            where = step.canonical if item is None else (f"{item}.{step.canonical}" if step.canonical else item)
            problems.append(MappingProblem(step.native, where, str(exc)))
            continue
        if _is_empty(converted):
            continue
        node = target
        for part in step.parents:
            node = node.setdefault(part, {})
        node[step.last] = converted


# --- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One native value <-> one canonical field path (``""`` inside :class:`Items` = the item).

    ``header_optional``: a CSV column added after partners' exports were in use (a schema v2
    field); a header without it is accepted and reads as every cell blank. Rendering writes it.
    """

    native: str
    canonical: str
    codec: Codec = TEXT
    header_optional: bool = False


@dataclass(frozen=True)
class Const:
    """A fixed native value the format needs (a FHIR status, a code system); carries no data.

    Rendering writes ``value``; parsing accepts only ``allowed`` (when given), which is how a
    code binding the FHIR library does not check gets checked.
    """

    native: str
    value: Any
    allowed: frozenset[str] | None = None


@dataclass(frozen=True)
class Items:
    """A repeated group: a JSON list of objects, or ``slots`` numbered CSV column groups.

    For a JSON list, ``native`` is the list's path and item fields are paths inside each item.
    For CSV, ``native`` is a column prefix with ``{n}`` (``"Contact {n} "``) and the format
    carries at most ``slots`` items; further items are reported as not carried.
    """

    native: str
    canonical: str
    fields: tuple[Field | Const, ...]
    slots: int | None = None

    def item_path(self, index: int, native: str) -> str:
        if self.slots is not None:
            return self.native.format(n=index + 1) + native
        return f"{self.native}[{index}].{native}" if native else f"{self.native}[{index}]"


Entry = Field | Const | Items


@dataclass(frozen=True)
class MappingProblem:
    """A value that could not be converted: where (native label, canonical path) and why."""

    native: str
    canonical: str
    reason: str


@dataclass(frozen=True)
class FieldMap:
    """The table of one native format; converts whole records both ways."""

    entries: tuple[Entry, ...]

    def columns(self) -> list[str]:
        """Every native name, repeated groups expanded: a CSV format's header."""
        names: list[str] = []
        for entry in self.entries:
            if isinstance(entry, Items):
                for index in range(entry.slots or 0):
                    names.extend(entry.item_path(index, f.native) for f in entry.fields)
            else:
                names.append(entry.native)
        return list(dict.fromkeys(names))

    def optional_columns(self) -> frozenset[str]:
        """Columns a CSV header may leave out (``Field.header_optional``)."""
        return frozenset(e.native for e in self.entries if isinstance(e, Field) and e.header_optional)

    def carried_paths(self) -> frozenset[str]:
        """Canonical field paths (no indexes) this format can carry."""
        paths = set()
        for entry in self.entries:
            if isinstance(entry, Field):
                paths.add(entry.canonical)
            elif isinstance(entry, Items):
                paths.update(
                    f"{entry.canonical}.{f.canonical}" if f.canonical else entry.canonical
                    for f in entry.fields
                    if isinstance(f, Field)
                )
        return frozenset(paths)

    def to_canonical(self, native: Mapping[str, Any]) -> tuple[dict[str, Any], list[MappingProblem]]:
        record: dict[str, Any] = {}
        problems: list[MappingProblem] = []
        for part in self._plan:
            if isinstance(part, Items):
                items = self._items_to_canonical(native, part, problems)
                if items:
                    _set_canonical(record, part.canonical, items)
            else:
                _read(native, part, record, problems, None)
        return record, problems

    @functools.cached_property
    def _plan(self) -> tuple[Items | tuple[_Step, ...], ...]:
        """The entries in order, each run of single values compiled into one tuple of reads,
        made once per table: a 100k-row batch reads some 60 cells a row, so the per-cell work
        is what a row costs (paths parsed and split here, not per cell)."""
        plan: list[Items | tuple[_Step, ...]] = []
        run: list[_Step] = []
        for entry in self.entries:
            if isinstance(entry, Items):
                if run:
                    plan.append(tuple(run))
                    run = []
                plan.append(entry)
            else:
                run.append(_Step.of(entry, entry.native))
        if run:
            plan.append(tuple(run))
        return tuple(plan)

    @functools.cached_property
    def _items_cache(self) -> dict[tuple[int, int], tuple[_Step, ...]]:
        """(id of a repeated group the table holds, item position) -> that item's reads."""
        return {}

    def _item_steps(self, items: Items, index: int) -> tuple[_Step, ...]:
        found = self._items_cache.get((id(items), index))
        if found is None:
            found = tuple(_Step.of(entry, items.item_path(index, entry.native)) for entry in items.fields)
            if index < ITEM_PLANS:
                self._items_cache[(id(items), index)] = found
        return found

    def _items_to_canonical(self, native: Any, items: Items, problems: list[MappingProblem]) -> list[Any]:
        if items.slots is not None:
            count = items.slots
        else:
            found = get_path(native, items.native)
            if found is None:
                return []
            if not isinstance(found, list):
                problems.append(MappingProblem(items.native, items.canonical, "expected a list"))
                return []
            count = len(found)
        out: list[Any] = []
        for index in range(count):
            item: dict[str, Any] = {}
            _read(native, self._item_steps(items, index), item, problems, f"{items.canonical}[{len(out)}]")
            if "" in item:
                out.append(item.pop(""))
            elif item or (
                items.slots is None and any(isinstance(f, Field) and f.canonical for f in items.fields)
            ):
                out.append(item)  # an empty object in a JSON list is still an item, found by its index
        return out

    def to_native(self, record: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
        """The native document for a canonical record or view, and the canonical paths of list
        items beyond the format's slots. Missing and null fields are left out, never invented."""
        native: dict[str, Any] = {}
        overflow: set[str] = set()
        for entry in self.entries:
            if isinstance(entry, Const):
                set_path(native, entry.native, entry.value)
            elif isinstance(entry, Field):
                self._write(record, entry, entry.native, native)
            else:
                rendered = [
                    self._item_to_native(entry, v) for v in get_canonical(record, entry.canonical) or []
                ]
                if entry.slots is None:
                    if rendered:
                        set_path(native, entry.native, rendered)
                    continue
                # Numbered column groups: an item with nothing to show takes no group.
                filled = [item for item in rendered if item]
                if len(filled) > entry.slots:
                    overflow.add(entry.canonical)
                for index, item in enumerate(filled[: entry.slots]):
                    native.update({entry.item_path(index, key): value for key, value in item.items()})
        return native, overflow

    def _item_to_native(self, entry: Items, value: Any) -> dict[str, Any]:
        item: dict[str, Any] = {}
        for inner in entry.fields:
            if isinstance(inner, Const):
                set_path(item, inner.native, inner.value)
            else:
                self._write(value if inner.canonical else {"": value}, inner, inner.native, item)
        return item

    @staticmethod
    def _write(source: Any, entry: Field, native_path: str, native: dict[str, Any]) -> None:
        value = source.get("") if entry.canonical == "" else get_canonical(source, entry.canonical)
        if _is_empty(value):
            return
        set_path(native, native_path, entry.codec.render(value))

    def native_label(self, canonical_path: str) -> str | None:
        """The native name for a canonical path with indexes (``household[1].ni_number``)."""
        for entry in self.entries:
            if isinstance(entry, Field) and (
                entry.canonical == canonical_path or canonical_path.startswith(f"{entry.canonical}[")
            ):
                return entry.native  # a list in one cell names its cell for any of its items
            if isinstance(entry, Items) and canonical_path.startswith(f"{entry.canonical}["):
                index_text, _, rest = canonical_path[len(entry.canonical) + 1 :].partition("]")
                if not index_text.isdigit():
                    continue
                for inner in entry.fields:
                    if isinstance(inner, Field) and inner.canonical == rest.lstrip("."):
                        return entry.item_path(int(index_text), inner.native)
        under = [
            entry.native
            for entry in self.entries
            if isinstance(entry, Field) and entry.canonical.startswith(f"{canonical_path}.")
        ]
        return ", ".join(under[:3]) if under else None


def canonical_leaf_paths(record: Any, prefix: str = "") -> Iterable[str]:
    """Schema paths (no indexes) of the values present in a canonical record or view."""
    if isinstance(record, Mapping):
        for key, value in record.items():
            yield from canonical_leaf_paths(value, f"{prefix}.{key}" if prefix else key)
    elif isinstance(record, list) and record and all(isinstance(item, Mapping) for item in record):
        for item in record:
            yield from canonical_leaf_paths(item, prefix)
    elif not _is_empty(record):
        yield prefix
