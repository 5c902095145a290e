"""The shipped schemas obey the contract rules; fingerprints, paths, classes and sealing units."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from referral_broker.errors import ContractError
from referral_broker.schemas import registry

DATA = Path(__file__).parent / "data" / "schemas"
FINGERPRINT_VECTORS = json.loads((DATA / "fingerprint_vectors.json").read_text("utf-8"))["vectors"]

# Operational fields travel in the clear. Any new one must be added here on purpose, after a
# review that it cannot carry personal data.
REVIEWED_OPERATIONAL_REFERRAL_PATHS = {
    "referral_id",
    "version",
    "created_at",
    "district",
    "priority",
    "flags",
    "flags.safeguarding_concern",
    "flags.crime_prevention",
    "flags.early_support_pathway",
    "concern_types",
    "referrer.partner",
    "referrer.organisation",
    "referrer.practitioner.role",
    "concerns.type",
    "consent.recorded_at",
    "sharing_override.override_id",
    "sharing_override.ground",
    "sharing_override.approved_by.role",
    "sharing_override.approved_at",
}

# Paths other parts of the broker (policy, adapters, router) are built on.
PATHS_OTHERS_DEPEND_ON = [
    "referral_id", "version", "created_at", "district", "priority", "concern_types",
    "flags.safeguarding_concern", "flags.crime_prevention", "flags.early_support_pathway",
    "referrer.partner", "referrer.organisation", "referrer.practitioner.name", "referrer.practitioner.email",
    "child.given_name", "child.family_name", "child.date_of_birth", "child.sex", "child.ethnicity",
    "child.first_language", "child.interpreter_needed", "child.address.postcode", "child.contact.phone",
    "identifiers.nhs_number", "identifiers.ni_number", "identifiers.upn",
    "household.given_name", "household.date_of_birth", "household.relationship", "household.ni_number",
    "home_circumstances", "health_and_development", "send",
    "school.attendance.possible_sessions", "school.attendance.by_code.code", "school.exclusions.kind",
    "school.exclusions.reason", "school.curriculum_results.outcome",
    "concerns.type", "concerns.detail", "services_requested",
    "consent.state", "consent.recorded_at", "consent.recorded_by",
    "sharing_override.ground", "sharing_override.reason", "sharing_override.approved_by.role",
    "sharing_override.approved_by.name", "sharing_override.approved_at",
]  # fmt: skip


@pytest.mark.parametrize("version", registry.shipped_versions(), ids=lambda v: v.path.name)
def test_every_shipped_schema_passes_the_rules(version: registry.SchemaVersion) -> None:
    assert registry.check_schema(version.schema) == []
    for info in registry.walk_fields(version.schema):
        assert info.data_class in registry.DATA_CLASSES, info.path
        assert info.field.get("doc"), info.path


def test_all_three_families_ship() -> None:
    assert {v.family for v in registry.shipped_versions()} == set(registry.FAMILIES)


def _without(schema: dict, path: str, key: str) -> dict:
    changed = copy.deepcopy(schema)
    for info in registry.walk_fields(changed):
        if info.path == path:
            del info.field[key]
            return changed
    raise AssertionError(path)


@pytest.mark.parametrize(
    "path", ["referral_id", "child.date_of_birth", "household.ni_number", "concerns.detail"]
)
def test_a_field_without_a_data_class_fails_the_check(path: str) -> None:
    broken = _without(registry.referral_schema(), path, "data_class")
    problems = registry.check_schema(broken)
    assert [(p.path, p.reason) for p in problems] == [(path, "field has no data_class tag")]
    with pytest.raises(ContractError, match=path):
        registry.ensure_schema(broken)


def test_a_field_without_a_doc_fails_the_check() -> None:
    broken = _without(registry.referral_schema(), "child.sex", "doc")
    assert [p.path for p in registry.check_schema(broken)] == ["child.sex"]


def test_an_unknown_data_class_fails_the_check() -> None:
    broken = copy.deepcopy(registry.referral_schema())
    broken["fields"][0]["data_class"] = "public"
    assert [p.path for p in registry.check_schema(broken)] == ["referral_id"]


def test_a_record_classed_below_its_contents_fails_the_check() -> None:
    broken = copy.deepcopy(registry.referral_schema())
    identifiers = next(f for f in broken["fields"] if f["name"] == "identifiers")
    identifiers["data_class"] = "personal"
    problems = registry.check_schema(broken)
    assert problems and {p.path for p in problems} == {"identifiers"}


def test_a_record_type_used_at_two_paths_fails_the_check() -> None:
    broken = copy.deepcopy(registry.referral_schema())
    broken["fields"].append(
        {"name": "second_child", "type": "Child", "doc": "again", "data_class": "special_category"}
    )
    assert any("also used at 'child'" in p.reason for p in registry.check_schema(broken))


def test_operational_fields_are_exactly_the_reviewed_ones() -> None:
    classes = registry.field_classes(registry.referral_schema())
    operational = {path for path, cls in classes.items() if cls == "operational"}
    assert operational == REVIEWED_OPERATIONAL_REFERRAL_PATHS


def test_status_reason_is_the_only_sealed_part_of_a_status_and_audit_has_none() -> None:
    assert registry.sealing_units(registry.status_schema()) == ["reason"]
    assert registry.sealing_units(registry.audit_decision_schema()) == []


@pytest.mark.parametrize("path", PATHS_OTHERS_DEPEND_ON)
def test_paths_others_depend_on_exist(path: str) -> None:
    assert path in registry.field_classes(registry.referral_schema())


def test_record_fields_carry_the_most_sensitive_class_inside() -> None:
    classes = registry.field_classes(registry.referral_schema())
    assert classes["identifiers"] == "identifier"
    assert classes["household"] == "identifier"  # members may carry an NI number
    assert classes["child"] == "special_category"  # ethnicity
    assert classes["health_and_development"] == classes["send"] == "special_category"
    assert classes["child.ethnicity"] == "special_category"


def test_sealing_units_follow_the_architecture_rule() -> None:
    schema = registry.referral_schema()
    units = registry.sealing_units(schema)
    infos = {info.path: info for info in registry.walk_fields(schema)}
    for path in units:
        assert infos[path].data_class != "operational"
        assert infos[path].kind != "record"
        assert not any(path.startswith(f"{other}.") for other in units), "nothing inside a sealed unit"
    # arrays are sealed whole; records are descended into
    assert "household" in units and "household.ni_number" not in units
    assert "school.exclusions" in units and "concerns" in units
    assert "child" not in units and "child.given_name" in units
    # every non-operational leaf is covered by exactly one unit
    for path, info in infos.items():
        if info.data_class != "operational" and info.kind != "record":
            covering = [u for u in units if path == u or path.startswith(f"{u}.")]
            assert len(covering) == 1, path


@pytest.mark.parametrize(("schema_text", "signed"), FINGERPRINT_VECTORS, ids=lambda v: str(v)[:30])
def test_fingerprint_matches_apache_avro_vectors(schema_text: str, signed: int) -> None:
    expected = (signed & (2**64 - 1)).to_bytes(8, "little")
    assert registry.fingerprint(json.loads(schema_text)) == expected


def test_logical_types_do_not_change_the_fingerprint() -> None:
    # Parsing Canonical Form keeps only type-defining attributes: a uuid is a string on the wire.
    assert registry.fingerprint({"type": "string", "logicalType": "uuid"}) == registry.fingerprint("string")


def test_docs_and_data_classes_do_not_change_the_fingerprint() -> None:
    schema = registry.referral_schema()
    relabelled = copy.deepcopy(schema)
    relabelled["fields"][0]["doc"] = "something else"
    relabelled["fields"][0]["data_class"] = "personal"
    assert registry.fingerprint(relabelled) == registry.fingerprint(schema)


def test_every_shipped_version_is_found_by_its_fingerprint() -> None:
    for version in registry.shipped_versions():
        assert registry.writer_schema(version.fingerprint) == version.schema
        assert len(version.fingerprint) == registry.FINGERPRINT_SIZE


def test_an_unknown_fingerprint_is_a_contract_error() -> None:
    with pytest.raises(ContractError, match="unknown writer schema fingerprint 0000000000000000"):
        registry.writer_schema(bytes(8))


def test_loaded_schemas_are_copies() -> None:
    first = registry.referral_schema()
    first["fields"].clear()
    assert registry.referral_schema()["fields"]


def test_unknown_family_or_version_is_named() -> None:
    with pytest.raises(ContractError, match="family 'nope'"):
        registry.load_schema("nope")
    with pytest.raises(ContractError, match="no version 99"):
        registry.load_schema("referral", 99)


def test_field_schema_is_a_standalone_schema_for_sealing() -> None:
    schema = registry.referral_schema()
    concerns = registry.field_schema(schema, "concerns")
    assert concerns["type"] == "array"
    type_field = concerns["items"]["fields"][0]
    assert type_field["type"]["type"] == "enum"  # the by-name reference is inlined
    assert registry.field_schema(schema, "child.date_of_birth") == {"type": "int", "logicalType": "date"}
    with pytest.raises(ContractError, match="unknown field path"):
        registry.field_schema(schema, "child.shoe_size")
