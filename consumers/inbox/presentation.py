"""How inbox values read on screen: ages, labels, tags and opened field values.

Pure functions of their inputs (the clock is passed in), used by the templates as filters.
Opened values are formatted for the response being rendered and go nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import cache
from typing import Any

from referral_broker.consumers.inbox.states import ReferralState
from referral_broker.schemas.registry import flatten

# Words that read better in capitals or a set form when a code becomes a label.
_WORDS = {
    "nhs": "NHS",
    "ni": "NI",
    "upn": "UPN",
    "urn": "URN",
    "gp": "GP",
    "send": "SEND",
    "ehc": "EHC",
    "eyfs": "EYFS",
    "neet": "NEET",
    "dwp": "DWP",
    "cambs": "Cambridgeshire",
}

STATE_TAG_CLASSES = {
    ReferralState.NEW: "govuk-tag--blue",
    ReferralState.OPENED: "govuk-tag--light-blue",
    ReferralState.ACCEPTED: "govuk-tag--green",
    ReferralState.DECLINED: "govuk-tag--red",
    ReferralState.MORE_INFORMATION_NEEDED: "govuk-tag--yellow",
    ReferralState.CLOSED: "govuk-tag--grey",
}

PRIORITY_TAG_CLASSES = {
    "urgent": "govuk-tag--red",
    "high": "govuk-tag--orange",
    "routine": "govuk-tag--grey",
}


def humanise(code: str | None) -> str:
    """``east_cambs`` -> ``East Cambridgeshire``; ``nhs_number`` -> ``NHS number``."""
    if not code:
        return ""
    words = code.replace("-", " ").replace("_", " ").split()
    out = [_WORDS.get(w.lower(), w) for w in words]
    if out and out[0] == words[0]:
        out[0] = out[0][:1].upper() + out[0][1:]
    return " ".join(out)


def field_label(path: str) -> str:
    """A field path as a label: ``child.address.postcode`` -> ``Child › Address › Postcode``."""
    return " › ".join(humanise(p) for p in path.split("."))


def age(since: datetime, now: datetime) -> str:
    """How long ago, in the largest whole unit: '3 days', '5 hours', 'less than an hour'."""
    delta = max(now - since, timedelta(0))
    days = delta.days
    if days >= 14:
        weeks = days // 7
        return f"{weeks} weeks"
    if days >= 1:
        return "1 day" if days == 1 else f"{days} days"
    hours = delta.seconds // 3600
    if hours >= 1:
        return "1 hour" if hours == 1 else f"{hours} hours"
    return "less than an hour"


def when(at: datetime | None) -> str:
    """GOV.UK style date and time: '26 November 2026 at 10:25am' (UTC)."""
    if at is None:
        return ""
    hour = at.hour % 12 or 12
    return f"{at.day} {at:%B %Y} at {hour}:{at:%M}{'am' if at.hour < 12 else 'pm'}"


@cache
def enum_paths() -> frozenset[str]:
    """Field paths of the Referral whose values are enum symbols (shown as words, not codes)."""
    from referral_broker.schemas.registry import (
        named_types,
        referral_schema,
        resolve_type,
        walk_fields,
        without_null,
    )

    schema = referral_schema()
    names = named_types(schema)
    found = set()
    for info in walk_fields(schema):
        node = info.type
        if isinstance(node, dict) and node.get("type") == "array":
            node = resolve_type(without_null(node["items"]), names, info.namespace)
        if isinstance(node, dict) and node.get("type") == "enum":
            found.add(info.path)
    return frozenset(found)


def display_value(value: Any, path: str = "") -> str | list[Any] | dict[str, Any]:
    """An opened value as text, or as a list/dict of texts for nested values; ``path`` (arrays
    transparent) says whether a string is an enum symbol to show as words."""
    if value is None:
        return "Not given"
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if isinstance(value, datetime):
        return when(value)
    if isinstance(value, date):
        return f"{value.day} {value:%B %Y}"
    if isinstance(value, Mapping):
        return {humanise(k): display_value(v, f"{path}.{k}" if path else k) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [display_value(v, path) for v in value] if value else "None"
    if isinstance(value, bytes):
        return "(sealed)"
    if isinstance(value, str) and path in enum_paths():
        return humanise(value)
    return str(value)


@dataclass(frozen=True)
class Section:
    """One group of granted fields on the referral page: a heading and (label, value) rows."""

    title: str
    rows: tuple[tuple[str, Any], ...]


def sections(granted: Mapping[str, Any]) -> list[Section]:
    """Granted fields grouped as the referral is: the referral's own fields first, then one
    section per record (child, school, ...) or array of records (household, concerns)."""
    about: list[tuple[str, Any]] = []
    grouped: dict[str, list[tuple[str, Any]]] = {}
    for name, value in granted.items():
        if isinstance(value, Mapping):
            rows = grouped.setdefault(name, [])
            for path, leaf in flatten(value, f"{name}.").items():
                rows.append((field_label(path.removeprefix(f"{name}.")), display_value(leaf, path)))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            grouped.setdefault(name, []).append(
                (f"{humanise(name)} ({len(value)})", display_value(value, name))
            )
        else:
            about.append((field_label(name), display_value(value, name)))
    out = [Section("About the referral", tuple(about))] if about else []
    out += [Section(humanise(name), tuple(rows)) for name, rows in grouped.items() if rows]
    return out
