"""Writes with each union's branch named: the bytes fastavro's own search gives, the value left
as it was, and a value that does not fit its branch still refused."""

from __future__ import annotations

import copy
import io
import random
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_schemas_strategies import avro_records

from referral_broker.errors import ValidationError
from referral_broker.schemas import codec, registry, union_branches, views
from referral_broker.schemas.synth import synthetic_referral

REFERRAL = registry.referral_schema()
AUDIT = registry.audit_decision_schema()
PATHS = registry.field_paths(REFERRAL)


def both_ways(parsed: Any, value: Any) -> tuple[bytes, bytes]:
    searched, named = io.BytesIO(), io.BytesIO()
    schemaless_writer(searched, parsed, value)
    union_branches.write(named, parsed, value)
    return searched.getvalue(), named.getvalue()


SLOW = [HealthCheck.too_slow, HealthCheck.large_base_example]


@settings(max_examples=120, deadline=None, suppress_health_check=SLOW)
@given(avro_records(REFERRAL), st.sets(st.sampled_from(PATHS), max_size=10))
def test_same_bytes_as_fastavro_for_referrals_and_views(record: dict[str, Any], granted: set[str]) -> None:
    before = copy.deepcopy(record)
    for schema in (REFERRAL, views.view_schema(granted)):
        searched, named = both_ways(codec.prepare(schema).parsed, record)
        assert named == searched
    assert record == before  # the value given is never changed


@settings(max_examples=60, deadline=None, suppress_health_check=SLOW)
@given(avro_records(AUDIT))
def test_the_bytes_are_fastavros_own_for_audit_records(record: dict[str, Any]) -> None:
    searched, named = both_ways(codec.prepare(AUDIT).parsed, record)
    assert named == searched


def test_only_unions_of_null_and_one_complex_type_are_named() -> None:
    hint = union_branches.union_hints(codec.prepare(REFERRAL).parsed)
    assert hint is not None
    referral = synthetic_referral(random.Random(5))
    referral["school"] = {**referral["school"], "attendance": None} if referral.get("school") else None
    named = hint(referral)
    child = named["child"]
    assert child["contact"] is None or child["contact"][0] == "earlyhelp.referral.ChildContact"
    members = named["household"]
    assert all(m["contact"] is None or m["contact"][0] == "earlyhelp.referral.MemberContact" for m in members)
    assert named["identifiers"]["nhs_number"] is None or isinstance(named["identifiers"]["nhs_number"], str)
    flat = {"type": "record", "name": "Flat", "fields": [{"name": "a", "type": ["null", "string"]}]}
    assert union_branches.union_hints(flat) is None


def test_a_type_referring_to_itself_and_a_union_of_several_branches_write_the_same_bytes() -> None:
    a = {"type": "record", "name": "A", "fields": [{"name": "x", "type": "int"}]}
    b = {"type": "record", "name": "B", "fields": [{"name": "y", "type": "string"}]}
    parsed = parse_schema(
        {
            "type": "record",
            "name": "Node",
            "fields": [
                {"name": "next", "type": ["null", "Node"]},
                {"name": "either", "type": ["null", a, b]},
                {"name": "tags", "type": ["null", {"type": "array", "items": "string"}]},
                {"name": "kind", "type": ["null", {"type": "enum", "name": "Kind", "symbols": ["P", "Q"]}]},
            ],
        }
    )
    inner = {"next": None, "either": {"y": "b"}, "tags": None, "kind": None}
    value = {"next": inner, "either": {"x": 1}, "tags": ["t"], "kind": "Q"}
    searched, named = both_ways(parsed, value)
    assert named == searched
    assert schemaless_reader(io.BytesIO(named), parsed, None) == value


def test_a_value_that_does_not_fit_its_branch_is_still_refused_with_its_path() -> None:
    referral = synthetic_referral(random.Random(7))
    referral["child"] = {**referral["child"], "contact": {"phone": 7, "email": None}}
    with pytest.raises(ValidationError, match=r"child\.contact\.phone"):
        codec.encode(referral)
    referral["child"]["contact"] = "not a record"
    with pytest.raises(ValidationError, match=r"child\.contact"):
        codec.encode(referral)
