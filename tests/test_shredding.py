"""Complete shredding (issue 15, attack 10 and Build 5), on the real broker with the real router.

After ``retention shred --case X``: the hub no longer opens X's archive copy, its district-team
copy or a status about X relayed to a district team; the council's inbox keeps only a tombstone
(shredded, when, by whom), lists nothing of X and opens none of its rows or texts, and a late
copy of X is not stored again; the words of X's decline are gone from the inbox's database
file. Copies the council cannot re-key (intake, status topics, dead letters) are named with
the moment until which they stay readable, from the topic plan's short, named windows, and a
topic that drifted from the plan is reported with its real (longer) window.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from county import CHARITY, SCHOOL
from test_inbox_fixtures import Pipeline, make_pipeline, make_store, read_topic
from test_inbox_web import Inbox, values_of
from test_inbox_web import inbox as inbox  # the web inbox fixture (signed-in pages over HTTP)
from test_sealing_support import read_all

from referral_broker.cli.main import cli
from referral_broker.cluster.clients import Record
from referral_broker.cluster.topics import admin_client, topic_name
from referral_broker.config import Settings
from referral_broker.consumers.inbox.outbound import Outbound, status_record
from referral_broker.consumers.inbox.sealed_format import SealedReferralFormat
from referral_broker.consumers.inbox.states import Action
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.consumers.inbox.store_referrals import SHREDDED, ListQuery
from referral_broker.errors import ShreddedError
from referral_broker.producers.intake import IntakeSender
from referral_broker.sealing import retention
from referral_broker.sealing.timefmt import to_iso

TEAM = "district-fenland"  # the council's district team (its inbox is the council's)
REFERRER = SCHOOL  # refers cases X and Y
ANSWERING = CHARITY  # receives case Z (referred by the team) and answers it
DECLINE_WORDS = "Synthetic decline: the family moved to Norfolk, says the mother"
KEPT_WORDS = "Synthetic decline for the case that is kept"
CHARITY_WORDS = "Synthetic charity answer naming a sibling"
HOURS = 3_600_000


def _cli(settings: Settings, *args: str) -> Any:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "REFERRAL_BROKER_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": settings.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(settings.paths_data_dir),
    }
    return CliRunner().invoke(cli, list(args), env=env)


def _status(party: str, to: str, referral: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "status_id": uuid.uuid4(),
        "referral_id": uuid.UUID(str(referral["referral_id"])),
        "version": referral["version"],
        "from_party": party,
        "to_party": to,
        "status": "declined",
        "reason": text,
        "at": datetime.now(UTC).replace(microsecond=0),
        "actor_role": "Synthetic role",
    }


def _decline(store: InboxStore, fmt: SealedReferralFormat, rid: str, words: str) -> None:
    """As the inbox's decline page does: the status (words inside, sealed) in the outbox, the
    words kept sealed for the team."""
    status_id = uuid.uuid4()

    def encode(decided: Any, referral: Any) -> Any:
        record = status_record(decided, referral, actor_role="Team manager", reason=words, status_id=status_id)
        return fmt.seal_status(record, TEAM)

    store.apply(
        TEAM,
        rid,
        Action.DECLINE,
        actor="fen.lead",
        at=datetime.now(UTC),
        encode_status=encode,
        reason_code="moved_out_of_area",
        sealed_text=fmt.seal_text(TEAM, rid, words),
        status_id=str(status_id),
    )


def _case(record: Record) -> str | None:
    value = dict(record.headers).get("rb-case")
    return value.decode() if value is not None else None


def _rid(record: Record) -> str:
    return (record.key or b"").decode()


class County:
    """Four cases through the real router and the council's inbox: X and Y referred by a
    school to the team (the team declines both, with words), W referred by the school and
    routed to the team but not yet stored by its inbox, Z referred by the team to a charity,
    which answers with words (relayed to the team under Z's case key)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pipeline: Pipeline = make_pipeline(settings)
        self.store = make_store(settings)
        self.fmt = self.pipeline.format([TEAM])
        p = self.pipeline
        x, y, w = p.referral(TEAM, 11), p.referral(TEAM, 12), p.referral(TEAM, 13)
        z = p.referral(TEAM, 0, partner=TEAM)
        z["referrer"]["partner"] = "district_team"  # seed 0: financial, so the charity provides
        self.x, self.y, self.z, self.w = (str(r["referral_id"]) for r in (x, y, z, w))
        p.send_referrals([x, y, w])
        p.send_referrals([z], partner=TEAM)
        assert p.route(routed=4)[0] == 4
        self.out_topic = topic_name(settings, "out", TEAM)
        for record in read_topic(settings, self.out_topic, expect=3):
            if _rid(record) != self.w:  # W is routed to the team but not in its inbox yet
                assert self.store.ingest(TEAM, self.fmt.summarise(record, TEAM), record).outcome == "new"
        _decline(self.store, self.fmt, self.x, DECLINE_WORDS)
        _decline(self.store, self.fmt, self.y, KEPT_WORDS)
        self.outbox = {e.referral_id: e.status_record for e in self.store.pending_status(TEAM)}
        outbound = Outbound(settings, self.fmt)
        try:
            assert outbound.publish_pending(self.store, now=datetime.now(UTC), team=TEAM) == 2
        finally:
            outbound.close()
        with IntakeSender(settings, p.bootstrap, ANSWERING, identity=p.partner(ANSWERING)) as charity:
            charity.send_status(_status(ANSWERING, TEAM, z, CHARITY_WORDS))
        assert p.route(statuses=3)[1] == 3

    def hub_opens(self, record: Record) -> Any:
        return self.pipeline.hub.opener.open(record)

    def team_opens(self, record: Record) -> Any:
        return self.fmt.identity(TEAM).opener.open(record)

    def topic(self, role: str, party: str | None = None) -> list[Record]:
        return read_all(self.settings, self.pipeline.bootstrap, [topic_name(self.settings, role, party)])


@pytest.fixture
def county(topics: Settings) -> Any:
    world = County(topics)
    try:
        yield world
    finally:
        world.store.close()


def test_after_shred_nothing_of_the_case_that_the_council_holds_opens(county: County) -> None:
    s, store = county.settings, county.store
    archive = county.topic("archive")
    team_copies = county.topic("out", TEAM)
    assert {_rid(r) for r in archive} == {county.x, county.y, county.z, county.w}
    assert all(_case(r) == _rid(r) for r in archive + team_copies)  # every council copy is case-keyed
    # before: the team holds X's referral and the charity's answer about Z, and both open
    relayed = [r for r in team_copies if dict(r.headers)["rb-kind"] == b"status"]
    assert [_rid(r) for r in relayed] == [county.z]
    assert county.team_opens(relayed[0]).record["reason"] == CHARITY_WORDS
    listed = {r.referral_id for r in store.query_referrals(ListQuery(TEAM, view="all"), today=datetime.now(UTC).date())}
    assert listed == {county.x, county.y}
    x_text = next(e.sealed_text for e in store.events(TEAM, county.x) if e.sealed_text)
    assert county.fmt.open_text(TEAM, county.x, x_text) == DECLINE_WORDS
    x_status = county.outbox[county.x]
    assert x_status is not None and x_status.value is not None

    before = datetime.now(UTC)
    result = _cli(s, "retention", "shred", "--case", county.x, "--json")
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert retention.shred(s, county.pipeline.bootstrap, county.z)["case_id"] == county.z

    # the council's Kafka copies of X and Z: archive, the team's referral, the relayed status
    for record in archive:
        if _rid(record) in (county.x, county.z):
            with pytest.raises(ShreddedError, match=f"case {_rid(record)} was shredded at"):
                county.hub_opens(record)
        else:
            assert county.hub_opens(record).referral_id in (county.y, county.w)
    for record in county.topic("out", TEAM):
        if _rid(record) in (county.x, county.z):
            with pytest.raises(ShreddedError):
                county.team_opens(record)
        else:
            assert county.team_opens(record).referral_id in (county.y, county.w)

    # the inbox: a tombstone (shredded, when, by whom), X not listed, nothing of X opens or remains
    assert done["inbox"] == {
        "database": str(s.inbox_db_path),
        "present": True,
        "teams": [TEAM],
        "ledger_problem": None,
    }
    tomb = store.tombstone(TEAM, county.x)
    assert tomb is not None and tomb.shredded_by == done["shredded_by"] and tomb.shredded_by
    assert before - timedelta(seconds=1) <= tomb.shredded_at <= datetime.now(UTC)
    assert tomb.case_key_id == done["case_key_id"]
    assert [t.referral_id for t in store.tombstones(TEAM)] == [county.x]
    assert store.get_referral(TEAM, county.x) is None
    listed = {r.referral_id for r in store.query_referrals(ListQuery(TEAM, view="all"), today=datetime.now(UTC).date())}
    assert listed == {county.y}
    assert store.events(TEAM, county.x) == [] and store.pending_status(TEAM) == []
    assert store.events(TEAM, county.y)  # the kept case keeps its history
    with pytest.raises(ShreddedError):
        county.fmt.open_text(TEAM, county.x, x_text)  # a copy of the text taken earlier
    db = sqlite3.connect(s.inbox_db_path)
    try:
        for table in ("records", "referrals", "events", "decisions"):
            assert db.execute(f"SELECT count(*) FROM {table} WHERE referral_id = ?", (county.x,)).fetchone()[0] == 0
    finally:
        db.close()
    # the decline's status message was sealed for the hub (its words inside): not left in the
    # database file or its write-ahead log, where the hub's key would still open it
    raw = b"".join(
        p.read_bytes() for p in (s.inbox_db_path, s.inbox_db_path.with_name(s.inbox_db_path.name + "-wal"))
    )
    assert x_status.value[32:96] not in raw
    assert county.outbox[county.y] is not None and county.outbox[county.y].value[32:96] in raw  # control

    # a late copy of X (a replay of the team's topic) is recognised, not stored, not listed
    x_copy = next(r for r in county.topic("out", TEAM) if _rid(r) == county.x)
    late = store.ingest(TEAM, county.fmt.summarise(x_copy, TEAM), x_copy)
    assert (late.outcome, late.copy) == ("duplicate", SHREDDED)
    assert store.get_referral(TEAM, county.x) is None and store.record_count(TEAM) == 1

    # W was sent to the team but its inbox had not stored it: the router's delivery ledger says
    # who was sent it, so the team gets a tombstone and W's copy is never stored
    result = _cli(s, "retention", "shred", "--case", county.w, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["inbox"]["teams"] == [TEAM]
    w_copy = next(r for r in county.topic("out", TEAM) if _rid(r) == county.w)
    late = store.ingest(TEAM, county.fmt.summarise(w_copy, TEAM), w_copy)
    assert (late.outcome, late.copy) == ("duplicate", SHREDDED)
    assert [t.referral_id for t in store.tombstones(TEAM)] == [county.x, county.w]
    assert store.get_referral(TEAM, county.w) is None and store.record_count(TEAM) == 1


def test_shred_names_until_when_the_unkeyable_copies_stay_readable(county: County) -> None:
    s = county.settings
    # X's intake copy, sealed by the school for the hub; X's decline on the team's status topic,
    # sealed by the council's inbox for the hub and under X's case key
    intake = [r for r in county.topic("intake", REFERRER) if _rid(r) == county.x]
    statuses = [r for r in county.topic("status", TEAM) if _rid(r) == county.x]
    assert len(intake) == 1 and len(statuses) == 1 and _case(statuses[0]) == county.x
    assert county.hub_opens(statuses[0]).record["reason"] == DECLINE_WORDS

    result = _cli(s, "retention", "shred", "--case", county.x)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"Case {county.x} shredded at " in out and "Inbox: tombstone kept for district-fenland" in out
    # the council's own decline no longer opens; the school's intake copy cannot be re-keyed and
    # the hub's key still opens it now, which is why the command says until when
    with pytest.raises(ShreddedError):
        county.hub_opens(statuses[0])
    assert county.hub_opens(intake[0]).referral_id == county.x
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(lines) == {"intake", "status", "dead-letter"}
    shredded_at = datetime.fromisoformat(out.split(" shredded at ")[1].split()[0])
    expected = {  # the topic plan's windows: retention + segment roll + the broker's 5-minute check
        "intake": 3 * 24 * HOURS + 6 * HOURS,
        "status": 3 * 24 * HOURS + 6 * HOURS,
        "dead-letter": 7 * 24 * HOURS + 6 * HOURS,
    }
    for name, window_ms in expected.items():
        until = to_iso((shredded_at.timestamp() * 1000 + window_ms + retention.RETENTION_CHECK_MS) / 1000)
        assert f"until {until}" in lines[name], lines[name]
        assert "drift" not in out
    assert "referrals.intake.<organisation>" in lines["intake"]
    assert "(retention 7 days + segment roll 6 h)" in lines["dead-letter"]
    # the topics as the cluster has them carry the plan's short windows
    admin = admin_client(s, county.pipeline.bootstrap)
    try:
        from kafka.admin import ConfigResource, ConfigResourceType

        names = [topic_name(s, "intake", REFERRER), topic_name(s, "status", TEAM), topic_name(s, "dlq")]
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    finally:
        admin.close()
    found = {
        name: {k: int(v["value"] if isinstance(v, dict) else v) for k, v in entries.items() if k in ("retention.ms", "segment.ms")}
        for name, entries in described["topic"].items()
    }
    assert found == {
        names[0]: {"retention.ms": 72 * HOURS, "segment.ms": 6 * HOURS},
        names[1]: {"retention.ms": 72 * HOURS, "segment.ms": 6 * HOURS},
        names[2]: {"retention.ms": 168 * HOURS, "segment.ms": 6 * HOURS},
    }


def test_a_topic_that_drifted_from_the_plan_reports_its_real_window(topics: Settings) -> None:
    """A dead-letter topic still kept for 90 days (an older plan) is named, and its window is 90 days."""
    from kafka.admin import ConfigResource, ConfigResourceType

    dlq = topic_name(topics, "dlq")
    admin = admin_client(topics, topics.bootstrap_servers)
    try:
        admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, dlq, configs={"retention.ms": str(90 * 24 * HOURS)})]
        )
    finally:
        admin.close()
    now = datetime.now(UTC).timestamp()
    deadline = time.monotonic() + 15  # the broker applies a config change through its metadata log
    while True:
        windows = {w.role: w for w in retention.readable_windows(topics, topics.bootstrap_servers, now=now)}
        if windows["dlq"].drift or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert windows["dlq"].retention_ms == 90 * 24 * HOURS
    assert windows["dlq"].drift == (f"{dlq}: retention.ms {90 * 24 * HOURS}, segment.ms {6 * HOURS}",)
    assert windows["dlq"].until == to_iso(now + (90 * 24 * HOURS + 6 * HOURS + retention.RETENTION_CHECK_MS) / 1000)
    assert windows["intake"].drift == () and windows["intake"].retention_ms == 72 * HOURS


def test_the_inbox_shows_a_shredded_case_only_as_a_tombstone(inbox: Inbox) -> None:
    shredded, kept = inbox.referral(31), inbox.referral(32)
    rid = str(shredded["referral_id"])
    assert inbox.sign_in().status_code == 303
    assert rid in inbox.client.get("/inbox?view=all").text
    assert inbox.client.get(f"/referrals/{rid}").status_code == 200
    at = datetime(2026, 11, 30, 2, 45, tzinfo=UTC)
    assert inbox.store.shred_case(rid, at=at, by="dpo.synthetic", case_key_id="abc123") == [TEAM]
    assert inbox.store.shred_case(rid, at=at, by="someone.else") == [TEAM]  # again: the first tombstone stays
    page = inbox.client.get(f"/referrals/{rid}")
    assert page.status_code == 410
    assert "This referral was shredded" in page.text
    assert "30 November 2026 at 02:45 UTC by dpo.synthetic" in page.text
    assert not [v for v in values_of(shredded) if v in page.text]
    listing = inbox.client.get("/inbox?view=all").text
    assert rid not in listing and str(kept["referral_id"]) in listing
    # another team's member learns nothing from the tombstone: a plain not-found
    inbox.client.post("/sign-out", data={"csrf_token": inbox.csrf("/inbox")})
    assert inbox.sign_in("cam.worker").status_code == 303
    other = inbox.client.get(f"/referrals/{rid}")
    assert other.status_code == 404 and "shredded" not in other.text
