"""Avro writes that name each union's branch instead of making fastavro search for it.

fastavro picks the branch of a union for a value by validating the value against each branch
in turn: for an optional record (``["null", Record]``) that is a full walk of the record, and
of every optional record inside it again when the branch itself is written. A referral has
nine of them, and the walk was about a quarter of every encode. A union with one branch
besides ``null`` has only one answer for any value that is not ``None``, so :func:`write`
hands fastavro that answer in its tuple notation (``(branch name, value)``), which it takes
without validating. The bytes are the same (tested); a value that does not fit the branch is
still refused, by the write of the branch itself, as a field outside a union always was.

Only unions of ``null`` and one complex type (record, array, map, enum, fixed) are named:
``["null", "string"]`` costs fastavro one type check, less than rebuilding the value would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import IO, Any

from fastavro import schemaless_writer

Hint = Callable[[Any], Any]

_NAMED = ("record", "enum", "fixed", "error")
_COMPLEX = (*_NAMED, "array", "map")


def union_hints(parsed: Any) -> Hint | None:
    """A function from a value of the parsed schema ``parsed`` to the same value with its
    unions' branches named (new dicts and lists where something changed; the value given is
    never modified), or ``None`` when the schema has no union to name."""
    named: dict[str, Any] = parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}
    building: set[str] = set()  # a type that refers to itself is left to fastavro

    def resolved(t: Any) -> Any:
        return named.get(t, t) if isinstance(t, str) else t

    def build(t: Any) -> Hint | None:
        if isinstance(t, str):
            found = named.get(t)
            if found is None or t in building:
                return None
            building.add(t)
            try:
                return build(found)
            finally:
                building.discard(t)
        if isinstance(t, list):
            return _union(t)
        if not isinstance(t, dict):
            return None
        kind = t.get("type")
        if kind in ("record", "error"):
            name = t.get("name")
            if isinstance(name, str):
                if name in building:
                    return None
                building.add(name)
            try:
                steps = [(f["name"], build(f["type"])) for f in t["fields"]]
            finally:
                if isinstance(name, str):
                    building.discard(name)
            return _record([(n, h) for n, h in steps if h is not None])
        if kind == "array":
            return _each(build(t["items"]))
        if kind == "map":
            return _values(build(t["values"]))
        return None

    def _union(branches: list[Any]) -> Hint | None:
        others = [b for b in branches if b != "null"]
        if len(others) != 1 or len(others) == len(branches):
            return None  # several branches to choose from, or no null: fastavro chooses
        branch = others[0]
        target = resolved(branch)
        kind = target.get("type") if isinstance(target, dict) else None
        if kind not in _COMPLEX:
            return None
        # fastavro's tuple notation matches a named type by its full name (a reference by
        # the name it is referred to with) and any other type by the type itself
        label = branch if isinstance(branch, str) else (target["name"] if kind in _NAMED else kind)
        inner = build(branch)
        if inner is None:
            return lambda v: v if v is None or isinstance(v, tuple) else (label, v)
        return lambda v: v if v is None or isinstance(v, tuple) else (label, inner(v))

    return build(parsed)


def _record(steps: list[tuple[str, Hint]]) -> Hint | None:
    if not steps:
        return None

    def hint(value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # fastavro refuses it
        out = dict(value)
        for name, step in steps:
            if name in out:
                out[name] = step(out[name])
        return out

    return hint


def _each(step: Hint | None) -> Hint | None:
    if step is None:
        return None
    return lambda value: [step(v) for v in value] if isinstance(value, list) else value


def _values(step: Hint | None) -> Hint | None:
    if step is None:
        return None
    return lambda value: {k: step(v) for k, v in value.items()} if isinstance(value, dict) else value


_lock = threading.Lock()
# id(parsed schema) -> (that schema, its hint): the entry keeps the schema alive, so its id
# cannot be reused while the entry stands
_hints: dict[int, tuple[Any, Hint | None]] = {}
_LIMIT = 1024


def hint_for(parsed: Any) -> Hint | None:
    """:func:`union_hints` of ``parsed``, built once per schema object."""
    found = _hints.get(id(parsed))
    if found is not None and found[0] is parsed:
        return found[1]
    hint = union_hints(parsed)
    with _lock:
        if len(_hints) >= _LIMIT:
            _hints.clear()
        _hints[id(parsed)] = (parsed, hint)
    return hint


def write(out: IO[bytes], parsed: Any, value: Any) -> None:
    """``fastavro.schemaless_writer`` of ``value`` with its unions' branches named."""
    hint = hint_for(parsed)
    schemaless_writer(out, parsed, value if hint is None else hint(value))
