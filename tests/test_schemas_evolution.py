"""Evolution: a new version must be fully compatible (both directions) and keep its classes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from referral_broker.errors import ContractError
from referral_broker.schemas import evolution, registry

SCHEMA = registry.referral_schema()


def field(schema: dict[str, Any], path: str) -> dict[str, Any]:
    return next(info.field for info in registry.walk_fields(schema) if info.path == path)


def changed(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    new = copy.deepcopy(SCHEMA)
    change(new)
    return new


def add_optional(s: dict[str, Any]) -> None:
    s["fields"].append(
        {"name": "previous_services", "type": ["null", {"type": "array", "items": "Service"}], "default": None,
         "doc": "Services offered before.", "data_class": "personal"}
    )  # fmt: skip


def add_required(s: dict[str, Any]) -> None:
    s["fields"].append(
        {"name": "case_number", "type": "string", "doc": "Case number.", "data_class": "operational"}
    )


def drop_required(s: dict[str, Any]) -> None:
    s["fields"] = [f for f in s["fields"] if f["name"] != "priority"]


def drop_optional(s: dict[str, Any]) -> None:
    s["fields"] = [f for f in s["fields"] if f["name"] != "sharing_override"]


def retype_birth_date(s: dict[str, Any]) -> None:
    field(s, "child.date_of_birth")["type"] = "string"


def add_district(s: dict[str, Any]) -> None:
    field(s, "district")["type"]["symbols"].append("peterborough")


def add_concern_type(s: dict[str, Any]) -> None:
    # ConcernType has a default symbol, so old readers map the new symbol to it.
    field(s, "concern_types")["type"]["items"]["symbols"].append("bereavement")


def lower_class(s: dict[str, Any]) -> None:
    field(s, "child.given_name")["data_class"] = "operational"


def drop_tag(s: dict[str, Any]) -> None:
    del field(s, "child.given_name")["data_class"]


def widen_version(s: dict[str, Any]) -> None:
    field(s, "version")["type"] = "long"


COMPATIBLE = {
    "add optional field": add_optional,
    "drop optional field": drop_optional,
    "add symbol to enum with default": add_concern_type,
    "raise a data class": lambda s: field(s, "referrer.organisation").__setitem__("data_class", "personal"),
    "change docs": lambda s: field(s, "child.sex").__setitem__("doc", "Sex as recorded by the referrer."),
}
INCOMPATIBLE = {
    "add required field": (add_required, "case_number", "reader_field_missing_default_value"),
    "drop required field": (drop_required, "priority", "reader_field_missing_default_value"),
    "retype a field": (retype_birth_date, "child.date_of_birth", "type_mismatch"),
    "add symbol to closed enum": (add_district, "district", "missing_enum_symbols"),
    "widen int to long": (widen_version, "version", "type_mismatch"),  # old readers cannot narrow
    "lower a data class": (lower_class, "child.given_name", "data_class_lowered"),
    "drop a data class tag": (drop_tag, "child.given_name", "no data_class"),
}


@pytest.mark.parametrize("change", COMPATIBLE.values(), ids=COMPATIBLE.keys())
def test_compatible_changes_pass(change: Callable[[dict[str, Any]], None]) -> None:
    assert evolution.check_full_compatibility(SCHEMA, changed(change)) == []
    evolution.ensure_fully_compatible(SCHEMA, changed(change))


@pytest.mark.parametrize(("change", "path", "kind"), INCOMPATIBLE.values(), ids=INCOMPATIBLE.keys())
def test_incompatible_changes_fail_naming_the_field(
    change: Callable[[dict[str, Any]], None], path: str, kind: str
) -> None:
    problems = evolution.check_full_compatibility(SCHEMA, changed(change))
    assert any(p.path == path and kind in p.kind for p in problems), [str(p) for p in problems]


def test_each_direction_is_checked() -> None:
    forward = {p.direction for p in evolution.check_full_compatibility(SCHEMA, changed(add_required))}
    assert forward == {evolution.NEW_READS_OLD}
    backward = {p.direction for p in evolution.check_full_compatibility(SCHEMA, changed(add_district))}
    assert backward == {evolution.OLD_READS_NEW}


def test_shipped_history_is_fully_compatible() -> None:
    results = evolution.check_shipped_history()
    assert {r.family for r in results} == set(registry.FAMILIES)
    assert all(r.compatible for r in results), [str(p) for r in results for p in r.problems]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "referral_broker.cli.main", *args], capture_output=True, text=True, timeout=120
    )


def write(path: Path, schema: dict[str, Any]) -> Path:
    path.write_text(json.dumps(schema), "utf-8")
    return path


def test_check_evolution_command(tmp_path: Path) -> None:
    old = write(tmp_path / "old.avsc", SCHEMA)
    good = write(tmp_path / "good.avsc", changed(add_optional))
    bad = write(tmp_path / "bad.avsc", changed(add_required))

    passed = run_cli("schemas", "check-evolution", str(old), str(good))
    assert passed.returncode == 0, passed.stderr
    assert "fully compatible" in passed.stdout

    failed = run_cli("schemas", "check-evolution", str(old), str(bad), "--json")
    assert failed.returncode == ContractError.exit_code
    report = json.loads(failed.stdout)
    assert report[0]["compatible"] is False
    assert {p["path"] for p in report[0]["problems"]} == {"case_number"}

    shipped = run_cli("schemas", "check-evolution")
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
