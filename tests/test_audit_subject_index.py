"""A family's sharing history through the hub's local audit index, and as a PDF (issue 16,
Build 2) on the real broker: the index answers exactly what a full scan of the audit topic
answers while reading only the subject's records; it holds no identifier, referral id or
full subject key; a stale index catches up before answering; a missing, unreadable or
outdated one is rebuilt with a message. The PDF opens, holds a timeline of exactly the
child's events and nothing identifying the child or another child."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

from county import cli
from test_audit_subject import history, inbox_viewed  # noqa: F401  (the fixture)

from referral_broker.audit_chain import read_topic
from referral_broker.audit_index import index_path
from referral_broker.audit_log import hub_subject_secret, query_subject_key, subject_lookup
from referral_broker.config import Settings


def lookup(settings: Settings, bootstrap: str, *args: str) -> tuple[dict[str, Any], str]:
    result = cli(settings, bootstrap, "audit", "subject", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def places(report: dict[str, Any]) -> list[tuple[int, int]]:
    return [(e["partition"], e["offset"]) for e in report["events"]]


def test_the_index_answers_as_the_scan_does_reading_only_the_subjects_records(
    history: dict[str, Any], county: Settings, kafka_bootstrap: str  # noqa: F811
) -> None:
    child, rid = history["child"], history["rid"]
    nhs = child["identifiers"]["nhs_number"]
    path = index_path(county)
    assert not path.exists()
    first, said = lookup(county, kafka_bootstrap, "--nhs-number", nhs)
    assert "there was no audit index yet: building it" in said and nhs not in said
    assert path.exists() and path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    scan, _ = lookup(county, kafka_bootstrap, "--nhs-number", nhs, "--no-index")
    assert scan["index"] is None and first["index"]["rebuilt"] == "there was no audit index yet"
    assert first["events"] == scan["events"] and first["referrals"] == scan["referrals"] == [rid]
    total = len(read_topic(county, kafka_bootstrap, "audit"))
    assert first["index"]["records_indexed"] > 0 and scan["scanned"] == total
    # only the child's referral's records were read, not the other child's nor the checkpoints
    assert first["scanned"] == first["index"]["candidates"] == len(first["events"]) < total
    for option, value in (("--upn", child["identifiers"]["upn"]), ("--ni-number", child["household"][0]["ni_number"]),
                          ("--case", rid)):
        again, said = lookup(county, kafka_bootstrap, option, value)
        assert places(again) == places(scan) and again["index"]["rebuilt"] is None and "index" not in said
        assert again["index"]["new_records_read"] == 0  # nothing new on the topic: no catch-up
    other, _ = lookup(county, kafka_bootstrap, "--nhs-number", history["other"]["identifiers"]["nhs_number"])
    assert other["referrals"] == [history["other_rid"]] and {e["referral_id"] for e in other["events"]} == {history["other_rid"]}
    never, _ = lookup(county, kafka_bootstrap, "--nhs-number", "9434765919")
    assert never["events"] == [] and never["scanned"] == 0

    # the file holds truncated keyed hashes and offsets only
    blob = path.read_bytes()
    secret = hub_subject_secret(county)
    key = query_subject_key(secret, "nhs_number", nhs)
    for them in (child, history["other"]):
        for value in (them["identifiers"]["nhs_number"], them["identifiers"]["upn"], them["household"][0]["ni_number"],
                      them["child"]["given_name"], them["child"]["family_name"]):
            assert value.encode() not in blob
    for case in (rid, history["other_rid"]):
        assert case.encode() not in blob and uuid.UUID(case).bytes not in blob
    assert key.encode() not in blob and bytes.fromhex(key) not in blob
    db = sqlite3.connect(path)
    try:
        tables = {name: [c[1] for c in db.execute(f"PRAGMA table_info({name})")]
                  for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        db.close()
    assert tables == {"meta": ["name", "value"], "position": ["partition", "next_offset"],
                      "record": ["partition", "offset", "rid"], "subject": ["key", "partition", "offset"]}


def test_a_stale_index_catches_up_and_a_broken_one_is_rebuilt(
    history: dict[str, Any], county: Settings, kafka_bootstrap: str  # noqa: F811
) -> None:
    nhs, rid = history["child"]["identifiers"]["nhs_number"], history["rid"]
    key = query_subject_key(hub_subject_secret(county), "nhs_number", nhs)
    before, _ = lookup(county, kafka_bootstrap, "--nhs-number", nhs)
    inbox_viewed(county, kafka_bootstrap, rid)  # a new event about the child after the index was built
    after, said = lookup(county, kafka_bootstrap, "--nhs-number", nhs)
    assert "index" not in said and after["index"]["rebuilt"] is None and after["index"]["new_records_read"] >= 1
    assert len(after["events"]) == len(before["events"]) + 1
    assert [e["event"] for e in after["events"]].count("inbox: referral_viewed") == 2
    scan, _ = lookup(county, kafka_bootstrap, "--nhs-number", nhs, "--no-index")
    assert places(after) == places(scan)

    path = index_path(county)
    path.write_bytes(b"not a database, just bytes " * 100)  # damaged
    damaged, said = lookup(county, kafka_bootstrap, "--nhs-number", nhs)
    assert "the audit index was unreadable" in said and "building it from the whole audit topic" in said
    assert places(damaged) == places(scan) and damaged["index"]["rebuilt"].startswith("the audit index was unreadable")

    db = sqlite3.connect(path)  # as if the audit topic had been deleted and recreated shorter
    db.execute("UPDATE position SET next_offset = next_offset + 1000000")
    db.commit()
    db.close()
    recreated, said = lookup(county, kafka_bootstrap, "--nhs-number", nhs)
    assert "(the topic was recreated): rebuilding it" in said
    assert places(recreated) == places(scan)

    db = sqlite3.connect(path)  # made under another subject secret: its hashes mean nothing now
    db.execute("UPDATE meta SET value = 'feedfacefeedface' WHERE name = 'secret'")
    db.commit()
    db.close()
    other, said = lookup(county, kafka_bootstrap, "--case", rid)
    assert "made under another subject secret: building it" in said
    assert places(other) == places(scan)

    # two lookups at once on no index: one builds it, the other waits, both answer in full
    path.unlink()
    answers: list[list[tuple[int, int]]] = []

    def look() -> None:
        report = subject_lookup(county, kafka_bootstrap, secret=hub_subject_secret(county), key=key)
        answers.append(places(report))

    threads = [threading.Thread(target=look) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == [places(scan), places(scan)]

    path.unlink()
    refreshed = cli(county, kafka_bootstrap, "audit", "index", "--json")
    assert refreshed.exit_code == 0, refreshed.output
    info = json.loads(refreshed.stdout)
    assert info["rebuilt"] == "there was no audit index yet"
    total = len(read_topic(county, kafka_bootstrap, "audit"))
    assert info["new_records_read"] == total and 0 < info["records_indexed"] < total  # checkpoints are not indexed
    rebuilt = cli(county, kafka_bootstrap, "audit", "index", "--rebuild")
    assert rebuilt.exit_code == 0 and f"{info['records_indexed']} audit records indexed" in rebuilt.stdout


def test_the_pdf_has_the_timeline_of_exactly_the_childs_events_and_no_identifier(
    history: dict[str, Any], county: Settings, kafka_bootstrap: str, tmp_path: Path  # noqa: F811
) -> None:
    from pypdf import PdfReader

    child, other = history["child"], history["other"]
    out = tmp_path / "letter.pdf"
    result = cli(county, kafka_bootstrap, "audit", "subject", "--nhs-number", child["identifiers"]["nhs_number"],
                 "--format", "pdf", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o600
    data = out.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    reader = PdfReader(io.BytesIO(data))
    assert reader.metadata is not None and reader.metadata.title == "Your family's sharing history"
    text = "\n".join(page.extract_text() for page in reader.pages)
    report, _ = lookup(county, kafka_bootstrap, "--case", history["rid"])
    assert f"{report['count']} recorded event(s), oldest first." in text
    for e in report["events"]:  # every event, with its time, in order
        assert e["at"] in text
    assert [text.index(e["at"]) for e in report["events"]] == sorted(text.index(e["at"]) for e in report["events"])
    assert text.count(f"Referral {history['rid']}") == report["count"]
    assert "Status relayed" in text and "Fenland Fields Primary School" in text and "Inbox: referral_viewed" in text
    assert "Retention.case_shredded" in text
    assert history["other_rid"] not in text
    for them in (child, other):
        for value in (them["identifiers"]["nhs_number"], them["identifiers"]["upn"], them["household"][0]["ni_number"],
                      them["child"]["given_name"], them["child"]["family_name"]):
            assert value not in text and value.encode() not in data

    html = tmp_path / "letter.html"
    as_html = cli(county, kafka_bootstrap, "audit", "subject", "--case", history["rid"], "--format", "html", "--out", str(html))
    assert as_html.exit_code == 0 and html.read_text("utf-8").count('<li class="event">') == report["count"]
    empty = tmp_path / "empty.pdf"
    none = cli(county, kafka_bootstrap, "audit", "subject", "--nhs-number", "9434765919", "--format", "pdf", "--out", str(empty))
    assert none.exit_code == 0
    assert "No sharing of information about this person is recorded." in PdfReader(empty).pages[0].extract_text()
    needs_out = cli(county, kafka_bootstrap, "audit", "subject", "--case", history["rid"], "--format", "pdf")
    assert needs_out.exit_code == 2 and "--out" in needs_out.output
