"""How inbox values read on screen: ages, labels, tags and opened field values.

Pure functions of their inputs (the clock is passed in), used by the templates as filters.
Opened values are formatted for the response being rendered and go nowhere else.
"""

from __future__ import annotations

import re
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
    "ods": "ODS",
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


_DIGITS = re.compile(r"(?<=[a-z])(?=[0-9])")


def humanise(code: str | None) -> str:
    """``east_cambs`` -> ``East Cambridgeshire``; ``nhs_number`` -> ``NHS number``;
    ``line1`` -> ``Line 1``."""
    if not code:
        return ""
    words = _DIGITS.sub(" ", code.replace("-", " ").replace("_", " ")).split()
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


def years_old(born: date, on: date) -> int:
    """Age in whole years on ``on``: 17 the day before the 18th birthday."""
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


# Dates of birth shown with the age: Early Help ends at 18, and a young parent in the household
# is a concern of its own.
AGE_PATHS = frozenset({"child.date_of_birth", "household.date_of_birth"})


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


@cache
def yes_no_paths() -> frozenset[str]:
    """Field paths of the Referral that are an optional yes/no: null there means the source did
    not say (schema v3: interpreter needed, parental responsibility), shown as "Not known"."""
    from referral_broker.schemas.registry import referral_schema, walk_fields

    return frozenset(
        info.path for info in walk_fields(referral_schema()) if info.optional and info.type == "boolean"
    )


def display_value(value: Any, path: str = "") -> str | list[Any] | dict[str, Any]:
    """An opened value as text, or as a list/dict of texts for nested values; ``path`` (arrays
    transparent) says whether a string is an enum symbol to show as words, and whether a null
    is a yes/no not known rather than a value not given."""
    if value is None:
        return "Not known" if path in yes_no_paths() else "Not given"
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


# --- the referral page, in the order a worker reads it ------------------------------------------

# (section title, top-level fields) in reading order; fields not named here come after, before
# the technical details.
READING_ORDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("The concerns", ("concern_types", "concerns", "services_requested")),
    ("Risk flags", ("flags",)),
    ("Consent and override", ("consent", "sharing_override")),
    ("The child", ("child", "identifiers")),
    ("The household", ("household",)),
    ("Home circumstances", ("home_circumstances",)),
    ("Health and development", ("health_and_development", "send")),
    ("School", ("school",)),
    ("Who referred", ("referrer",)),
)
# Shown elsewhere on the page (the summary at the top, the technical details at the end).
_ELSEWHERE = frozenset({"referral_id", "version", "created_at", "district", "priority"})

NO_ONWARD_REASON = "The council’s sharing policy lets your team use this, not pass it on"


@dataclass(frozen=True)
class Row:
    """One shown field: its label, its value as text (or nested texts), its path, and whether
    the team must not pass it on."""

    label: str
    value: Any
    path: str
    no_onward: bool = False


@dataclass(frozen=True)
class Group:
    """One record in an array (a household member, a concern): a title and its rows."""

    title: str
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class ReadingSection:
    title: str
    slug: str
    rows: tuple[Row, ...] = ()
    groups: tuple[Group, ...] = ()
    withheld: tuple[tuple[str, str], ...] = ()  # (label, reason) of fields withheld here


def _restricted(path: str, no_onward: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + ".") or p.startswith(path + ".") for p in no_onward)


def _shown(leaf: Any, path: str, today: date | None) -> Any:
    shown = display_value(leaf, path)
    if today is not None and path in AGE_PATHS and isinstance(leaf, date) and leaf <= today:
        return f"{shown} (age {years_old(leaf, today)})"
    return shown


def _rows_of(
    name: str, value: Any, no_onward: Sequence[str], today: date | None = None
) -> tuple[list[Row], list[Group]]:
    rows: list[Row] = []
    groups: list[Group] = []
    if isinstance(value, Mapping):
        for path, leaf in flatten(value, f"{name}.").items():
            label = field_label(path.removeprefix(f"{name}."))
            rows.append(Row(label, _shown(leaf, path, today), path, _restricted(path, no_onward)))
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for i, item in enumerate(value, 1):
            item_rows = []
            for path, leaf in flatten(item, f"{name}.").items():
                label = field_label(path.removeprefix(f"{name}."))
                item_rows.append(Row(label, _shown(leaf, path, today), path, _restricted(path, no_onward)))
            title = _group_title(name, item, i)
            groups.append(Group(title, tuple(item_rows)))
    else:
        rows.append(Row(field_label(name), display_value(value, name), name, _restricted(name, no_onward)))
    return rows, groups


def _group_title(name: str, item: Mapping[str, Any], index: int) -> str:
    if name == "household":
        who = " ".join(str(item.get(k) or "") for k in ("given_name", "family_name")).strip()
        relation = humanise(str(item.get("relationship") or ""))
        return ", ".join(p for p in (who, relation.lower() if relation else "") if p) or f"Member {index}"
    if name == "concerns":
        return humanise(str(item.get("type") or "")) or f"Concern {index}"
    return f"{humanise(name)} {index}"


def reading_sections(
    granted: Mapping[str, Any],
    no_onward: Sequence[str],
    withheld: Sequence[tuple[str, str]] = (),
    *,
    today: date | None = None,
) -> list[ReadingSection]:
    """The granted fields in :data:`READING_ORDER`, each field marked when it must not be passed
    on; each withheld field listed (name and reason, never a value) in the section it belongs to;
    with ``today``, a date of birth also shows the age on that day."""
    placed: set[str] = set(_ELSEWHERE)
    out: list[ReadingSection] = []
    order = list(READING_ORDER)
    extra = tuple(n for n in granted if n not in _ELSEWHERE and all(n not in f for _, f in READING_ORDER))
    if extra:
        order.append(("Other information", extra))
    for title, names in order:
        rows: list[Row] = []
        groups: list[Group] = []
        for name in names:
            placed.add(name)
            if name not in granted:
                continue
            r, g = _rows_of(name, granted[name], no_onward, today)
            rows += r
            groups += g
        held = tuple(
            (field_label(path), reason) for path, reason in withheld if path.split(".", 1)[0] in names
        )
        if rows or groups or held:
            slug = title.lower().replace(" ", "-")
            out.append(ReadingSection(title, slug, tuple(rows), tuple(groups), held))
    return out


# --- the list: what a worker recognises a family by -------------------------------------------

CONCERN_SUMMARY_CHARS = 90


@dataclass(frozen=True)
class ListSummary:
    """The few opened values the list shows for one referral, for one response only. ``None``
    where the field was not shared with the team."""

    name: str | None = None
    date_of_birth: date | None = None
    postcode: str | None = None
    concern: str | None = None
    nhs_number: str | None = None
    other_names: tuple[str, ...] = ()  # the household's, for search only
    unreadable: bool = False


def _text(value: Any) -> str:
    return str(value).strip() if value else ""


def list_summary(granted: Mapping[str, Any], concern_types: Sequence[str] = ()) -> ListSummary:
    child = granted.get("child")
    if not isinstance(child, Mapping):
        child = {}
    name = " ".join(p for p in (_text(child.get("given_name")), _text(child.get("family_name"))) if p)
    preferred = _text(child.get("preferred_name"))
    if preferred and name:
        name = f"{name} ({preferred})"
    address = child.get("address")
    if not isinstance(address, Mapping):
        address = {}
    dob = child.get("date_of_birth")
    concerns = granted.get("concerns")
    concern = ""
    if isinstance(concerns, list):
        concern = " ".join(
            _text(c.get("detail")) for c in concerns if isinstance(c, Mapping) and c.get("detail")
        )
    if not concern:
        concern = ", ".join(humanise(c) for c in concern_types)
    if len(concern) > CONCERN_SUMMARY_CHARS:
        concern = concern[: CONCERN_SUMMARY_CHARS - 1].rstrip() + "…"
    identifiers = granted.get("identifiers")
    if not isinstance(identifiers, Mapping):
        identifiers = {}
    household = granted.get("household")
    if not isinstance(household, list):
        household = []
    others = tuple(
        " ".join(p for p in (_text(m.get("given_name")), _text(m.get("family_name"))) if p)
        for m in household
        if isinstance(m, Mapping)
    )
    return ListSummary(
        name=name or None,
        date_of_birth=dob if isinstance(dob, date) else None,
        postcode=_text(address.get("postcode")) or None,
        concern=concern or None,
        nhs_number=_text(identifiers.get("nhs_number")) or None,
        other_names=others,
    )


def short_date(day: date | None) -> str:
    return f"{day.day} {day:%b %Y}" if day else ""


# --- search -------------------------------------------------------------------------------------

_DATE_FORMATS = ("%Y-%m-%d", "%d/%m/%Y", "%d-%m-%Y", "%d.%m.%Y", "%d %B %Y", "%d %b %Y")


def _compact(text: str) -> str:
    return "".join(text.split()).upper()


@dataclass(frozen=True)
class Search:
    """A worker's search words, read once: a date, an NHS number, or words matched against
    names, the postcode and the referral reference."""

    text: str
    day: date | None = None
    digits: str | None = None

    @classmethod
    def parse(cls, text: str) -> Search:
        text = " ".join(text.split())[:100]
        day = None
        for fmt in _DATE_FORMATS:
            try:
                day = datetime.strptime(text, fmt).date()
                break
            except ValueError:
                continue
        compact = "".join(text.split())
        digits = compact if compact.isdigit() and len(compact) >= 6 else None
        return cls(text, day, digits)

    def matches(self, referral_id: str, found: ListSummary) -> bool:
        if not self.text:
            return True
        if self.day is not None:
            return found.date_of_birth == self.day
        if self.digits is not None:
            return bool(found.nhs_number) and _compact(found.nhs_number or "").startswith(self.digits)
        lowered = self.text.lower()
        if referral_id.startswith(lowered.replace(" ", "")):
            return True
        if (
            found.postcode
            and len(_compact(self.text)) >= 3
            and _compact(found.postcode).startswith(_compact(self.text))
        ):
            return True
        words = lowered.split()
        for name in (found.name or "", *found.other_names):
            parts = name.lower().replace("(", " ").replace(")", " ").split()
            if words and all(any(p.startswith(w) for p in parts) for w in words):
                return True
        return False


def organisation_name(party: str) -> str:
    """A party's registered organisation name (``Fenland Fields Primary School``), or the
    party name made readable when the registry does not know it."""
    from referral_broker.parties import all_parties

    found = all_parties().get(party)
    return found.description if found is not None and found.org is not None else humanise(party)
