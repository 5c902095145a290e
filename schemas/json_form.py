"""The JSON form of a record: what JSON lines files, the CLI and partner tools exchange.

In memory a record holds what fastavro reads back: ``uuid.UUID``, ``datetime.date`` and
timezone-aware ``datetime.datetime``. In JSON those become strings (UUID text, ISO dates,
ISO-8601 timestamps with ``Z``); unions are plain values or ``null``, not Avro's tagged JSON.
Converting back is lenient on purpose: a string that does not parse is left as it is, so
validation reports it against its field path instead of the parser reporting its value.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from .registry import Schema, full_name, named_types, resolve_type


def _walk(value: Any, node: Any, names: dict[str, Schema], namespace: str | None, leaf: Any) -> Any:
    node = resolve_type(node, names, namespace)
    if value is None:
        return None
    if isinstance(node, list):
        branches = [b for b in node if b != "null"]
        if len(branches) != 1:
            return value
        node = resolve_type(branches[0], names, namespace)
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "record" and isinstance(value, dict):
            full = full_name(node["name"], node.get("namespace", namespace))
            inner_ns = full.rpartition(".")[0] or None
            declared = {item["name"]: item["type"] for item in node["fields"]}
            return {
                key: _walk(item, declared[key], names, inner_ns, leaf) if key in declared else item
                for key, item in value.items()
            }
        if kind == "array" and isinstance(value, list):
            return [_walk(item, node["items"], names, namespace, leaf) for item in value]
        if kind == "map" and isinstance(value, dict):
            return {key: _walk(item, node["values"], names, namespace, leaf) for key, item in value.items()}
        logical = node.get("logicalType")
        if logical:
            return leaf(value, logical)
    return value


def _to_json_leaf(value: Any, logical: str) -> Any:
    if logical == "uuid" and isinstance(value, uuid.UUID):
        return str(value)
    if logical in ("timestamp-millis", "timestamp-micros") and isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        spec = "milliseconds" if logical == "timestamp-millis" else "microseconds"
        return aware.astimezone(dt.UTC).isoformat(timespec=spec).replace("+00:00", "Z")
    if logical == "date" and isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def _from_json_leaf(value: Any, logical: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if logical == "uuid":
            return uuid.UUID(value)
        if logical in ("timestamp-millis", "timestamp-micros"):
            parsed = dt.datetime.fromisoformat(value)
            # A timestamp without an offset stays naive; validation rejects it by path.
            return parsed
        if logical == "date" and len(value) == 10:
            return dt.date.fromisoformat(value)
    except ValueError:
        return value
    return value


def to_json_form(record: dict[str, Any], schema: Schema) -> dict[str, Any]:
    """The record with logical-type values as JSON strings, ready for ``json.dumps``."""
    return _walk(record, schema, named_types(schema), None, _to_json_leaf)


def from_json_form(obj: Any, schema: Schema) -> Any:
    """The in-memory record for a parsed JSON object; unparseable strings are left for validation."""
    return _walk(obj, schema, named_types(schema), None, _from_json_leaf)
