"""The shipped Avro schemas, their fingerprints, and the field paths and data classes in them.

Every ``.avsc`` file in this folder is named ``<family>.v<N>.avsc`` and is kept forever: a
message written with any historical version must stay readable, so the fingerprint -> writer
schema lookup covers all of them (plus any schema registered at run time, such as a view).

Field paths are dotted from the record root (``child.date_of_birth``); arrays are transparent
(``household.given_name``). Each field's ``data_class`` tag is what the policy and the sealing
code read; this module never looks at a value.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, overload

from fastavro import parse_schema
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form

from referral_broker.errors import ContractError, Problem

SCHEMA_DIR = Path(__file__).resolve().parent
FAMILIES = ("referral", "status", "audit_decision", "audit_checkpoint", "audit_access", "audit_admin")
# Least to most sensitive: a record-typed field carries the most sensitive class inside it.
DATA_CLASSES = ("operational", "personal", "identifier", "special_category")
FINGERPRINT_SIZE = 8
# Avro single-object encoding: these two bytes, the 8-byte fingerprint, the body.
SINGLE_OBJECT_MAGIC = b"\xc3\x01"

_FILE_NAME = re.compile(r"^(?P<family>[a-z_]+)\.v(?P<version>[1-9][0-9]*)\.avsc$")
_NAMED = ("record", "enum", "fixed")
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}

Schema = dict[str, Any]


@dataclass(frozen=True)
class SchemaVersion:
    """One shipped schema file: its family, version number, JSON and fingerprint."""

    family: str
    version: int
    path: Path
    schema: Schema = field(repr=False)
    fingerprint: bytes

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()


def canonical_form(schema: Any) -> str:
    """Avro Parsing Canonical Form: what the fingerprint is computed over (docs/tags excluded)."""
    return to_parsing_canonical_form(schema)


def fingerprint(schema: Any) -> bytes:
    """The 8-byte CRC-64-AVRO fingerprint, byte order as in Avro single-object encoding."""
    return bytes.fromhex(_fastavro_fingerprint(canonical_form(schema), "CRC-64-AVRO"))


@cache
def shipped_versions() -> tuple[SchemaVersion, ...]:
    """Every ``.avsc`` file in this folder, ordered by family then version."""
    found: list[SchemaVersion] = []
    for path in sorted(SCHEMA_DIR.glob("*.avsc")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise ContractError(f"schema file {path.name}: name must be <family>.v<N>.avsc")
        try:
            schema = json.loads(path.read_text("utf-8"))
        except json.JSONDecodeError as exc:
            raise ContractError(f"schema file {path.name}: not valid JSON ({exc.msg})") from exc
        found.append(SchemaVersion(match["family"], int(match["version"]), path, schema, fingerprint(schema)))
    found.sort(key=lambda v: (v.family, v.version))
    return tuple(found)


def versions_of(family: str) -> list[SchemaVersion]:
    """All shipped versions of one family, oldest first."""
    versions = [v for v in shipped_versions() if v.family == family]
    if not versions:
        raise ContractError(f"no shipped schema for family '{family}'; known: {', '.join(FAMILIES)}")
    return versions


def load_schema(family: str = "referral", version: int | None = None) -> Schema:
    """A fresh copy of a shipped schema (the latest version unless one is named)."""
    versions = versions_of(family)
    if version is None:
        return copy.deepcopy(versions[-1].schema)
    for candidate in versions:
        if candidate.version == version:
            return copy.deepcopy(candidate.schema)
    raise ContractError(f"no version {version} of schema family '{family}'")


@cache
def shared_schema(family: str = "referral", version: int | None = None) -> Schema:
    """One copy of a shipped schema for the whole process, for work done per record or per
    message: validation, sealing plans, the codec and the union hints cache what they compile
    by schema *object*, so a fresh :func:`load_schema` copy per record is copied, compiled and
    cached again each time (0.4-2 ms). Never change it; build a new dict instead."""
    return load_schema(family, version)


def referral_schema(version: int | None = None) -> Schema:
    """The canonical Referral schema (latest unless a version is named)."""
    return load_schema("referral", version)


def status_schema(version: int | None = None) -> Schema:
    return load_schema("status", version)


def audit_decision_schema(version: int | None = None) -> Schema:
    return load_schema("audit_decision", version)


# --- fingerprint -> writer schema ------------------------------------------------------------


class WriterSchemas:
    """Fingerprint -> writer schema over every shipped version plus schemas registered later.

    Views and sealed wire schemas are derived at run time; a producer registers the schema it
    writes with so any reader in the same process can resolve it. Parsed forms are cached
    because ``parse_schema`` costs far more than a decode.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._schemas: dict[bytes, Schema] = {}
        self._parsed: dict[bytes, Any] = {}
        for version in shipped_versions():
            self._schemas[version.fingerprint] = version.schema

    def register(self, schema: Schema) -> bytes:
        """Make ``schema`` resolvable by its fingerprint; returns the fingerprint."""
        key = fingerprint(schema)
        with self._lock:
            self._schemas.setdefault(key, copy.deepcopy(schema))
        return key

    def schema(self, key: bytes) -> Schema:
        try:
            return self._schemas[key]
        except KeyError:
            raise ContractError(f"unknown writer schema fingerprint {key.hex()}") from None

    def parsed(self, key: bytes) -> Any:
        """The fastavro-parsed schema for a fingerprint, parsed once.

        Parsed with fastavro's default write hint: without it every write re-parses the schema.
        """
        found = self._parsed.get(key)
        if found is None:
            found = parse_schema(self.schema(key))
            with self._lock:
                self._parsed[key] = found
        return found

    def __contains__(self, key: object) -> bool:
        return key in self._schemas


@cache
def writer_schemas() -> WriterSchemas:
    """The process-wide lookup the codec uses."""
    return WriterSchemas()


def writer_schema(key: bytes) -> Schema:
    """The writer schema with this 8-byte fingerprint (any shipped version or a registered one)."""
    return writer_schemas().schema(key)


def register_writer_schema(schema: Schema) -> bytes:
    return writer_schemas().register(schema)


# --- walking fields --------------------------------------------------------------------------


def full_name(name: str, namespace: str | None) -> str:
    """A named type's full name: dotted names are already full, others take the namespace."""
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


def named_types(schema: Schema) -> dict[str, Schema]:
    """Every named type defined in ``schema`` by full name, so references can be followed."""
    found: dict[str, Schema] = {}

    def visit(node: Any, namespace: str | None) -> None:
        if isinstance(node, list):
            for branch in node:
                visit(branch, namespace)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind in _NAMED:
                own_ns = node.get("namespace", namespace)
                full = full_name(node["name"], own_ns)
                found[full] = node
                namespace = full.rpartition(".")[0] or None
                for item in node.get("fields", []):
                    visit(item["type"], namespace)
            elif kind == "array":
                visit(node["items"], namespace)
            elif kind == "map":
                visit(node["values"], namespace)
            elif isinstance(kind, dict | list):
                visit(kind, namespace)

    visit(schema, None)
    return found


def resolve_type(node: Any, names: dict[str, Schema], namespace: str | None) -> Any:
    """Follow a by-name reference to its definition; other nodes come back unchanged."""
    if isinstance(node, str) and node not in _PRIMITIVES:
        return names.get(full_name(node, namespace)) or names[node]
    if isinstance(node, dict) and isinstance(node.get("type"), str) and node["type"] not in _NAMED:
        inner = node["type"]
        if inner not in _PRIMITIVES and inner not in ("array", "map"):
            return resolve_type(inner, names, namespace)
    return node


def without_null(node: Any) -> Any:
    """The single non-null branch of an optional union; other types unchanged."""
    if isinstance(node, list):
        branches = [b for b in node if b != "null"]
        if len(branches) == 1:
            return branches[0]
    return node


@dataclass(frozen=True)
class FieldInfo:
    """One field at one path: its declaration and its type with null and references removed."""

    path: str
    field: Schema
    type: Any
    namespace: str | None
    in_array: bool

    @property
    def data_class(self) -> str | None:
        return self.field.get("data_class")

    @property
    def kind(self) -> str:
        """'record', 'array', 'map', 'enum', 'fixed' or the primitive name."""
        node = self.type
        if isinstance(node, dict):
            return node["type"] if isinstance(node["type"], str) else "union"
        if isinstance(node, list):
            return "union"
        return node

    @property
    def optional(self) -> bool:
        declared = self.field["type"]
        return isinstance(declared, list) and "null" in declared


def walk_fields(schema: Schema) -> Iterator[FieldInfo]:
    """Every field at every depth, parents before children; arrays (and maps) are transparent."""
    names = named_types(schema)

    def record_of(node: Any, namespace: str | None) -> tuple[Schema | None, str | None, bool]:
        """The record under ``node`` (through null unions, arrays and maps), if any."""
        in_array = False
        while True:
            node = resolve_type(without_null(node), names, namespace)
            if isinstance(node, dict) and node.get("type") == "array":
                node, in_array = node["items"], True
            elif isinstance(node, dict) and node.get("type") == "map":
                node, in_array = node["values"], True
            else:
                break
        if isinstance(node, dict) and node.get("type") == "record":
            full = full_name(node["name"], node.get("namespace", namespace))
            return node, full.rpartition(".")[0] or None, in_array
        return None, namespace, in_array

    def visit(record: Schema, namespace: str | None, prefix: str, in_array: bool) -> Iterator[FieldInfo]:
        for item in record["fields"]:
            path = f"{prefix}{item['name']}"
            resolved = resolve_type(without_null(item["type"]), names, namespace)
            yield FieldInfo(path, item, resolved, namespace, in_array)
            child, child_ns, through_array = record_of(item["type"], namespace)
            if child is not None:
                yield from visit(child, child_ns, f"{path}.", in_array or through_array)

    root_ns = schema.get("namespace") or (schema["name"].rpartition(".")[0] or None)
    yield from visit(schema, root_ns, "", False)


def field_paths(schema: Schema) -> list[str]:
    """Every field path, records and leaves, in schema order."""
    return [info.path for info in walk_fields(schema)]


def field_classes(schema: Schema) -> dict[str, str]:
    """Path -> data class for every field (record-typed fields too)."""
    return {info.path: info.data_class or "" for info in walk_fields(schema)}


def field_action(data_class: str | None, declared_type: Any) -> str:
    """The sealing-unit rule, the one place it is written (ARCHITECTURE.md).

    ``declared_type`` is the field's type with named references resolved. A field whose type,
    after removing ``null`` from a union, is a record is descended into (``"record"``); else an
    ``operational`` field stays clear (``"clear"``); anything else is one sealed unit
    (``"seal"``): an array or map whole, so nothing under it is a unit of its own.
    """
    branches = declared_type if isinstance(declared_type, list) else [declared_type]
    non_null = [b for b in branches if b != "null"]
    if len(non_null) == 1 and isinstance(non_null[0], dict) and non_null[0].get("type") == "record":
        return "record"
    return "clear" if data_class == "operational" else "seal"


def sealing_units(schema: Schema) -> list[str]:
    """Paths sealed as one ciphertext each, by :func:`field_action`, in schema order."""
    units: list[str] = []
    sealed_whole: list[str] = []
    for info in walk_fields(schema):
        if any(info.path.startswith(f"{outer}.") for outer in sealed_whole):
            continue
        if field_action(info.data_class, info.type) != "seal":
            continue
        units.append(info.path)
        sealed_whole.append(info.path)
    return units


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A record's values by dotted field path (the project's path convention); nested records
    are looked into, arrays stay whole (a household shows member by member)."""
    out: dict[str, Any] = {}
    for name, item in record.items():
        path = f"{prefix}{name}"
        if isinstance(item, Mapping):
            out.update(flatten(item, f"{path}."))
        else:
            out[path] = item
    return out


def check_schema(schema: Schema) -> list[Problem]:
    """Contract rules every shipped schema obeys; an empty list means the schema passes.

    Every field has a ``doc`` and a known ``data_class``; a record, array or map field is
    classed at least as high as anything inside it (so a policy reading the parent class never
    under-protects); each record type is used at one path only (views project per path).
    """
    problems: list[Problem] = []
    try:
        parse_schema(copy.deepcopy(schema), _write_hint=False)
    except Exception as exc:  # fastavro raises several unrelated types for a bad schema
        return [Problem("<schema>", f"not a valid Avro schema ({type(exc).__name__})")]
    infos = list(walk_fields(schema))
    by_path = {info.path: info for info in infos}
    names = named_types(schema)
    record_sites: dict[int, str] = {}
    for info in infos:
        if not str(info.field.get("doc", "")).strip():
            problems.append(Problem(info.path, "field has no doc"))
        if info.data_class is None:
            problems.append(Problem(info.path, "field has no data_class tag"))
        elif info.data_class not in DATA_CLASSES:
            problems.append(Problem(info.path, f"unknown data_class; use one of {', '.join(DATA_CLASSES)}"))
    for info in infos:
        parent_path = info.path.rpartition(".")[0]
        parent = by_path.get(parent_path)
        if parent is None or parent.data_class not in DATA_CLASSES or info.data_class not in DATA_CLASSES:
            continue
        if DATA_CLASSES.index(info.data_class) > DATA_CLASSES.index(parent.data_class):
            problems.append(
                Problem(parent_path, f"data_class is lower than its field '{info.field['name']}' inside it")
            )
    for info in infos:
        node = info.type
        while isinstance(node, dict) and node.get("type") in ("array", "map"):
            node = resolve_type(without_null(node.get("items", node.get("values"))), names, info.namespace)
        if isinstance(node, dict) and node.get("type") == "record":
            site = record_sites.setdefault(id(node), info.path)
            if site != info.path:
                problems.append(
                    Problem(info.path, f"record type is also used at '{site}'; define one per path")
                )
    return problems


def ensure_schema(schema: Schema, label: str = "schema") -> None:
    """Raise ContractError listing every rule ``schema`` breaks."""
    problems = check_schema(schema)
    if problems:
        shown = "; ".join(str(p) for p in problems[:10])
        raise ContractError(f"{label} breaks the schema rules: {shown}")


def expand_references(schema: Schema) -> Schema:
    """A deep copy of ``schema`` with every by-name reference replaced by its definition.

    The result is not a valid Avro schema on its own (a name may now be defined twice); it is a
    tree to cut and reassemble, as views do, before ``define_names_once`` makes it valid again.
    """
    names = named_types(schema)

    def expand(node: Any, namespace: str | None) -> Any:
        if isinstance(node, str):
            if node in _PRIMITIVES:
                return node
            return expand(resolve_type(node, names, namespace), namespace)
        if isinstance(node, list):
            return [expand(branch, namespace) for branch in node]
        node = dict(node)
        kind = node.get("type")
        if kind in _NAMED:
            full = full_name(node["name"], node.get("namespace", namespace))
            node.pop("namespace", None)
            node["name"] = full
            inner_ns = full.rpartition(".")[0] or None
            if kind == "record":
                node["fields"] = [{**item, "type": expand(item["type"], inner_ns)} for item in node["fields"]]
        elif kind == "array":
            node["items"] = expand(node["items"], namespace)
        elif kind == "map":
            node["values"] = expand(node["values"], namespace)
        elif isinstance(kind, dict | list) or (isinstance(kind, str) and kind not in _PRIMITIVES):
            return expand(kind, namespace)
        return node

    return expand(schema, None)


@overload
def define_names_once(expanded: Schema) -> Schema: ...
@overload
def define_names_once(expanded: list[Any]) -> list[Any]: ...
def define_names_once(expanded: Schema | list[Any]) -> Schema | list[Any]:
    """Turn an expanded tree back into a valid schema: the first use of a name defines it, later
    uses refer to it by full name. Two different definitions under one name are an error."""
    seen: dict[str, str] = {}

    def collapse(node: Any) -> Any:
        if isinstance(node, list):
            return [collapse(branch) for branch in node]
        if not isinstance(node, dict):
            return node
        kind = node.get("type")
        if kind in _NAMED:
            name = node["name"]
            shape = json.dumps(node, sort_keys=True)
            if name in seen:
                if seen[name] != shape:
                    raise ContractError(f"named type {name} would have two different shapes")
                return name
            seen[name] = shape
            if kind == "record":
                return {
                    **node,
                    "fields": [{**item, "type": collapse(item["type"])} for item in node["fields"]],
                }
            return node
        if kind == "array":
            return {**node, "items": collapse(node["items"])}
        if kind == "map":
            return {**node, "values": collapse(node["values"])}
        return node

    collapsed: Schema | list[Any] = collapse(expanded)
    return collapsed


def field_schema(schema: Schema, path: str) -> Any:
    """The standalone Avro schema of one field's value (named references inlined).

    This is what a sealed field's plaintext is encoded with: ``codec.encode_body(value,
    field_schema(schema, "household"))``.
    """
    expanded = expand_references(schema)
    node: Any = expanded
    for part in path.split("."):
        record = without_null(node)
        while isinstance(record, dict) and record.get("type") in ("array", "map"):
            record = without_null(record.get("items", record.get("values")))
        if not (isinstance(record, dict) and record.get("type") == "record"):
            raise ContractError(f"unknown field path '{path}'")
        match = [item for item in record["fields"] if item["name"] == part]
        if not match:
            raise ContractError(f"unknown field path '{path}'")
        node = match[0]["type"]
    return define_names_once(node) if isinstance(node, dict | list) else node
