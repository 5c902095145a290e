"""A district team records in the inbox that a family objects to research use; the hub takes
it in from the team-signed audit event and every later research export leaves the child out."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from county import cli
from test_inbox_fixtures import OTHER_TEAM, TEAM
from test_inbox_web import Inbox, inbox  # noqa: F401  (the fixture)

from referral_broker.audit_chain import read_topic
from referral_broker.audit_log import read_event_value
from referral_broker.cluster.clients import build_producer
from referral_broker.cluster.topics import topic_name
from referral_broker.consumers.inbox.outbound import (
    ACCESS_EVENT_KIND,
    AccessEvent,
    AccessKind,
    access_event_value,
)


def quarter_of(record: dict[str, object]) -> str:
    created = record["created_at"]
    assert isinstance(created, datetime)
    return f"{created.year}-Q{(created.month - 1) // 3 + 1}"


def test_an_objection_recorded_in_the_inbox_leaves_the_child_out_of_the_export(inbox: Inbox, tmp_path: Path) -> None:  # noqa: F811
    s, bootstrap = inbox.settings, inbox.settings.bootstrap_servers
    record = inbox.referral(31)
    rid = record["referral_id"]
    # the hub's archive copy, as the router writes it (the objection is matched against it)
    inbox.pipeline.send_referrals([record])
    assert inbox.pipeline.route(routed=1)[0] == 1

    inbox.sign_in()
    page = inbox.client.get(f"/referrals/{rid}")
    assert "Record that the family objects" in page.text
    token = inbox.csrf(f"/referrals/{rid}")
    done = inbox.client.post(f"/referrals/{rid}/research-objection", data={"csrf_token": token}, follow_redirects=False)
    assert done.status_code == 303
    page = inbox.client.get(f"/referrals/{rid}")
    assert "objects to their data being used for research" in page.text
    assert "Record that the family objects" not in page.text  # recorded once
    assert [e.action for e in inbox.store.events(TEAM, rid)] == ["research_objection"]
    assert inbox.store.pending_status() == []  # nothing goes to the referrer

    [event] = [
        read_event_value(r.value or b"")
        for r in read_topic(s, bootstrap, "audit")
        if dict(r.headers).get("rb-kind") == ACCESS_EVENT_KIND.encode()
        and read_event_value(r.value or b"")["kind"] == "research_objection"
    ]
    assert (event["team"], event["member"], event["referral_id"]) == (TEAM, "fen.worker", rid)
    assert record["child"]["family_name"] not in json.dumps(event)

    # another team cannot object in Fenland's name
    forged = AccessEvent(AccessKind.RESEARCH_OBJECTION, datetime.now(UTC), "cam.worker", TEAM, rid, 1)
    key, value = access_event_value(forged)
    message = inbox.fmt.sign_event(OTHER_TEAM, topic_name(s, "audit"), key, value, ACCESS_EVENT_KIND)
    producer = build_producer(s, bootstrap)
    try:
        message.send(producer)
        producer.flush()
    finally:
        producer.close()

    synced = cli(s, bootstrap, "objections", "sync", "--json")
    assert synced.exit_code == 0, synced.output
    assert json.loads(synced.stdout) == {"taken_in": [event["event_id"]], "known": 0, "refused": 1, "waiting": []}
    again = cli(s, bootstrap, "objections", "sync", "--json")
    assert json.loads(again.stdout)["taken_in"] == [] and json.loads(again.stdout)["known"] == 1
    listed = json.loads(cli(s, bootstrap, "objections", "list", "--json").stdout)
    assert [(o["objection_id"], o["source"], o["recorded_by"]) for o in listed] == [
        (event["event_id"], "inbox", f"fen.worker ({TEAM})")
    ]

    out = tmp_path / "export"
    exported = cli(s, bootstrap, "export", "research", "--period", quarter_of(record), "--out", str(out), "--json")
    assert exported.exit_code == 0, exported.output
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["objectors_left_out"] == 1 and counts["families_exported"] == counts["families_in_period"] - 1
