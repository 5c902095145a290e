"""The research export (issue 16, Build 4) on the real broker: synthetic referrals routed into
the council's archive; an objection recorded for one child; ``export research``: the two parts
join only through the link key, the objector is absent and counted, the identifiers part opens
with the research recipient's key and with no other, an empty period gives empty parts counted
0, and every export and objection is audited with ids and counts only."""

from __future__ import annotations

import copy
import csv
import json
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from county import HUB, RESEARCH, SCHOOL, cli, in_county

from referral_broker import research_export
from referral_broker.config import Settings
from referral_broker.consumers.router import Router
from referral_broker.errors import ConfigError, ContractError, ReferralBrokerError
from referral_broker.producers.intake import IntakeSender
from referral_broker.schemas.synth import synthetic_referrals

SENDER = SCHOOL  # the referring organisation
OTHER = SCHOOL  # a party that is not the research recipient
OBJECTOR_NHS = "9449305552"  # a valid synthetic NHS number
IN_PERIOD = datetime(2026, 8, 3, 10, 0, tzinfo=UTC)  # 2026-Q3
BEFORE = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)  # 2026-Q2




def referrals() -> list[dict[str, Any]]:
    """Five referrals about four children: A (the objector, by NHS number), B, C twice (the
    second a later referral naming the same child by name and date of birth), and D before the
    period. Distinct names, so a name found in a file names one child."""
    picked: list[dict[str, Any]] = []
    names: set[tuple[str, str]] = set()
    for record in synthetic_referrals(60, seed=16):
        name = (record["child"]["given_name"], record["child"]["family_name"])
        if name in names:
            continue
        names.add(name)
        record = copy.deepcopy(record)
        record["district"] = "fenland"
        record = in_county(record)
        record["referrer"] = {**record["referrer"], "partner": "schools"}
        record["consent"] = {**record["consent"], "state": "given", "recorded_at": IN_PERIOD}
        record["identifiers"] = {"nhs_number": None, "ni_number": None, "upn": None}
        record["created_at"] = IN_PERIOD
        picked.append(record)
        if len(picked) == 4:
            break
    a, b, c, d = picked
    a["identifiers"]["nhs_number"] = OBJECTOR_NHS
    c_again = copy.deepcopy(picked[3])
    c_again["child"] = copy.deepcopy(c["child"])
    c_again["referral_id"] = uuid.uuid4()
    d["created_at"] = BEFORE
    d["consent"] = {**d["consent"], "recorded_at": BEFORE}
    return [a, b, c, c_again, d]


def route(settings: Settings, bootstrap: str, records: list[dict[str, Any]]) -> None:
    with IntakeSender(settings, bootstrap, SENDER) as sender:
        sent = sender.send_referrals(records)
    assert len(sent) == len(records)
    stats = Router(settings, bootstrap).run(stop_when_idle=3)
    assert stats.routed == len(records) and stats.dead_lettered == 0


def read_attributes(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_export_splits_leaves_out_the_objector_and_opens_only_for_the_research_recipient(
    county: Settings, kafka_bootstrap: str, tmp_path: Path
) -> None:
    records = referrals()
    _a, b, c, _c_again, _d = records
    route(county, kafka_bootstrap, records)

    added = cli(county, kafka_bootstrap, "objections", "add", "--nhs-number", OBJECTOR_NHS, "--json")
    assert added.exit_code == 0, added.output
    objection = json.loads(added.stdout)
    assert objection["identified_by"] == ["nhs_number"] and OBJECTOR_NHS not in added.output
    stored = (county.paths_data_dir / "research" / "objections.jsonl").read_text()
    assert OBJECTOR_NHS not in stored and objection["objection_id"] in stored  # a keyed hash only
    listed = cli(county, kafka_bootstrap, "objections", "list", "--json")
    assert listed.exit_code == 0 and [o["objection_id"] for o in json.loads(listed.stdout)] == [
        objection["objection_id"]
    ]

    out = tmp_path / "export-q3"
    done = cli(county, kafka_bootstrap, "export", "research", "--period", "2026-Q3", "--out", str(out), "--json")
    assert done.exit_code == 0, done.output
    printed = json.loads(done.stdout)
    # printed counts: small cells suppressed, totals included
    assert printed["counts"]["families_exported"] == "<10" and printed["counts"]["objectors_left_out"] == "<10"
    assert printed["counts"]["archive_records_unreadable"] == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["period"] == "2026-Q3" and manifest["recipient"] == RESEARCH
    counts = manifest["counts"]
    assert counts["referrals_in_period"] == 4  # D is in Q2
    assert counts["families_in_period"] == 3  # C's two referrals are one family
    assert counts["families_exported"] == 2 and counts["objectors_left_out"] == 1
    assert manifest["cells"]["area"]["fenland"] == "<10" and "area:fenland" in manifest["suppressed_cells"]
    assert manifest["cells"]["area"]["cambridge"] == 0

    # The identifiers part opens with the research recipient's key...
    ident_path = out / "identifiers.sealed.jsonl"
    people = research_export.open_identifiers(county, kafka_bootstrap, ident_path, party=RESEARCH)
    assert sorted((p["given_name"], p["family_name"]) for p in people) == sorted(
        (r["child"]["given_name"], r["child"]["family_name"]) for r in (b, c)
    )
    by_name = {p["given_name"]: p for p in people}
    assert by_name[b["child"]["given_name"]]["date_of_birth"] == b["child"]["date_of_birth"]
    assert by_name[b["child"]["given_name"]]["last_address"][-1] == b["child"]["address"]["postcode"]
    # ... and with no other party's key, not even the hub's that sealed it
    for party in (OTHER, HUB):
        with pytest.raises(ReferralBrokerError):
            research_export.open_identifiers(county, kafka_bootstrap, ident_path, party=party)
    opened = cli(county, kafka_bootstrap, "export", "open-identifiers", str(ident_path), "--as", RESEARCH,
                 "--out", str(tmp_path / "opened.jsonl"), "--json")  # fmt: skip
    assert opened.exit_code == 0 and json.loads(opened.stdout)["rows"] == 2, opened.output
    assert {json.loads(x)["link_key"] for x in (tmp_path / "opened.jsonl").read_text().splitlines()} == {
        p["link_key"] for p in people
    }
    stolen = cli(county, kafka_bootstrap, "export", "open-identifiers", str(ident_path), "--as", OTHER,
                 "--out", str(tmp_path / "stolen.jsonl"))  # fmt: skip
    assert isinstance(stolen.exception, ReferralBrokerError) and not (tmp_path / "stolen.jsonl").exists()
    # An edited line (its clear link key changed to another row's) no longer opens at all.
    lines = ident_path.read_text().splitlines()
    edited = json.loads(lines[0])
    edited["key"] = json.loads(lines[1])["key"]
    (tmp_path / "edited.jsonl").write_text(json.dumps(edited) + "\n")
    with pytest.raises(ReferralBrokerError):
        research_export.open_identifiers(county, kafka_bootstrap, tmp_path / "edited.jsonl", party=RESEARCH)
    raw_ident = ident_path.read_text()
    for r in records:
        assert r["child"]["given_name"] not in raw_ident and r["child"]["address"]["postcode"] not in raw_ident
        assert str(r["referral_id"]) not in raw_ident

    # The attributes part: coarse, no identifier, and it joins the identifiers by link key only.
    rows = read_attributes(out / "attributes.csv")
    assert list(rows[0]) == list(research_export.ATTRIBUTE_COLUMNS)
    assert {r["link_key"] for r in rows} == {p["link_key"] for p in people} and len(rows) == 2
    raw_attrs = (out / "attributes.csv").read_text()
    for r in records:
        child = r["child"]
        for value in (child["given_name"], child["family_name"], child["date_of_birth"].isoformat(),
                      child["address"]["postcode"], str(r["referral_id"])):  # fmt: skip
            assert value not in raw_attrs
    shared = set(rows[0]) & set(people[0])
    assert shared == {"link_key"}
    c_row = next(r for r in rows if r["link_key"] == by_name[c["child"]["given_name"]]["link_key"])
    assert c_row["referrals"] == "2" and c_row["area"] == "fenland"
    assert c_row["age_band"] == research_export.age_band(c["child"]["date_of_birth"], date(2026, 9, 30))
    # The link keys are made for this export: a second export of the same period has new ones.
    again = cli(county, kafka_bootstrap, "export", "research", "--period", "2026-Q3", "--out", str(tmp_path / "again"), "--json")  # fmt: skip
    assert again.exit_code == 0, again.output
    assert not {r["link_key"] for r in read_attributes(tmp_path / "again" / "attributes.csv")} & {
        r["link_key"] for r in rows
    }

    # Audited: the objection and both exports, with ids and counts, never a value.
    events = research_export.audit_events(county, kafka_bootstrap)
    kinds = sorted(e["type"] for e in events)  # one chain, spread over the audit partitions
    assert kinds == ["research.export", "research.export", "research.objection_recorded"]
    [mine] = [e for e in events if e.get("export_id") == manifest["export_id"]]
    assert mine["counts"] == counts and mine["period"] == "2026-Q3" and mine["recipient"] == RESEARCH
    [recorded] = [e for e in events if e["type"] == "research.objection_recorded"]
    assert recorded["objection_id"] == objection["objection_id"]
    blob = json.dumps(events)
    for r in records:
        assert r["child"]["given_name"] not in blob and r["child"]["family_name"] not in blob
    assert OBJECTOR_NHS not in blob
    # the research chain verifies with the rest of the audit
    verified = cli(county, kafka_bootstrap, "audit", "verify", "--json")
    assert verified.exit_code == 0, verified.output


def test_an_empty_period_gives_empty_parts_counted(county: Settings, kafka_bootstrap: str, tmp_path: Path) -> None:
    route(county, kafka_bootstrap, referrals()[:1])
    out = tmp_path / "empty"
    shown = cli(county, kafka_bootstrap, "export", "research", "--period", "2025-Q1", "--out", str(out))
    assert shown.exit_code == 0, shown.output
    assert "families exported: 0; objectors left out: 0" in shown.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["families_exported"] == 0 and manifest["counts"]["objectors_left_out"] == 0
    assert manifest["counts"]["archive_records_read"] == 1 and manifest["suppressed_cells"] == []
    assert (out / "identifiers.sealed.jsonl").read_text() == ""
    assert read_attributes(out / "attributes.csv") == []
    assert (out / "attributes.csv").read_text().strip() == ",".join(research_export.ATTRIBUTE_COLUMNS)
    assert research_export.open_identifiers(county, kafka_bootstrap, out / "identifiers.sealed.jsonl", party=RESEARCH) == []
    [event] = [e for e in research_export.audit_events(county, kafka_bootstrap) if e["type"] == "research.export"]
    assert event["counts"]["families_exported"] == 0 and event["period"] == "2025-Q1"


def test_an_objection_by_name_and_a_shredded_case_are_left_out(
    county: Settings, kafka_bootstrap: str, tmp_path: Path
) -> None:
    from referral_broker.sealing.retention import shred

    objector, shredded = referrals()[:2]
    route(county, kafka_bootstrap, [objector, shredded])
    child = objector["child"]
    named = {  # as a worker might type it: other case, extra spaces
        "given_name": f"  {child['given_name'].upper()} ",
        "family_name": child["family_name"].lower(),
        "date_of_birth": child["date_of_birth"].isoformat(),
    }
    from referral_broker import objections

    recorded = objections.add(county, kafka_bootstrap, named)
    assert recorded.kinds == ("name_dob",)
    shred(county, kafka_bootstrap, str(shredded["referral_id"]))
    manifest = research_export.export(county, kafka_bootstrap, period="2026-Q3", out=tmp_path / "q3")
    assert manifest["counts"]["archive_records_read"] == 2
    assert manifest["counts"]["archive_records_unreadable"] == 1  # its case key is gone: never exported
    assert manifest["counts"]["objectors_left_out"] == 1 and manifest["counts"]["families_exported"] == 0
    assert (tmp_path / "q3" / "identifiers.sealed.jsonl").read_text() == ""


def refused(result: Any, kind: type[Exception], *needles: str) -> str:
    """The error a command raised (main() prints it as one line with its exit code)."""
    assert isinstance(result.exception, kind), result.output
    text = str(result.exception)
    for needle in needles:
        assert needle in text, text
    return text


def test_bad_input_is_refused_without_echo(county: Settings, kafka_bootstrap: str, tmp_path: Path) -> None:
    bad = cli(county, kafka_bootstrap, "export", "research", "--period", "2026-Q5", "--out", str(tmp_path / "x"))
    refused(bad, ContractError, "YYYY-Qn")
    assert not (tmp_path / "x").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "something").write_text("x")
    again = cli(county, kafka_bootstrap, "export", "research", "--period", "2026-Q3", "--out", str(used))
    refused(again, ConfigError, "not empty")
    assert sorted(p.name for p in used.iterdir()) == ["something"]
    not_research = cli(county, kafka_bootstrap, "export", "research", "--period", "2026-Q3",
                       "--out", str(tmp_path / "y"), "--recipient", OTHER)  # fmt: skip
    refused(not_research, ConfigError, "not a research recipient")
    assert not (tmp_path / "y").exists()
    wrong = "9449305553"  # fails the check digit
    text = refused(cli(county, kafka_bootstrap, "objections", "add", "--nhs-number", wrong), ContractError, "NHS number")
    assert wrong not in text
    text = refused(cli(county, kafka_bootstrap, "objections", "add", "--given-name", "Synthetic"), ContractError)
    assert "Synthetic" not in text
    named = ("--given-name", "Synthetic", "--family-name", "Child", "--date-of-birth", "2015-13-40")
    text = refused(cli(county, kafka_bootstrap, "objections", "add", *named), ContractError, "not a date")
    assert "2015-13-40" not in text
    assert cli(county, kafka_bootstrap, "objections", "list", "--json").stdout.strip() == "[]"
