"""Record-level sealing: which fields of a schema are sealed, the wire schema, seal and open.

Given any Avro record schema whose fields carry ``data_class`` (``operational``, ``personal``,
``identifier``, ``special_category``), a :class:`SealingPlan` says, once per schema:

* a **sealing unit** is a field whose class is not ``operational`` and whose type, after
  removing ``null`` from a union, is not a record. Its whole value (an array or a map too) is
  sealed as one :mod:`~referral_broker.sealing.fields` value;
* record-typed fields (and ``["null", Record]``) are descended into, whatever their class;
* ``operational`` fields stay clear, so routing and operations work without keys, but an
  operational array, map or union that hides a non-operational field inside a record is a
  contract error, never sent in the clear.

The **wire schema** is the same schema with every sealing unit's type replaced by ``bytes``
(``["null", "bytes"]`` with default null where the field was nullable with default null, so
that the wire schemas evolve as the schemas do). The writer always writes sealed bytes there,
a null included, so on the wire a reader cannot even tell whether an optional field was set;
a null (or anything that is not a sealed value) in a sealing unit is refused as unsealed.
A message value is the wire record in Avro single-object encoding (``C3 01``, the wire
schema's fingerprint, the body), so a value written under any other wire schema is refused.

That wire schema is sealed formats 1 and 2's (one sealed value per field, still opened). Sealed
format 3 (written today) seals one value per data class under a wire schema of its own, derived
by :class:`~referral_broker.sealing.classes.ClassLayout` (``SealingPlan.layout``).

This module must never put a field value in an exception or a log line, and must never return
a partly opened record: :meth:`SealingPlan.open` returns every field opened or raises.
"""

from __future__ import annotations

import copy
import io
import json
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NoReturn, cast

from fastavro import parse_schema, schemaless_reader
from fastavro.schema import expand_schema

from referral_broker.errors import ContractError, TamperedError
from referral_broker.schemas import union_branches
from referral_broker.schemas.registry import (
    DATA_CLASSES,
    SINGLE_OBJECT_MAGIC,
    Schema,
    field_action,
    fingerprint,
)
from referral_broker.sealing.classes import SEALED_FIELD, ClassBytes, ClassLayout
from referral_broker.sealing.fields import (
    DataKey,
    FieldCodec,
    FieldContext,
    MessageCipher,
    message_aad_prefix,
    open_value,
)
from referral_broker.sealing.framing import frame, unframe

_NAMED = ("record", "enum", "fixed")
_MISSING = object()


def _branches(field_type: Any) -> list[Any]:
    return list(field_type) if isinstance(field_type, list) else [field_type]


def _is_record(t: Any) -> bool:
    return isinstance(t, dict) and t.get("type") == "record"


def _collapse(t: Any, seen: set[str]) -> Any:
    """Re-share named types in an expanded schema: the first occurrence keeps its definition,
    later ones become a reference by full name (fastavro refuses a type defined twice)."""
    if isinstance(t, list):
        return [_collapse(b, seen) for b in t]
    if not isinstance(t, dict):
        return t
    kind = t.get("type")
    if kind in _NAMED:
        name = t["name"]
        if name in seen:
            return name
        seen.add(name)
        if kind == "record":
            out = dict(t)
            out["fields"] = [{**f, "type": _collapse(f["type"], seen)} for f in t["fields"]]
            return out
        return t
    if kind == "array":
        return {**t, "items": _collapse(t["items"], seen)}
    if kind == "map":
        return {**t, "values": _collapse(t["values"], seen)}
    return t


def _hidden_sensitive(t: Any, path: str) -> str | None:
    """The path of a non-operational field hidden inside a clear (operational) type, if any."""
    for branch in _branches(t):
        if not isinstance(branch, dict):
            continue
        kind = branch.get("type")
        if kind == "record":
            for f in branch["fields"]:
                sub = f"{path}.{f['name']}"
                if f.get("data_class", "operational") != "operational":
                    return sub
                found = _hidden_sensitive(f["type"], sub)
                if found:
                    return found
        elif kind == "array":
            found = _hidden_sensitive(branch["items"], path)
            if found:
                return found
        elif kind == "map":
            found = _hidden_sensitive(branch["values"], path)
            if found:
                return found
    return None


@dataclass(frozen=True)
class _FieldPlan:
    name: str
    path: str
    action: str  # "clear" | "seal" | "record"
    default: Any
    nullable: bool
    codec: FieldCodec | None = None
    child: tuple[_FieldPlan, ...] = ()
    data_class: str = "operational"
    avro_type: Any = None  # the field's expanded type (named types defined inline)


class SealingPlan:
    """What to seal in records of one schema, and how to turn them into wire records and back.

    Build with :func:`sealing_plan` (cached per schema). Thread-safe: it holds no mutable state.
    """

    def __init__(self, schema: Schema) -> None:
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise ContractError("a sealing plan needs an Avro record schema")
        self.schema = schema
        self.fingerprint = fingerprint(schema)
        try:
            # a record schema expands to a record schema (fastavro types any schema form)
            expanded = cast(Schema, expand_schema(copy.deepcopy(schema)))
        except Exception as exc:
            raise ContractError(f"schema {schema.get('name')}: not a valid Avro schema ({exc})") from exc
        units: list[str] = []
        self._fields, self.wire_schema = self._plan_record(expanded, "", units, set())
        self.units = tuple(units)
        self.wire_fingerprint = fingerprint(self.wire_schema)
        self._wire_header = SINGLE_OBJECT_MAGIC + self.wire_fingerprint
        try:
            self._wire_parsed = parse_schema(copy.deepcopy(self.wire_schema), named_schemas={})
        except Exception as exc:
            raise ContractError(
                f"schema {schema.get('name')}: cannot derive its wire schema ({exc})"
            ) from exc

    def _plan_record(
        self, record: Schema, prefix: str, units: list[str], seen: set[str]
    ) -> tuple[tuple[_FieldPlan, ...], Schema | str]:
        """The field plans of one record occurrence (paths differ per occurrence) and its wire
        type: the full definition the first time the named record appears, else its name."""
        first = record["name"] not in seen
        seen.add(record["name"])
        plans: list[_FieldPlan] = []
        wire_fields: list[dict[str, Any]] = []
        for f in record["fields"]:
            path = f"{prefix}{f['name']}"
            data_class = f.get("data_class")
            if data_class not in DATA_CLASSES:
                raise ContractError(
                    f"field {path}: data_class must be one of {', '.join(DATA_CLASSES)} (found {data_class!r})"
                )
            branches = _branches(f["type"])
            non_null = [b for b in branches if b != "null"]
            nullable = len(non_null) < len(branches)
            default = f.get("default", _MISSING)
            wire = {k: v for k, v in f.items() if k != "type"}
            action = field_action(data_class, f["type"])
            if action == "record":
                child, child_wire = self._plan_record(non_null[0], f"{path}.", units, seen)
                plans.append(
                    _FieldPlan(
                        f["name"], path, "record", default, nullable, child=child, data_class=data_class, avro_type=f["type"]
                    )
                )
                wire_branches = [child_wire if _is_record(b) else b for b in branches]
                wire["type"] = wire_branches if isinstance(f["type"], list) else wire_branches[0]
            elif action == "clear":
                hidden = _hidden_sensitive(f["type"], path)
                if hidden:
                    raise ContractError(
                        f"field {path} is operational (sent in the clear) but contains the "
                        f"non-operational field {hidden}; tag it with the most sensitive class inside"
                    )
                # its own codec too: the clear fields are digested one by one (clear_projection)
                codec = FieldCodec(path, _collapse(f["type"], set()))
                plans.append(
                    _FieldPlan(f["name"], path, "clear", default, nullable, codec, avro_type=f["type"])
                )
                wire["type"] = _collapse(f["type"], seen)
            else:
                codec = FieldCodec(path, _collapse(f["type"], set()))
                units.append(path)
                plans.append(
                    _FieldPlan(
                        f["name"], path, "seal", default, nullable, codec, data_class=data_class, avro_type=f["type"]
                    )
                )
                wire.pop("default", None)
                if nullable and default is None:
                    wire["type"], wire["default"] = ["null", "bytes"], None
                else:
                    wire["type"] = "bytes"
                wire["sealed"] = True
            wire_fields.append(wire)
        wire_record: Schema | str = record["name"]
        if first:
            wire_record = {k: v for k, v in record.items() if k != "fields"} | {"fields": wire_fields}
        return tuple(plans), wire_record

    # -- records ------------------------------------------------------------------------------
    def seal(self, record: dict[str, Any], key: DataKey, context: FieldContext) -> dict[str, Any]:
        """The wire record: every sealing unit replaced by its sealed bytes for ``context``."""
        return self._seal(self._fields, record, MessageCipher(key, context))

    def _seal(self, plans: tuple[_FieldPlan, ...], record: Any, cipher: MessageCipher) -> dict[str, Any]:
        if not isinstance(record, dict):
            raise ContractError(f"record at {plans[0].path.rpartition('.')[0] or 'root'}: expected a record")
        out: dict[str, Any] = {}
        for p in plans:
            value = record.get(p.name, p.default)
            if value is _MISSING:
                raise ContractError(f"field {p.path}: missing and has no default")
            if p.action == "seal":
                assert p.codec is not None
                out[p.name] = cipher.seal(value, p.codec)
            elif p.action == "record":
                out[p.name] = None if value is None and p.nullable else self._seal(p.child, value, cipher)
            else:
                out[p.name] = value
        return out

    def open(self, wire: dict[str, Any], key: DataKey, context: FieldContext) -> dict[str, Any]:
        """The plaintext record, every sealing unit opened; raises on the first failure."""
        return self._open(self._fields, wire, key, context, message_aad_prefix(context, key))

    def _open(
        self, plans: tuple[_FieldPlan, ...], wire: Any, key: DataKey, context: FieldContext, prefix: bytes
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in plans:
            value = wire.get(p.name)
            if p.action == "seal":
                assert p.codec is not None
                if not isinstance(value, bytes):
                    raise TamperedError(f"field {p.path}: arrived unsealed")
                out[p.name] = open_value(value, p.codec, key, context, aad_prefix=prefix)
            elif p.action == "record":
                out[p.name] = (
                    None if value is None and p.nullable else self._open(p.child, value, key, context, prefix)
                )
            else:
                out[p.name] = value
        return out

    # -- sealed format 3: one AEAD per data class ---------------------------------------------
    @cached_property
    def layout(self) -> ClassLayout:
        """The format-3 derived schemas (:mod:`~referral_broker.sealing.classes`)."""
        return ClassLayout(self._fields, str(self.schema.get("name")))

    def clear_bytes(self, record: dict[str, Any], reuse: ClassBytes | None = None) -> bytes:
        """A format-3 message's clear projection of ``record`` (its clear fields in Avro;
        ``reuse``: see :meth:`ClassLayout.projection`)."""
        try:
            return self.layout.projection(record, reuse)
        except Exception:
            self._refuse(record)

    def seal_classes(
        self,
        record: dict[str, Any],
        projection: bytes,
        key: DataKey,
        context: FieldContext,
        reuse: ClassBytes | None = None,
    ) -> bytes:
        """The format-3 message value of ``record`` for ``context`` (bound to ``projection``;
        ``reuse``: see :meth:`ClassLayout.seal`)."""
        try:
            return self.layout.seal(record, projection, key, context, reuse)
        except Exception:
            self._refuse(record, context)

    def _refuse(self, record: dict[str, Any], context: FieldContext | None = None) -> NoReturn:
        """Raise the precise error for a record the format-3 encoding refused: the per-field
        walk names the field (fastavro's own messages may quote the value, so never those)."""
        self.clear_projection(record)
        if context is not None and context.binding is not None:
            self.seal(record, DataKey.generate(), context)
        raise ContractError(f"record does not match schema {self.schema.get('name')}")

    # -- clear fields (what a format-2 message's binding digests) ------------------------------
    def clear_projection(self, record: dict[str, Any]) -> bytes:
        """The canonical bytes of ``record``'s clear (operational) fields: in plan order, each
        clear field's Avro binary under its own type, and for each nested record that holds
        sealing units one byte, present (1, then its clear fields) or null (0); all framed.

        The same bytes come out of the plaintext record before sealing and out of the decoded
        wire record after, so the sealer and the opener digest the same thing. Nulling out a
        nested record of sealed fields is therefore a change of the clear fields too."""
        return frame(*self._items(self._fields, record, []))

    def _items(self, plans: tuple[_FieldPlan, ...], record: Any, out: list[bytes]) -> list[bytes]:
        if not isinstance(record, dict):
            raise ContractError(f"record at {plans[0].path.rpartition('.')[0] or 'root'}: expected a record")
        for p in plans:
            if p.action == "seal":
                continue
            value = record.get(p.name, p.default)
            if value is _MISSING:
                raise ContractError(f"field {p.path}: missing and has no default")
            if p.action == "record":
                if value is None and p.nullable:
                    out.append(b"\x00")
                else:
                    out.append(b"\x01")
                    self._items(p.child, value, out)
            else:
                assert p.codec is not None
                out.append(p.codec.encode(value))
        return out

    def changed_clear_fields(self, sealed_projection: bytes, arrived_projection: bytes, *, sealed_format: int = 2) -> list[str]:
        """The paths of the clear fields (and nested records) that differ between the
        projection a sender sealed and the one that arrived; names only, never values.
        ``sealed_format`` 3 projections are the clear schema's Avro, 2's are framed fields."""
        read = self.layout.clear_values if sealed_format == 3 else self._by_path
        try:
            before: dict[str, Any] = read(sealed_projection)
            after: dict[str, Any] = read(arrived_projection)
        except Exception:
            return []
        changed = [p for p in dict.fromkeys([*before, *after]) if before.get(p) != after.get(p)]
        # a record that appeared or went: name it, not every field inside it
        return [p for p in changed if not any(p.startswith(q + ".") for q in changed)]

    def _by_path(self, projection: bytes) -> dict[str, bytes]:
        parts = iter(unframe(projection, None, "clear-fields projection"))
        out: dict[str, bytes] = {}

        def walk(plans: tuple[_FieldPlan, ...]) -> None:
            for p in plans:
                if p.action == "seal":
                    continue
                out[p.path] = next(parts)
                if p.action == "record" and out[p.path] == b"\x01":
                    walk(p.child)

        walk(self._fields)
        if next(parts, None) is not None:
            raise ValueError("trailing parts")
        return out

    # -- wire bytes ---------------------------------------------------------------------------
    def encode_wire(self, wire: dict[str, Any]) -> bytes:
        """Single-object encoding of a wire record under the wire schema (the format-3 wire
        schema when ``wire`` holds the sealed classes, as :meth:`decode_wire` gives them)."""
        three = SEALED_FIELD in wire
        buf = io.BytesIO()
        buf.write(self.layout.wire_header if three else self._wire_header)
        try:
            union_branches.write(buf, self.layout.wire_parsed if three else self._wire_parsed, wire)
        except Exception:
            raise ContractError(
                f"record does not match schema {self.schema.get('name')} (an operational field has a wrong type)"
            ) from None
        return buf.getvalue()

    def wire_format(self, data: bytes) -> int | None:
        """Which of this schema's wire schemas ``data`` is written with: 2 (formats 1 and 2,
        one sealed value per field), 3 (one per data class), or None (neither)."""
        if data.startswith(self._wire_header):
            return 2
        return 3 if data.startswith(self.layout.wire_header) else None

    def decode_wire(self, data: bytes) -> dict[str, Any]:
        """The wire record of a message value; refuses another wire schema or trailing bytes.
        A format-3 value gives its clear fields and, under ``rb_sealed``, its sealed classes."""
        head = data[: len(self._wire_header)]
        if head[:2] != SINGLE_OBJECT_MAGIC:
            raise TamperedError("message value is not Avro single-object encoded")
        written = self.wire_format(data)
        if written == 3:
            clear, _, blobs = self.layout.decode(data)
            return {**clear, SEALED_FIELD: blobs}
        if written is None:
            raise TamperedError(
                f"message value is written with wire schema {head[2:].hex()}, expected "
                f"{self.wire_fingerprint.hex()} (derived from the schema named in rb-schema)"
            )
        buf = io.BytesIO(data)
        buf.seek(len(self._wire_header))
        try:
            wire = schemaless_reader(buf, self._wire_parsed, None)
        except Exception:
            raise TamperedError(
                f"message value does not decode under the wire schema of {self.schema.get('name')}"
            ) from None
        if buf.tell() != len(data):
            raise TamperedError("message value has trailing bytes after the record")
        if not isinstance(wire, dict):
            raise TamperedError("message value is not a record")
        return wire


_plans: dict[str, SealingPlan] = {}
# id(schema) -> (schema, plan): the entry keeps the dict alive, so its id cannot be reused.
_plans_by_id: dict[int, tuple[Schema, SealingPlan]] = {}
_plans_lock = threading.Lock()
_PLAN_CACHE_LIMIT = 256


def sealing_plan(schema: Schema) -> SealingPlan:
    """The plan for ``schema``, built once per distinct schema (tags and docs included).

    The same dict object is found by identity (hashing a 40 KB schema per message would cost
    more than sealing it); a different but equal dict by its JSON. Schemas are treated as
    immutable: build a new dict rather than changing one that was used.
    """
    found = _plans_by_id.get(id(schema))
    if found is not None and found[0] is schema:
        return found[1]
    ident = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    plan = _plans.get(ident)
    if plan is None:
        plan = SealingPlan(schema)
    with _plans_lock:
        if len(_plans) >= _PLAN_CACHE_LIMIT:
            _plans.clear()
            _plans_by_id.clear()
        plan = _plans.setdefault(ident, plan)
        _plans_by_id[id(schema)] = (schema, plan)
    return plan
