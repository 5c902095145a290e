"""Per-recipient view schemas: the canonical schema projected onto the granted field paths.

Minimisation shows in the data contract itself: a recipient's view schema has only the fields
the policy grants it, and canonical data is cut down to it by Avro schema resolution (the
writer is the canonical schema, the reader is the view), not by hand-written filtering.

Rules: granting a record path grants everything inside it; granting a path inside a record
keeps the enclosing records with only the granted parts; arrays are transparent
(``household.given_name`` keeps a ``household`` array of members holding only ``given_name``).
Record and enum full names stay those of the canonical schema, which is what lets resolution
match them; each field keeps its doc and default (null for optional fields), and a partly granted record
is classed by the most sensitive field it still holds.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any, cast

from fastavro import schemaless_reader

from referral_broker.errors import ContractError

from . import union_branches
from .codec import PreparedSchema, prepare
from .registry import (
    DATA_CLASSES,
    Schema,
    define_names_once,
    expand_references,
    field_paths,
    fingerprint,
    referral_schema,
    without_null,
)


def _record_under(node: Any) -> dict[str, Any] | None:
    """The record type under a field type, looking through null unions, arrays and maps."""
    node = without_null(node)
    while isinstance(node, dict) and node.get("type") in ("array", "map"):
        node = without_null(node.get("items", node.get("values")))
    return node if isinstance(node, dict) and node.get("type") == "record" else None


def _replace_record(node: Any, record: dict[str, Any]) -> Any:
    """``node`` with the record under it swapped for ``record`` (null unions, arrays kept)."""
    if isinstance(node, list):
        return [branch if branch == "null" else _replace_record(branch, record) for branch in node]
    if isinstance(node, dict) and node.get("type") == "array":
        return {**node, "items": _replace_record(node["items"], record)}
    if isinstance(node, dict) and node.get("type") == "map":
        return {**node, "values": _replace_record(node["values"], record)}
    return record


def _project(record: dict[str, Any], granted: set[str], prefix: str) -> dict[str, Any]:
    kept = []
    for item in record["fields"]:
        path = f"{prefix}{item['name']}"
        if path in granted:
            kept.append(item)
            continue
        if not any(g.startswith(f"{path}.") for g in granted):
            continue
        inner = _record_under(item["type"])
        if inner is None:  # a leaf cannot have granted paths below it; field_paths rules this out
            continue
        narrowed = _project(inner, granted, f"{path}.")
        # A record carries the most sensitive class inside it: in the view, of what it still holds.
        data_class = max((f["data_class"] for f in narrowed["fields"]), key=DATA_CLASSES.index)
        kept.append({**item, "type": _replace_record(item["type"], narrowed), "data_class": data_class})
    return {**record, "fields": kept}


def view_schema(granted: Iterable[str], schema: Schema | None = None) -> Schema:
    """The projection of ``schema`` (the latest Referral by default) onto ``granted`` paths.

    Unknown paths raise ContractError: a typo in the policy must not silently grant nothing.
    The result carries ``view_of`` (the canonical fingerprint, hex) and ``granted`` (sorted)
    as extra top-level attributes; they do not change its fingerprint.
    """
    canonical = schema if schema is not None else referral_schema()
    wanted = {path.strip() for path in granted if path.strip()}
    known = set(field_paths(canonical))
    unknown = sorted(wanted - known)
    if unknown:
        raise ContractError(f"unknown field path(s) for a view: {', '.join(unknown)}")
    projected = _project(expand_references(canonical), wanted, "")
    view = define_names_once(projected)
    view["view_of"] = fingerprint(canonical).hex()
    view["granted"] = sorted(wanted)
    return view


def project(
    record: dict[str, Any],
    view: Schema | PreparedSchema,
    canonical: Schema | PreparedSchema | None = None,
) -> dict[str, Any]:
    """``record`` (written with ``canonical``) as the view sees it, by Avro schema resolution."""
    writer = prepare(canonical if canonical is not None else referral_schema())
    reader = prepare(view)
    buffer = io.BytesIO()
    try:
        union_branches.write(buffer, writer.parsed, record)
        buffer.seek(0)
        return cast(dict[str, Any], schemaless_reader(buffer, writer.parsed, reader.parsed))  # a record
    except Exception as exc:  # fastavro messages can quote values: only the kind is passed on
        raise ContractError(
            f"cannot project a record of schema {writer.fingerprint.hex()} into view "
            f"{reader.fingerprint.hex()} ({type(exc).__name__})"
        ) from None


def withheld_paths(view: Schema, canonical: Schema | None = None) -> list[str]:
    """Canonical field paths the view does not carry (what an audit record lists as withheld)."""
    canonical = canonical if canonical is not None else referral_schema()
    carried = set(field_paths(view))
    return [path for path in field_paths(canonical) if path not in carried]
