"""Synthetic referrals: valid at 100%, realistic in shape, seedable; and the synth/validate CLI."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from referral_broker.errors import ContractError
from referral_broker.schemas import codec, registry
from referral_broker.schemas.registry import walk_fields
from referral_broker.schemas.synth import DEFAULT_ANCHOR, NamedOrganisation, synthetic_referrals
from referral_broker.schemas.validation import validate

SCHEMA = registry.referral_schema()
NOW = DEFAULT_ANCHOR + dt.timedelta(days=1)
# The demo county's GP practices and charities (referral_broker/organisations.toml), as a caller
# passes them: the contract does not read the registry.
GP_PRACTICES = (
    NamedOrganisation("Z90001", "Fenland Bridge Surgery", districts=frozenset({"fenland", "east_cambs"})),
    NamedOrganisation("Z90002", "Cam Valley Medical Practice", districts=frozenset({"cambridge", "south_cambs"})),
)
CHARITIES = (
    NamedOrganisation(
        "1190001", services=frozenset({"citizens_advice"}), districts=frozenset({"fenland", "east_cambs", "huntingdonshire"})
    ),
    NamedOrganisation("1190004", services=frozenset({"citizens_advice"}), districts=frozenset({"cambridge", "south_cambs"})),
    NamedOrganisation("1190002", services=frozenset({"caring_together"})),
    NamedOrganisation(
        "1190003", services=frozenset({"parenting_programme"}), districts=frozenset({"cambridge", "south_cambs", "huntingdonshire"})
    ),
)
SAMPLE = list(synthetic_referrals(600, seed=2026, gp_practices=GP_PRACTICES, charities=CHARITIES))


def values_at(record: Any, path: str) -> list[Any]:
    head, _, rest = path.partition(".")
    if isinstance(record, list):
        return [v for item in record for v in values_at(item, path)]
    if record is None:
        return []
    inner = record[head]
    return values_at(inner, rest) if rest else [inner]


def age(born: dt.date, on: dt.date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def test_every_synthetic_referral_is_valid() -> None:
    problems = [(n, str(p)) for n, r in enumerate(SAMPLE) for p in validate(r, now=NOW)]
    assert problems == []


def test_synthetic_referrals_round_trip_the_codec() -> None:
    for record in SAMPLE[:100]:
        assert codec.decode(codec.encode(record)) == record


def test_the_same_seed_gives_the_same_referrals() -> None:
    assert list(synthetic_referrals(5, seed=9)) == list(synthetic_referrals(5, seed=9))
    assert list(synthetic_referrals(5, seed=9)) != list(synthetic_referrals(5, seed=10))


OPTIONAL_PATHS = [info.path for info in walk_fields(SCHEMA) if info.optional]
ARRAY_PATHS = [info.path for info in walk_fields(SCHEMA) if info.kind == "array"]


@pytest.mark.parametrize("path", OPTIONAL_PATHS)
def test_every_optional_field_is_sometimes_present_and_sometimes_absent(path: str) -> None:
    seen = [v for record in SAMPLE for v in values_at(record, path)]
    assert any(v is None for v in seen), f"{path} never absent"
    assert any(v is not None for v in seen), f"{path} never present"


@pytest.mark.parametrize("path", ARRAY_PATHS)
def test_every_list_is_sometimes_empty_and_sometimes_not(path: str) -> None:
    seen = [v for record in SAMPLE for v in values_at(record, path)]
    if path not in ("concerns", "concern_types", "services_requested"):  # at least one by rule
        assert any(v == [] for v in seen), f"{path} never empty"
    assert any(v for v in seen), f"{path} never filled"


def test_realistic_shapes() -> None:
    ages = Counter(age(r["child"]["date_of_birth"], r["created_at"].date()) for r in SAMPLE)
    assert set(ages) == set(range(18))
    assert all(re.match(r"^(CB|PE)\d{1,2} \d[A-Z]{2}$", r["child"]["address"]["postcode"]) for r in SAMPLE)
    assert {r["district"] for r in SAMPLE} == {
        "cambridge",
        "east_cambs",
        "fenland",
        "huntingdonshire",
        "south_cambs",
    }
    sizes = Counter(len(r["household"]) for r in SAMPLE)
    assert len(sizes) >= 4  # lone parents, couples, siblings, kinship carers
    assert {p for r in SAMPLE for p in [r["referrer"]["partner"]]} == {
        "schools", "health", "dwp", "police", "charities", "district_team",
    }  # fmt: skip
    for record in SAMPLE:
        attendance = (record["school"] or {}).get("attendance")
        if attendance:
            assert 0 <= attendance["present_sessions"] <= attendance["possible_sessions"]
        child_age = age(record["child"]["date_of_birth"], record["created_at"].date())
        if record["flags"]["early_support_pathway"]:
            assert child_age <= 5
        if record["identifiers"]["nhs_number"]:
            assert record["identifiers"]["nhs_number"].startswith("999")  # NHS test range


def test_all_concern_types_and_services_appear() -> None:
    concern_symbols = next(f for f in SCHEMA["fields"] if f["name"] == "concern_types")["type"]["items"][
        "symbols"
    ]
    service_symbols = next(f for f in SCHEMA["fields"] if f["name"] == "services_requested")["type"]["items"][
        "symbols"
    ]
    assert {c for r in SAMPLE for c in r["concern_types"]} == set(concern_symbols)
    assert {s for r in SAMPLE for s in r["services_requested"]} == set(service_symbols)
    assert {r["consent"]["state"] for r in SAMPLE} == {"given", "refused", "not_asked"}
    assert {r["sharing_override"]["ground"] for r in SAMPLE if r["sharing_override"]} == {
        "risk_of_significant_harm",
        "prevention_detection_of_crime",
    }


# --- the commands ---------------------------------------------------------------------------


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "referral_broker.cli.main", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


def test_synth_output_passes_validate_at_100_percent(tmp_path: Path) -> None:
    out = tmp_path / "referrals.jsonl"
    made = run_cli("synth", "--count", "250", "--seed", "7", "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert len(out.read_text("utf-8").splitlines()) == 250
    checked = run_cli("validate", "--file", str(out), "--json")
    assert checked.returncode == 0, checked.stdout
    report = json.loads(checked.stdout)
    assert report["records"] == report["valid"] == 250 and report["problems"] == []


def test_synth_writes_json_lines_to_stdout_by_default() -> None:
    made = run_cli("synth", "--count", "2", "--seed", "1")
    assert made.returncode == 0
    lines = made.stdout.splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert re.match(r"^\d{4}-\d{2}-\d{2}$", first["child"]["date_of_birth"])
    assert first["created_at"].endswith("Z")


def test_validate_lists_every_problem_by_record_and_path_never_the_value(tmp_path: Path) -> None:
    made = run_cli("synth", "--count", "3", "--seed", "11")
    records = [json.loads(line) for line in made.stdout.splitlines()]
    records[0]["child"]["date_of_birth"] = "2099-01-01"  # future date of birth
    records[1]["identifiers"]["nhs_number"] = "9449305553"  # wrong check digit
    records[1]["district"] = "Zedland-Secret"  # unknown enum value
    del records[2]["referral_id"]  # required field missing
    records[2]["version"] = "three"  # wrong type
    lines = [json.dumps(r) for r in records] + ["", "{not json"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", "utf-8")

    human = run_cli("validate", "--file", str(bad))
    assert human.returncode == ContractError.exit_code
    for expected in (
        "record 1: child.date_of_birth: is in the future",
        "record 2: identifiers.nhs_number:",
        "record 2: district: not one of the allowed values",
        "record 3: referral_id: required field is missing",
        "record 3: version: expected a whole number",
        "record 5: <record>: not valid JSON",
    ):
        assert expected in human.stdout, human.stdout
    for secret in ("2099-01-01", "9449305553", "Zedland-Secret", "three"):
        assert secret not in human.stdout + human.stderr

    as_json = run_cli("validate", "--file", str(bad), "--json")
    report = json.loads(as_json.stdout)
    assert (report["records"], report["valid"], report["invalid"]) == (4, 0, 4)
    assert {(p["record"], p["path"]) for p in report["problems"]} >= {
        (1, "child.date_of_birth"),
        (3, "version"),
    }


def test_validate_reads_stdin() -> None:
    made = run_cli("synth", "--count", "3", "--seed", "5")
    checked = run_cli("validate", "--file", "-", stdin=made.stdout)
    assert checked.returncode == 0 and "3 record(s): 3 valid, 0 invalid." in checked.stdout


def test_schemas_show_prints_fields_and_views() -> None:
    full = run_cli("schemas", "show", "--json")
    data = json.loads(full.stdout)
    assert data["fingerprint"] == registry.fingerprint(SCHEMA).hex()
    assert {f["path"] for f in data["fields"]} == set(registry.field_paths(SCHEMA))
    view = run_cli("schemas", "show", "--fields", "referral_id,child.date_of_birth")
    assert view.returncode == 0
    assert "child.date_of_birth" in view.stdout and "child.given_name" not in view.stdout
    unknown = run_cli("schemas", "show", "--fields", "child.shoe_size")
    assert unknown.returncode == ContractError.exit_code and "child.shoe_size" in unknown.stderr
    listed = json.loads(run_cli("schemas", "list", "--json").stdout)
    assert {row["family"] for row in listed} == set(registry.FAMILIES)


def test_a_fixed_referring_kind_gets_an_organisation_and_practitioner_of_that_kind() -> None:
    import random

    from referral_broker.schemas.synth import synthetic_referral

    for seed in range(20):
        police = synthetic_referral(random.Random(seed), partner="police")["referrer"]
        assert police["partner"] == "police"
        assert police["organisation"] == "County Constabulary Public Protection Unit"
        assert police["practitioner"]["email"].endswith("@police.example")
        school = synthetic_referral(random.Random(seed), partner="schools")["referrer"]
        assert school["organisation"].endswith(("Primary School", "Academy", "Community College", "Nursery"))
