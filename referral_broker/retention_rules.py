"""The retention schedule (``retention_rules.toml``): load and check it, and apply it to a case.

Loaded like the sharing policy: every problem names the file, the line and what is wrong (an
unknown key, record type twice, a field path the referral schema does not have, a value its enum
does not allow, a rule with no clock, an unknown topic class), and any problem stops the load: a
schedule that half-loads would shred the wrong cases.

:func:`assess` gives a case's due date from its latest archived referral and its closure: the
latest date of every matching rule. A date from the child's date of birth is rounded up to the
first day of the next month, so the stored due date does not reveal the date of birth.
:func:`check_topics` holds the topic plan's retention against the schedule.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from referral_broker.errors import ConfigError

TOPIC_CLASSES = ("record", "transit")
_TOP_KEYS = {"version", "reviewed", "closing_statuses", "rule", "topics"}
_RULE_KEYS = {"record_type", "description", "years_after_closure", "until_birthday", "when_any"}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
YEAR_MS = 365 * 24 * 3600 * 1000 + 6 * 3600 * 1000  # a Julian year: 365.25 days


def default_rules_path() -> Path:
    return Path(str(resources.files("referral_broker").joinpath("retention_rules.toml")))


@dataclass(frozen=True)
class Rule:
    record_type: str
    description: str
    years_after_closure: int | None = None
    until_birthday: int | None = None
    when_any: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def span_years(self) -> int:
        """The longest this rule can keep a case after its closure (a birthday rule: a child
        closed at birth)."""
        return max(self.years_after_closure or 0, self.until_birthday or 0)

    def matches(self, referral: Mapping[str, Any]) -> bool:
        if not self.when_any:
            return True
        return any(v in wanted for path, wanted in self.when_any for v in values_at(referral, path))

    def describe(self) -> str:
        clocks = []
        if self.years_after_closure:
            clocks.append(f"{self.years_after_closure} years after closure")
        if self.until_birthday:
            clocks.append(f"until the {_ordinal(self.until_birthday)} birthday")
        return " or ".join(clocks)


@dataclass(frozen=True)
class Rules:
    version: str
    reviewed: str
    closing_statuses: tuple[str, ...]
    rules: tuple[Rule, ...]
    topics: dict[str, str] = field(hash=False)
    path: str = ""

    @property
    def longest_years(self) -> int:
        return max(r.span_years for r in self.rules)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "reviewed": self.reviewed,
            "path": self.path,
            "closing_statuses": list(self.closing_statuses),
            "rules": [
                {
                    "record_type": r.record_type,
                    "description": r.description,
                    "years_after_closure": r.years_after_closure,
                    "until_birthday": r.until_birthday,
                    "when_any": {p: list(v) for p, v in r.when_any},
                }
                for r in self.rules
            ],
            "longest_years": self.longest_years,
            "topics": dict(self.topics),
        }


@dataclass(frozen=True)
class Assessment:
    """A case's place in the schedule: what it is, until when it is kept and why. Holds no
    date of birth (a birthday clock is kept only as its rounded-up date)."""

    record_types: tuple[str, ...]
    due: date
    basis: str
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "record_types": list(self.record_types),
            "due": self.due.isoformat(),
            "basis": self.basis,
            "notes": list(self.notes),
        }


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def values_at(record: Mapping[str, Any], path: str) -> list[Any]:
    """The values at a dotted field path; arrays are transparent (every item's value)."""
    found: list[Any] = [record]
    for part in path.split("."):
        step: list[Any] = []
        for node in found:
            items = node if isinstance(node, list) else [node]
            for item in items:
                if isinstance(item, Mapping) and item.get(part) is not None:
                    step.append(item[part])
        found = step
    flat: list[Any] = []
    for v in found:
        flat.extend(v if isinstance(v, list) else [v])
    return flat


def add_years(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February in a year that has none: 1 March
        return date(day.year + years, 3, 1)


def month_after(day: date) -> date:
    """``day`` rounded up to the first day of a month (itself if it is one)."""
    if day.day == 1:
        return day
    return date(day.year + (day.month == 12), day.month % 12 + 1, 1)


def assess(rules: Rules, referral: Mapping[str, Any] | None, closed: datetime) -> Assessment:
    """The due date of a case closed at ``closed`` whose latest archived referral is
    ``referral`` (None: no readable copy, so only the rules that match every case apply)."""
    closed_on = closed.date()
    dob = None
    if referral is not None:
        raw = (referral.get("child") or {}).get("date_of_birth")
        dob = raw if isinstance(raw, date) and not isinstance(raw, datetime) else None
    types: list[str] = []
    candidates: list[tuple[date, str]] = []
    notes: list[str] = []
    for rule in rules.rules:
        if referral is None and rule.when_any:
            continue
        if referral is not None and not rule.matches(referral):
            continue
        types.append(rule.record_type)
        if rule.years_after_closure:
            candidates.append(
                (
                    add_years(closed_on, rule.years_after_closure),
                    f"{rule.record_type}: {rule.years_after_closure} years after closure",
                )
            )
        if rule.until_birthday:
            if dob is None:
                notes.append(
                    f"{rule.record_type}: no date of birth recorded, its birthday clock does not apply"
                )
            else:
                candidates.append(
                    (
                        month_after(add_years(dob, rule.until_birthday)),
                        f"{rule.record_type}: {_ordinal(rule.until_birthday)} birthday (to the month)",
                    )
                )
    if referral is None:
        notes.append("no readable archive copy: only the rules for every case apply")
    due, basis = (
        max(candidates) if candidates else (add_years(closed_on, rules.longest_years), "longest rule")
    )
    return Assessment(tuple(types), due, basis, tuple(notes))


# -- loading ------------------------------------------------------------------------------------
class _Lines:
    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.rules = [i for i, ln in enumerate(self.lines) if ln.strip() == "[[rule]]"]

    def of(self, token: str, rule: int | None = None) -> int:
        start, end = 0, len(self.lines)
        if rule is not None and rule < len(self.rules):
            start = self.rules[rule]
            end = self.rules[rule + 1] if rule + 1 < len(self.rules) else end
        for i in range(start, end):
            if token in self.lines[i]:
                return i + 1
        return start + 1


def _field_values() -> dict[str, tuple[str, tuple[Any, ...] | None]]:
    """Every field path of the referral schema -> (kind, the values it may hold, if closed)."""
    from referral_broker.schemas.registry import referral_schema, walk_fields

    found: dict[str, tuple[str, tuple[Any, ...] | None]] = {}
    for info in walk_fields(referral_schema()):
        node = info.type
        if isinstance(node, dict) and node.get("type") == "array" and isinstance(node.get("items"), dict):
            node = node["items"]
        if isinstance(node, dict) and node.get("type") == "enum":
            found[info.path] = ("enum", tuple(node["symbols"]))
        elif node == "boolean" or (isinstance(node, dict) and node.get("type") == "boolean"):
            found[info.path] = ("boolean", (True, False))
        else:
            found[info.path] = (info.kind, None)
    return found


def _status_codes() -> tuple[str, ...]:
    from referral_broker.schemas.registry import status_schema

    for f in status_schema()["fields"]:
        if f["name"] == "status":
            t = f["type"]
            return tuple(t["symbols"]) if isinstance(t, dict) else ()
    return ()


def load_rules(path: Path | None = None) -> Rules:
    """The retention schedule at ``path`` (the shipped one by default), checked whole."""
    path = path or default_rules_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"retention rules {path}: cannot be read ({type(exc).__name__})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"retention rules {path}: not valid TOML ({exc})") from None
    lines = _Lines(text)
    problems: list[str] = []

    def problem(line: int, what: str) -> None:
        problems.append(f"{path}:{line}: {what}")

    for key in sorted(set(doc) - _TOP_KEYS):
        problem(lines.of(key), f"unknown key '{key}'")
    for key in ("version", "reviewed"):
        if not isinstance(doc.get(key), str) or not doc.get(key, "").strip():
            problem(lines.of(key), f"'{key}' must be a non-empty string")
    codes = _status_codes()
    closing = doc.get("closing_statuses")
    if not isinstance(closing, list) or not closing:
        problem(lines.of("closing_statuses"), "'closing_statuses' must list the status codes that end a case")
        closing = []
    for code in closing:
        if code not in codes:
            problem(
                lines.of("closing_statuses"),
                f"closing status '{code}' is not a status code ({', '.join(codes)})",
            )
    fields = _field_values()
    rules: list[Rule] = []
    seen: set[str] = set()
    raw_rules = doc.get("rule")
    if not isinstance(raw_rules, list) or not raw_rules:
        problem(1, "no [[rule]]: at least one rule that applies to every case is needed")
        raw_rules = []
    for i, raw in enumerate(raw_rules):
        for key in sorted(set(raw) - _RULE_KEYS):
            problem(lines.of(key, i), f"rule {i + 1}: unknown key '{key}'")
        name = raw.get("record_type")
        if not isinstance(name, str) or not _NAME.match(name):
            problem(lines.of("record_type", i), f"rule {i + 1}: 'record_type' must be a lower-case name")
            name = f"rule-{i + 1}"
        elif name in seen:
            problem(lines.of("record_type", i), f"record type '{name}' has two rules")
        seen.add(name)
        if not isinstance(raw.get("description"), str) or not raw["description"].strip():
            problem(
                lines.of("record_type", i), f"rule '{name}': 'description' must say what it keeps and why"
            )
        clocks: dict[str, int | None] = {}
        for key in ("years_after_closure", "until_birthday"):
            value = raw.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100
            ):
                problem(lines.of(key, i), f"rule '{name}': '{key}' must be a whole number of years, 1 to 100")
                value = None
            clocks[key] = value
        if not any(clocks.values()):
            problem(
                lines.of("record_type", i),
                f"rule '{name}' has no clock: give years_after_closure or until_birthday",
            )
        when: list[tuple[str, tuple[Any, ...]]] = []
        raw_when = raw.get("when_any", {})
        if not isinstance(raw_when, dict):
            problem(
                lines.of("when_any", i), f"rule '{name}': 'when_any' must map field paths to lists of values"
            )
            raw_when = {}
        for fpath, values in raw_when.items():
            if fpath not in fields:
                problem(lines.of(fpath, i), f"rule '{name}': '{fpath}' is not a field of the referral schema")
                continue
            kind, allowed = fields[fpath]
            if allowed is None:
                problem(
                    lines.of(fpath, i),
                    f"rule '{name}': '{fpath}' is a {kind} field; match enum or boolean fields only",
                )
                continue
            if not isinstance(values, list) or not values:
                problem(lines.of(fpath, i), f"rule '{name}': '{fpath}' needs a non-empty list of values")
                continue
            for v in values:
                if v not in allowed or (kind == "boolean") != isinstance(v, bool):
                    problem(lines.of(fpath, i), f"rule '{name}': {v!r} is not a value of '{fpath}'")
            when.append((fpath, tuple(values)))
        rules.append(
            Rule(
                name,
                str(raw.get("description", "")),
                clocks["years_after_closure"],
                clocks["until_birthday"],
                tuple(when),
            )
        )
    baseline = [r for r in rules if not r.when_any]
    if rules and not baseline:
        problem(1, "no rule applies to every case (one rule without 'when_any' is needed)")
    if any(not r.years_after_closure for r in baseline):
        problem(1, "a rule for every case must give years_after_closure (a case may have no date of birth)")
    topics = doc.get("topics", {})
    if not isinstance(topics, dict) or not topics:
        problem(
            lines.of("[topics]"),
            "[topics] must class every topic role of the topic plan as record or transit",
        )
        topics = {}
    for role, cls in topics.items():
        if cls not in TOPIC_CLASSES:
            problem(lines.of(role), f"topic role '{role}': '{cls}' is not one of {', '.join(TOPIC_CLASSES)}")
    if problems:
        raise ConfigError(f"retention rules {path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return Rules(
        str(doc["version"]), str(doc["reviewed"]), tuple(closing), tuple(rules), dict(topics), str(path)
    )


# -- the topic plan against the schedule --------------------------------------------------------
@dataclass(frozen=True)
class TopicFinding:
    role: str
    topic: str
    holds: str | None
    retention_ms: int | None
    problem: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "topic": self.topic,
            "holds": self.holds,
            "retention_ms": self.retention_ms,
            "problem": self.problem,
        }


def check_topics(
    rules: Rules, topics: Iterable[tuple[str, str, int | None]], *, source: str = "plan"
) -> list[TopicFinding]:
    """Each (role, topic name, retention.ms) held against the schedule: a topic of records kept
    shorter than the longest rule, a topic in transit kept forever or longer than the longest
    rule, a role the schedule does not class. ``source`` names where the values came from."""
    longest_ms = rules.longest_years * YEAR_MS
    found: list[TopicFinding] = []
    for role, topic, retention in topics:
        holds = rules.topics.get(role)
        if holds is None:
            found.append(
                TopicFinding(
                    role,
                    topic,
                    None,
                    retention,
                    f"{source}: role '{role}' is not classed in the retention rules",
                )
            )
        elif retention is None:
            continue
        elif holds == "record" and 0 <= retention < longest_ms:
            found.append(
                TopicFinding(
                    role,
                    topic,
                    holds,
                    retention,
                    f"{source}: keeps records {retention / YEAR_MS:.2f} years, shorter than the longest rule "
                    f"({rules.longest_years} years); records would be lost before they are due",
                )
            )
        elif holds == "transit" and retention < 0:
            found.append(
                TopicFinding(
                    role,
                    topic,
                    holds,
                    retention,
                    f"{source}: keeps personal data forever (retention.ms -1); a shred cannot reach it",
                )
            )
        elif holds == "transit" and retention > longest_ms:
            found.append(
                TopicFinding(
                    role,
                    topic,
                    holds,
                    retention,
                    f"{source}: keeps personal data {retention / YEAR_MS:.2f} years, longer than the longest rule "
                    f"({rules.longest_years} years)",
                )
            )
    return found
