"""Load and check a sharing policy file. Every problem names the file, the line and what is
wrong: an unknown recipient, field, class, ground or condition, or special category data
granted without an Art 9 condition, stops the load (a policy that half-loads would share the
wrong things)."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from referral_broker.errors import PolicyError
from referral_broker.policy.model import (
    CONDITION_KINDS,
    CONSENT_MODES,
    GROUNDS,
    OVERRIDE_GROUNDS,
    RECIPIENT_RULES,
    SPECIAL_CATEGORY_CONDITIONS,
    Purpose,
    SharingPolicy,
)
from referral_broker.schemas.registry import (
    DATA_CLASSES,
    field_classes,
    field_paths,
    field_schema,
    referral_schema,
    walk_fields,
)

_KEYS = {
    "recipient",
    "name",
    "description",
    "provides",
    "when_all",
    "when_any",
    "ground",
    "special_category_condition",
    "consent",
    "override_grounds",
    "classes",
    "fields",
    "no_onward_sharing",
}


def default_policy_path() -> Path:
    return Path(str(resources.files("referral_broker.policy").joinpath("sharing_policy.toml")))


def policy_units(schema: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The granularity the policy speaks in: every leaf field path (arrays of records are
    looked into, so ``household.ni_number`` can be withheld while ``household.given_name``
    is shared) with its data class."""
    classes = field_classes(schema)
    paths = list(classes)
    leaves = [p for p in paths if not any(q.startswith(p + ".") for q in paths)]
    return leaves, {p: classes[p] for p in leaves}


class _Locator:
    """Finds the line of a purpose, or of a token inside one, for error messages."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.headers = [i for i, ln in enumerate(self.lines) if ln.strip() == "[[purpose]]"]

    def line(self, index: int, token: str | None = None) -> int:
        if index >= len(self.headers):
            return 1
        start = self.headers[index]
        end = self.headers[index + 1] if index + 1 < len(self.headers) else len(self.lines)
        if token is not None:
            for i in range(start, end):
                if token in self.lines[i]:
                    return i + 1
        return start + 1

    def error(self, index: int, what: str, token: str | None = None) -> PolicyError:
        return PolicyError(f"{self.path}, line {self.line(index, token)}: {what}")


def _strings(entry: dict[str, Any], key: str, loc: _Locator, index: int) -> tuple[str, ...]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise loc.error(index, f"'{key}' must be a list of strings", f"{key} =")
    return tuple(value)


def _check_condition(cond: str, loc: _Locator, index: int, schema_enums: dict[str, list[str]]) -> None:
    kind, _, arg = cond.partition(":")
    if kind not in CONDITION_KINDS:
        raise loc.error(index, f"unknown condition '{cond}' (known: {', '.join(CONDITION_KINDS)})", cond)
    needs_arg = kind in ("flag", "concern", "referrer", "child_age_at_most")
    if needs_arg != bool(arg):
        raise loc.error(index, f"condition '{cond}' {'needs' if needs_arg else 'takes no'} argument", cond)
    if kind == "child_age_at_most" and not arg.isdigit():
        raise loc.error(index, f"condition '{cond}' needs a whole number of years", cond)
    allowed = schema_enums.get(kind)
    if allowed is not None and arg not in allowed:
        raise loc.error(index, f"condition '{cond}': '{arg}' is not one of {', '.join(allowed)}", cond)


def _schema_enums(schema: dict[str, Any]) -> dict[str, list[str]]:
    flags = [info.path.split(".", 1)[1] for info in walk_fields(schema) if info.path.startswith("flags.")]
    return {
        "flag": flags,
        "concern": list(field_schema(schema, "concern_types")["items"]["symbols"]),
        "referrer": list(field_schema(schema, "referrer.partner")["symbols"]),
        "service": list(field_schema(schema, "services_requested")["items"]["symbols"]),
    }


def _expand(
    paths: Iterable[str], classes: Iterable[str], units: list[str], unit_classes: dict[str, str]
) -> frozenset[str]:
    granted = {u for u in units if unit_classes[u] in set(classes)}
    for path in paths:
        granted.update(u for u in units if u == path or u.startswith(path + "."))
    return frozenset(granted)


@dataclass(frozen=True)
class _Contract:
    """What a purpose is checked against: the schema's units, paths and enums."""

    loc: _Locator
    units: list[str]
    unit_classes: dict[str, str]
    known_paths: set[str]
    enums: dict[str, list[str]]


def load_policy(path: Path | None = None, schema: dict[str, Any] | None = None) -> SharingPolicy:
    """Load, check and expand a policy against the canonical Referral schema."""
    path = path or default_policy_path()
    schema = schema or referral_schema()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    unknown_top = set(doc) - {"version", "purpose"}
    if unknown_top:
        raise PolicyError(f"{path}: unknown top-level key(s): {', '.join(sorted(unknown_top))}")
    units, unit_classes = policy_units(schema)
    contract = _Contract(
        _Locator(str(path), text),
        units,
        unit_classes,
        set(field_paths(schema)),
        _schema_enums(schema),
    )
    purposes: list[Purpose] = []
    seen: set[tuple[str, str]] = set()
    for index, entry in enumerate(doc.get("purpose", [])):
        purpose = _load_purpose(contract, index, entry)
        if (purpose.recipient, purpose.name) in seen:
            raise contract.loc.error(
                index, f"purpose '{purpose.name}' for '{purpose.recipient}' is defined twice", purpose.name
            )
        seen.add((purpose.recipient, purpose.name))
        purposes.append(purpose)
    if not isinstance(doc.get("version"), int):
        raise PolicyError(f"{path}: 'version' must be a whole number")
    return SharingPolicy(str(path), doc["version"], tuple(purposes), tuple(units), unit_classes)


def _load_purpose(contract: _Contract, index: int, entry: dict[str, Any]) -> Purpose:
    """One ``[[purpose]]``: its recipient and ground, then what it grants, then its guards."""
    loc = contract.loc
    extra = set(entry) - _KEYS
    if extra:
        key = sorted(extra)[0]
        raise loc.error(index, f"unknown key '{key}' in a purpose", key)
    for required in ("recipient", "name", "ground", "consent"):
        if not isinstance(entry.get(required), str):
            raise loc.error(index, f"purpose is missing '{required}'")
    _check_recipient_and_ground(contract, index, entry)
    fields, classes, granted = _grants(contract, index, entry)
    provides = _strings(entry, "provides", loc, index)
    conditions = _strings(entry, "when_all", loc, index) + _strings(entry, "when_any", loc, index)
    for cond in conditions:
        _check_condition(cond, loc, index, contract.enums)
    for service in provides:
        if service not in contract.enums["service"]:
            raise loc.error(index, f"unknown service '{service}'", f'"{service}"')
    if "service_requested" in conditions and not provides:
        raise loc.error(index, "condition 'service_requested' needs 'provides'", "service_requested")
    if entry["recipient"] in ("service_provider", "named_charity") and not provides:
        raise loc.error(index, f"recipient rule '{entry['recipient']}' needs 'provides'", "recipient")
    overrides = _strings(entry, "override_grounds", loc, index)
    for g in overrides:
        if g not in OVERRIDE_GROUNDS:
            raise loc.error(index, f"unknown override ground '{g}'", f'"{g}"')
    return Purpose(
        recipient=entry["recipient"],
        name=entry["name"],
        description=entry.get("description", ""),
        ground=entry["ground"],
        consent=entry["consent"],
        granted=granted,
        declared_fields=fields,
        declared_classes=classes,
        when_all=_strings(entry, "when_all", loc, index),
        when_any=_strings(entry, "when_any", loc, index),
        provides=provides,
        special_category_condition=entry.get("special_category_condition"),
        override_grounds=overrides,
        no_onward_sharing=_no_onward(contract, index, entry, granted),
        line=loc.line(index),
    )


def _check_recipient_and_ground(contract: _Contract, index: int, entry: dict[str, Any]) -> None:
    loc, recipient = contract.loc, entry["recipient"]
    if recipient not in RECIPIENT_RULES:
        raise loc.error(
            index,
            f"unknown recipient rule '{recipient}': a recipient is resolved per referral by one of "
            f"{', '.join(RECIPIENT_RULES)} (never a partner kind or a fixed party)",
            recipient,
        )
    if entry["ground"] not in GROUNDS:
        raise loc.error(index, f"unknown ground '{entry['ground']}' (known: {', '.join(GROUNDS)})", "ground")
    if entry["consent"] not in CONSENT_MODES:
        raise loc.error(index, f"consent must be one of {', '.join(CONSENT_MODES)}", "consent")
    art9 = entry.get("special_category_condition")
    if art9 is not None and art9 not in SPECIAL_CATEGORY_CONDITIONS:
        raise loc.error(index, f"unknown special category condition '{art9}'", "special_category_condition")


def _grants(
    contract: _Contract, index: int, entry: dict[str, Any]
) -> tuple[tuple[str, ...], tuple[str, ...], frozenset[str]]:
    """The declared fields and classes, and the units they grant (Art 9 checked)."""
    loc = contract.loc
    fields = _strings(entry, "fields", loc, index)
    for f in fields:
        if f not in contract.known_paths:
            raise loc.error(index, f"unknown field '{f}' (not in the Referral schema)", f'"{f}"')
    classes = _strings(entry, "classes", loc, index)
    for c in classes:
        if c not in DATA_CLASSES:
            raise loc.error(index, f"unknown data class '{c}'", f'"{c}"')
    granted = _expand(fields, classes, contract.units, contract.unit_classes)
    special = sorted(u for u in granted if contract.unit_classes[u] == "special_category")
    if special and entry.get("special_category_condition") is None:
        raise loc.error(
            index,
            f"purpose '{entry['name']}' grants special category field(s) ({', '.join(special[:3])}"
            f"{', ...' if len(special) > 3 else ''}) without a special_category_condition (UK GDPR Art 9)",
        )
    return fields, classes, granted


def _no_onward(
    contract: _Contract, index: int, entry: dict[str, Any], granted: frozenset[str]
) -> frozenset[str]:
    loc = contract.loc
    onward = _strings(entry, "no_onward_sharing", loc, index)
    for mark in onward:
        if mark not in contract.known_paths:
            raise loc.error(index, f"unknown field '{mark}' in no_onward_sharing", f'"{mark}"')
    onward_units = _expand(onward, (), contract.units, contract.unit_classes)
    if not onward_units <= granted:
        raise loc.error(
            index, "no_onward_sharing names fields the purpose does not grant", "no_onward_sharing"
        )
    return onward_units
