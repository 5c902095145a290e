"""The hub's own actions (organisation, credential and key changes, ACLs, research exports,
retention) are audited as Avro ``audit_admin`` records on the hub's chains."""

from __future__ import annotations

import json

from county import cli

from referral_broker.admin_audit import ADMIN_CHAIN, ADMIN_KIND, encode_event, flatten
from referral_broker.audit_chain import chain_headers, read_topic
from referral_broker.audit_log import read_event_value
from referral_broker.config import Settings
from referral_broker.parties import HUB
from referral_broker.schemas import codec
from referral_broker.schemas.registry import SINGLE_OBJECT_MAGIC

NEW_SCHOOL = ("orgs", "add", "--kind", "school", "--id", "139990", "--name", "Audit Test Primary", "--district", "fenland")


def admin_events(settings: Settings, bootstrap: str) -> list[dict[str, object]]:
    out = []
    for record in read_topic(settings, bootstrap, "audit"):
        if dict(record.headers).get("rb-kind") == ADMIN_KIND.encode():
            assert (record.value or b"")[:2] == SINGLE_OBJECT_MAGIC  # Avro, never JSON
            assert (chain_headers(record.headers) or ("",))[0] == ADMIN_CHAIN
            assert dict(record.headers)["rb-sender"] == HUB.encode()
            out.append(read_event_value(record.value or b""))
    return out


def test_organisation_and_key_changes_are_audited_on_the_admin_chain(county: Settings, kafka_bootstrap: str) -> None:
    added = cli(county, kafka_bootstrap, *NEW_SCHOOL, "--json")
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["audit"] == {"audited": True}
    again = cli(county, kafka_bootstrap, *NEW_SCHOOL, "--json")  # nothing changed: nothing audited
    assert again.exit_code == 0 and "audit" not in json.loads(again.stdout)
    disabled = cli(county, kafka_bootstrap, "orgs", "disable", "school-139990", "--json")
    assert disabled.exit_code == 0, disabled.output
    rotated = cli(county, kafka_bootstrap, "keys", "rotate", "--party", "school-110123", "--json")
    assert rotated.exit_code == 0, rotated.output
    new_key = next(k for k in json.loads(rotated.stdout) if k["status"] == "active")["key_id"]
    revoked = cli(county, kafka_bootstrap, "keys", "revoke", "--key-id", new_key, "--json")
    assert revoked.exit_code == 0, revoked.output

    events = admin_events(county, kafka_bootstrap)
    assert [e["type"] for e in sorted(events, key=lambda e: str(e["at"]))] == [
        "org.added", "org.disabled", "key.rotated", "key.revoked",
    ]
    by_type = {str(e["type"]): e for e in events}
    assert by_type["org.added"]["org"] == by_type["org.disabled"]["org"] == "school-139990"
    assert by_type["org.disabled"]["status"] == "disabled"
    assert f"{new_key}=revoked" in by_type["key.revoked"]["keys"]  # type: ignore[operator]
    assert all(e["party"] == HUB and e["actor"] for e in events)

    verified = cli(county, kafka_bootstrap, "audit", "verify", "--json")
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["intact"]


def test_a_change_made_where_the_hub_keys_are_not_says_it_was_not_audited(topics: Settings, kafka_bootstrap: str) -> None:
    added = cli(topics, kafka_bootstrap, *NEW_SCHOOL, "--json")
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["audit"]["audited"] is False
    assert "not audited" in added.stderr
    assert admin_events(topics, kafka_bootstrap) == []


def test_details_keep_their_types_and_nesting() -> None:
    event = {
        "type": "retention.case_shredded", "counts": {"families": 12, "left_out": 0}, "teams": ["a", "b"],
        "by_rule": {"record_types": ["send"], "due": "2031-01-01", "basis": {"closed": "2025-01-01"}},
        "reason": None, "actor": "ops",
    }
    doc = flatten(codec.decode(encode_event({**event, "odd": [1, "x"]}, now=0.0)))
    assert {k: doc[k] for k in event} == event  # nested records come back as they went in
    assert json.loads(str(doc["odd"])) == [1, "x"]  # what fits no Avro type here is JSON text
