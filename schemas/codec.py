"""The wire format: Avro single-object encoding (``C3 01``, 8-byte fingerprint, Avro body).

The fingerprint in every message names the exact writer schema, so a reader resolves the body
against it and can read data written with any shipped version or a registered view. fastavro
has no single-object encoding of its own; the header is built here.

fastavro's error messages can quote the value that failed, so they are never passed on: a
failure becomes a ContractError naming the schema and the kind of failure, or, on encode, a
ValidationError listing the offending field paths.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from typing import Any, cast

from fastavro import parse_schema, schemaless_reader
from fastavro.schema import expand_schema

from referral_broker.errors import ContractError, ValidationError

from . import union_branches
from .registry import FINGERPRINT_SIZE, SINGLE_OBJECT_MAGIC, Schema, referral_schema, writer_schemas

HEADER_SIZE = len(SINGLE_OBJECT_MAGIC) + FINGERPRINT_SIZE


@dataclass(frozen=True)
class PreparedSchema:
    """A schema with its fingerprint and fastavro parse done once, for hot encode/decode loops."""

    schema: Schema = field(repr=False)
    fingerprint: bytes
    parsed: Any = field(repr=False)


_cache_lock = threading.Lock()
# id(schema) -> PreparedSchema; the entry keeps the dict alive, so its id cannot be reused.
_prepared_by_id: dict[int, PreparedSchema] = {}
_PREPARED_CACHE_LIMIT = 256


def prepare(schema: Schema | PreparedSchema) -> PreparedSchema:
    """Fingerprint, register and parse ``schema`` once; later calls with the same dict are free.

    Schemas are treated as immutable: a dict changed after it was first used keeps its old
    fingerprint here. Build a new dict instead.
    """
    if isinstance(schema, PreparedSchema):
        return schema
    found = _prepared_by_id.get(id(schema))
    if found is not None and found.schema is schema:
        return found
    key = writer_schemas().register(schema)
    prepared = PreparedSchema(schema, key, writer_schemas().parsed(key))
    with _cache_lock:
        if len(_prepared_by_id) >= _PREPARED_CACHE_LIMIT:
            _prepared_by_id.clear()
        _prepared_by_id[id(schema)] = prepared
    return prepared


_default_referral: PreparedSchema | None = None


def _referral() -> PreparedSchema:
    global _default_referral
    if _default_referral is None:
        _default_referral = prepare(referral_schema())
    return _default_referral


def encode(record: dict[str, Any], schema: Schema | PreparedSchema | None = None) -> bytes:
    """Single-object encoding of ``record`` (a Referral under the latest schema by default).

    This does not run the edge rules (check digits, dates): call ``validation.ensure_valid``
    where data enters. A record the schema cannot encode raises ValidationError with paths.
    """
    prepared = _referral() if schema is None else prepare(schema)
    out = io.BytesIO()
    out.write(SINGLE_OBJECT_MAGIC)
    out.write(prepared.fingerprint)
    try:
        union_branches.write(out, prepared.parsed, record)
    except Exception as exc:  # fastavro raises ValueError/TypeError/KeyError/... by value
        from .validation import check_against_schema

        problems = check_against_schema(record, prepared.schema)
        if problems:
            raise ValidationError(problems, "record for encoding") from None
        raise ContractError(
            f"cannot encode record with schema {prepared.fingerprint.hex()} ({type(exc).__name__})"
        ) from None
    return out.getvalue()


def writer_fingerprint(data: bytes) -> bytes:
    """The 8-byte writer fingerprint from a message header (checks the header only)."""
    if len(data) < HEADER_SIZE or data[: len(SINGLE_OBJECT_MAGIC)] != SINGLE_OBJECT_MAGIC:
        raise ContractError("not an Avro single-object message (missing C3 01 header)")
    return bytes(data[len(SINGLE_OBJECT_MAGIC) : HEADER_SIZE])


def decode(data: bytes, reader_schema: Schema | PreparedSchema | None = None) -> dict[str, Any]:
    """Read a single-object message with the writer schema its fingerprint names.

    With a ``reader_schema`` the body is resolved into it by Avro schema resolution (fields the
    reader lacks are dropped, missing ones take defaults): pass the latest ``referral_schema()``
    to read every historical version in today's shape, or a view schema to project. Without one
    the record comes back as written.
    """
    key = writer_fingerprint(data)
    schemas = writer_schemas()
    if key not in schemas:
        raise ContractError(f"unknown writer schema fingerprint {key.hex()}")
    writer = schemas.parsed(key)
    reader = None if reader_schema is None else prepare(reader_schema)
    body = io.BytesIO(data)
    body.seek(HEADER_SIZE)
    try:
        # every writer schema is a record schema, so the value read is a record (fastavro
        # types it as any Avro value)
        if reader is None or reader.fingerprint == key:
            record = cast(dict[str, Any], schemaless_reader(body, writer, None))
        else:
            record = cast(dict[str, Any], schemaless_reader(body, writer, reader.parsed))
    except Exception as exc:  # EOFError, SchemaResolutionError, IndexError, UnicodeDecodeError...
        target = "" if reader is None else f" into reader {reader.fingerprint.hex()}"
        raise ContractError(
            f"cannot decode message written with schema {key.hex()}{target} ({type(exc).__name__})"
        ) from None
    if body.tell() != len(data):
        raise ContractError(f"message written with schema {key.hex()} has trailing bytes after the record")
    return record


def encode_body(value: Any, schema: Schema | PreparedSchema) -> bytes:
    """Bare Avro binary of ``value`` (no header): what a sealed field's plaintext is."""
    prepared = prepare(schema)
    out = io.BytesIO()
    try:
        union_branches.write(out, prepared.parsed, value)
    except Exception as exc:
        raise ContractError(
            f"cannot encode value with schema {prepared.fingerprint.hex()} ({type(exc).__name__})"
        ) from None
    return out.getvalue()


def decode_body(body: bytes, schema: Schema | PreparedSchema) -> Any:
    """Read bare Avro binary written with ``schema``; the whole body must be consumed."""
    prepared = prepare(schema)
    buffer = io.BytesIO(body)
    try:
        value = schemaless_reader(buffer, prepared.parsed, None)
    except Exception as exc:
        raise ContractError(
            f"cannot decode value with schema {prepared.fingerprint.hex()} ({type(exc).__name__})"
        ) from None
    if buffer.tell() != len(body):
        raise ContractError(f"value for schema {prepared.fingerprint.hex()} has trailing bytes")
    return value


class RepeatedFieldsEncoder:
    """:func:`encode` for records of one schema in which a run of adjacent fields repeats from
    record to record (an audit record's shared and withheld field lists: the same few views
    for every referral of a kind). Avro writes a record as its fields one after the other, so
    those fields' bytes are written once per distinct ``key`` and put between the bytes of
    the fields before and after them: the same bytes as :func:`encode` (tested), for a
    fraction of the writing.

    The caller promises that records given the same ``key`` hold the same values in those
    fields. At most ``size`` keys are kept (the oldest go first); thread-safe.
    """

    def __init__(self, schema: Schema, fields: tuple[str, ...], *, size: int = 256) -> None:
        self.prepared = prepare(schema)
        self.size = size
        # named types inlined, so each part parses on its own
        whole = cast(dict[str, Any], expand_schema(schema))
        names = [f["name"] for f in whole["fields"]]
        start = names.index(fields[0]) if fields and fields[0] in names else -1
        end = start + len(fields)
        if start < 0 or tuple(names[start:end]) != fields:
            raise ContractError(f"fields {', '.join(fields)} are not a run of adjacent fields of {whole.get('name')}")

        def part(subset: list[Any], tag: str) -> Any:
            return parse_schema({**whole, "name": f"{whole['name']}{tag}", "fields": subset}, named_schemas={})

        self._before = part(whole["fields"][:start], "Before")
        self._repeated = part(whole["fields"][start:end], "Repeated")
        self._after = part(whole["fields"][end:], "After")
        self._header = SINGLE_OBJECT_MAGIC + self.prepared.fingerprint
        self._kept: dict[Any, bytes] = {}
        self._lock = threading.Lock()

    def encode(self, record: dict[str, Any], key: Any) -> bytes:
        """``encode(record, schema)``; ``key``: hashable, equal only for equal repeated fields."""
        repeated = self._kept.get(key)
        out = io.BytesIO()
        out.write(self._header)
        try:
            union_branches.write(out, self._before, record)
            if repeated is None:
                part = io.BytesIO()
                union_branches.write(part, self._repeated, record)
                repeated = part.getvalue()
                with self._lock:
                    if len(self._kept) >= self.size:
                        del self._kept[next(iter(self._kept))]
                    self._kept[key] = repeated
            out.write(repeated)
            union_branches.write(out, self._after, record)
        except Exception:
            return encode(record, self.prepared)  # its precise error, or the bytes after all
        return out.getvalue()
