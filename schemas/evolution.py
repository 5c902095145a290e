"""Schema evolution: is a new version fully compatible with the one before it?

Full compatibility means both directions hold: old readers read data written with the new
schema, and new readers read data written with the old one. Each direction is checked with the
Apache ``avro`` package's ``ReaderWriterCompatibilityChecker`` (fastavro has no checker).

On top of Avro's rules a new version must pass the schema rules (doc and data class on every
field) and must not lower a field's data class: relabelling ``personal`` as ``operational``
would put personal data in the clear without any wire incompatibility to catch it.

A version may declare, in its own file, that it is only *backward* compatible with the one
before it (``"evolution": {"mode": "backward", "from": "<fingerprint of that version, hex>",
"reason": "..."}`` at the top level; the reason is shown by ``schemas check-evolution``). The
declaration holds only against the schema whose fingerprint it names, so a copy of the file
made to start the next version is checked in full again. New readers must still read old data,
but old readers need not read new data. Referral v3 does, because making a yes/no field
nullable cannot be read by a reader whose field is a plain boolean. In this project that costs
nothing at run time: every message names its writer schema by fingerprint and a reader refuses
a fingerprint it does not ship, so readers are always upgraded before writers.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from referral_broker.errors import ContractError

from .registry import (
    DATA_CLASSES,
    FAMILIES,
    FINGERPRINT_SIZE,
    Schema,
    check_schema,
    field_classes,
    fingerprint,
    named_types,
    resolve_type,
    versions_of,
)

OLD_READS_NEW = "old readers, new data"
NEW_READS_OLD = "new readers, old data"
FULL = "full"
BACKWARD = "backward"
MODES = (FULL, BACKWARD)


@dataclass(frozen=True)
class Incompatibility:
    """One reason a new schema version may not ship: where (a field path if known) and why."""

    direction: str
    kind: str
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.direction}: {self.path}: {self.kind}{f' ({self.detail})' if self.detail else ''}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class PairResult:
    """The check of one (old, new) pair, as the CLI reports it."""

    family: str
    old: str
    new: str
    problems: tuple[Incompatibility, ...]
    mode: str = FULL
    reason: str = ""

    @property
    def compatible(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        if not self.compatible:
            return "NOT compatible"
        return "fully compatible" if self.mode == FULL else f"{self.mode} compatible, as declared ({self.reason})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "old": self.old,
            "new": self.new,
            "compatible": self.compatible,
            "mode": self.mode,
            "reason": self.reason,
            "problems": [p.as_dict() for p in self.problems],
        }


def _avro(schema: Schema) -> avro.schema.Schema:
    try:
        return avro.schema.parse(json.dumps(schema))
    except Exception as exc:  # avro raises SchemaParseException and plain errors alike
        raise ContractError(f"not a valid Avro schema ({type(exc).__name__})") from exc


def pointer_to_path(schema: Schema, pointer: str) -> str:
    """Turn the checker's JSON-pointer location (``/fields/3/type/fields/0``) into a field path.

    The pointer walks the reader schema; a location that does not end on a field comes back
    as the path of the nearest field above it, or the pointer itself if none.
    """
    names = named_types(schema)
    tokens = [t for t in pointer.split("/") if t]
    node: Any = schema
    namespace = schema.get("namespace")
    parts: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        node = resolve_type(node, names, namespace)
        if token == "fields" and isinstance(node, dict) and index + 1 < len(tokens):
            field_list = node.get("fields", [])
            position = int(tokens[index + 1])
            if position >= len(field_list):
                break
            parts.append(field_list[position]["name"])
            node = field_list[position]["type"]
            index += 2
            continue
        if token == "type":
            pass
        elif token in ("items", "values") and isinstance(node, dict):
            node = node.get(token)
        elif token.isdigit() and isinstance(node, list):
            node = node[int(token)]
        else:
            break
        index += 1
    return ".".join(parts) if parts else pointer


def _direction(reader: Schema, writer: Schema, label: str) -> list[Incompatibility]:
    result = ReaderWriterCompatibilityChecker().get_compatibility(_avro(reader), _avro(writer))
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    kinds = sorted(k.value if hasattr(k, "value") else str(k) for k in result.incompatibilities)
    # The root location "/" accompanies every deeper one; keep it only when it is all there is.
    locations = sorted(loc for loc in result.locations if loc != "/") or ["/"]
    detail = ", ".join(sorted(str(m) for m in result.messages))
    # The checker reports sets, so kinds and locations cannot be paired one to one.
    return [
        Incompatibility(label, " / ".join(kinds), pointer_to_path(reader, loc), detail) for loc in locations
    ]


def class_downgrades(old: Schema, new: Schema) -> list[Incompatibility]:
    """Fields whose data class is lower in ``new`` than in ``old``."""
    before, after = field_classes(old), field_classes(new)
    found = []
    for path, old_class in before.items():
        new_class = after.get(path)
        if (
            old_class in DATA_CLASSES
            and new_class in DATA_CLASSES
            and DATA_CLASSES.index(new_class) < DATA_CLASSES.index(old_class)
        ):
            found.append(
                Incompatibility("data class", "data_class_lowered", path, f"{old_class} -> {new_class}")
            )
    return found


def check_full_compatibility(old: Schema, new: Schema) -> list[Incompatibility]:
    """Every reason ``new`` may not replace ``old``; an empty list means it may."""
    problems = [Incompatibility("schema rules", p.reason, p.path, "") for p in check_schema(new)]
    if problems:
        return problems
    problems += _direction(old, new, OLD_READS_NEW)
    problems += _direction(new, old, NEW_READS_OLD)
    problems += class_downgrades(old, new)
    return problems


def declared_mode(old: Schema, new: Schema) -> tuple[str, str]:
    """The compatibility ``new`` declares with ``old``: (mode, reason).

    No declaration, or one naming another schema's fingerprint, means full. A declaration must
    name a known mode, the fingerprint it is about and a reason."""
    declared = new.get("evolution")
    if declared is None:
        return FULL, ""
    fields = declared if isinstance(declared, dict) else {}
    mode, about, reason = fields.get("mode"), fields.get("from"), fields.get("reason")
    if mode not in MODES:
        raise ContractError(f"schema 'evolution.mode' must be one of {', '.join(MODES)}")
    if not isinstance(about, str) or len(about) != 2 * FINGERPRINT_SIZE:
        raise ContractError("schema 'evolution.from' must be the previous version's fingerprint (16 hex digits)")
    if not isinstance(reason, str) or not reason.strip():
        raise ContractError("schema 'evolution.reason' must say why the version is not fully compatible")
    if about.lower() != fingerprint(old).hex():
        return FULL, ""
    return mode, reason.strip()


def check_declared_compatibility(old: Schema, new: Schema) -> list[Incompatibility]:
    """Every reason ``new`` may not replace ``old`` under the compatibility it declares against
    ``old``: full unless it declares backward, which leaves out only the
    old-readers-read-new-data direction."""
    mode, _ = declared_mode(old, new)
    problems = check_full_compatibility(old, new)
    if mode == BACKWARD:
        problems = [p for p in problems if p.direction != OLD_READS_NEW]
    return problems


def ensure_fully_compatible(old: Schema, new: Schema) -> None:
    """Raise ContractError naming each incompatibility."""
    problems = check_full_compatibility(old, new)
    if problems:
        shown = "; ".join(str(p) for p in problems[:10])
        raise ContractError(f"new schema is not fully compatible: {shown}")


def check_files(old_file: Path, new_file: Path) -> PairResult:
    """Check two ``.avsc`` files (e.g. a shipped version and a proposed one)."""
    schemas = []
    for path in (old_file, new_file):
        try:
            schemas.append(json.loads(Path(path).read_text("utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise ContractError(f"cannot read schema file {path} ({type(exc).__name__})") from exc
    mode, reason = declared_mode(schemas[0], schemas[1])
    problems = check_declared_compatibility(schemas[0], schemas[1])
    return PairResult(schemas[1].get("name", "?"), str(old_file), str(new_file), tuple(problems), mode, reason)


def check_shipped_history(family: str | None = None) -> list[PairResult]:
    """Every consecutive pair of shipped versions (of one family, or all), each checked in full.

    A family with a single version yields one result comparing it with itself, so the schema
    rules are still applied to it. A version that declares backward compatibility
    (:func:`declared_mode`) is checked as declared.
    """
    results = []
    for name in [family] if family else list(FAMILIES):
        versions = versions_of(name)
        pairs = list(itertools.pairwise(versions)) or [(versions[0], versions[0])]
        for old, new in pairs:
            mode, reason = declared_mode(old.schema, new.schema)
            problems = check_declared_compatibility(old.schema, new.schema)
            results.append(PairResult(name, old.path.name, new.path.name, tuple(problems), mode, reason))
    return results
