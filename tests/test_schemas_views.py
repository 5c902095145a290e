"""Per-recipient views: exactly the granted fields survive, by Avro schema resolution."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_schemas_strategies import avro_records

from referral_broker.errors import ContractError
from referral_broker.schemas import codec, registry, views
from referral_broker.schemas.synth import synthetic_referral

SCHEMA = registry.referral_schema()
ALL_PATHS = registry.field_paths(SCHEMA)
RECORD_NAMES = {name for name, node in registry.named_types(SCHEMA).items() if node["type"] == "record"}


def expected_paths(granted: set[str]) -> set[str]:
    """Granted paths, everything under them, and the records enclosing them."""
    kept = set()
    for path in ALL_PATHS:
        if any(path == g or path.startswith(f"{g}.") or g.startswith(f"{path}.") for g in granted):
            kept.add(path)
    return kept


def value_paths(value: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every key present in a record (arrays transparent)."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            path = f"{prefix}{key}"
            found.add(path)
            found |= value_paths(inner, f"{path}.")
    elif isinstance(value, list):
        for item in value:
            found |= value_paths(item, prefix)
    return found


def at_path(value: Any, path: str) -> list[Any]:
    """Every value at a dotted path: arrays fan out, a null parent yields nothing."""
    head, _, rest = path.partition(".")
    if isinstance(value, list):
        return [found for item in value for found in at_path(item, path)]
    if value is None:
        return []
    inner = value[head]
    return at_path(inner, rest) if rest else [inner]


grants = st.sets(st.sampled_from(ALL_PATHS), max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grants)
def test_view_schema_has_exactly_the_granted_fields(granted: set[str]) -> None:
    view = views.view_schema(granted)
    assert set(registry.field_paths(view)) == expected_paths(granted)
    assert set(views.withheld_paths(view)) == set(ALL_PATHS) - expected_paths(granted)
    assert registry.check_schema(view) == []
    # the same full names as the canonical schema, so Avro resolution can match them
    assert {n for n, node in registry.named_types(view).items() if node["type"] == "record"} <= RECORD_NAMES


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(grants, avro_records(SCHEMA))
def test_projection_drops_exactly_the_fields_not_granted(granted: set[str], record: dict[str, Any]) -> None:
    view = views.view_schema(granted)
    projected = views.project(record, view)
    allowed = expected_paths(granted)
    present = value_paths(projected)
    assert present <= allowed
    # every granted field the record holds arrives unchanged
    for path in granted:
        assert at_path(projected, path) == at_path(record, path), path
    # the wire route gives the same result: decode canonical bytes with the view as reader
    assert codec.decode(codec.encode(record), view) == projected


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(grants, avro_records(SCHEMA))
def test_whole_record_under_a_view_is_its_projection(granted: set[str], record: dict[str, Any]) -> None:
    """The router encodes each copy from the whole referral with the recipient's view schema
    (no projection first): the bytes must be those of the projection, field for field."""
    view = views.view_schema(granted)
    projected = views.project(record, view)
    whole = codec.encode(record, view)
    assert whole == codec.encode(projected, view)
    assert codec.decode(whole) == projected


def test_granting_a_record_grants_all_of_it() -> None:
    view = views.view_schema(["identifiers"])
    assert registry.field_paths(view) == [
        "identifiers",
        "identifiers.nhs_number",
        "identifiers.ni_number",
        "identifiers.upn",
    ]


def test_arrays_are_transparent() -> None:
    record = synthetic_referral(random.Random(3))
    view = views.view_schema(["household.relationship", "referral_id"])
    projected = views.project(record, view)
    assert projected["household"] == [{"relationship": m["relationship"]} for m in record["household"]]


def test_optional_fields_keep_a_null_default_in_the_view() -> None:
    view = views.view_schema(["identifiers.nhs_number"])
    field = view["fields"][0]["type"]["fields"][0]
    assert field["type"] == ["null", "string"] and field["default"] is None


def test_partly_granted_records_are_classed_by_what_they_still_hold() -> None:
    view = views.view_schema(["child.given_name", "household.given_name"])
    classes = registry.field_classes(view)
    assert classes["child"] == "personal"  # ethnicity (special category) is withheld
    assert classes["household"] == "personal"  # NI numbers are withheld


def test_an_unknown_path_is_refused_not_ignored() -> None:
    with pytest.raises(ContractError, match=r"child\.shoe_size"):
        views.view_schema(["child.given_name", "child.shoe_size"])


def test_views_carry_their_origin() -> None:
    view = views.view_schema(["referral_id"])
    assert view["view_of"] == registry.fingerprint(SCHEMA).hex()
    assert view["granted"] == ["referral_id"]
    assert registry.fingerprint(view) != registry.fingerprint(SCHEMA)
