"""Retention that runs itself (issue 16, Build 3), on the real broker with the real router.

Five cases through the real router and the council's inbox: the district team closes A (early
help), B (SEND, so kept until the child's 25th birthday) and C (then placed under legal hold),
declines E, and leaves D open. Closure in the inbox is what starts the clock: the inbox sends a
``closed``/``declined`` status, the router relays and audits it (hub-signed, ``status-code:``),
and the sweep learns it from there. A sweep shreds only cases past their rule and none under
hold; a dry run shreds nothing and lists what it would do; a sweep while the broker is down says
so and shreds nothing; a closure record not signed by the hub is refused.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_inbox_fixtures import Pipeline, make_pipeline, make_store, read_topic
from test_sealing_support import read_all

from referral_broker.audit_log import read_event_value
from referral_broker.cli.main import cli
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.inbox.outbound import Outbound, status_record
from referral_broker.consumers.inbox.sealed_format import SealedReferralFormat
from referral_broker.consumers.inbox.states import Action
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.errors import ShreddedError
from referral_broker.retention_rules import add_years
from referral_broker.schemas import codec
from referral_broker.schemas.registry import audit_decision_schema
from referral_broker.sealing import OutgoingMessage
from referral_broker.sealing.case_keys import CaseKeyStore
from referral_broker.sealing.retention import load_records

TEAM = "district-fenland"
SEND_DOB = date(2015, 3, 10)  # B's child: 25th birthday 10 March 2040, due 1 April 2040


def _env(settings: Settings, *, bootstrap: str | None = None) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap or settings.bootstrap_servers,
        "REFERRAL_BROKER_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": settings.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(settings.paths_data_dir),
    }


def _command() -> str:
    return str(Path(sys.executable).with_name("referral-broker"))


def _cli(settings: Settings, *args: str, bootstrap: str | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=_env(settings, bootstrap=bootstrap))


def _sweep(settings: Settings, *args: str, bootstrap: str | None = None) -> tuple[int, dict[str, Any]]:
    result = _cli(settings, "retention", "sweep", "--json", *args, bootstrap=bootstrap)
    try:
        return result.exit_code, json.loads(result.stdout)
    except json.JSONDecodeError:
        return result.exit_code, {"output": result.output}


def _plain(p: Pipeline, seed: int) -> dict[str, Any]:
    """A referral no special rule matches: no SEND, no safeguarding concern."""
    r = p.referral(TEAM, seed)
    r["send"] = None
    r["flags"] = {"safeguarding_concern": False, "crime_prevention": False, "early_support_pathway": False}
    r["concern_types"] = ["parenting"]
    r["concerns"] = [{"type": "parenting", "detail": "Synthetic: parenting support asked for", "since": None}]
    return r


class World:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pipeline = make_pipeline(settings)
        self.store: InboxStore = make_store(settings)
        self.fmt: SealedReferralFormat = self.pipeline.format([TEAM])
        p = self.pipeline
        a, c, d, e = _plain(p, 41), _plain(p, 43), _plain(p, 44), _plain(p, 45)
        b = _plain(p, 42)
        b["send"] = {"status": "ehc_plan", "primary_need": "speech_language_communication", "details": None}
        b["child"]["date_of_birth"] = SEND_DOB
        self.a, self.b, self.c, self.d, self.e = (str(r["referral_id"]) for r in (a, b, c, d, e))
        p.send_referrals([a, b, c, d, e])
        assert p.route(routed=5)[0] == 5
        for record in read_topic(settings, topic_name(settings, "out", TEAM), expect=5):
            assert self.store.ingest(TEAM, self.fmt.summarise(record, TEAM), record).outcome == "new"
        for rid in (self.a, self.b, self.c, self.d):
            self.act(rid, Action.ACCEPT)
        for rid in (self.a, self.b, self.c):
            self.act(rid, Action.CLOSE)
        self.act(self.e, Action.DECLINE, reason_code="moved_out_of_area", words="Synthetic: moved away")
        outbound = Outbound(settings, self.fmt)
        try:
            assert outbound.publish_pending(self.store, now=datetime.now(UTC), team=TEAM) == 8
        finally:
            outbound.close()
        assert p.route(statuses=8)[1] == 8
        self.keys = CaseKeyStore.open(settings.keys_dir)

    def act(
        self, rid: str, action: Action, *, reason_code: str | None = None, words: str | None = None
    ) -> None:
        status_id = uuid.uuid4()

        def encode(decided: Any, referral: Any) -> Any:
            record = status_record(
                decided, referral, actor_role="Family worker", reason=words, status_id=status_id
            )
            return self.fmt.seal_status(record, TEAM)

        self.store.apply(
            TEAM,
            rid,
            action,
            actor="fen.worker",
            at=datetime.now(UTC),
            encode_status=encode,
            reason_code=reason_code,
            sealed_text=self.fmt.seal_text(TEAM, rid, words) if words else None,
            status_id=str(status_id),
        )

    def shredded(self) -> set[str]:
        return {c for c in (self.a, self.b, self.c, self.d, self.e) if self.keys.shredded(c) is not None}

    def retention_events(self) -> list[dict[str, Any]]:
        audit = read_all(self.settings, self.pipeline.bootstrap, [topic_name(self.settings, "audit")])
        return [
            read_event_value(r.value)
            for r in audit
            if dict(r.headers).get("rb-kind") == b"audit.retention" and r.value is not None
        ]


@pytest.fixture
def world(topics: Settings) -> Any:
    w = World(topics)
    try:
        yield w
    finally:
        w.store.close()


def test_closure_starts_the_clock_and_a_sweep_shreds_only_cases_past_their_rule(world: World) -> None:
    s = world.settings
    records_file = world.keys.root / "retention.json"
    today = datetime.now(UTC).date()
    world.keys.hold(world.c, "Synthetic care proceedings ref. 123")

    # a dry run long after every rule: lists what it would do, changes nothing
    code, dry = _sweep(s, "--dry-run", "--now", "2100-01-01")
    assert code == 0, dry
    assert dry["dry_run"] is True and dry["shredded"] == []
    assert {d["case_id"] for d in dry["due"]} == {world.a, world.b, world.e}  # D was never closed
    assert [h["case_id"] for h in dry["held"]] == [world.c]
    assert "legal hold since" in dry["held"][0]["reason"] and "care proceedings" in dry["held"][0]["reason"]
    assert dry["closures_learnt"] == 4 and dry["refused_audit_records"] == 0
    assert world.shredded() == set() and not records_file.exists()
    human = _cli(s, "retention", "sweep", "--dry-run", "--now", "2100-01-01")
    assert human.exit_code == 0, human.output
    assert f"would shred {world.a}: due " in human.stdout and "nothing was changed (dry run)" in human.stdout
    assert f"skipped {world.c}" in human.stdout

    # today nothing is due; the sweep records each closure and its due date
    code, now = _sweep(s)
    assert code == 0, now
    assert now["due"] == [] and now["shredded"] == [] and now["not_yet_due"] == 4
    book = load_records(s)
    assert set(book["cases"]) == {world.a, world.b, world.c, world.e}  # closure started these clocks only
    closed = {c: datetime.fromisoformat(r["closed_at"]).date() for c, r in book["cases"].items()}
    assert all(today - timedelta(days=1) <= d <= today for d in closed.values())
    assert book["cases"][world.a]["record_types"] == ["early_help"]
    assert book["cases"][world.a]["due"] == add_years(closed[world.a], 6).isoformat()
    assert book["cases"][world.e]["status"] == "declined" and book["cases"][world.a]["status"] == "closed"
    assert book["cases"][world.b]["record_types"] == ["early_help", "send"]
    assert book["cases"][world.b]["due"] == "2040-04-01"  # the 25th birthday, to the month
    assert (
        SEND_DOB.isoformat() not in records_file.read_text() and "2040-03-10" not in records_file.read_text()
    )
    assert oct(records_file.stat().st_mode & 0o777) == "0o600"

    # the day before six years after closure: nothing; on the day: A and E, never C (held) nor B
    due_a = date.fromisoformat(book["cases"][world.a]["due"])
    code, before = _sweep(s, "--now", (due_a - timedelta(days=1)).isoformat())
    assert code == 0 and before["shredded"] == [] and world.shredded() == set()
    code, swept = _sweep(
        s, "--now", max(due_a, date.fromisoformat(book["cases"][world.e]["due"])).isoformat()
    )
    assert code == 0, swept
    assert {x["case_id"] for x in swept["shredded"]} == {world.a, world.e}
    assert world.shredded() == {world.a, world.e}
    assert [h["case_id"] for h in swept["held"]] == [world.c]
    assert all(x["inbox_teams"] == [TEAM] for x in swept["shredded"])
    for record in read_all(s, world.pipeline.bootstrap, [topic_name(s, "archive")]):
        rid = (record.key or b"").decode()
        if rid in (world.a, world.e):
            with pytest.raises(ShreddedError):
                world.pipeline.hub.opener.open(record)
    shreds = [e for e in world.retention_events() if e["type"] == "retention.case_shredded"]
    assert {e["case_id"] for e in shreds} == {world.a, world.e}
    assert all(e["by_rule"]["record_types"] == ["early_help"] and e["by_rule"]["due"] for e in shreds)
    assert (
        world.store.tombstone(TEAM, world.a) is not None
        and world.store.get_referral(TEAM, world.b) is not None
    )

    # B (SEND) is kept until the month after the 25th birthday, whatever six years say
    assert _sweep(s, "--now", "2040-03-31")[1]["shredded"] == []
    # the broker is down: a clear error, exit 3, and nothing shredded (the read comes first)
    down = subprocess.run(
        [_command(), "retention", "sweep", "--now", "2040-04-01"],
        env=os.environ | _env(s, bootstrap="127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert down.returncode == 3, down.stdout + down.stderr
    assert down.stderr.startswith("Error: cannot reach Kafka at 127.0.0.1:1") and down.stdout == ""
    assert world.keys.has_key(world.b) and world.b not in world.shredded()
    code, late = _sweep(s, "--now", "2040-04-01")
    assert code == 0 and [x["case_id"] for x in late["shredded"]] == [world.b]

    # C is skipped while held, and shredded by the first sweep after the hold is released
    assert world.c not in world.shredded() and world.keys.has_key(world.c)
    result = _cli(s, "retention", "release", "--case", world.c)
    assert result.exit_code == 0, result.output
    human = _cli(s, "retention", "sweep", "--now", "2100-01-01")  # as an operator sees it
    assert human.exit_code == 0, human.output
    assert "Shredding" in human.stderr  # the progress bar (its label, off a terminal)
    assert f"  shredded {world.c}: due " in human.stdout and "1 case(s) shredded." in human.stdout
    assert "3 already shredded" in human.stdout
    assert world.shredded() == {world.a, world.b, world.c, world.e}
    assert world.keys.has_key(world.d)  # never closed: never due


def test_a_closure_record_not_signed_by_the_hub_is_refused(world: World) -> None:
    """A district team may write the audit topic: a copy of a real closure, re-addressed to the
    open case D and unsigned, must not start D's clock."""
    s = world.settings
    audit = read_all(s, world.pipeline.bootstrap, [topic_name(s, "audit")])
    schema = audit_decision_schema()
    genuine = next(
        r
        for r in audit
        if dict(r.headers).get("rb-kind") == b"audit.decision"
        and b"status-code:closed" in (r.value or b"")
        and (r.key or b"").decode() == world.a
    )
    d = codec.decode(genuine.value or b"", schema)
    d["referral_id"] = world.d
    forged = codec.encode(d, schema)
    world.pipeline.produce(
        OutgoingMessage(topic_name(s, "audit"), world.d.encode(), forged, [("rb-kind", b"audit.decision")])
    )
    code, result = _sweep(s, "--dry-run", "--now", "2100-01-01")
    assert code == 0, result
    assert result["refused_audit_records"] == 1
    assert world.d not in {x["case_id"] for x in result["due"]}
    assert {x["case_id"] for x in result["due"]} == {world.a, world.b, world.c, world.e}


def test_retention_run_sweeps_until_sigterm(topics: Settings) -> None:
    make_pipeline(topics)  # the hub's keys on this machine
    env = os.environ | _env(topics)
    out = Path(topics.paths_data_dir) / "run.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("referral-broker")),
                "retention",
                "run",
                "--every",
                "1s",
                "--json",
            ],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while (
                out.read_text().count('"rules_version"') < 2
                and time.monotonic() < deadline
                and proc.poll() is None
            ):
                time.sleep(0.5)
            assert out.read_text().count('"rules_version"') >= 2, out.read_text()  # it swept, then again
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "retention run stopped." in out.read_text()


def test_a_case_whose_shred_fails_is_named_and_the_others_go_on(world: World) -> None:
    """A's key file (from a store before the journals) left readable by others (a real
    key-store fault, refused by every read): its shred fails before anything is written, the
    sweep names it, shreds the rest, exits with the fault's code; the next sweep after the fix
    shreds A."""
    s = world.settings
    assert _sweep(s)[0] == 0  # today: every closure recorded with its due date, nothing due
    key_file = world.keys.root / f"{world.a}.key"
    doc = {"case_id": world.a, "case_key_id": "0123456789ab", "created_at": "2025-01-02T03:04:05Z"}
    key_file.write_text(json.dumps(doc | {"key": base64.b64encode(os.urandom(32)).decode()}))
    key_file.chmod(0o644)
    try:
        code, result = _sweep(s, "--now", "2100-01-01")
    finally:
        key_file.chmod(0o600)
    assert code == 56, json.dumps(result)  # KeyStorePermissionError
    assert [f["case_id"] for f in result["failed"]] == [world.a]
    assert "KeyStorePermissionError" in result["failed"][0]["reason"] and result["stopped"] is None
    assert {x["case_id"] for x in result["shredded"]} == {world.b, world.c, world.e}
    assert world.keys.has_key(world.a) and world.shredded() == {world.b, world.c, world.e}
    assert not [e for e in world.retention_events() if e["case_id"] == world.a]  # nothing audited for A
    code, again = _sweep(s, "--now", "2100-01-01")
    assert code == 0 and [x["case_id"] for x in again["shredded"]] == [world.a]
    assert again["shredded"][0]["case_key_id"].startswith("0123456789ab, j")  # the file's key and the journal's
    assert not key_file.exists()
