"""Edge validation: everything wrong with a record, by field path and reason, never by value.

Two layers. The schema layer walks the Avro schema and the record together: required fields,
types, enum symbols, logical types (UUID text, real dates, timezone-aware timestamps), unknown
fields. The rule layer adds what a schema cannot say: identifier check digits, postcode shape,
birth dates not in the future, counts that add up, flags consistent with the concerns, consent
recorded when it was asked, an override only when there is no consent.

Problem paths name array items by index (``household[1].ni_number``) so a person can find the
item; ``schema_path`` drops the indexes to get the policy's field path (``household.ni_number``).
The clock is passed in (``now``) so results do not depend on when a test runs.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeGuard

from referral_broker.errors import Problem, ValidationError

from . import identifiers
from .registry import (
    Schema,
    full_name,
    load_schema,
    named_types,
    referral_schema,
    resolve_type,
)

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
MAX_TEXT_LENGTH = 10_000
MAX_OPERATIONAL_LABEL = 120
# Early Help works with children and young people; SEND support runs to 25.
MAX_CHILD_AGE_YEARS = 25
EARLY_SUPPORT_PATHWAY_MAX_AGE_YEARS = 5
CLOCK_SKEW = dt.timedelta(minutes=5)

_INDEX = re.compile(r"\[\d+\]")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_UK_PHONE = re.compile(r"^(?:0\d{9,10}|\+44\d{9,10})$")
_DIGIT_RUN = re.compile(r"\d{5}")
_FIELD_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
_URN = re.compile(r"^\d{6}$")
_ACADEMIC_YEAR = re.compile(r"^(\d{4})/(\d{2})$")


def schema_path(path: str) -> str:
    """The field path without array indexes: ``household[1].ni_number`` -> ``household.ni_number``."""
    return _INDEX.sub("", path)


def _email_problem(value: str) -> str | None:
    return None if _EMAIL.match(value) else "not a valid email address"


def _phone_problem(value: str) -> str | None:
    digits = value.replace(" ", "")
    return None if _UK_PHONE.match(digits) else "not a valid UK phone number"


def _urn_problem(value: str) -> str | None:
    return None if _URN.match(value) else "not a valid school URN (6 digits)"


def _academic_year_problem(value: str) -> str | None:
    match = _ACADEMIC_YEAR.match(value)
    if match is None or (int(match[1]) + 1) % 100 != int(match[2]):
        return "not an academic year (YYYY/YY, consecutive years)"
    return None


def _operational_label_problem(value: str) -> str | None:
    """Operational text travels in the clear: keep it a short label, not a contact detail."""
    if len(value) > MAX_OPERATIONAL_LABEL:
        return f"longer than {MAX_OPERATIONAL_LABEL} characters for a label sent in the clear"
    if "@" in value or _DIGIT_RUN.search(value):
        return "looks like contact details; this label is sent in the clear"
    return None


# Checks on string fields, by schema path (any array index). Each returns a reason or None.
STRING_RULES: dict[str, Callable[[str], str | None]] = {
    "identifiers.nhs_number": identifiers.nhs_number_problem,
    "identifiers.ni_number": identifiers.ni_number_problem,
    "identifiers.upn": identifiers.upn_problem,
    "household.ni_number": identifiers.ni_number_problem,
    "child.address.postcode": identifiers.postcode_problem,
    "referrer.practitioner.email": _email_problem,
    "referrer.practitioner.phone": _phone_problem,
    "child.contact.email": _email_problem,
    "child.contact.phone": _phone_problem,
    "household.contact.email": _email_problem,
    "household.contact.phone": _phone_problem,
    "school.urn": _urn_problem,
    "health_and_development.gp_practice_ods": identifiers.ods_gp_practice_problem,
    "service_providers.provider": identifiers.charity_number_problem,
    "referrer.organisation": _operational_label_problem,
    "referrer.practitioner.role": _operational_label_problem,
    "sharing_override.approved_by.role": _operational_label_problem,
    "school.curriculum_results.academic_year": _academic_year_problem,
}


class _SchemaWalk:
    """Walks one record against one schema, collecting problems."""

    def __init__(self, names: dict[str, Schema], record_number: int | None) -> None:
        self.names = names
        self.record_number = record_number
        self.problems: list[Problem] = []

    def add(self, path: str, reason: str) -> None:
        self.problems.append(Problem(path or "<record>", reason, self.record_number))

    def value(self, value: Any, node: Any, path: str, namespace: str | None) -> None:
        node = resolve_type(node, self.names, namespace)
        if isinstance(node, list):
            self.union(value, node, path, namespace)
            return
        if value is None:
            self.add(path, "required field is null")
            return
        kind = node.get("type") if isinstance(node, dict) else node
        if isinstance(node, dict) and node.get("logicalType"):
            self.logical(value, node, path)
        elif kind == "record":
            self.record(value, node, path, namespace)
        elif kind == "array":
            if not isinstance(value, list):
                self.add(path, "expected a list")
                return
            for index, item in enumerate(value):
                self.value(item, node["items"], f"{path}[{index}]", namespace)
        elif kind == "map":
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                self.add(path, "expected an object with string keys")
                return
            for key, item in value.items():
                self.value(item, node["values"], f"{path}[{key}]", namespace)
        elif kind == "enum":
            if not isinstance(value, str) or value not in node["symbols"]:
                self.add(path, "not one of the allowed values")
        else:
            self.primitive(value, kind, path)

    def union(self, value: Any, branches: list[Any], path: str, namespace: str | None) -> None:
        if value is None:
            if "null" not in branches:
                self.add(path, "required field is null")
            return
        others = [b for b in branches if b != "null"]
        if len(others) == 1:
            self.value(value, others[0], path, namespace)
            return
        for branch in others:
            trial = _SchemaWalk(self.names, self.record_number)
            trial.value(value, branch, path, namespace)
            if not trial.problems:
                return
        self.add(path, "matches none of the allowed types")

    def record(self, value: Any, node: Schema, path: str, namespace: str | None) -> None:
        if not isinstance(value, Mapping):
            self.add(path, "expected an object")
            return
        inner_ns = full_name(node["name"], node.get("namespace", namespace)).rpartition(".")[0] or None
        declared = {item["name"] for item in node["fields"]}
        for item in node["fields"]:
            child_path = f"{path}.{item['name']}" if path else item["name"]
            if item["name"] not in value:
                if "default" not in item:
                    self.add(child_path, "required field is missing")
                continue
            self.value(value[item["name"]], item["type"], child_path, inner_ns)
        for key in value:
            if key not in declared:
                # A key is normally a field name, but a malformed file could put a value there.
                shown = key if isinstance(key, str) and _FIELD_NAME.match(key) else "<unnamed>"
                self.add(f"{path}.{shown}" if path else shown, "unknown field")

    def logical(self, value: Any, node: Schema, path: str) -> None:
        logical = node["logicalType"]
        if logical == "uuid":
            if isinstance(value, uuid.UUID):
                return
            if isinstance(value, str):
                try:
                    uuid.UUID(value)
                    return
                except ValueError:
                    pass
            self.add(path, "expected a UUID")
        elif logical == "date":
            if not isinstance(value, dt.date) or isinstance(value, dt.datetime):
                self.add(path, "expected a date (YYYY-MM-DD)")
            elif value.year < 1900:
                self.add(path, "date is before 1900")
        elif logical in ("timestamp-millis", "timestamp-micros"):
            if not isinstance(value, dt.datetime):
                self.add(path, "expected a timestamp (ISO 8601 with time zone)")
            elif value.tzinfo is None or value.utcoffset() is None:
                self.add(path, "timestamp has no time zone")
            elif value.year < 1970:
                self.add(path, "timestamp is before 1970")
        else:
            self.primitive(value, node["type"], path)

    def primitive(self, value: Any, kind: str | None, path: str) -> None:
        if kind == "string":
            if not isinstance(value, str):
                self.add(path, "expected text")
            elif not value.strip():
                self.add(path, "must not be empty")
            elif len(value) > MAX_TEXT_LENGTH:
                self.add(path, f"longer than {MAX_TEXT_LENGTH} characters")
            else:
                rule = STRING_RULES.get(schema_path(path))
                reason = rule(value) if rule else None
                if reason:
                    self.add(path, reason)
        elif kind == "boolean":
            if not isinstance(value, bool):
                self.add(path, "expected true or false")
        elif kind in ("int", "long"):
            low, high = (INT_MIN, INT_MAX) if kind == "int" else (LONG_MIN, LONG_MAX)
            if isinstance(value, bool) or not isinstance(value, int):
                self.add(path, "expected a whole number")
            elif not low <= value <= high:
                self.add(path, f"out of range for an Avro {kind}")
        elif kind in ("float", "double"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.add(path, "expected a number")
        elif kind in ("bytes", "fixed") and not isinstance(value, bytes | bytearray):
            self.add(path, "expected bytes")


# id(schema) -> (schema, its named types): a file validates thousands of records against one
# schema dict, and walking the schema for its names cost as much as checking a record. The entry
# keeps the dict alive, so its id is not reused; schemas are not changed in place once used.
_names_by_id: dict[int, tuple[Schema, dict[str, Schema]]] = {}
_NAMES_CACHE_LIMIT = 64


def _names_of(schema: Schema) -> dict[str, Schema]:
    found = _names_by_id.get(id(schema))
    if found is not None and found[0] is schema:
        return found[1]
    names = named_types(schema)
    if len(_names_by_id) >= _NAMES_CACHE_LIMIT:
        _names_by_id.clear()
    _names_by_id[id(schema)] = (schema, names)
    return names


# --- the schema layer, built once per schema ----------------------------------------------------
# A checker: (value, its path, add(path, reason)). It does what _SchemaWalk does for the same
# node, with every decision that depends only on the schema taken once: references resolved,
# the string rule of each field path found, unions split. Record checkers build their fields'
# checkers on first use, so a recursive schema compiles only as deep as data goes.
_Add = Callable[[str, str], None]


def _collector(into: list[tuple[str, str]]) -> _Add:
    """An ``add`` that keeps (path, reason) in ``into`` (to try a union's branches quietly)."""
    return lambda path, reason: into.append((path, reason))
_Check = Callable[[Any, str, _Add], None]


class _Compiler:
    def __init__(self, names: dict[str, Schema]) -> None:
        self.names = names

    def compile(self, node: Any, namespace: str | None, spath: str, in_map: bool) -> _Check:
        node = resolve_type(node, self.names, namespace)
        if isinstance(node, list):
            return self._union(node, namespace, spath, in_map)
        kind = node.get("type") if isinstance(node, dict) else node
        inner: _Check
        if isinstance(node, dict) and node.get("logicalType"):
            inner = self._logical(node, spath, in_map)
        elif kind == "record":
            inner = self._record(node, namespace, spath, in_map)
        elif kind == "array":
            inner = self._array(self.compile(node["items"], namespace, spath, in_map))
        elif kind == "map":
            inner = self._map(self.compile(node["values"], namespace, spath, True))
        elif kind == "enum":
            inner = self._enum(frozenset(node["symbols"]))
        else:
            inner = self._primitive(kind, spath, in_map)

        def check(value: Any, path: str, add: _Add) -> None:
            if value is None:
                add(path, "required field is null")
            else:
                inner(value, path, add)

        return check

    def _union(self, branches: list[Any], namespace: str | None, spath: str, in_map: bool) -> _Check:
        has_null = "null" in branches
        others = [self.compile(b, namespace, spath, in_map) for b in branches if b != "null"]
        if len(others) == 1:
            only = others[0]

            def single(value: Any, path: str, add: _Add) -> None:
                if value is None:
                    if not has_null:
                        add(path, "required field is null")
                    return
                only(value, path, add)

            return single

        def several(value: Any, path: str, add: _Add) -> None:
            if value is None:
                if not has_null:
                    add(path, "required field is null")
                return
            for branch in others:
                failed: list[tuple[str, str]] = []
                branch(value, path, _collector(failed))
                if not failed:
                    return
            add(path, "matches none of the allowed types")

        return several

    def _record(self, node: Schema, namespace: str | None, spath: str, in_map: bool) -> _Check:
        inner_ns = full_name(node["name"], node.get("namespace", namespace)).rpartition(".")[0] or None
        declared = frozenset(item["name"] for item in node["fields"])
        fields: list[tuple[str, bool, _Check]] = []

        def check(value: Any, path: str, add: _Add) -> None:
            if not fields and node["fields"]:
                fields.extend(
                    (
                        item["name"],
                        "default" in item,
                        self.compile(item["type"], inner_ns, f"{spath}.{item['name']}" if spath else item["name"], in_map),
                    )
                    for item in node["fields"]
                )
            if not isinstance(value, Mapping):
                add(path, "expected an object")
                return
            prefix = f"{path}." if path else ""
            for name, has_default, field_check in fields:
                if name not in value:
                    if not has_default:
                        add(prefix + name, "required field is missing")
                    continue
                field_check(value[name], prefix + name, add)
            for key in value:
                if key not in declared:
                    # A key is normally a field name, but a malformed file could put a value there.
                    shown = key if isinstance(key, str) and _FIELD_NAME.match(key) else "<unnamed>"
                    add(prefix + shown, "unknown field")

        return check

    @staticmethod
    def _array(item: _Check) -> _Check:
        def check(value: Any, path: str, add: _Add) -> None:
            if not isinstance(value, list):
                add(path, "expected a list")
                return
            for index, element in enumerate(value):
                item(element, f"{path}[{index}]", add)

        return check

    @staticmethod
    def _map(item: _Check) -> _Check:
        def check(value: Any, path: str, add: _Add) -> None:
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                add(path, "expected an object with string keys")
                return
            for key, element in value.items():
                item(element, f"{path}[{key}]", add)

        return check

    @staticmethod
    def _enum(symbols: frozenset[str]) -> _Check:
        def check(value: Any, path: str, add: _Add) -> None:
            if not isinstance(value, str) or value not in symbols:
                add(path, "not one of the allowed values")

        return check

    def _logical(self, node: Schema, spath: str, in_map: bool) -> _Check:
        logical = node["logicalType"]
        if logical == "uuid":

            def check_uuid(value: Any, path: str, add: _Add) -> None:
                if isinstance(value, uuid.UUID):
                    return
                if isinstance(value, str):
                    try:
                        uuid.UUID(value)
                        return
                    except ValueError:
                        pass
                add(path, "expected a UUID")

            return check_uuid
        if logical == "date":

            def check_date(value: Any, path: str, add: _Add) -> None:
                if not isinstance(value, dt.date) or isinstance(value, dt.datetime):
                    add(path, "expected a date (YYYY-MM-DD)")
                elif value.year < 1900:
                    add(path, "date is before 1900")

            return check_date
        if logical in ("timestamp-millis", "timestamp-micros"):

            def check_timestamp(value: Any, path: str, add: _Add) -> None:
                if not isinstance(value, dt.datetime):
                    add(path, "expected a timestamp (ISO 8601 with time zone)")
                elif value.tzinfo is None or value.utcoffset() is None:
                    add(path, "timestamp has no time zone")
                elif value.year < 1970:
                    add(path, "timestamp is before 1970")

            return check_timestamp
        return self._primitive(node["type"], spath, in_map)

    @staticmethod
    def _primitive(kind: Any, spath: str, in_map: bool) -> _Check:
        if kind == "string":
            # inside a map the path holds its keys, which schema_path keeps: look up as it did
            static_rule = None if in_map else STRING_RULES.get(spath)

            def check_string(value: Any, path: str, add: _Add) -> None:
                if not isinstance(value, str):
                    add(path, "expected text")
                elif not value.strip():
                    add(path, "must not be empty")
                elif len(value) > MAX_TEXT_LENGTH:
                    add(path, f"longer than {MAX_TEXT_LENGTH} characters")
                else:
                    rule = STRING_RULES.get(schema_path(path)) if in_map else static_rule
                    reason = rule(value) if rule else None
                    if reason:
                        add(path, reason)

            return check_string
        if kind == "boolean":

            def check_boolean(value: Any, path: str, add: _Add) -> None:
                if not isinstance(value, bool):
                    add(path, "expected true or false")

            return check_boolean
        if kind in ("int", "long"):
            low, high = (INT_MIN, INT_MAX) if kind == "int" else (LONG_MIN, LONG_MAX)

            def check_integer(value: Any, path: str, add: _Add) -> None:
                if isinstance(value, bool) or not isinstance(value, int):
                    add(path, "expected a whole number")
                elif not low <= value <= high:
                    add(path, f"out of range for an Avro {kind}")

            return check_integer
        if kind in ("float", "double"):

            def check_number(value: Any, path: str, add: _Add) -> None:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    add(path, "expected a number")

            return check_number
        if kind in ("bytes", "fixed"):

            def check_bytes(value: Any, path: str, add: _Add) -> None:
                if not isinstance(value, bytes | bytearray):
                    add(path, "expected bytes")

            return check_bytes
        return _nothing


def _nothing(value: Any, path: str, add: _Add) -> None:
    return None


# id(schema) -> (schema, its checker), kept like _names_by_id.
_checkers_by_id: dict[int, tuple[Schema, _Check]] = {}


def _checker_of(schema: Schema) -> _Check:
    found = _checkers_by_id.get(id(schema))
    if found is not None and found[0] is schema:
        return found[1]
    checker = _Compiler(_names_of(schema)).compile(schema, None, "", False)
    if len(_checkers_by_id) >= _NAMES_CACHE_LIMIT:
        _checkers_by_id.clear()
    _checkers_by_id[id(schema)] = (schema, checker)
    return checker


def check_against_schema(record: Any, schema: Schema, record_number: int | None = None) -> list[Problem]:
    """Structural problems only: required fields, types, enums, logical types, unknown fields.
    Runs the checker built once for ``schema`` (:class:`_Compiler`); ``_SchemaWalk`` is the
    reference it must agree with (tests/test_schemas_validation.py compares them)."""
    problems: list[Problem] = []

    def add(path: str, reason: str) -> None:
        problems.append(Problem(path or "<record>", reason, record_number))

    _checker_of(schema)(record, "", add)
    return problems


def walk_against_schema(record: Any, schema: Schema, record_number: int | None = None) -> list[Problem]:
    """The same problems by the reference walk (recursive, the schema read again per value)."""
    walk = _SchemaWalk(_names_of(schema), record_number)
    walk.value(record, schema, "", None)
    return walk.problems


# --- rules a schema cannot express --------------------------------------------------------------


def _age_on(born: dt.date, on: dt.date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def _get(record: Mapping[str, Any], dotted: str) -> Any:
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _is_date(value: object) -> TypeGuard[dt.date]:
    return isinstance(value, dt.date) and not isinstance(value, dt.datetime)


def _is_aware(value: object) -> TypeGuard[dt.datetime]:
    return isinstance(value, dt.datetime) and value.utcoffset() is not None


# A rule set: (record, now, add(path, reason)); it reports through ``add``, never raises.
_Rule = Callable[[Mapping[str, Any], dt.datetime, Callable[[str, str], None]], None]


def _envelope_rules(record: Mapping[str, Any], now: dt.datetime, add: Callable[[str, str], None]) -> None:
    """created_at and version: the referral itself."""
    created = record.get("created_at")
    if _is_aware(created) and created > now + CLOCK_SKEW:
        add("created_at", "is in the future")
    version = record.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version < 1:
        add("version", "must be 1 or more")


def _child_rules(record: Mapping[str, Any], now: dt.datetime, add: Callable[[str, str], None]) -> None:
    """The child's age (and the Early Support Pathway's 0-5 bound) and the household's dates."""
    today = now.date()
    created = record.get("created_at")
    created_on = created.date() if _is_aware(created) else None
    born = _get(record, "child.date_of_birth")
    if _is_date(born):
        if born > today:
            add("child.date_of_birth", "is in the future")
        elif created_on is not None and born > created_on:
            add("child.date_of_birth", "is after the referral was created")
        else:
            reference = created_on if created_on is not None else today
            age = _age_on(born, reference)
            if age > MAX_CHILD_AGE_YEARS:
                add("child.date_of_birth", f"child is older than {MAX_CHILD_AGE_YEARS}")
            flags = record.get("flags")
            esp = flags.get("early_support_pathway") if isinstance(flags, Mapping) else None
            if esp is True and age > EARLY_SUPPORT_PATHWAY_MAX_AGE_YEARS:
                add("flags.early_support_pathway", "set for a child older than 5")

    members = record.get("household")
    if isinstance(members, list):
        for index, member in enumerate(members):
            member_born = member.get("date_of_birth") if isinstance(member, Mapping) else None
            if _is_date(member_born) and member_born > today:
                add(f"household[{index}].date_of_birth", "is in the future")


def _concerns_rules(record: Mapping[str, Any], now: dt.datetime, add: Callable[[str, str], None]) -> None:
    """Concerns: at least one, concern_types listing exactly their types, flags consistent."""
    today = now.date()
    concerns = record.get("concerns")
    concern_types = record.get("concern_types")
    if isinstance(concerns, list):
        if not concerns:
            add("concerns", "at least one concern is required")
        # a corrupted type (a dict, a list) is reported by the schema layer; never crash here
        found = {c.get("type") for c in concerns if isinstance(c, Mapping) and isinstance(c.get("type"), str)}
        for index, concern in enumerate(concerns):
            since = concern.get("since") if isinstance(concern, Mapping) else None
            if _is_date(since) and since > today:
                add(f"concerns[{index}].since", "is in the future")
        if isinstance(concern_types, list) and all(isinstance(t, str) for t in concern_types):
            if len(set(concern_types)) != len(concern_types):
                add("concern_types", "lists a type more than once")
            if set(concern_types) != found:
                add("concern_types", "does not list exactly the types of the concerns")
    if isinstance(concern_types, list):
        flags = record.get("flags")
        if isinstance(flags, Mapping):
            if "safeguarding" in concern_types and flags.get("safeguarding_concern") is False:
                add("flags.safeguarding_concern", "must be set when a safeguarding concern is raised")
            if "crime_prevention" in concern_types and flags.get("crime_prevention") is False:
                add("flags.crime_prevention", "must be set when a crime-prevention concern is raised")


def _services_rules(record: Mapping[str, Any], now: dt.datetime, add: Callable[[str, str], None]) -> None:
    """Services requested: at least one, none twice; a named provider only for a requested
    service, and at most one per service (the router sends that service's share to it alone)."""
    services = record.get("services_requested")
    if isinstance(services, list):
        if not services:
            add("services_requested", "at least one service is required")
        elif len(set(map(str, services))) != len(services):
            add("services_requested", "lists a service more than once")
    providers = record.get("service_providers")
    if not isinstance(providers, list):
        return
    requested = {s for s in services if isinstance(s, str)} if isinstance(services, list) else set()
    named: set[str] = set()
    for index, entry in enumerate(providers):
        service = entry.get("service") if isinstance(entry, Mapping) else None
        if not isinstance(service, str):
            continue  # a missing or mistyped service is the schema layer's to report
        if service not in requested:
            add(f"service_providers[{index}].service", "is not one of services_requested")
        elif service in named:
            add(f"service_providers[{index}].service", "names a second provider for the same service")
        named.add(service)


def _school_rules(record: Mapping[str, Any], now: dt.datetime, add: Callable[[str, str], None]) -> None:
    """Attendance counts and periods, year group, exclusions."""
    today = now.date()
    attendance = _get(record, "school.attendance")
    if isinstance(attendance, Mapping):
        counts = {
            name: attendance.get(name)
            for name in (
                "possible_sessions",
                "present_sessions",
                "authorised_absence_sessions",
                "unauthorised_absence_sessions",
            )
        }
        whole = {k: v for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)}
        for name, count in whole.items():
            if count < 0:
                add(f"school.attendance.{name}", "must not be negative")
        if len(whole) == 4 and all(v >= 0 for v in whole.values()):
            recorded = sum(whole[k] for k in whole if k != "possible_sessions")
            if recorded > whole["possible_sessions"]:
                add("school.attendance.possible_sessions", "is less than the sessions recorded")
        start, end = attendance.get("period_start"), attendance.get("period_end")
        if _is_date(start) and _is_date(end) and end < start:
            add("school.attendance.period_end", "is before period_start")
        if _is_date(end) and end > today:
            add("school.attendance.period_end", "is in the future")
        by_code = attendance.get("by_code")
        if isinstance(by_code, list):
            for index, entry in enumerate(by_code):
                sessions = entry.get("sessions") if isinstance(entry, Mapping) else None
                if isinstance(sessions, int) and not isinstance(sessions, bool) and sessions < 0:
                    add(f"school.attendance.by_code[{index}].sessions", "must not be negative")

    year_group = _get(record, "school.year_group")
    if isinstance(year_group, int) and not isinstance(year_group, bool) and not -2 <= year_group <= 14:
        add("school.year_group", "not a national curriculum year group (-2 to 14)")
    exclusions = _get(record, "school.exclusions")
    if isinstance(exclusions, list):
        for index, exclusion in enumerate(exclusions):
            if not isinstance(exclusion, Mapping):
                continue
            sessions = exclusion.get("sessions")
            if isinstance(sessions, int) and not isinstance(sessions, bool) and sessions < 1:
                add(f"school.exclusions[{index}].sessions", "must be 1 or more")
            start = exclusion.get("start_date")
            if _is_date(start) and start > today + dt.timedelta(days=31):
                add(f"school.exclusions[{index}].start_date", "is more than a month ahead")


def _consent_rules(record: Mapping[str, Any], now: dt.datetime, add: Callable[[str, str], None]) -> None:
    """Consent recorded by whom and when; an override only without consent."""
    consent = record.get("consent")
    if isinstance(consent, Mapping) and consent.get("state") in ("given", "refused"):
        if consent.get("recorded_at") is None:
            add("consent.recorded_at", "required when consent was given or refused")
        if consent.get("recorded_by") is None:
            add("consent.recorded_by", "required when consent was given or refused")
    recorded_at = consent.get("recorded_at") if isinstance(consent, Mapping) else None
    if _is_aware(recorded_at) and recorded_at > now + CLOCK_SKEW:
        add("consent.recorded_at", "is in the future")

    override = record.get("sharing_override")
    if isinstance(override, Mapping):
        if isinstance(consent, Mapping) and consent.get("state") == "given":
            add(
                "sharing_override",
                "present although consent was given; an override is for sharing without it",
            )
        approved_at = override.get("approved_at")
        if _is_aware(approved_at) and approved_at > now + CLOCK_SKEW:
            add("sharing_override.approved_at", "is in the future")


_REFERRAL_SECTIONS: tuple[_Rule, ...] = (
    _envelope_rules,
    _child_rules,
    _concerns_rules,
    _services_rules,
    _school_rules,
    _consent_rules,
)


def _referral_rules(record: Mapping[str, Any], now: dt.datetime, add: Callable[[str, str], None]) -> None:
    for section in _REFERRAL_SECTIONS:
        section(record, now, add)


def _status_rules(record: Mapping[str, Any], now: dt.datetime, add: Callable[[str, str], None]) -> None:
    if record.get("status") in ("declined", "more_information_needed") and record.get("reason") is None:
        add("reason", "required when declining or asking for more information")
    at = record.get("at")
    if _is_aware(at) and at > now + CLOCK_SKEW:
        add("at", "is in the future")
    version = record.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version < 1:
        add("version", "must be 1 or more")


# Fields that name a party, checked against ``known_parties``.
_PARTY_FIELDS = {"earlyhelp.status.ReferralStatus": ("from_party", "to_party")}
_RULES: dict[str, _Rule] = {
    "earlyhelp.referral.Referral": _referral_rules,
    "earlyhelp.status.ReferralStatus": _status_rules,
}


def validate(
    record: Any,
    schema: Schema | None = None,
    *,
    now: dt.datetime | None = None,
    record_number: int | None = None,
    known_parties: Collection[str] | None = None,
) -> list[Problem]:
    """Every problem with ``record`` (a Referral unless another schema is given); [] when valid.

    ``now`` is the clock for "not in the future" checks (timezone-aware; defaults to the
    current time). ``record_number`` is copied into each Problem for file-wide reports.
    ``known_parties`` are the names a party field may hold (statuses' ``from_party`` and
    ``to_party``): the parties are the deployment's data, not the contract's, so the caller
    passes them; every stage that accepts a status does.
    """
    schema = schema if schema is not None else referral_schema()
    now = now if now is not None else dt.datetime.now(dt.UTC)
    problems = check_against_schema(record, schema, record_number)
    if isinstance(record, Mapping):
        failed = {p.path for p in problems}

        def add(path: str, reason: str) -> None:
            # A field already failing its type check gets no second, derived complaint.
            if path not in failed:
                problems.append(Problem(path, reason, record_number))

        name = full_name(schema["name"], schema.get("namespace"))
        rules = _RULES.get(name)
        if rules is not None:
            rules(record, now, add)
        if known_parties is not None:
            for party_field in _PARTY_FIELDS.get(name, ()):
                party = record.get(party_field)
                if isinstance(party, str) and party.strip() and party not in known_parties:
                    add(party_field, "not a known party")
    return problems


def validate_referral(
    record: Any, *, now: dt.datetime | None = None, record_number: int | None = None
) -> list[Problem]:
    """Every problem with a Referral against the latest schema."""
    return validate(record, referral_schema(), now=now, record_number=record_number)


def validate_status(
    record: Any, *, now: dt.datetime | None = None, known_parties: Collection[str] | None = None
) -> list[Problem]:
    return validate(record, load_schema("status"), now=now, known_parties=known_parties)


def ensure_valid(
    record: Any,
    schema: Schema | None = None,
    *,
    now: dt.datetime | None = None,
    context: str = "referral",
    known_parties: Collection[str] | None = None,
) -> None:
    """Raise ValidationError listing every problem; return quietly when the record is valid."""
    problems = validate(record, schema, now=now, known_parties=known_parties)
    if problems:
        raise ValidationError(problems, context)
