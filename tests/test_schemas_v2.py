"""Referral schema v2: the GP practice's ODS code and the providers named for requested services.

Both are optional with defaults, so v2 passes the full-compatibility gate both ways, a v1
message still reads (as v2, with the defaults), and a v1 reader still reads a v2 message. The
new values are checked at the edge like the other identifiers, and every downstream use of
the schema (views, sealing units, policy units, the CLI) sees them.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import random
import subprocess
import sys
from typing import Any

import pytest

from referral_broker.errors import ContractError
from referral_broker.policy import load_policy
from referral_broker.policy.load import policy_units
from referral_broker.schemas import codec, evolution, identifiers, registry, views
from referral_broker.schemas.json_form import from_json_form, to_json_form
from referral_broker.schemas.synth import (
    DEFAULT_ANCHOR,
    NamedOrganisation,
    synthetic_referral,
    synthetic_referrals,
)
from referral_broker.schemas.validation import validate
from referral_broker.sealing import DataKey, FieldContext, sealing_plan
from referral_broker.sealing.fields import Binding

V1 = registry.referral_schema(1)
V2 = registry.referral_schema(2)
V3 = registry.referral_schema(3)  # the latest: nullable yes/no fields (test_schemas_v3)
NOW = DEFAULT_ANCHOR + dt.timedelta(days=1)
GP_ODS = "health_and_development.gp_practice_ods"
PROVIDERS = "service_providers"
# The demo county's organisations (referral_broker/organisations.toml), named here once.
GP_PRACTICE = "Z90001"
OTHER_GP_PRACTICE = "Z90002"
CITIZENS_ADVICE = "1190001"
CARERS_CHARITY = "1190002"


def field_at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    return next(info.field for info in registry.walk_fields(schema) if info.path == path)


def referral_with(*, seed: int = 4, **changes: Any) -> dict[str, Any]:
    """A valid synthetic v2 referral with a health record, a requested citizens_advice service,
    and ``changes`` applied (dotted paths)."""
    record = synthetic_referral(random.Random(seed))
    record["health_and_development"] = {
        "gp_practice": "Fenland Bridge Surgery",
        "gp_practice_ods": None,
        "conditions": [],
        "mental_health_concern": False,
        "development_concern": False,
        "disability": False,
        "summary": None,
    }
    record["services_requested"] = sorted({*record["services_requested"], "citizens_advice"})
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = record
        for part in parents:
            node = node[part]
        node[last] = value
    assert validate(record, V2, now=NOW) == [] or changes, "the base record must be valid"
    return record


# --- the evolution gate --------------------------------------------------------------------------


def test_v2_and_v1_stay_shipped_under_v3() -> None:
    versions = registry.versions_of("referral")
    assert [v.version for v in versions] == [1, 2, 3]
    assert registry.referral_schema() == V3
    assert registry.writer_schema(versions[1].fingerprint) == V2
    assert registry.fingerprint(V1) != registry.fingerprint(V2)
    assert registry.writer_schema(versions[0].fingerprint) == V1


def test_v2_passes_the_full_compatibility_gate_in_both_directions() -> None:
    assert evolution.check_full_compatibility(V1, V2) == []
    shipped = evolution.check_shipped_history("referral")
    assert [(r.old, r.new, r.compatible, r.mode) for r in shipped] == [
        ("referral.v1.avsc", "referral.v2.avsc", True, "full"),
        ("referral.v2.avsc", "referral.v3.avsc", True, "backward"),
    ]


@pytest.mark.parametrize("path", [GP_ODS, PROVIDERS])
def test_without_its_default_a_new_field_fails_the_gate_where_v2_reads_v1(path: str) -> None:
    """The defaults are what let a v2 reader read v1 data: the gate proves it by failing without."""
    no_default = copy.deepcopy(V2)
    del field_at(no_default, path)["default"]
    problems = evolution.check_full_compatibility(V1, no_default)
    assert problems, "the gate must refuse a new field without a default"
    assert {p.direction for p in problems} == {evolution.NEW_READS_OLD}
    # named at the field, or at the optional record holding it (the checker then finds no
    # union branch of the reader that reads the writer's record)
    assert all(path == p.path or path.startswith(f"{p.path}.") for p in problems), [str(p) for p in problems]


def test_the_new_fields_are_classed_like_their_neighbours() -> None:
    classes = registry.field_classes(V2)
    assert classes[GP_ODS] == classes["health_and_development.gp_practice"] == "personal"
    assert classes[PROVIDERS] == classes["services_requested"] == "special_category"
    assert classes["service_providers.service"] == classes["service_providers.provider"] == "special_category"
    assert registry.check_schema(V2) == []
    # nothing new travels in the clear
    assert not {p for p, c in classes.items() if c == "operational"} - set(registry.field_classes(V1))


def test_the_check_evolution_command_passes_on_the_shipped_history() -> None:
    shown = run_cli("schemas", "check-evolution", "--family", "referral", "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    report = json.loads(shown.stdout)
    assert [(r["old"], r["new"], r["compatible"], r["mode"], r["problems"]) for r in report] == [
        ("referral.v1.avsc", "referral.v2.avsc", True, "full", []),
        ("referral.v2.avsc", "referral.v3.avsc", True, "backward", []),
    ]


# --- reading across versions ---------------------------------------------------------------------


def v1_record(record: dict[str, Any]) -> dict[str, Any]:
    """The same referral as a v1 writer holds it: without the v2 fields."""
    old = copy.deepcopy(record)
    old.pop(PROVIDERS)
    if old["health_and_development"] is not None:
        old["health_and_development"].pop("gp_practice_ods")
    return old


def test_a_v1_message_decodes_as_v2_with_the_defaults() -> None:
    record = referral_with()
    message = codec.encode(v1_record(record), V1)
    assert codec.writer_fingerprint(message) == registry.fingerprint(V1)
    as_written = codec.decode(message)
    assert PROVIDERS not in as_written and "gp_practice_ods" not in as_written["health_and_development"]
    latest = codec.decode(message, V2)
    assert latest[PROVIDERS] == []
    assert latest["health_and_development"]["gp_practice_ods"] is None
    assert latest == record  # everything else exactly as written
    assert validate(latest, V2, now=NOW) == []


def test_a_v1_reader_reads_a_v2_message_without_the_new_fields() -> None:
    record = referral_with(
        **{
            "health_and_development.gp_practice_ods": GP_PRACTICE,
            PROVIDERS: [{"service": "citizens_advice", "provider": CITIZENS_ADVICE}],
        }
    )
    message = codec.encode(record, V2)
    assert codec.writer_fingerprint(message) == registry.fingerprint(V2)
    assert codec.decode(message) == record
    assert codec.decode(message, V1) == v1_record(record)


def test_a_v1_record_without_the_new_keys_is_valid_and_encodes_as_v2() -> None:
    old = v1_record(referral_with())
    assert validate(old, V2, now=NOW) == []
    assert codec.decode(codec.encode(old))[PROVIDERS] == []


def test_the_json_form_carries_the_new_fields() -> None:
    record = referral_with(
        **{
            "health_and_development.gp_practice_ods": GP_PRACTICE,
            PROVIDERS: [{"service": "citizens_advice", "provider": CITIZENS_ADVICE}],
        }
    )
    text = json.dumps(to_json_form(record, V2))
    assert from_json_form(json.loads(text), V2) == record


# --- validation at the edge ----------------------------------------------------------------------


def problems_of(record: dict[str, Any]) -> list[str]:
    return [str(p) for p in validate(record, V2, now=NOW)]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("z90001", "must be upper-case with no spaces"),
        ("Z 90001", "must be upper-case with no spaces"),
        ("Z9001", "not a GP practice ODS code (a letter and 5 digits, e.g. A81001)"),
        ("RGT", "not a GP practice ODS code (a letter and 5 digits, e.g. A81001)"),
        ("990001", "not a GP practice ODS code (a letter and 5 digits, e.g. A81001)"),
        ("", "must not be empty"),
    ],
)
def test_a_malformed_gp_practice_ods_code_is_named_never_shown(value: str, reason: str) -> None:
    found = problems_of(referral_with(**{"health_and_development.gp_practice_ods": value}))
    assert found == [f"{GP_ODS}: {reason}"]
    assert all(value not in p for p in found if value)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("11900 01", "must have no spaces"),
        ("11900", "not a registered charity number (6 to 8 digits, '-N' for a linked charity, e.g. 1190001)"),
        ("119000123", "not a registered charity number (6 to 8 digits, '-N' for a linked charity, e.g. 1190001)"),
        ("1190001-", "not a registered charity number (6 to 8 digits, '-N' for a linked charity, e.g. 1190001)"),
        ("SC012345", "not a registered charity number (6 to 8 digits, '-N' for a linked charity, e.g. 1190001)"),
    ],
)
def test_a_malformed_provider_is_named_by_item(value: str, reason: str) -> None:
    record = referral_with(**{PROVIDERS: [{"service": "citizens_advice", "provider": value}]})
    assert problems_of(record) == [f"service_providers[0].provider: {reason}"]


def test_good_organisation_codes_pass() -> None:
    for code in (GP_PRACTICE, "A81001"):
        assert identifiers.ods_gp_practice_problem(code) is None
    for number in (CITIZENS_ADVICE, "202918", "12345678", "1190001-1", "1190001-12"):
        assert identifiers.charity_number_problem(number) is None
    assert identifiers.compact_ods_code(" z9 0001 ") == GP_PRACTICE
    assert identifiers.compact_charity_number("1 190 001") == CITIZENS_ADVICE
    linked = referral_with(**{PROVIDERS: [{"service": "citizens_advice", "provider": "1190001-1"}]})
    assert problems_of(linked) == []


def test_a_provider_only_for_a_requested_service_and_one_per_service() -> None:
    record = referral_with(
        **{
            PROVIDERS: [
                {"service": "citizens_advice", "provider": CITIZENS_ADVICE},
                {"service": "caring_together", "provider": CARERS_CHARITY},
                {"service": "citizens_advice", "provider": "1190004"},
            ]
        }
    )
    assert "caring_together" not in record["services_requested"]
    assert problems_of(record) == [
        "service_providers[1].service: is not one of services_requested",
        "service_providers[2].service: names a second provider for the same service",
    ]


def test_a_provider_item_with_a_wrong_shape_is_reported_by_the_schema_layer() -> None:
    record = referral_with(
        **{PROVIDERS: [{"service": "legal_aid", "provider": CITIZENS_ADVICE}, {"service": "citizens_advice"}]}
    )
    assert problems_of(record) == [
        "service_providers[0].service: not one of the allowed values",
        "service_providers[1].provider: required field is missing",
    ]
    listed = referral_with(**{PROVIDERS: {"citizens_advice": CITIZENS_ADVICE}})
    assert problems_of(listed) == ["service_providers: expected a list"]


# --- downstream: views, sealing, policy, the CLI -------------------------------------------------


def test_views_carry_the_new_fields_when_granted_and_only_then() -> None:
    record = referral_with(
        **{
            "health_and_development.gp_practice_ods": GP_PRACTICE,
            PROVIDERS: [{"service": "citizens_advice", "provider": CITIZENS_ADVICE}],
        }
    )
    health = views.view_schema(["health_and_development"])
    assert GP_ODS in registry.field_paths(health)
    assert views.project(record, health)["health_and_development"]["gp_practice_ods"] == GP_PRACTICE
    services = views.view_schema(["services_requested"])
    assert PROVIDERS not in views.project(record, services)
    assert PROVIDERS in views.withheld_paths(services)
    named = views.view_schema(["services_requested", PROVIDERS])
    assert views.project(record, named)[PROVIDERS] == record[PROVIDERS]
    # a view of v1 still projects a v1 record
    old_view = views.view_schema(["health_and_development"], V1)
    assert "gp_practice_ods" not in views.project(v1_record(record), old_view, V1)["health_and_development"]


def test_the_new_fields_are_sealing_units_and_policy_units() -> None:
    units = registry.sealing_units(V2)
    assert GP_ODS in units and PROVIDERS in units
    assert not any(u.startswith(f"{PROVIDERS}.") for u in units)  # an array is sealed whole
    leaves, classes = policy_units(V2)
    assert {GP_ODS, "service_providers.service", "service_providers.provider"} <= set(leaves)
    assert classes[GP_ODS] == "personal"


def test_the_shipped_policy_loads_against_v2_and_covers_every_new_unit() -> None:
    policy = load_policy()
    assert {GP_ODS, "service_providers.provider"} <= set(policy.units)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "referral_broker.cli.main", *args], capture_output=True, text=True, timeout=120
    )


def test_schemas_list_and_show_name_v2_and_still_show_v1() -> None:
    listed = json.loads(run_cli("schemas", "list", "--json").stdout)
    referral_rows = [(r["version"], r["file"]) for r in listed if r["family"] == "referral"]
    assert referral_rows == [(1, "referral.v1.avsc"), (2, "referral.v2.avsc"), (3, "referral.v3.avsc")]
    latest = json.loads(run_cli("schemas", "show", "--json").stdout)
    assert latest["fingerprint"] == registry.fingerprint(V3).hex()
    shown = {f["path"]: f for f in latest["fields"]}
    assert shown[GP_ODS]["data_class"] == "personal" and shown[GP_ODS]["sealing_unit"]
    assert shown[PROVIDERS]["data_class"] == "special_category" and shown[PROVIDERS]["sealing_unit"]
    old = json.loads(run_cli("schemas", "show", "--version", "1", "--json").stdout)
    assert old["fingerprint"] == registry.fingerprint(V1).hex()
    assert GP_ODS not in {f["path"] for f in old["fields"]}


# --- the synthetic generator ---------------------------------------------------------------------

PRACTICES = (
    NamedOrganisation(GP_PRACTICE, "Fenland Bridge Surgery", districts=frozenset({"fenland", "east_cambs"})),
    NamedOrganisation(OTHER_GP_PRACTICE, "Cam Valley Medical Practice", districts=frozenset({"cambridge"})),
)
CHARITIES = (
    NamedOrganisation(CITIZENS_ADVICE, services=frozenset({"citizens_advice"}), districts=frozenset({"fenland"})),
    NamedOrganisation(CARERS_CHARITY, services=frozenset({"caring_together"})),
)


def test_by_default_synth_names_no_gp_practice_code_and_no_provider() -> None:
    sample = list(synthetic_referrals(200, seed=31))
    assert all(r[PROVIDERS] == [] for r in sample)
    assert all(r["health_and_development"]["gp_practice_ods"] is None for r in sample if r["health_and_development"])


def test_synth_names_only_the_organisations_passed_where_they_serve() -> None:
    sample = list(synthetic_referrals(400, seed=31, gp_practices=PRACTICES, charities=CHARITIES))
    assert all(validate(r, V3, now=NOW) == [] for r in sample)  # synth writes the latest
    health = [r for r in sample if r["health_and_development"]]
    named = [r for r in health if r["health_and_development"]["gp_practice_ods"]]
    assert len(named) > len(health) // 2
    by_code = {p.identifier: p for p in PRACTICES}
    for r in named:
        practice = by_code[r["health_and_development"]["gp_practice_ods"]]
        assert r["health_and_development"]["gp_practice"] == practice.name
        if r["district"] in ("fenland", "east_cambs", "cambridge"):
            assert r["district"] in practice.districts  # the local practice where there is one
    providers = [(r["district"], p) for r in sample for p in r[PROVIDERS]]
    assert {p["provider"] for _, p in providers} == {CITIZENS_ADVICE, CARERS_CHARITY}
    for district, p in providers:
        charity = next(c for c in CHARITIES if c.identifier == p["provider"])
        assert p["service"] in charity.services and charity.serves(district)
    # the same seed and organisations give the same referrals
    assert list(synthetic_referrals(20, seed=31, gp_practices=PRACTICES, charities=CHARITIES)) == sample[:20]


def test_plain_identifiers_name_organisations_that_serve_everywhere() -> None:
    sample = list(synthetic_referrals(200, seed=8, gp_practices=[OTHER_GP_PRACTICE], charities=[CITIZENS_ADVICE]))
    codes = {r["health_and_development"]["gp_practice_ods"] for r in sample if r["health_and_development"]}
    assert codes == {OTHER_GP_PRACTICE, None}
    assert {p["provider"] for r in sample for p in r[PROVIDERS]} == {CITIZENS_ADVICE}
    assert all(validate(r, V3, now=NOW) == [] for r in sample)


def test_passing_organisations_leaves_the_rest_of_a_seeded_referral_unchanged() -> None:
    plain = list(synthetic_referrals(50, seed=77))
    named = list(synthetic_referrals(50, seed=77, gp_practices=PRACTICES, charities=CHARITIES))
    for before, after in zip(plain, named, strict=True):
        after = copy.deepcopy(after)
        after[PROVIDERS] = []
        if after["health_and_development"] is not None:
            after["health_and_development"]["gp_practice_ods"] = None
            after["health_and_development"]["gp_practice"] = before["health_and_development"]["gp_practice"]
        assert after == before


def test_an_unknown_schema_version_is_refused() -> None:
    with pytest.raises(ContractError, match="no version 4 of schema family 'referral'"):
        registry.referral_schema(4)


# --- sealing: the new fields are sealed per recipient, v1 still seals and opens ------------------


def test_the_new_values_are_sealed_and_open_again() -> None:
    record = referral_with(
        **{
            "health_and_development.gp_practice_ods": GP_PRACTICE,
            PROVIDERS: [{"service": "citizens_advice", "provider": CITIZENS_ADVICE}],
        }
    )
    bound = Binding("council", "referrals.out.district-fenland", "referral", bytes(32))
    for schema, value in ((V2, record), (V1, v1_record(record))):
        plan = sealing_plan(schema)
        context = FieldContext(str(record["referral_id"]), 1, "district-fenland", plan.fingerprint, bound)
        key = DataKey.generate()
        wire = plan.encode_wire(plan.seal(value, key, context))
        assert plan.open(plan.decode_wire(wire), key, context) == value
        assert GP_PRACTICE.encode() not in wire and CITIZENS_ADVICE.encode() not in wire
    assert {GP_ODS, PROVIDERS} <= set(sealing_plan(V2).units)


def test_a_view_routed_under_v1_derives_the_same_schema_under_v2() -> None:
    """A recipient learns a message's view schema by deriving it from the latest Referral and
    the granted leaf paths in ``rb-view``, checked against the fingerprint in ``rb-schema``: a
    copy routed before v2 still opens only if v1 and v2 derive the same view from v1's paths."""
    leaves, _ = policy_units(V1)
    rng = random.Random(2)
    grants = [leaves, *(rng.sample(leaves, rng.randrange(1, len(leaves))) for _ in range(150))]
    for granted in grants:
        assert registry.fingerprint(views.view_schema(granted, V1)) == registry.fingerprint(
            views.view_schema(granted, V2)
        ), sorted(granted)
    # and the new paths make a different view, as they must
    assert registry.fingerprint(views.view_schema([*leaves, GP_ODS], V2)) != registry.fingerprint(
        views.view_schema(leaves, V2)
    )
