"""The one shape of a partner adapter, the registry by partner kind, and the file-level verbs.

    PartnerAdapter      kind, native_suffix, parse, render, status_to_native, status_from_native
    ├── CsvAdapter      one record per CSV row                     (schools, dwp)
    └── JsonAdapter     one record per JSON object or array item   (police, charities, health)

A partner module declares its kind, picks its family and gives its :class:`FieldMap` tables
(referral, and status when it has its own); everything else (reading, converting, validating,
rendering) is here, so adapters stay alike and adding a partner is one small module. The
file-level verbs over this shape are in ``file_verbs``.

Parsing never returns part of a bad record: a record is either a complete canonical dict that
passed edge validation, or rejected with every problem, each naming the file, the record number
and the field (native name and canonical path). No value from a partner file ever goes into a
problem, an exception or a log line.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import functools
import json
import os
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, ClassVar

from referral_broker.errors import ConfigError, PartnerInputError, Problem, ValidationError
from referral_broker.parties import all_parties
from referral_broker.schemas.json_form import from_json_form
from referral_broker.schemas.registry import expand_references, shared_schema, without_null
from referral_broker.schemas.validation import validate

from .field_map import (
    INT,
    TIMESTAMP,
    UUID,
    Field,
    FieldMap,
    Items,
    MappingProblem,
    canonical_leaf_paths,
    get_canonical,
)
from .native_files import Source, iter_json, read_csv, sniff, source_name, write_text

_SAFE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_ -]{0,40}$")
# For formats with no ethnicity, or where the question is optional: "not obtained" is what is known.
NOT_OBTAINED_ETHNICITY: Mapping[str, Any] = MappingProxyType({"child.ethnicity": "not_obtained"})
# Spreadsheet programs run a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class ParsedRecord:
    """One record of a partner file: its canonical dict, or why it was rejected."""

    source: str
    number: int
    record: dict[str, Any] | None
    problems: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return self.record is not None

    def __str__(self) -> str:
        if self.ok:
            return f"{self.source}: record {self.number}: ok"
        return f"{self.source}: record {self.number}: " + "; ".join(
            f"{p.path}: {p.reason}" for p in self.problems
        )


@dataclass(frozen=True)
class Rendered:
    """What ``render`` wrote: the file (None for a stream), how many records, and the canonical
    paths present in the input that this format cannot carry (list items beyond its slots too)."""

    path: Path | None
    count: int
    not_carried: frozenset[str]


@dataclass(frozen=True)
class NativeRecord:
    """A native record as read from the file, or the reasons it could not be read."""

    number: int
    document: Any
    problems: tuple[MappingProblem, ...] = ()


# The status form shared by partners whose format has no status message of its own.
STATUS_MAP = FieldMap(
    (
        Field("status_id", "status_id", UUID),
        Field("referral_id", "referral_id", UUID),
        Field("version", "version", INT),
        Field("from_party", "from_party"),
        Field("to_party", "to_party"),
        Field("status", "status"),
        Field("reason", "reason"),
        Field("at", "at", TIMESTAMP),
        Field("actor_role", "actor_role"),
    )
)


@dataclass(frozen=True)
class _Contract:
    """What differs between referrals and statuses when converting: schema, checks, own party."""

    schema: Callable[[], dict[str, Any]]
    validate: Callable[..., list[Problem]]
    own_party_path: str
    finish: Callable[[dict[str, Any]], None]

    def expanded(self) -> dict[str, Any]:
        return _expanded(self.schema)


@functools.cache
def _expanded(schema: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    return expand_references(schema())


def _finish_referral(record: dict[str, Any]) -> None:
    record.setdefault("referral_id", uuid.uuid4())
    record.setdefault("version", 1)
    concerns = record.get("concerns")
    if isinstance(concerns, list):
        # Operational and derived, so routing works without opening the sealed concerns.
        types = {c.get("type") for c in concerns if isinstance(c, dict)}
        record["concern_types"] = sorted(t for t in types if isinstance(t, str))


def _finish_status(record: dict[str, Any]) -> None:
    record.setdefault("status_id", uuid.uuid4())
    record.setdefault("version", 1)


def _validate(family: str) -> Callable[..., list[Problem]]:
    def check(record: dict[str, Any], *, now: dt.datetime, record_number: int) -> list[Problem]:
        return validate(
            record, shared_schema(family), now=now, record_number=record_number, known_parties=all_parties()
        )

    return check


_REFERRAL = _Contract(
    functools.partial(shared_schema, "referral"), _validate("referral"), "referrer.partner", _finish_referral
)
_STATUS = _Contract(functools.partial(shared_schema, "status"), _validate("status"), "from_party", _finish_status)


def _complete(value: Any, node: Any) -> None:
    """Fill schema defaults, and empty lists for required arrays, inside records that are present."""
    if isinstance(value, list):
        for item in value:
            _complete(item, node)
        return
    if not isinstance(value, dict):
        return
    for name, default, inner in _fill_plan(node):
        if name in value:
            if inner is not None:
                _complete(value[name], inner)
        elif default is not _NO_DEFAULT:
            value[name] = default if type(default) in _IMMUTABLE else copy.deepcopy(default)
            if inner is not None and isinstance(default, dict):
                _complete(value[name], inner)


_NO_DEFAULT = object()
_IMMUTABLE = frozenset({type(None), str, int, float, bool})  # deepcopy would return these as they are
_plans: dict[int, list[tuple[str, Any, Any]]] = {}


def _fill_plan(node: Any) -> list[tuple[str, Any, Any]]:
    """Per record type, once: each field's value when absent, and the record type to descend into.

    A required array becomes empty and a required record of optional fields (identifiers) an
    empty record; both say "none given", which is what an absent native value means.
    """
    plan = _plans.get(id(node))
    if plan is None:
        plan = []
        for item in without_null(node)["fields"]:
            kind = without_null(item["type"])
            inner = kind.get("items") if isinstance(kind, dict) and kind.get("type") == "array" else kind
            inner = without_null(inner)
            inner = inner if isinstance(inner, dict) and inner.get("type") == "record" else None
            if "default" in item:
                default = item["default"]
            elif isinstance(kind, dict) and kind.get("type") == "array":
                default = []
            elif inner is not None and all("default" in f for f in inner["fields"]):
                default = {}
            else:
                default = _NO_DEFAULT
            plan.append((item["name"], default, inner))
        _plans[id(node)] = plan  # schema dicts are cached for the process, so ids stay valid
    return plan


def _label(native: str | None, canonical: str) -> str:
    if native and canonical:
        return f'"{native}" ({canonical})'
    return f'"{native}"' if native else canonical or "<record>"


class PartnerAdapter(ABC):
    """Native <-> canonical for one partner kind, both for referrals and for status messages."""

    kind: ClassVar[str]
    native_suffix: ClassVar[str]
    referral_map: ClassVar[FieldMap]
    status_map: ClassVar[FieldMap] = STATUS_MAP
    # Values for required canonical fields a record of this format may lack, each one a value
    # that says "not known from this source" (ethnicity 'not_obtained'), never a guess.
    defaults_when_absent: ClassVar[Mapping[str, Any]] = {}

    # Further native formats the kind reads (chosen by the file's content) and can render:
    # format name -> file suffix (health: FHIR "xml"; schools: the DfE "ctf").
    formats: ClassVar[Mapping[str, str]] = {}

    def __init__(self) -> None:
        # What reading a file found worth saying without refusing anything (columns ignored,
        # values read as "not known"); one adapter instance reads one file.
        self.warnings: list[str] = []
        self.syntax: str | None = None  # the format being rendered; None: the kind's first

    def _choose(self, fmt: str | None) -> str:
        """The file suffix for rendering in ``fmt`` (None: the kind's own format)."""
        if fmt is None or (fmt not in self.formats and fmt == self.native_suffix.lstrip(".")):
            self.syntax = None
            return self.native_suffix
        if fmt not in self.formats:
            known = ", ".join([self.native_suffix.lstrip("."), *self.formats])
            raise ConfigError(f"{self.kind} has no format '{fmt}'; known: {known}")
        self.syntax = fmt
        return self.formats[fmt]

    # --- the format family's mechanics -----------------------------------------------------

    @abstractmethod
    def read_native(self, source: Source, field_map: FieldMap) -> Iterator[NativeRecord]:
        """Native records in file order, numbered from 1; a broken file raises PartnerInputError."""

    @abstractmethod
    def write_native(self, documents: Iterable[dict[str, Any]], field_map: FieldMap, out: IO[str]) -> None:
        """Write native documents as one file of this format."""

    def extra_problems(self, native: Any, record: dict[str, Any]) -> list[MappingProblem]:
        """Format rules beyond the table (a partner module overrides this when it has any)."""
        return []

    def finish_native(self, document: dict[str, Any], record: Mapping[str, Any]) -> None:
        """Native values derived from the whole record (a partner module overrides this)."""
        return None

    # --- the verbs -------------------------------------------------------------------------

    def parse(self, source: Source, *, now: dt.datetime | None = None) -> Iterator[ParsedRecord]:
        """Canonical referrals from a native file, one per record, streaming, in file order."""
        return self._parse(source, self._map_for(source), _REFERRAL, now)

    def _map_for(self, source: Source) -> FieldMap:
        """The referral table for this file (a kind with several formats chooses by content)."""
        return self.referral_map

    def parse_statuses(
        self, source: Source, *, party: str | None = None, now: dt.datetime | None = None
    ) -> Iterator[ParsedRecord]:
        """Canonical status messages from a native status file written by ``party`` (the
        organisation answering: its ``from_party``; the file may leave it empty)."""
        return self._parse(source, self.status_map, _STATUS, now, own=party)

    def render(
        self,
        records: Iterable[Mapping[str, Any]],
        out: str | os.PathLike[str] | IO[str],
        *,
        name: str | None = None,
        fmt: str | None = None,
    ) -> Rendered:
        """Canonical referrals or recipient views as one native file (in folder ``out``, or to a
        stream), in ``fmt`` (one of ``formats``; None: the kind's own). Fields missing from a
        view are left out, never filled in."""
        suffix = self._choose(fmt)
        return self._render(records, out, name or f"referrals{suffix}", self.referral_map, shared_schema("referral"))

    def render_statuses(
        self,
        statuses: Iterable[Mapping[str, Any]],
        out: str | os.PathLike[str] | IO[str],
        *,
        name: str | None = None,
        fmt: str | None = None,
    ) -> Rendered:
        suffix = self._choose(fmt)
        return self._render(statuses, out, name or f"statuses{suffix}", self.status_map, shared_schema("status"))

    def to_native(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """One canonical referral or view as this format's native record."""
        typed = from_json_form(dict(record), shared_schema("referral"))
        document = self.referral_map.to_native(typed)[0]
        self.finish_native(document, typed)
        return document

    def status_to_native(self, status: Mapping[str, Any]) -> dict[str, Any]:
        """One canonical status message as this format's native status record."""
        return self.status_map.to_native(from_json_form(dict(status), shared_schema("status")))[0]

    def status_from_native(
        self, native: Mapping[str, Any], *, party: str | None = None, now: dt.datetime | None = None
    ) -> dict[str, Any]:
        """One native status record (from ``party``) as a valid canonical status;
        ValidationError lists what is wrong."""
        parsed = self._convert(NativeRecord(1, native), "<status>", self.status_map, _STATUS, now, own=party)
        if parsed.record is None:
            raise ValidationError(list(parsed.problems), f"{self.kind} status")
        return parsed.record

    def carried_paths(self) -> frozenset[str]:
        """Canonical field paths this format carries (derived ones included)."""
        paths = set(self.referral_map.carried_paths())
        if "concerns.type" in paths:
            paths.add("concern_types")
        return frozenset(paths)

    # --- shared conversion -----------------------------------------------------------------

    def _reconvert(self, source: Source, *, now: dt.datetime) -> Iterator[ParsedRecord]:
        """Referrals converted again without edge validation: only for a second pass over a file
        whose every record was validated by a first (``FileStream``)."""
        return self._parse(source, self._map_for(source), _REFERRAL, now, validate=False)

    def parse_some(
        self, source: Source, take: Callable[[int], bool], *, now: dt.datetime, validate: bool = True
    ) -> Iterator[ParsedRecord]:
        """The referrals whose record number ``take`` accepts, converted (and validated, unless
        this is a second pass over records a first one validated); the others are read but not
        converted. For one of several processes sharing a file's records (``producers.file_pool``)."""
        name = source_name(source)
        field_map = self._map_for(source)
        for native in self.read_native(source, field_map):
            if take(native.number):
                yield self._convert(native, name, field_map, _REFERRAL, now, validate=validate)

    def _parse(
        self,
        source: Source,
        field_map: FieldMap,
        contract: _Contract,
        now: dt.datetime | None,
        *,
        validate: bool = True,
        own: str | None = None,
    ) -> Iterator[ParsedRecord]:
        name = source_name(source)
        clock = now or dt.datetime.now(dt.UTC)
        for native in self.read_native(source, field_map):
            yield self._convert(native, name, field_map, contract, clock, validate=validate, own=own)

    def _convert(
        self,
        native: NativeRecord,
        name: str,
        field_map: FieldMap,
        contract: _Contract,
        now: dt.datetime | None,
        *,
        validate: bool = True,
        own: str | None = None,
    ) -> ParsedRecord:
        """``own``: the party the file speaks for (a status file's organisation); the
        partner kind itself by default (a referral's ``referrer.partner``)."""

        def reject(found: Iterable[MappingProblem | Problem]) -> ParsedRecord:
            problems = tuple(
                Problem(_label(p.native, p.canonical), p.reason, native.number)
                if isinstance(p, MappingProblem)
                else Problem(_label(field_map.native_label(p.path), p.path), p.reason, native.number)
                for p in found
            )
            return ParsedRecord(name, native.number, None, problems)

        if native.problems:
            return reject(native.problems)
        record, mapping_problems = field_map.to_canonical(native.document)
        own_path = contract.own_party_path
        own = own or self.kind
        claimed = get_canonical(record, own_path)
        if claimed is not None and claimed != own:
            # A file from one partner cannot speak for another (a re-imported file, say).
            label = field_map.native_label(own_path) or own_path
            mapping_problems.append(MappingProblem(label, own_path, f"must be empty or '{own}'"))
        _set(record, own_path, own)
        if contract is _REFERRAL:
            for path, value in self.defaults_when_absent.items():
                _set(record, path, copy.deepcopy(value), keep=True)
            mapping_problems.extend(self.extra_problems(native.document, record))
        contract.finish(record)
        _complete(record, contract.expanded())
        failed = {p.canonical for p in mapping_problems if p.canonical}
        problems: list[MappingProblem | Problem] = list(mapping_problems)
        if validate:
            problems.extend(
                _with_allowed_values(p, contract)
                for p in contract.validate(record, now=now, record_number=native.number)
                if not any(p.path == f or p.path.startswith((f"{f}.", f"{f}[")) for f in failed)
            )
        return reject(problems) if problems else ParsedRecord(name, native.number, record)

    def _render(
        self,
        records: Iterable[Mapping[str, Any]],
        out: str | os.PathLike[str] | IO[str],
        file_name: str,
        field_map: FieldMap,
        schema: dict[str, Any],
    ) -> Rendered:
        carried = self.carried_paths() if field_map is self.referral_map else field_map.carried_paths()
        not_carried: set[str] = set()
        count = 0

        def documents() -> Iterator[dict[str, Any]]:
            nonlocal count
            for record in records:
                typed = from_json_form(dict(record), schema)
                document, overflow = field_map.to_native(typed)
                if field_map is self.referral_map:
                    self.finish_native(document, typed)
                not_carried.update(
                    path
                    for path in canonical_leaf_paths(typed)
                    if path not in carried and not any(path.startswith(f"{c}.") for c in carried)
                )
                not_carried.update(overflow)
                count += 1
                yield document

        path = write_text(out, file_name, lambda handle: self.write_native(documents(), field_map, handle))
        return Rendered(path, count, frozenset(not_carried))


_INDEX = re.compile(r"\[[^\]]*\]")


def _with_allowed_values(problem: Problem, contract: _Contract) -> Problem:
    """An enum problem with the symbols the field allows, so the message says what would do."""
    if problem.reason != "not one of the allowed values":
        return problem
    symbols = enum_symbols(contract.schema).get(_INDEX.sub("", problem.path))
    if not symbols:
        return problem
    return Problem(problem.path, f"not one of the allowed values: {', '.join(symbols)}", problem.record)


@functools.cache
def enum_symbols(schema: Callable[[], dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    """Canonical path (no indexes) -> the symbols of the enum there, for every enum field."""
    found: dict[str, tuple[str, ...]] = {}

    def walk(node: Any, path: str) -> None:
        node = without_null(node)
        if isinstance(node, dict) and node.get("type") == "enum":
            found[path] = tuple(node["symbols"])
        elif isinstance(node, dict) and node.get("type") == "array":
            walk(node["items"], path)
        elif isinstance(node, dict) and node.get("type") == "record":
            for item in node["fields"]:
                walk(item["type"], f"{path}.{item['name']}" if path else item["name"])

    walk(_expanded(schema), "")
    return found


def _set(record: dict[str, Any], path: str, value: Any, *, keep: bool = False) -> None:
    *parents, last = path.split(".")
    for part in parents:
        record = record.setdefault(part, {})
    if not (keep and record.get(last) is not None):
        record[last] = value


class CsvAdapter(PartnerAdapter):
    """A partner whose files are UTF-8 CSV with one record per row and the table's columns."""

    native_suffix = ".csv"
    # Accept columns beyond the table, ignored and named in a warning (a school MIS export).
    allow_extra_columns: ClassVar[bool] = False

    def read_native(self, source: Source, field_map: FieldMap) -> Iterator[NativeRecord]:
        warnings = self.warnings if self.allow_extra_columns else None
        rows = read_csv(source, field_map.columns(), warnings=warnings, optional=field_map.optional_columns())
        for number, row in rows:
            if isinstance(row, str):
                yield NativeRecord(number, None, (MappingProblem("<row>", "", row),))
            else:
                yield NativeRecord(number, {k: _restore_cell(v) for k, v in row.items()})

    def write_native(self, documents: Iterable[dict[str, Any]], field_map: FieldMap, out: IO[str]) -> None:
        writer = csv.DictWriter(out, fieldnames=field_map.columns(), restval="")
        writer.writeheader()
        for document in documents:
            writer.writerow({k: _neutralise_cell(v) for k, v in document.items()})


def _neutralise_cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _restore_cell(value: str) -> str:
    return value[1:] if value.startswith("'") and value[1:].startswith(_FORMULA_START) else value


class JsonAdapter(PartnerAdapter):
    """A partner whose files are one JSON object (one record) or an array of objects."""

    native_suffix = ".json"
    # Reject keys the table does not know: a misspelt key would otherwise lose its data silently.
    strict_keys: ClassVar[bool] = True

    def read_native(self, source: Source, field_map: FieldMap) -> Iterator[NativeRecord]:
        name = source_name(source)
        found = sniff(source)
        if found == "xml":
            raise PartnerInputError(
                f"{name}: the file is XML, but {self.kind} files are JSON (see adapters/FORMATS.md)"
            )
        if found == "text":
            raise PartnerInputError(
                f"{name}: the file is not JSON (it starts with neither {{ nor [), but {self.kind} files "
                "are JSON (see adapters/FORMATS.md)"
            )
        for item in iter_json(source):
            if item.number == 0:
                continue
            problems = [
                MappingProblem(
                    shown_path(path), "", "the key appears more than once in its object; keep one"
                )
                for path in item.duplicates
            ]
            if not isinstance(item.value, dict):
                found = json_kind(item.value)
                problems.append(MappingProblem("<record>", "", f"expected a JSON object ({{...}}), found {found}"))
            elif self.strict_keys:
                problems.extend(key_problems(item.value, field_map))
            yield NativeRecord(item.number, item.value if isinstance(item.value, dict) else None, tuple(problems))

    def write_native(self, documents: Iterable[dict[str, Any]], field_map: FieldMap, out: IO[str]) -> None:
        json.dump(list(documents), out, indent=2, ensure_ascii=False)
        out.write("\n")


def json_kind(value: Any) -> str:
    """What a JSON value is, in words, for messages (never the value itself)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "true/false"
    if value is None:
        return "null"
    return "a number"


def shown_key(key: Any) -> str:
    """A key as it may appear in a message: a short name, else ``<unnamed>`` (a key can hold data)."""
    return str(key) if _SAFE_KEY.match(str(key)) else "<unnamed>"


def shown_path(path: str) -> str:
    return ".".join(
        shown_key(part.partition("[")[0]) + (f"[{part.partition('[')[2]}" if "[" in part else "")
        for part in path.split(".")
    )


def _known_paths(field_map: FieldMap) -> set[str]:
    known: set[str] = set()
    for entry in field_map.entries:
        if isinstance(entry, Items):
            known.update(
                f"{entry.native}[].{f.native}" if f.native else f"{entry.native}[]" for f in entry.fields
            )
            known.add(f"{entry.native}[]")
        else:
            known.add(entry.native)
    return known


def key_problems(document: dict[str, Any], field_map: FieldMap) -> list[MappingProblem]:
    """Keys the table does not know (with a hint for a hyphenated one), and a list where the
    table has an object or the other way round."""
    known = _known_paths(field_map)
    objects = {path[:i] for path in known for i in range(len(path)) if path[i] == "."}
    lists = {path[:i] for path in known for i in range(len(path)) if path[i] == "["}
    found: list[MappingProblem] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, f"{path}[]")
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            shown = f"{path}.{shown_key(key)}" if path else shown_key(key)
            if child in known:
                continue
            if child in lists:
                if isinstance(value, list):
                    walk(value, child)
                else:
                    found.append(MappingProblem(shown, "", f"expected a list ([...]), found {json_kind(value)}"))
            elif child in objects:
                if isinstance(value, dict):
                    walk(value, child)
                else:
                    found.append(MappingProblem(shown, "", f"expected an object ({{...}}), found {json_kind(value)}"))
            else:
                fixed = child.replace("-", "_").replace(" ", "_")
                hint = (
                    f' (did you mean "{fixed.rpartition(".")[2]}"?)'
                    if fixed != child and (fixed in known or fixed in lists or fixed in objects)
                    else ""
                )
                found.append(MappingProblem(shown, "", f"unknown field{hint}"))

    walk(document, "")
    return found


# --- the registry -------------------------------------------------------------------------------

_ADAPTERS: dict[str, type[PartnerAdapter]] = {}


def register(cls: type[PartnerAdapter]) -> type[PartnerAdapter]:
    """Class decorator: make an adapter reachable by its partner kind."""
    if cls.kind in _ADAPTERS:
        raise ConfigError(f"two adapters for partner kind '{cls.kind}'")
    _ADAPTERS[cls.kind] = cls
    return cls


def adapter_kinds() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(kind: str) -> PartnerAdapter:
    try:
        return _ADAPTERS[kind]()
    except KeyError:
        raise ConfigError(
            f"no adapter for partner kind '{kind}'; known: {', '.join(adapter_kinds())}"
        ) from None
