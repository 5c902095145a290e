"""Edge validation: every problem named by field path and reason, never by value."""

from __future__ import annotations

import copy
import datetime as dt
import random
import uuid
from typing import Any

import pytest
from county import SCHOOL
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_schemas_strategies import TEST_NOW, valid_referrals

from referral_broker.errors import ValidationError
from referral_broker.schemas import registry
from referral_broker.schemas.registry import named_types, resolve_type, without_null
from referral_broker.schemas.synth import synthetic_referral
from referral_broker.schemas.validation import ensure_valid, schema_path, validate, validate_status

SCHEMA = registry.referral_schema()
NAMES = named_types(SCHEMA)
TEAM = "district-fenland"


def referral(seed: int = 1, **changes: Any) -> dict[str, Any]:
    record = synthetic_referral(random.Random(seed))
    record.update(changes)
    return record


def paths(problems: list) -> set[str]:
    return {p.path for p in problems}


def test_a_synthetic_referral_is_valid() -> None:
    assert validate(referral(), now=TEST_NOW) == []


def test_missing_required_fields_are_listed() -> None:
    record = referral()
    del record["referral_id"], record["child"]["date_of_birth"]
    problems = validate(record, now=TEST_NOW)
    assert ("referral_id", "required field is missing") in {(p.path, p.reason) for p in problems}
    assert "child.date_of_birth" in paths(problems)


def _referral_with(seed: int, mutate: Any) -> dict[str, Any]:
    """A synthetic referral (searched from ``seed``) that has the parts ``mutate`` needs."""
    for attempt in range(seed, seed + 500):
        record = synthetic_referral(random.Random(attempt))
        try:
            mutate(record)
        except (KeyError, IndexError, TypeError):
            continue
        return record
    raise AssertionError("no synthetic referral with the needed parts")


BAD_INPUT = [
    ("wrong NHS check digit", lambda r: r["identifiers"].__setitem__("nhs_number", "9449305553"),
     "identifiers.nhs_number", "9449305553"),
    ("wrong UPN check letter", lambda r: r["identifiers"].__setitem__("upn", "A801200005001"),
     "identifiers.upn", "A801200005001"),
    ("bad NI number", lambda r: r["identifiers"].__setitem__("ni_number", "QQ123456Z"),
     "identifiers.ni_number", "QQ123456Z"),
    ("bad member NI number", lambda r: r["household"][0].__setitem__("ni_number", "GB123456A"),
     "household[0].ni_number", "GB123456A"),
    ("bad postcode", lambda r: r["child"]["address"].__setitem__("postcode", "CB99 XYZ"),
     "child.address.postcode", "CB99 XYZ"),
    ("future birth date", lambda r: r["child"].__setitem__("date_of_birth", dt.date(2031, 5, 4)),
     "child.date_of_birth", "2031"),
    ("unknown enum", lambda r: r.__setitem__("district", "peterborough"), "district", "peterborough"),
    ("wrong type", lambda r: r["child"].__setitem__("interpreter_needed", "Nope-Secret"),
     "child.interpreter_needed", "Nope-Secret"),
    ("bad email", lambda r: r["referrer"]["practitioner"].__setitem__("email", "jane at school"),
     "referrer.practitioner.email", "jane at school"),
    ("naive timestamp", lambda r: r.__setitem__("created_at", dt.datetime(2025, 1, 1, 9, 0)), "created_at", "2025"),
    ("not a uuid", lambda r: r.__setitem__("referral_id", "not-a-uuid-secret"), "referral_id", "not-a-uuid-secret"),
    ("unknown field", lambda r: r["child"].__setitem__("shoe_size", 3), "child.shoe_size", "3"),
    ("contact details in a clear label",
     lambda r: r["referrer"]["practitioner"].__setitem__("role", "Call 07700 900123"),
     "referrer.practitioner.role", "07700 900123"),
    ("empty required text", lambda r: r["child"].__setitem__("given_name", "   "), "child.given_name", "   "),
]  # fmt: skip


@pytest.mark.parametrize(("label", "mutate", "path", "value"), BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_is_rejected_by_path_and_never_echoed(
    label: str, mutate: Any, path: str, value: str
) -> None:
    record = _referral_with(3, mutate)
    problems = validate(record, now=TEST_NOW)
    assert path in paths(problems), label
    with pytest.raises(ValidationError) as caught:
        ensure_valid(record, now=TEST_NOW)
    assert path in str(caught.value)
    if value.strip() and not value.isdigit():
        assert value not in str(caught.value)
        assert all(value not in p.reason for p in caught.value.problems)


def test_a_key_that_looks_like_a_value_is_not_echoed() -> None:
    record = referral()
    record["child"]["Jane Smith 07700 900123"] = True
    problems = validate(record, now=TEST_NOW)
    assert ("child.<unnamed>", "unknown field") in {(p.path, p.reason) for p in problems}


def test_every_problem_is_listed_not_just_the_first() -> None:
    record = referral(district="nowhere", priority="whenever", version=0)
    record["identifiers"]["nhs_number"] = "1234567890"
    assert {"district", "priority", "version", "identifiers.nhs_number"} <= paths(
        validate(record, now=TEST_NOW)
    )


def test_consistency_rules() -> None:
    record = _referral_with(5, lambda r: r["concerns"][0])
    record["concern_types"] = ["other"] if record["concern_types"] != ["other"] else ["housing"]
    assert "concern_types" in paths(validate(record, now=TEST_NOW))

    record = referral(7)
    record["concerns"] = [{"type": "safeguarding", "detail": "x", "since": None}]
    record["concern_types"] = ["safeguarding"]
    record["flags"]["safeguarding_concern"] = False
    assert "flags.safeguarding_concern" in paths(validate(record, now=TEST_NOW))

    record = referral(8)
    record["consent"] = {"state": "given", "recorded_at": None, "recorded_by": None}
    assert {"consent.recorded_at", "consent.recorded_by"} <= paths(validate(record, now=TEST_NOW))


def test_an_override_is_only_for_sharing_without_consent() -> None:
    record = _referral_with(9, lambda r: r["sharing_override"]["ground"])
    record["consent"] = {
        "state": "given",
        "recorded_at": record["created_at"],
        "recorded_by": "A Practitioner",
    }
    assert "sharing_override" in paths(validate(record, now=TEST_NOW))


def test_early_support_pathway_only_for_children_up_to_five() -> None:
    record = referral(11)
    record["child"]["date_of_birth"] = record["created_at"].date().replace(year=record["created_at"].year - 9)
    record["flags"]["early_support_pathway"] = True
    assert "flags.early_support_pathway" in paths(validate(record, now=TEST_NOW))


def test_attendance_counts_must_add_up() -> None:
    record = _referral_with(12, lambda r: r["school"]["attendance"]["possible_sessions"])
    record["school"]["attendance"]["possible_sessions"] = 1
    assert "school.attendance.possible_sessions" in paths(validate(record, now=TEST_NOW))


def test_schema_path_drops_indexes() -> None:
    assert schema_path("household[12].contact.email") == "household.contact.email"


def test_status_messages_are_validated_too() -> None:
    status = {
        "status_id": uuid.uuid4(),
        "referral_id": uuid.uuid4(),
        "version": 1,
        "from_party": TEAM,
        "to_party": SCHOOL,
        "status": "declined",
        "reason": None,
        "at": TEST_NOW,
        "actor_role": "Early Help Practitioner",
    }
    assert paths(validate_status(status, now=TEST_NOW)) == {"reason"}
    status["to_party"] = "nobody"
    assert "to_party" not in paths(validate_status(status, now=TEST_NOW))  # parties are the caller's
    known = {TEAM, SCHOOL}
    assert "to_party" in paths(validate_status(status, now=TEST_NOW, known_parties=known))


# --- property: any single-field corruption is rejected with that field named -----------------


def _leaves(value: Any, node: Any, path: str, namespace: str | None) -> list[tuple[str, Any, bool, bool]]:
    """(path with indexes, field type, required, has a default) for every field present in ``value``."""
    node = resolve_type(without_null(node), NAMES, namespace)
    found: list[tuple[str, Any, bool, bool]] = []
    if isinstance(node, dict) and node.get("type") == "record" and isinstance(value, dict):
        inner = registry.full_name(node["name"], node.get("namespace", namespace)).rpartition(".")[0]
        for item in node["fields"]:
            child = f"{path}.{item['name']}" if path else item["name"]
            required = not (isinstance(item["type"], list) and "null" in item["type"])
            found.append((child, item["type"], required, "default" in item))
            found += _leaves(value.get(item["name"]), item["type"], child, inner)
    elif isinstance(node, dict) and node.get("type") == "array" and isinstance(value, list):
        for index, item in enumerate(value):
            found += _leaves(item, node["items"], f"{path}[{index}]", namespace)
    return found


def _parent_and_key(record: dict[str, Any], path: str) -> tuple[Any, Any]:
    parts: list[Any] = []
    for part in path.split("."):
        name, _, rest = part.partition("[")
        parts.append(name)
        if rest:
            parts.append(int(rest.rstrip("]")))
    node: Any = record
    for part in parts[:-1]:
        node = node[part]
    return node, parts[-1]


def _corruptions(field_type: Any, required: bool, defaulted: bool) -> list[tuple[str, Any]]:
    node = resolve_type(without_null(field_type), NAMES, "earlyhelp.referral")
    kind = node.get("type") if isinstance(node, dict) else node
    logical = node.get("logicalType") if isinstance(node, dict) else None
    options: list[tuple[str, Any]] = [("wrong type", {"nested": "object"} if kind != "record" else "text")]
    if kind in ("string", "enum", "array", "record") or logical:
        options.append(("number instead", 1234567))
    if kind == "enum":
        options.append(("unknown symbol", "no_such_symbol"))
    if kind in ("int", "long", "boolean") and not logical:
        options.append(("text instead", "many"))
    if required:
        options.append(("null", None))
    if required and not defaulted:  # a field added with a default (v2) may be absent: the default applies
        options.append(("missing", KeyError))
    return options


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_referrals(), st.data())
def test_any_single_field_corruption_is_rejected_with_that_field_named(
    record: dict[str, Any], data: Any
) -> None:
    assert validate(record, now=TEST_NOW) == []
    path, field_type, required, defaulted = data.draw(st.sampled_from(_leaves(record, SCHEMA, "", None)))
    label, bad = data.draw(st.sampled_from(_corruptions(field_type, required, defaulted)))
    corrupted = copy.deepcopy(record)
    parent, key = _parent_and_key(corrupted, path)
    if bad is KeyError:
        del parent[key]
    else:
        parent[key] = bad
    problems = validate(corrupted, now=TEST_NOW)
    assert path in paths(problems), (label, path)


IDENTIFIER_CORRUPTIONS = {
    "identifiers.nhs_number": lambda v: v[:-1] + str((int(v[-1]) + 1) % 10),
    "identifiers.upn": lambda v: ("A" if v[0] != "A" else "B") + v[1:],
    "identifiers.ni_number": lambda v: v[:-1] + "E",
    "child.address.postcode": lambda v: v.replace(" ", ""),
}


@settings(max_examples=100, deadline=None)
@given(valid_referrals(), st.sampled_from(sorted(IDENTIFIER_CORRUPTIONS)))
def test_any_broken_identifier_is_rejected_by_path(record: dict[str, Any], path: str) -> None:
    parent, key = _parent_and_key(record, path)
    assume(parent[key] is not None)  # not a pass: hypothesis fails the test if too few examples qualify
    parent[key] = IDENTIFIER_CORRUPTIONS[path](parent[key])
    assert path in paths(validate(record, now=TEST_NOW))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_referrals(), st.data())
def test_the_checker_built_once_finds_what_the_reference_walk_finds(record: dict[str, Any], data: Any) -> None:
    """The schema layer runs a checker built once per schema; the recursive walk it replaced
    is kept as the reference: on valid referrals and on one or two corruptions of any field
    (wrong types, nulls, missing, unknown symbols, unknown keys) both list the same problems,
    in the same order."""
    from referral_broker.schemas.validation import check_against_schema, walk_against_schema

    corrupted = copy.deepcopy(record)
    for _ in range(data.draw(st.integers(0, 2))):
        path, field_type, required, defaulted = data.draw(st.sampled_from(_leaves(corrupted, SCHEMA, "", None)))
        _label, bad = data.draw(st.sampled_from(_corruptions(field_type, required, defaulted)))
        try:
            parent, key = _parent_and_key(corrupted, path)
            if bad is KeyError:
                del parent[key]
            else:
                parent[key] = bad
        except (KeyError, IndexError, TypeError):
            pass  # an earlier corruption removed its parent
    if data.draw(st.booleans()):
        corrupted["no_such_field"] = 1
    found = check_against_schema(corrupted, SCHEMA, 7)
    assert found == walk_against_schema(corrupted, SCHEMA, 7)
    status_schema = registry.status_schema()
    assert check_against_schema(corrupted, status_schema) == walk_against_schema(corrupted, status_schema)
