"""Status messages both ways: what a partner receives about referrals it made, and what it sends
about referrals it received (accepted, declined with a reason, more information needed...)."""

from __future__ import annotations

import datetime as dt
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from county import OTHER_SCHOOL, SENDER

from referral_broker import adapters
from referral_broker.errors import ValidationError
from referral_broker.schemas.validation import validate_status

KINDS = adapters.adapter_kinds()
NOW = dt.datetime(2025, 10, 1, tzinfo=dt.UTC)
TEAM = "district-fenland"
OTHER_TEAM = "district-cambridge"
CODES = ["opened", "accepted", "declined", "more_information_needed", "allocated", "closed"]


def status(code: str, *, from_party: str, to_party: str, reason: str | None = None) -> dict[str, Any]:
    return {
        "status_id": uuid.uuid4(),
        "referral_id": uuid.uuid4(),
        "version": 2,
        "from_party": from_party,
        "to_party": to_party,
        "status": code,
        "reason": reason,
        "at": dt.datetime(2025, 9, 20, 14, 5, tzinfo=dt.UTC),
        "actor_role": "Early Help Practitioner",
    }


def sent_by(kind: str) -> list[dict[str, Any]]:
    """One status of every code, as the county's organisation sending in format ``kind`` would
    send them about referrals it received."""
    return [
        status(
            code,
            from_party=SENDER[kind],
            to_party=TEAM,
            reason="Synthetic reason text." if code in ("declined", "more_information_needed") else None,
        )
        for code in CODES
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_status_file_round_trip(kind: str, tmp_path: Path) -> None:
    statuses = sent_by(kind)
    assert all(validate_status(s, now=NOW) == [] for s in statuses)
    rendered = adapters.render_statuses(kind, statuses, tmp_path)
    assert (
        rendered.path is not None
        and rendered.path.name == f"statuses{adapters.get_adapter(kind).native_suffix}"
    )
    assert rendered.count == len(statuses) and rendered.not_carried == frozenset()
    loaded = adapters.load_statuses(kind, rendered.path, party=SENDER[kind], now=NOW)
    assert [p.record for p in loaded.records] == statuses


@pytest.mark.parametrize("kind", KINDS)
def test_one_status_each_way(kind: str) -> None:
    adapter = adapters.get_adapter(kind)
    received = status(
        "declined", from_party=OTHER_TEAM, to_party=SENDER[kind], reason="Synthetic reason text."
    )
    native = adapter.status_to_native(received)
    assert json.dumps(native)  # a JSON object or a CSV row: plain data either way
    mine = sent_by(kind)[1]
    assert adapter.status_from_native(adapter.status_to_native(mine), party=SENDER[kind], now=NOW) == mine


@pytest.mark.parametrize("kind", KINDS)
def test_a_partner_cannot_send_a_status_as_another_party(kind: str) -> None:
    adapter = adapters.get_adapter(kind)
    forged = adapter.status_to_native(status("accepted", from_party=OTHER_TEAM, to_party=SENDER[kind]))
    with pytest.raises(ValidationError, match=r"from_party.*must be empty or"):
        adapter.status_from_native(forged, party=SENDER[kind], now=NOW)


def test_a_blank_sender_and_id_mean_this_organisation_and_a_new_status() -> None:
    row = adapters.get_adapter("schools").status_to_native(sent_by("schools")[0])
    row.pop("from_party")
    row.pop("status_id")
    parsed = adapters.get_adapter("schools").status_from_native(row, party=SENDER["schools"], now=NOW)
    assert parsed["from_party"] == SENDER["schools"]
    assert isinstance(parsed["status_id"], uuid.UUID)
    # the file's own sender must be the organisation reading it in, not another school
    other = adapters.get_adapter("schools").status_to_native(sent_by("schools")[0])
    with pytest.raises(ValidationError, match=rf"from_party.*must be empty or '{OTHER_SCHOOL}'"):
        adapters.get_adapter("schools").status_from_native(other, party=OTHER_SCHOOL, now=NOW)


def test_declining_without_a_reason_is_refused() -> None:
    row = adapters.get_adapter("dwp").status_to_native(sent_by("dwp")[2])
    row.pop("reason")
    with pytest.raises(ValidationError, match=r"\"reason\" \(reason\): required when declining"):
        adapters.get_adapter("dwp").status_from_native(row, party=SENDER["dwp"], now=NOW)


def test_health_statuses_are_fhir_tasks() -> None:
    adapter = adapters.get_adapter("health")
    out = io.StringIO()
    adapter.render_statuses(sent_by("health"), out)
    bundle = json.loads(out.getvalue())
    tasks = [entry["resource"] for entry in bundle["entry"]]
    assert {t["resourceType"] for t in tasks} == {"Task"}
    assert [t["status"] for t in tasks] == [
        "received",
        "accepted",
        "rejected",
        "on-hold",
        "in-progress",
        "completed",
    ]
    assert tasks[2]["statusReason"]["text"] == "Synthetic reason text."
    single = adapters.load_statuses("health", io.StringIO(json.dumps(tasks[1])), party=SENDER["health"], now=NOW)
    assert single.records[0].record is not None and single.records[0].record["status"] == "accepted"


def test_a_fhir_task_outside_its_value_sets_is_refused() -> None:
    adapter = adapters.get_adapter("health")
    task = {"resourceType": "Task", **adapter.status_to_native(sent_by("health")[0])}
    task["status"] = "bogus"
    with pytest.raises(ValidationError, match=r'record 1: "status" \(status\): not one of the codes'):
        adapters.load_statuses("health", io.StringIO(json.dumps(task)), party=SENDER["health"], now=NOW)
    del task["intent"]
    with pytest.raises(ValidationError, match=r'"Task.intent": fails FHIR R4 validation'):
        adapters.load_statuses("health", io.StringIO(json.dumps(task)), party=SENDER["health"], now=NOW)
