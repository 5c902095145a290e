"""A family's sharing history (issue 16, Build 2) on the real broker: ``audit subject`` finds
every event about one child or household member through keyed hashes the router wrote (no
identifier in clear on the audit topic), lists exactly the events the test caused for that
child and nothing about another, as JSON and as a readable HTML timeline; a malformed
identifier is a clear error that does not echo it; a subject with no records is an empty
report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from county import cli
from test_audit_chain import encompass

from referral_broker.audit_chain import read_topic
from referral_broker.audit_log import decisions as audit_decisions
from referral_broker.audit_log import hub_subject_secret, query_subject_key, referral_subject_keys
from referral_broker.cluster.clients import build_producer
from referral_broker.config import Settings
from referral_broker.consumers.inbox.outbound import AccessEvent, AccessKind, access_event_value
from referral_broker.consumers.router import Router
from referral_broker.errors import ContractError
from referral_broker.producers.intake import IntakeSender
from referral_broker.sealing import retention, sign_plain
from referral_broker.sealing.keystore import KeyStore

POLICE = "police-35"
SCHOOL = "school-110123"
TEAM = "district-fenland"
CHILD_SEED, OTHER_SEED = 70, 73  # synthetic children with an NHS number (and a UPN, a household NI number)




def inbox_viewed(settings: Settings, bootstrap: str, rid: str) -> None:
    """An inbox access event as the inbox writes it (signed Avro; unchained here)."""
    from referral_broker.cluster.topics import topic_name

    event = AccessEvent(AccessKind.VIEWED, datetime.now(UTC), "synthetic-worker", TEAM, rid, 1)
    key, value = access_event_value(event)
    team = KeyStore.open(settings.keys_dir, TEAM)
    message = sign_plain(team, topic=topic_name(settings, "audit"), key=key, value=value, kind="inbox.access")
    producer = build_producer(settings, bootstrap)
    try:
        message.send(producer)
        producer.flush()
    finally:
        producer.close()


@pytest.fixture
def history(county: Settings, kafka_bootstrap: str) -> dict[str, Any]:
    """Two children referred by the police; for the first, the school answers, the district
    team's inbox opens it, and the case is shredded."""
    child, other = encompass(CHILD_SEED), encompass(OTHER_SEED)
    with IntakeSender(county, kafka_bootstrap, POLICE) as sender:
        rid, other_rid = [s.referral_id for s in sender.send_referrals([child, other])]
    router = Router(county, kafka_bootstrap, instance="subject-a")
    router.run(stop_when_idle=3)
    with IntakeSender(county, kafka_bootstrap, SCHOOL) as school:
        school.send_status(
            {
                "status_id": uuid.uuid4(),
                "referral_id": uuid.UUID(rid),
                "version": 1,
                "from_party": SCHOOL,
                "to_party": POLICE,
                "status": "accepted",
                "reason": None,
                "at": datetime.now(UTC).replace(microsecond=0),
                "actor_role": "Designated Safeguarding Lead",
            }
        )
    stats = router.run(stop_when_idle=3)
    assert stats.statuses == 1 and stats.dead_lettered == 0
    inbox_viewed(county, kafka_bootstrap, rid)
    retention.shred(county, kafka_bootstrap, rid)
    return {"child": child, "other": other, "rid": rid, "other_rid": other_rid}


def subject(settings: Settings, bootstrap: str, *args: str) -> dict[str, Any]:
    result = cli(settings, bootstrap, "audit", "subject", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_the_history_lists_exactly_the_childs_events(history: dict[str, Any], county: Settings, kafka_bootstrap: str) -> None:
    rid, child = history["rid"], history["child"]
    decided = [d for d in audit_decisions(county, kafka_bootstrap) if str(d["referral_id"]) == rid]
    shared = [d for d in decided if "status-to-referrer" not in (d["purpose"] or "")]
    assert shared and len(decided) == len(shared) + 1
    spaced = f"{child['identifiers']['nhs_number'][:3]} {child['identifiers']['nhs_number'][3:6]} {child['identifiers']['nhs_number'][6:]}"
    report = subject(county, kafka_bootstrap, "--nhs-number", spaced)  # normalised before hashing
    assert report["referrals"] == [rid]
    events = report["events"]
    assert {e["referral_id"] for e in events} == {rid}  # nothing about the other child
    kinds = [e["event"] for e in events]
    assert kinds.count("status relayed") == 1
    assert len([e for e in events if e["event"] in ("shared", "not shared", "recipient not found")]) == len(shared)
    assert "inbox: referral_viewed" in kinds and "retention.case_shredded" in kinds
    assert len(events) == len(decided) + 2  # the decisions, the inbox view, the shred: exactly
    school = next(e for e in events if e.get("to") == SCHOOL and e["event"] == "shared")
    assert school["from"] == POLICE and school["purpose"] and school["ground"]
    assert school["override_reference"] == str(child["sharing_override"]["override_id"])
    assert "child.given_name" in school["fields_shared"]
    status = next(e for e in events if e["event"] == "status relayed")
    assert (status["from"], status["to"]) == (SCHOOL, POLICE)
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    # the same history by UPN, by a household member's NI number, by case
    same = [(e["partition"], e["offset"]) for e in events]
    by_upn = subject(county, kafka_bootstrap, "--upn", child["identifiers"]["upn"].lower())
    by_ni = subject(county, kafka_bootstrap, "--ni-number", child["household"][0]["ni_number"])
    by_case = subject(county, kafka_bootstrap, "--case", rid)
    for other in (by_upn, by_ni, by_case):
        assert [(e["partition"], e["offset"]) for e in other["events"]] == same
    # the other child: only its own events
    theirs = subject(county, kafka_bootstrap, "--nhs-number", history["other"]["identifiers"]["nhs_number"])
    assert theirs["referrals"] == [history["other_rid"]] and theirs["count"] > 0
    assert {e["referral_id"] for e in theirs["events"]} == {history["other_rid"]}


def test_no_identifier_is_stored_in_clear_and_the_key_needs_the_hubs_secret(
    history: dict[str, Any], county: Settings, kafka_bootstrap: str
) -> None:
    ids = history["child"]["identifiers"]
    clear = [ids["nhs_number"], ids["upn"], history["child"]["household"][0]["ni_number"]]
    records = read_topic(county, kafka_bootstrap, "audit")
    assert records
    for r in records:
        blob = (r.key or b"") + (r.value or b"") + b"".join(bytes(v) for _, v in r.headers)
        for value in clear:
            assert value.encode() not in blob
    secret = hub_subject_secret(county)
    want = query_subject_key(secret, "nhs_number", ids["nhs_number"])
    assert want in referral_subject_keys(secret, history["child"])
    assert query_subject_key(b"\x01" * 32, "nhs_number", ids["nhs_number"]) != want  # keyed, not a bare hash
    decided = [d for d in audit_decisions(county, kafka_bootstrap) if str(d["referral_id"]) == history["rid"]]
    assert all(want in d["subject_keys"] for d in decided if "status-to-referrer" not in (d["purpose"] or ""))
    secret_file = county.keys_dir / "council" / "subject-hmac.key"
    assert secret_file.stat().st_mode & 0o077 == 0
    # a decision naming the child, signed by a partner rather than the hub, is left out and counted
    before = subject(county, kafka_bootstrap, "--nhs-number", ids["nhs_number"])
    real = next(r for r in records if dict(r.headers).get("rb-kind") == b"audit.decision" and want.encode() in (r.value or b""))
    school = KeyStore.open(county.keys_dir, SCHOOL)
    from referral_broker.cluster.topics import topic_name

    forged = sign_plain(school, topic=topic_name(county, "audit"), key=real.key or b"", value=real.value or b"", kind="audit.decision")
    producer = build_producer(county, kafka_bootstrap)
    try:
        forged.send(producer)
        producer.flush()
    finally:
        producer.close()
    after = subject(county, kafka_bootstrap, "--nhs-number", ids["nhs_number"])
    assert after["events"] == before["events"] and (before["refused"], after["refused"]) == (0, 1)


def test_html_document_has_a_timeline_and_no_identifier(
    history: dict[str, Any], county: Settings, kafka_bootstrap: str, tmp_path: Path
) -> None:
    out = tmp_path / "letter.html"
    child = history["child"]
    result = cli(county, kafka_bootstrap, "audit", "subject", "--nhs-number", child["identifiers"]["nhs_number"], "--html", str(out))
    assert result.exit_code == 0, result.output
    assert child["identifiers"]["nhs_number"] not in result.output
    page = out.read_text("utf-8")
    assert page.startswith("<!DOCTYPE html>") and '<ol class="timeline">' in page
    assert page.count('<li class="event">') == len(subject(county, kafka_bootstrap, "--case", history["rid"])["events"])
    assert "Fenland Fields Primary School" in page and "Status relayed" in page
    for personal in (child["identifiers"]["nhs_number"], child["child"]["given_name"], child["child"]["family_name"]):
        assert personal not in page


def test_a_malformed_identifier_is_refused_without_echo_and_no_records_is_an_empty_report(
    county: Settings, kafka_bootstrap: str
) -> None:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "REFERRAL_BROKER_TOPIC_PREFIX": county.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": county.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(county.paths_data_dir),
    }
    for option, bad in (("--nhs-number", "9999885722"), ("--upn", "ZZ12"), ("--ni-number", "QQ12345"), ("--case", "not-a-case-77")):
        proc = subprocess.run(
            [sys.executable, "-m", "referral_broker.cli.main", "audit", "subject", option, bad],
            capture_output=True, text=True, env=env, timeout=120,
        )
        said = proc.stdout + proc.stderr
        assert proc.returncode == ContractError.exit_code, (option, said)
        assert "Traceback" not in said and bad not in said and bad.lower() not in said.lower()
        assert said.startswith("Error: the ") and "not" in said  # one line: what is wrong
    empty = subject(county, kafka_bootstrap, "--nhs-number", "9434765919")  # valid, never referred
    assert empty["events"] == [] and empty["count"] == 0 and empty["referrals"] == []
    human = cli(county, kafka_bootstrap, "audit", "subject", "--nhs-number", "9434765919")
    assert human.exit_code == 0 and "No audit records about this person" in human.output
    two = cli(county, kafka_bootstrap, "audit", "subject", "--nhs-number", "9434765919", "--upn", "A873459815270")
    assert two.exit_code == 2
