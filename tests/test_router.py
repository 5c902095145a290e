"""The router on the real broker: minimum data per recipient, audited, nothing lost."""

from __future__ import annotations

import copy
import random
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from county import CHARITY, FORMAT, OTHER_SCHOOL, PARTNERS, POLICE, SCHOOL, in_county

from referral_broker.cluster.clients import build_consumer, build_producer, drain
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.dead_letters import read_dead_letters
from referral_broker.consumers.receiving import Received, receive
from referral_broker.consumers.router import Router
from referral_broker.consumers.router_metrics import PHASES
from referral_broker.parties import all_parties
from referral_broker.policy import load_policy
from referral_broker.policy.review import explain
from referral_broker.producers.intake import IntakeSender
from referral_broker.schemas import codec
from referral_broker.schemas.registry import audit_decision_schema, referral_schema
from referral_broker.schemas.synth import synthetic_referrals
from referral_broker.sealing.key_admin import init_parties

TEAM = "district-cambridge"
OTHER_TEAM = "district-fenland"
NOW = datetime.now(UTC)


@pytest.fixture
def broker(topics: Settings, kafka_bootstrap: str) -> Settings:
    """The topic plan plus keys for every party, published on the keys topic."""
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    return topics


def referrals_from(sender: str, count: int, seed: int, **changes: Any) -> list[dict[str, Any]]:
    """Synthetic referrals from the organisation ``sender`` (its partner kind as the referrer),
    naming the county's school, GP practice and charities for their district."""
    out = []
    for record in synthetic_referrals(count, seed=seed):
        record = copy.deepcopy(record)
        record["referrer"]["partner"] = FORMAT[sender]
        record.update(changes)
        out.append(in_county(record))
    return out


def leaf_paths(value: Any, prefix: str = "") -> set[str]:
    """Field paths present in an opened record (arrays transparent, like policy paths)."""
    if isinstance(value, dict):
        found: set[str] = set()
        for key, inner in value.items():
            path = f"{prefix}{key}"
            sub = leaf_paths(inner, f"{path}.")
            found |= sub or {path}
        return found
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return set().union(*(leaf_paths(v, prefix) for v in value))
    return set()


def read_all(settings: Settings, bootstrap: str, topic: str) -> list[Any]:
    consumer = build_consumer(settings, bootstrap, [topic], group_id=None)
    try:
        return [r for batch in drain(consumer, idle_s=2) for r in batch]
    finally:
        consumer.close()


def received_by(settings: Settings, bootstrap: str, party: str) -> list[Received]:
    got = list(receive(settings, bootstrap, party, stop_when_idle=2, group_id=None))
    refused = [g for g in got if not isinstance(g, Received)]
    assert not refused, refused
    return got  # type: ignore[return-value]


def test_every_recipient_gets_exactly_its_granted_fields(broker: Settings, kafka_bootstrap: str) -> None:
    sent: dict[str, str] = {}
    records: dict[str, dict[str, Any]] = {}
    for i, sender_party in enumerate(PARTNERS):
        batch = referrals_from(sender_party, 6, seed=100 + i)
        records.update({str(r["referral_id"]): r for r in batch})
        with IntakeSender(broker, kafka_bootstrap, sender_party) as sender:
            for s in sender.send_referrals(batch):
                sent[s.referral_id] = sender_party
    router = Router(broker, kafka_bootstrap)
    stats = router.run(stop_when_idle=3)
    assert stats.routed == len(sent) and stats.dead_lettered == 0
    # every committed batch's time, phase by phase: in the stats route --json prints and on /metrics
    phases = stats.as_dict()["phases"]
    assert phases["batches"] == stats.batches >= 1
    assert phases["records"] == stats.consumed
    assert set(phases["ms_a_batch"]) == set(PHASES)
    for phase in ("poll", "catch_up", "route", "sign_send", "commit"):
        assert phases["ms_a_batch"][phase]["wall"] > 0, phase
    assert phases["ms_a_batch"]["route"]["cpu"] > 0  # opening and sealing are this thread's work
    assert 0 < phases["batch_ms"]["p50"] <= phases["batch_ms"]["p99"] <= phases["batch_ms"]["max"]
    observed = router.metrics.registry.get_sample_value(
        "referral_router_batch_phase_seconds_count", {"phase": "commit"}
    )
    assert observed == stats.batches
    # the case keys of these new cases were written deferred and synced before each commit
    assert router.hub.case_keys is not None and router.hub.case_keys.unsynced == 0
    assert all(router.hub.case_keys.has_key(case) for case in sent)

    policy = load_policy()
    audits = [
        codec.decode(r.value, audit_decision_schema())
        for r in read_all(broker, kafka_bootstrap, topic_name(broker, "audit"))
        if dict(r.headers).get("rb-kind") == b"audit.decision"  # not the chain's checkpoints
    ]
    delivered_audits = {(str(a["referral_id"]), a["recipient"]) for a in audits if a["fields_shared"]}
    assert {str(a["referral_id"]) for a in audits} == set(sent)  # every referral has decisions
    parties = all_parties()
    for a in audits:
        if a["unresolved_reason"]:  # a rule that found no organisation: nothing sent to anyone
            assert a["recipient"] not in parties and a["recipient_rules"] == [a["recipient"]]
            assert a["delivered"] is False and a["fields_shared"] == []
        elif a["delivered"] and parties[a["recipient"]].org.kind.value == "school":
            # a school receives only the referrals that name it as the child's school
            urn = (records[str(a["referral_id"])].get("school") or {}).get("urn")
            assert a["recipient"] == f"school-{urn}"

    seen_recipients: set[str] = set()
    received: set[tuple[str, str]] = set()
    for party, found in sorted(parties.items()):
        if not found.receives:
            continue
        allowed = {f["path"] for f in explain(policy, party)["fields"]}
        for msg in received_by(broker, kafka_bootstrap, party):
            seen_recipients.add(party)
            received.add((msg.referral_id, party))
            present = leaf_paths(msg.record)
            # an empty array or absent record shows as its own path: fine if it holds only granted fields
            beyond = {p for p in present - allowed if not any(a.startswith(p + ".") for a in allowed)}
            assert not beyond, f"{party} got {sorted(beyond)} beyond policy explain"
            assert not present & set(msg.withheld), f"{party} got withheld fields"
            assert (msg.referral_id, party) in delivered_audits  # every delivery has its audit record
            assert sent[msg.referral_id] != party  # never back to the referrer
    assert received == delivered_audits  # every delivered decision reached its organisation
    kinds = {parties[p].org.kind.value for p in seen_recipients if parties[p].org is not None}
    assert {"school", "nhs_organisation", "charity", "police_force"} <= kinds
    assert any(a["unresolved_reason"] for a in audits)  # these referrals leave some rules unresolved
    assert any(r.startswith("district-") for r in seen_recipients)


def test_police_only_with_flag_and_override_audited(broker: Settings, kafka_bootstrap: str) -> None:
    flags_off = {"safeguarding_concern": False, "crime_prevention": False, "early_support_pathway": False}
    flags_on = {**flags_off, "safeguarding_concern": True}
    consent = {
        "state": "refused",
        "recorded_at": NOW.replace(microsecond=0),
        "recorded_by": "Synthetic Worker",
    }
    override = {
        "override_id": str(uuid.uuid4()),
        "ground": "risk_of_significant_harm",
        "reason": "Synthetic: risk of significant harm assessed by the team manager",
        "approved_by": {"role": "Early Help team manager", "name": "Synthetic Approver"},
        "approved_at": NOW.replace(microsecond=0),
    }
    base = referrals_from(SCHOOL, 3, seed=5, consent=consent)
    no_flag = {**base[0], "flags": flags_off, "concern_types": ["parenting"], "sharing_override": None}
    flag_no_override = {
        **base[1],
        "flags": flags_on,
        "concern_types": ["safeguarding"],
        "sharing_override": None,
    }
    flag_override = {
        **base[2],
        "flags": flags_on,
        "concern_types": ["safeguarding"],
        "sharing_override": override,
    }
    records = [no_flag, flag_no_override, flag_override]
    for r in records:
        r["concerns"] = [
            {"type": t, "detail": "Synthetic concern detail", "since": None} for t in r["concern_types"]
        ]
    with IntakeSender(broker, kafka_bootstrap, SCHOOL) as sender:
        sender.send_referrals(records)
    Router(broker, kafka_bootstrap).run(stop_when_idle=3)

    police = {m.referral_id for m in received_by(broker, kafka_bootstrap, POLICE)}
    assert police == {str(flag_override["referral_id"])}
    audits = [
        codec.decode(r.value, audit_decision_schema())
        for r in read_all(broker, kafka_bootstrap, topic_name(broker, "audit"))
        if dict(r.headers).get("rb-kind") == b"audit.decision"  # not the chain's checkpoints
    ]
    police_audits = {str(a["referral_id"]): a for a in audits if a["recipient"] == POLICE}
    assert str(no_flag["referral_id"]) not in police_audits  # never a candidate without the flag
    blocked = police_audits[str(flag_no_override["referral_id"])]
    assert blocked["fields_shared"] == [] and "basis:none" in blocked["conditions_met"]
    assert any("no sharing override record" in w["reason"] for w in blocked["fields_withheld"])
    shared = police_audits[str(flag_override["referral_id"])]
    assert str(shared["override_reference"]) == override["override_id"]
    assert "basis:override" in shared["conditions_met"]
    assert shared["delivered"] is True and shared["basis"] == "override"
    assert shared["special_category_conditions"] == ["dpa_2018_sch1_para18"]
    assert blocked["delivered"] is False and blocked["basis"] == "none"


def test_garbage_goes_to_dead_letters_and_good_messages_still_flow(
    broker: Settings, kafka_bootstrap: str
) -> None:
    rng = random.Random(1)
    topic = topic_name(broker, "intake", CHARITY)
    good = referrals_from(CHARITY, 5, seed=9)
    producer = build_producer(broker, kafka_bootstrap)
    with IntakeSender(broker, kafka_bootstrap, CHARITY) as sender:
        for i in range(1000):
            producer.send(topic, rng.randbytes(rng.randrange(0, 300)), key=str(i).encode())
            if i % 200 == 0:
                producer.flush()
                sender.send_referrals([good[i // 200]])
        producer.flush()
    producer.close()
    # a valid envelope with invalid content: a referral signed by the school on the charity's topic
    with IntakeSender(broker, kafka_bootstrap, SCHOOL) as impostor:
        msg = impostor.identity.sealer.seal(
            referrals_from(SCHOOL, 1, seed=11)[0],
            impostor.canonical,
            topic=topic,
            recipient="council",
            referral_id=str(uuid.uuid4()),
            referral_version=1,
        )
        msg.send(impostor.producer)
        impostor.producer.flush()
    router = Router(broker, kafka_bootstrap)
    stats = router.run(stop_when_idle=3)
    assert stats.routed == 5
    metrics = router.metrics
    assert metrics.dead_letters.labels(stage="verify-open")._value.get() == 1001
    assert metrics.routed._value.get() == 5 and metrics.consumed._value.get() == 1006
    from prometheus_client import generate_latest

    exposed = generate_latest(metrics.registry).decode()
    assert 'referral_router_dead_letters_total{stage="verify-open"} 1001.0' in exposed
    letters = [d for _, d in read_dead_letters(broker, kafka_bootstrap)]
    assert len(letters) == 1001
    assert all(d.source_topic == topic and d.reason for d in letters)
    assert Counter(d.stage for d in letters)["verify-open"] == 1001
    assert any(f"signed by {SCHOOL}" in d.reason for d in letters)


def test_router_instances_are_stable_slots_never_shared(settings: Settings) -> None:
    """A restarted router gets its dead predecessor's name (so its transactional id fences the
    old transaction); two live routers never share one. (The kills themselves are in
    tests/test_faults_router.py.)"""
    from referral_broker.consumers.router import claim_instance
    from referral_broker.errors import ConfigError

    with claim_instance(settings, None) as first, claim_instance(settings, None) as second:
        assert first != second and first.endswith("-0") and second.endswith("-1")
    with claim_instance(settings, None) as again:
        assert again == first
    with (
        claim_instance(settings, "blue"),
        pytest.raises(ConfigError, match="already running"),
        claim_instance(settings, "blue"),
    ):
        pass
    with pytest.raises(ConfigError, match="instance name"), claim_instance(settings, "no/slashes"):
        pass


def test_a_group_with_a_router_from_before_round_robin_agrees_on_range(
    broker: Settings, kafka_bootstrap: str
) -> None:
    """A rolling upgrade: a router offers round robin first and range second, so a group that
    still holds a router of the version before (range only) agrees on range, both routers get
    partitions, and every referral is routed exactly once by one or the other."""
    import threading
    import time

    from kafka.coordinator.assignors.range import RangePartitionAssignor
    from kafka.errors import KafkaError

    from referral_broker.cluster.topics import admin_client

    class RangeOnlyRouter(Router):
        ASSIGNORS = (RangePartitionAssignor,)

    routers = [
        Router(broker, kafka_bootstrap, instance="upgraded"),
        RangeOnlyRouter(broker, kafka_bootstrap, instance="older"),
    ]
    errors: list[BaseException] = []

    def route(router: Router) -> None:
        try:
            router.run(stop_when_idle=15)
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=route, args=(r,), daemon=True) for r in routers]
    for t in threads:
        t.start()
    group, doc = routers[0].group, {}
    admin = admin_client(broker, kafka_bootstrap)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                doc = admin.describe_groups([group])[group] or {}
            except KafkaError:  # no coordinator for the group until its first member joins
                doc = {}
            if str(doc.get("group_state", "")).lower() == "stable" and len(doc.get("members") or []) == 2:
                break
            time.sleep(0.5)
    finally:
        admin.close()
    assert str(doc.get("group_state", "")).lower() == "stable" and len(doc.get("members") or []) == 2, doc
    assert (doc.get("protocol_data") or doc.get("protocol")) == "range", doc  # the one both offer

    sent = referrals_from(SCHOOL, 30, seed=31) + referrals_from(SCHOOL, 30, seed=32)  # both schools
    for sender, batch in ((SCHOOL, sent[:30]), (OTHER_SCHOOL, sent[30:])):
        with IntakeSender(broker, kafka_bootstrap, sender) as intake:
            intake.send_referrals(batch)
    for t in threads:
        t.join(timeout=180)
    assert not errors and not any(t.is_alive() for t in threads), errors
    consumed = [r.stats.consumed for r in routers]
    assert sum(consumed) == 60 and all(c > 0 for c in consumed), consumed  # both held partitions
    assert sum(r.stats.routed for r in routers) == 60
    assert list(read_dead_letters(broker, kafka_bootstrap)) == []
    archived = Counter(r.key.decode() for r in read_all(broker, kafka_bootstrap, topic_name(broker, "archive")))
    assert archived == Counter(str(r["referral_id"]) for r in sent)  # each committed exactly once


def test_router_takes_its_sealer(broker: Settings, kafka_bootstrap: str) -> None:
    """The benchmark's PlainSealer goes in through the constructor: the same decisions and
    projections, no crypto, and the routing headers the sealed router sends (no key, binding
    or signature); a plain message without them is refused to the dead letters."""
    from referral_broker.consumers.router_bench import PLAIN_HEADERS, PlainSealer, plain_headers
    from referral_broker.sealing.envelope import H_CASE, H_RECIPIENT, H_SENDER, RESERVED

    topic = topic_name(broker, "intake", SCHOOL)
    records = referrals_from(SCHOOL, 6, seed=51, district="fenland")
    fingerprint = codec.prepare(referral_schema()).fingerprint
    producer = build_producer(broker, kafka_bootstrap)
    for r in records[:5]:
        headers = plain_headers("referral", SCHOOL, "council", fingerprint, r["version"])
        producer.send(topic, codec.encode(r), key=str(r["referral_id"]).encode(), headers=headers)
    producer.send(topic, codec.encode(records[5]), key=str(records[5]["referral_id"]).encode())
    producer.flush()
    producer.close()
    stats = Router(broker, kafka_bootstrap, sealer=PlainSealer(SCHOOL)).run(stop_when_idle=3)
    assert stats.routed == 5 and stats.dead_lettered == 1
    [letter] = [d for _, d in read_dead_letters(broker, kafka_bootstrap)]
    assert f"from {SCHOOL} must say so" in letter.reason
    archive = read_all(broker, kafka_bootstrap, topic_name(broker, "archive"))
    canonical = referral_schema()
    assert sorted(str(codec.decode(r.value, canonical)["referral_id"]) for r in archive) == sorted(
        str(r["referral_id"]) for r in records[:5]
    )
    copies = read_all(broker, kafka_bootstrap, topic_name(broker, "out", OTHER_TEAM))
    assert len(copies) == 5
    for copy_ in copies:
        names = {n for n, _ in copy_.headers}
        assert set(PLAIN_HEADERS) <= names and not (names & RESERVED) - set(PLAIN_HEADERS)
        found = dict(copy_.headers)
        assert found[H_SENDER] == b"council" and found[H_RECIPIENT] == OTHER_TEAM.encode() and found[H_CASE]


def test_status_travels_back_to_the_referrer_sealed(broker: Settings, kafka_bootstrap: str) -> None:
    record = referrals_from(SCHOOL, 1, seed=31, district="cambridge")[0]
    with IntakeSender(broker, kafka_bootstrap, SCHOOL) as sender:
        sender.send_referrals([record])
    Router(broker, kafka_bootstrap).run(stop_when_idle=3)
    arrived = received_by(broker, kafka_bootstrap, TEAM)
    assert [m.referrer for m in arrived] == [SCHOOL]
    status = {
        "status_id": uuid.uuid4(),
        "referral_id": record["referral_id"],
        "version": record["version"],
        "from_party": TEAM,
        "to_party": arrived[0].referrer,
        "status": "declined",
        "reason": "Synthetic: already open to another service",
        "at": NOW.replace(microsecond=0),
        "actor_role": "Early Help practitioner",
    }
    with IntakeSender(broker, kafka_bootstrap, TEAM) as team:
        team.send_status(status)
    stats = Router(broker, kafka_bootstrap).run(stop_when_idle=3)
    assert stats.statuses == 1 and stats.dead_lettered == 0
    statuses = [m for m in received_by(broker, kafka_bootstrap, SCHOOL) if m.kind == "status"]
    assert len(statuses) == 1
    got = statuses[0].record
    assert (
        got["status"] == "declined"
        and got["reason"] == status["reason"]
        and got["from_party"] == TEAM
    )
    assert not received_by(broker, kafka_bootstrap, OTHER_SCHOOL)  # only the referrer hears back
    raw = read_all(broker, kafka_bootstrap, topic_name(broker, "out", SCHOOL))
    assert all(status["reason"].encode() not in r.value for r in raw)  # sealed on the wire
    # a status claiming to come from another team than its sender is a dead letter
    forged = {**status, "status_id": uuid.uuid4(), "from_party": OTHER_TEAM}
    with IntakeSender(broker, kafka_bootstrap, TEAM) as team:
        team.send_status(forged)
    stats = Router(broker, kafka_bootstrap).run(stop_when_idle=3)
    assert stats.dead_lettered == 1 and stats.statuses == 0


def test_message_from_a_revoked_sender_is_a_dead_letter(broker: Settings, kafka_bootstrap: str) -> None:
    from referral_broker.sealing import KeyStore
    from referral_broker.sealing.key_admin import revoke

    with IntakeSender(broker, kafka_bootstrap, CHARITY) as sender:
        sender.send_referrals(referrals_from(CHARITY, 2, seed=41))
    revoke(broker, KeyStore.open(broker.keys_dir, CHARITY).active().key_id, bootstrap=kafka_bootstrap)
    with IntakeSender(broker, kafka_bootstrap, SCHOOL) as sender:
        sender.send_referrals(referrals_from(SCHOOL, 1, seed=42))
    stats = Router(broker, kafka_bootstrap).run(stop_when_idle=3)
    assert stats.routed == 1 and stats.dead_lettered == 2
    reasons = [d.reason for _, d in read_dead_letters(broker, kafka_bootstrap)]
    assert len(reasons) == 2 and all("revoked" in r for r in reasons)
