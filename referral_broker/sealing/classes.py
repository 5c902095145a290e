"""Sealed format 3: one AEAD per data class of a message, not one per field.

A recipient opens every field of its copy anyway, so sealing each field on its own (format 2)
paid an AES-GCM call, a nonce, a header and an Avro call per field for nothing. Format 3 seals
the values of each data class (``personal``, ``identifier``, ``special_category``) of a
message together, so classes stay apart (a list view can open personal fields without the
special category ones) and the work per message is one Avro encoding and one AEAD per class.

For every schema a :class:`ClassLayout` derives, once:

* the **clear schema**: the record with only its ``operational`` fields, and every nested
  record (nullable as declared, empty when it holds only sealed fields, so its presence stays
  a clear fact);
* one **class schema** per data class that has fields: the record with only that class's
  sealing units, and the nested records holding them;
* the **format-3 wire schema**: the clear schema plus a last field ``rb_sealed``, the array of
  sealed class values in :data:`~referral_broker.schemas.registry.DATA_CLASSES` order.

So a format-3 message value is ``C3 01 | wire-3 fingerprint | clear fields | sealed classes``,
and the clear fields' Avro encoding is at the same time the **clear projection** that the
message binding digests (format 2 framed the clear fields one by one). A sealed class value::

    version 3 (1 byte) | cipher id (1) | data-key id length (1) | data-key id | nonce (12) | ciphertext+tag

Its plaintext is the class schema's Avro encoding of the record, zero-padded to a multiple of
16 bytes. Its associated data (:func:`class_aad`) binds it to the referral id and version, the
recipient, the schema, the message binding (sender, topic, kind, clear-fields digest) and the
class name: a class value moved to another message, class or recipient fails to open.

Like the rest of this package, nothing here puts a value, plaintext or key into an exception.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from fastavro import parse_schema, schemaless_reader

from referral_broker.errors import ContractError, TamperedError
from referral_broker.schemas import union_branches
from referral_broker.schemas.registry import DATA_CLASSES, SINGLE_OBJECT_MAGIC, Schema, fingerprint
from referral_broker.sealing.fields import (
    _PADDING,
    CIPHER_AES_256_GCM,
    NONCE_SIZE,
    PAD_BLOCK,
    TAG_SIZE,
    DataKey,
    FieldContext,
    _message_part,
    nonces,
)
from referral_broker.sealing.framing import frame, short

if TYPE_CHECKING:
    from referral_broker.sealing.records import _FieldPlan

CLASS_FORMAT_VERSION = 3
SEALED_FIELD = "rb_sealed"  # the wire-3 field holding the sealed classes
CLEAR = "clear"  # ClassBytes.shapes' key of the clear projection (no data class is named so)
_SEALED_ARRAY = parse_schema({"type": "array", "items": "bytes"}, named_schemas={})


def class_aad(context: FieldContext, data_key_id: bytes, data_class: str) -> bytes:
    """THE associated data of a sealed class value (built here and nowhere else)::

    label | version+cipher | data-key id | referral id | referral version | recipient |
    schema fingerprint | sender | topic | kind | clear-fields digest | data class

    All but the class is the message's part, framed as a field's is (``fields._message_part``,
    with the format-3 label; ``frame(a, b) == frame(a) + frame(b)``), once per message."""
    return _class_prefix(context, data_key_id) + frame(data_class)


def _class_prefix(context: FieldContext, data_key_id: bytes) -> bytes:
    if context.binding is None:
        raise ValueError("a format-3 class value is always bound to its message")
    return _message_part(context, CLASS_FORMAT_VERSION, CIPHER_AES_256_GCM, data_key_id)


def binary_shape(schema: Schema) -> str:
    """What decides a schema's Avro binary encoding, and nothing else: its structure with
    the names of its named types, docs, defaults and extra attributes left out (field names
    kept). Two schemas of one shape encode a record of the same values to the same bytes."""

    named: dict[str, int] = {}  # a named type's full and short name -> its place in definition order
    defined = itertools.count()

    def walk(s: Any, ns: str) -> Any:
        if isinstance(s, list):
            return [walk(b, ns) for b in s]
        if not isinstance(s, dict):
            found = named.get(s if "." in s or not ns else f"{ns}.{s}", named.get(s))
            return s if found is None else {"ref": found}
        kind = s.get("type")
        if kind in ("record", "enum", "fixed") and "name" in s:
            name = s["name"]
            ns = name.rpartition(".")[0] if "." in name else s.get("namespace", ns)
            short = name.rpartition(".")[2]
            named[f"{ns}.{short}" if ns else short] = named[short] = next(defined)
        if kind == "record":
            return {"record": [[f["name"], walk(f["type"], ns)] for f in s["fields"]]}
        if kind == "enum":
            return {"enum": s["symbols"]}
        if kind == "fixed":
            return {"fixed": s["size"]}
        if kind == "array":
            return {"array": walk(s["items"], ns)}
        if kind == "map":
            return {"map": walk(s["values"], ns)}
        if not s.get("logicalType"):
            return walk(kind, ns)
        # a decimal's scale and precision change the bytes a value encodes to
        return {"logical": [walk(kind, ns), s["logicalType"], s.get("precision"), s.get("scale")]}

    return json.dumps(walk(schema, ""), separators=(",", ":"))


@dataclass(frozen=True)
class ClassBytes:
    """The plaintext a format-3 message opened to, as bytes: its clear projection and each
    class's Avro encoding, with the shapes (:func:`binary_shape`) they were written with.
    Sealing a record of the same values under a schema whose clear part or class has the same
    shape reuses those bytes instead of encoding the record again (the router's archive and
    district-team copies of a referral it opened). Plaintext: never logged, never kept."""

    shapes: dict[str, str] = field(repr=False)
    projection: bytes = field(repr=False)
    classes: dict[str, bytes] = field(repr=False)


class _Names:
    """Unique names for the derived records (a record type used in two places is restricted in
    each place on its own), and the named types already defined in one derived schema."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.count: Iterator[int] = itertools.count()
        self.seen: set[str] = set()

    def record(self, name: str) -> str:
        return f"{name.rpartition('.')[2]}__{self.tag}{next(self.count)}"


def _derived(fields: tuple[_FieldPlan, ...], name: str, keep: str | None, names: _Names) -> Schema | None:
    """The record of ``fields`` restricted to the clear fields (``keep`` None) or to the
    sealing units of class ``keep``. Nested records are kept with their nullability: always
    for the clear schema (their presence is clear), only when they hold units of the class for
    a class schema (None when nothing of the class is in here)."""
    from referral_broker.sealing.records import _MISSING, _collapse, _is_record

    out: list[dict[str, Any]] = []
    for p in fields:
        if p.action == "record":
            child = _derived(p.child, p.name, keep, names)
            if child is None:
                continue
            declared = p.avro_type
            # the declared union's branch order (a default must match its first branch)
            kept: Any = [child if _is_record(b) else b for b in declared] if isinstance(declared, list) else child
            f = {"name": p.name, "type": kept}
            if p.default is not _MISSING:
                f["default"] = p.default  # fastavro writes a default with more fields than kept
            out.append(f)
        elif (p.action == "clear") if keep is None else (p.action == "seal" and p.data_class == keep):
            leaf: dict[str, Any] = {"name": p.name, "type": _collapse(p.avro_type, names.seen)}
            if p.default is not _MISSING:
                leaf["default"] = p.default
            out.append(leaf)
    if keep is not None and not out:
        return None
    return {"type": "record", "name": names.record(name), "fields": out}


def _parsed(schema: Schema, what: str) -> Any:
    try:
        return parse_schema(schema, named_schemas={})
    except Exception as exc:
        raise ContractError(f"{what}: cannot derive its format-3 schema ({exc})") from exc


def _long(n: int) -> bytes:
    """Avro's long: zig-zag, then a little-endian base-128 varint."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _array(blobs: list[bytes]) -> bytes:
    """Avro's encoding of an array of bytes (one block, then the end marker)."""
    if not blobs:
        return b"\x00"
    return b"".join([_long(len(blobs)), *(_long(len(b)) + b for b in blobs), b"\x00"])


class ClassLayout:
    """The derived schemas of one record schema for sealed format 3 (see the module doc).
    Built once per :class:`~referral_broker.sealing.records.SealingPlan`; holds no mutable
    state, so it is thread-safe."""

    def __init__(self, fields: tuple[_FieldPlan, ...], schema_name: str) -> None:
        if any(p.name == SEALED_FIELD for p in fields):
            raise ContractError(f"schema {schema_name}: a field may not be named {SEALED_FIELD} (format 3 uses it)")
        self._fields = fields
        self.schema_name = schema_name
        names = _Names("clear")
        clear = _derived(fields, schema_name, None, names)
        assert clear is not None
        self._clear = _parsed(clear, f"schema {schema_name}")
        self.classes: tuple[str, ...] = tuple(c for c in DATA_CLASSES if c != "operational" and self._has(fields, c))
        # the paths of the nested records holding a sealed field: the rest are read whole
        sealing = frozenset(p.path for p in _records(fields) if any(self._has(p.child, c) for c in self.classes))
        self._merge_steps = _merge_steps(fields, self.classes, sealing)
        self._framed_class = {c: frame(c) for c in self.classes}
        self._class_parsed: dict[str, Any] = {}
        self.shapes = {CLEAR: binary_shape(clear)}
        for c in self.classes:
            derived = _derived(fields, schema_name, c, _Names(c))
            assert derived is not None
            self._class_parsed[c] = _parsed(derived, f"schema {schema_name}")
            self.shapes[c] = binary_shape(derived)
        self.wire_schema: Schema = {
            **clear,
            "fields": [*clear["fields"], {"name": SEALED_FIELD, "type": {"type": "array", "items": "bytes"}}],
        }
        self.wire_parsed = _parsed(self.wire_schema, f"schema {schema_name}")
        self.wire_fingerprint = fingerprint(self.wire_schema)
        self.wire_header = SINGLE_OBJECT_MAGIC + self.wire_fingerprint

    @classmethod
    def _has(cls, fields: tuple[_FieldPlan, ...], data_class: str) -> bool:
        return any(
            (p.action == "seal" and p.data_class == data_class) or (p.action == "record" and cls._has(p.child, data_class))
            for p in fields
        )

    # -- sealing ------------------------------------------------------------------------------
    def projection(self, record: dict[str, Any], reuse: ClassBytes | None = None) -> bytes:
        """The clear projection of ``record``: its clear fields under the clear schema (the
        bytes of ``reuse``, the same values opened, when its clear part has the same shape)."""
        if reuse is not None and reuse.shapes.get(CLEAR) == self.shapes[CLEAR]:
            return reuse.projection
        buf = io.BytesIO()
        union_branches.write(buf, self._clear, record)
        return buf.getvalue()

    def seal(
        self,
        record: dict[str, Any],
        projection: bytes,
        key: DataKey,
        context: FieldContext,
        reuse: ClassBytes | None = None,
    ) -> bytes:
        """The format-3 message value of ``record`` (``projection`` is :meth:`projection`).
        ``reuse``: the same values as opened from another message; a class of the same shape
        is sealed from its bytes, not encoded again."""
        header = bytes([CLASS_FORMAT_VERSION, CIPHER_AES_256_GCM]) + short(key.key_id)
        drawn = nonces.take(len(self.classes))
        prefix = _class_prefix(context, key.key_id)  # class_aad's, once for the message
        blobs: list[bytes] = []
        for i, c in enumerate(self.classes):
            if reuse is not None and reuse.shapes.get(c) == self.shapes[c]:
                encoded = reuse.classes[c]
            else:
                buf = io.BytesIO()
                union_branches.write(buf, self._class_parsed[c], record)
                encoded = buf.getvalue()
            plaintext = encoded + _PADDING[PAD_BLOCK - (len(encoded) % PAD_BLOCK)]
            nonce = drawn[i * NONCE_SIZE : (i + 1) * NONCE_SIZE]
            aad = prefix + self._framed_class[c]
            blobs.append(header + nonce + key.aead.encrypt(nonce, plaintext, aad))
        return self.wire_header + projection + _array(blobs)

    # -- opening ------------------------------------------------------------------------------
    def decode(self, data: bytes) -> tuple[dict[str, Any], bytes, list[bytes]]:
        """The clear fields, the clear projection (their bytes as they arrived) and the sealed
        class values of a format-3 message value; refuses another wire schema or stray bytes."""
        if data[: len(self.wire_header)] != self.wire_header:
            raise TamperedError(
                f"a format-3 message value must be written with wire schema {self.wire_fingerprint.hex()} "
                f"(derived from the schema named in rb-schema); found {bytes(data[2:10]).hex()}"
            )
        buf = io.BytesIO(data)
        buf.seek(len(self.wire_header))
        try:
            clear = schemaless_reader(buf, self._clear, None)
            end = buf.tell()
            blobs = schemaless_reader(buf, _SEALED_ARRAY, None)
        except Exception:
            raise TamperedError(f"message value does not decode under the format-3 wire schema of {self.schema_name}") from None
        if buf.tell() != len(data):
            raise TamperedError("message value has trailing bytes after the record")
        if not isinstance(clear, dict) or not isinstance(blobs, list):
            raise TamperedError("message value is not a record")
        if len(blobs) != len(self.classes):
            raise TamperedError(
                f"message carries {len(blobs)} sealed data classes; {self.schema_name} has {len(self.classes)} "
                f"({', '.join(self.classes) or 'none'})"
            )
        return clear, bytes(data[len(self.wire_header) : end]), blobs

    def open(
        self, clear: dict[str, Any], projection: bytes, blobs: list[bytes], key: DataKey, context: FieldContext
    ) -> tuple[dict[str, Any], ClassBytes]:
        """The whole plaintext record, every class opened (raises on the first failure), and
        the bytes it was read from (``projection``: :meth:`decode`'s)."""
        prefix = _class_prefix(context, key.key_id) if self.classes else b""  # class_aad's, once
        parts: dict[str, Any] = {}
        encoded: dict[str, bytes] = {}
        for c, blob in zip(self.classes, blobs, strict=True):
            parts[c], encoded[c] = self._open_class(c, blob, key, prefix + self._framed_class[c])
        record = _merge(self._merge_steps, clear, parts)
        return record, ClassBytes(self.shapes, projection, encoded)

    def _open_class(self, data_class: str, sealed: bytes, key: DataKey, aad: bytes) -> tuple[dict[str, Any], bytes]:
        what = f"sealed class {data_class}"
        if len(sealed) < 3:
            raise TamperedError(f"truncated {what}")
        if sealed[0] != CLASS_FORMAT_VERSION:
            raise TamperedError(
                f"{what}: not a format-{CLASS_FORMAT_VERSION} sealed value (version byte {sealed[0]}); "
                "refused (unsealed, downgraded or spliced)"
            )
        if sealed[1] != CIPHER_AES_256_GCM:
            raise TamperedError(f"{what}: unknown cipher id {sealed[1]}")
        start = 3 + sealed[2]
        if sealed[2] == 0 or len(sealed) < start + NONCE_SIZE + TAG_SIZE + PAD_BLOCK:
            raise TamperedError(f"truncated {what}")
        if sealed[3:start] != key.key_id:
            raise TamperedError(
                f"{what}: sealed under data key {bytes(sealed[3:start]).hex()}, "
                f"but the message carries data key {key.key_id.hex()}"
            )
        nonce = bytes(sealed[start : start + NONCE_SIZE])
        try:
            plaintext = key.aead.decrypt(nonce, bytes(sealed[start + NONCE_SIZE :]), aad)
        except InvalidTag:
            raise TamperedError(f"{what}: authentication failed (tampered, moved, or wrong key)") from None
        buf = io.BytesIO(plaintext)
        try:
            value = schemaless_reader(buf, self._class_parsed[data_class], None)
        except Exception:
            raise TamperedError(f"{what}: sealed payload does not decode as the class's fields") from None
        padding = plaintext[buf.tell() :]
        if not 0 < len(padding) <= PAD_BLOCK or padding.count(0) != len(padding):
            raise TamperedError(f"{what}: sealed payload has malformed padding")
        if not isinstance(value, dict):
            raise TamperedError(f"{what}: not a record")
        return value, plaintext[: buf.tell()]

    # -- clear fields -------------------------------------------------------------------------
    def clear_values(self, projection: bytes) -> dict[str, Any]:
        """Each clear field's value (and each nested record's presence) by path."""
        record = schemaless_reader(io.BytesIO(projection), self._clear, None)
        out: dict[str, Any] = {}

        def walk(fields: tuple[_FieldPlan, ...], d: dict[str, Any]) -> None:
            for p in fields:
                if p.action == "clear":
                    out[p.path] = d.get(p.name)
                elif p.action == "record":
                    sub = d.get(p.name)
                    out[p.path] = sub is not None
                    if isinstance(sub, dict):
                        walk(p.child, sub)

        walk(self._fields, record if isinstance(record, dict) else {})
        return out


def _records(fields: tuple[_FieldPlan, ...]) -> Iterator[_FieldPlan]:
    """Every nested record's plan, at any depth."""
    for p in fields:
        if p.action == "record":
            yield p
            yield from _records(p.child)


# How _merge takes a field: from the clear part, from its class's part, or put together.
_FROM_CLEAR, _FROM_CLASS, _NESTED = 0, 1, 2
_MergeStep = tuple[str, int, Any, Any, str]  # name, how, data class (or the classes holding it), steps, path


def _merge_steps(
    fields: tuple[_FieldPlan, ...], classes: tuple[str, ...], sealing: frozenset[str]
) -> tuple[_MergeStep, ...]:
    """:func:`_merge`'s plan of ``fields``, made once per layout: where each field's value is
    read, and for a nested record holding sealed fields, the classes whose parts hold it."""
    steps: list[_MergeStep] = []
    for p in fields:
        if p.action == "clear" or (p.action == "record" and p.path not in sealing):
            # a record here holds no sealed field: the clear schema read it whole
            steps.append((p.name, _FROM_CLEAR, None, None, p.path))
        elif p.action == "seal":
            steps.append((p.name, _FROM_CLASS, p.data_class, None, p.path))
        else:
            holders = tuple(c for c in classes if ClassLayout._has(p.child, c))
            steps.append((p.name, _NESTED, holders, _merge_steps(p.child, classes, sealing), p.path))
    return tuple(steps)


def _merge(steps: tuple[_MergeStep, ...], clear: dict[str, Any], parts: dict[str, Any]) -> dict[str, Any]:
    """The record put back together from its clear fields and its opened classes. A nested
    record is present in every part holding fields of it, or in none."""
    out: dict[str, Any] = {}
    for name, how, where, child, path in steps:
        if how == _FROM_CLEAR:
            out[name] = clear[name]
        elif how == _FROM_CLASS:
            out[name] = parts[where][name]
        else:
            sub = clear[name]
            inner = {c: parts[c][name] for c in where}
            if any((v is None) != (sub is None) for v in inner.values()):
                raise TamperedError(f"record {path}: present in some data classes and null in others")
            out[name] = None if sub is None else _merge(child, sub, inner)
    return out
