"""Ingest on the real broker with what the real router sends: idempotent, sealed at rest,
opened only with the team's key and the case key, refused records dead-lettered with their
reason, and status messages that reach the referrer's adapter through the router."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from test_inbox_fixtures import (
    OTHER_TEAM,
    REFERRER,
    TEAM,
    Pipeline,
    as_sealed,
    make_pipeline,
    make_store,
    read_topic,
)

from referral_broker.cluster.clients import build_producer
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.inbox.ingest import TeamIngest
from referral_broker.consumers.inbox.outbound import Outbound, status_record
from referral_broker.consumers.inbox.states import Action, ReferralState
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.consumers.receiving import Received
from referral_broker.errors import SealingError, ShreddedError
from referral_broker.policy import decide
from referral_broker.policy.decide import DEFAULT_DENY
from referral_broker.schemas.registry import flatten
from referral_broker.schemas.views import project, view_schema


@pytest.fixture
def pipeline(topics: Settings) -> Pipeline:
    return make_pipeline(topics)


@pytest.fixture
def inbox_store(topics: Settings) -> Iterator[InboxStore]:
    store = make_store(topics)
    yield store
    store.close()


def ingest(pipeline: Pipeline, store: InboxStore, team: str = TEAM, idle: float = 3.0):
    worker = TeamIngest(pipeline.settings, team, store, pipeline.format([TEAM, OTHER_TEAM]))
    return worker.run(stop_when_idle=idle)


def test_partner_to_router_to_inbox_once_and_sealed_at_rest(
    pipeline: Pipeline, inbox_store: InboxStore
) -> None:
    first, second = pipeline.referral(TEAM, 1), pipeline.referral(TEAM, 2)
    elsewhere = pipeline.referral(OTHER_TEAM, 3)
    pipeline.send_referrals([first, second, elsewhere])
    assert pipeline.route(routed=3) == (3, 0)
    stats = ingest(pipeline, inbox_store)
    assert (stats.new, stats.duplicate, stats.dead_lettered) == (2, 0, 0)
    rows = inbox_store.list_referrals(TEAM)
    assert sorted(r.referral_id for r in rows) == sorted([first["referral_id"], second["referral_id"]])
    row = inbox_store.get_referral(TEAM, first["referral_id"])
    assert row is not None
    assert (row.referrer, row.referrer_organisation) == (REFERRER, first["referrer"]["organisation"])
    assert list(row.concern_types) == first["concern_types"] and row.priority == first["priority"]
    assert row.district == "fenland" and row.state is ReferralState.NEW and row.withheld == ()
    assert "identifiers.nhs_number" in row.no_onward  # the shipped policy's onward-sharing marks

    # The router's message is stored byte for byte; a re-delivery is recognised.
    kept = inbox_store.record_of(TEAM, first["referral_id"])
    again = build_producer(pipeline.settings, pipeline.bootstrap)
    try:
        again.send(kept.topic, kept.value, kept.key, kept.headers)
        again.flush()
    finally:
        again.close()
    stats = ingest(pipeline, inbox_store)
    assert (stats.new, stats.duplicate) == (0, 1)
    assert len(inbox_store.list_referrals(TEAM)) == 2

    # Nothing personal in the database file: it holds only the sealed bytes.
    inbox_store.close()
    raw = b"".join(p.read_bytes() for p in inbox_store.path.parent.glob(inbox_store.path.name + "*"))
    for person in (first, second):
        child = person["child"]
        for value in (child["given_name"], child["family_name"], child["address"]["postcode"]):
            assert value.encode() not in raw


def test_offsets_are_committed_after_storing(pipeline: Pipeline, inbox_store: InboxStore) -> None:
    pipeline.produce(pipeline.routed(pipeline.referral(TEAM, 4), TEAM))
    assert ingest(pipeline, inbox_store).new == 1
    again = ingest(pipeline, inbox_store, idle=2.0)  # same group: nothing left to read
    assert (again.new, again.duplicate) == (0, 0)


def test_opening_gives_exactly_the_granted_fields_and_names_the_withheld(
    topics: Settings, inbox_store: InboxStore
) -> None:
    pipeline = make_pipeline(topics, narrow_policy=True)
    record = pipeline.referral(TEAM, 5)
    pipeline.produce(pipeline.routed(record, TEAM))
    ingest(pipeline, inbox_store)
    [decision] = [
        d
        for d in decide(pipeline.policy, record, referrer_party=REFERRER, at=datetime.now(UTC))
        if d.recipient == TEAM
    ]
    row = inbox_store.get_referral(TEAM, record["referral_id"])
    assert row is not None
    assert {(w.path, w.reason) for w in row.withheld} == set(decision.withheld.items())
    assert "identifiers.nhs_number" in {w.path for w in row.withheld}
    assert {w.reason for w in row.withheld} == {DEFAULT_DENY}
    assert set(row.no_onward) == set(decision.no_onward_sharing)
    opened = pipeline.format([TEAM]).open(inbox_store.record_of(TEAM, record["referral_id"]), TEAM)
    assert opened.granted == project(record, view_schema(decision.shared))
    assert not set(flatten(opened.granted)) & {w.path for w in row.withheld}
    assert opened.granted["child"]["given_name"] == record["child"]["given_name"]


def test_another_team_cannot_open_it(pipeline: Pipeline, inbox_store: InboxStore) -> None:
    record = pipeline.referral(TEAM, 6)
    pipeline.produce(pipeline.routed(record, TEAM))
    ingest(pipeline, inbox_store)
    sealed = inbox_store.record_of(TEAM, record["referral_id"])
    with pytest.raises(SealingError):
        pipeline.format([OTHER_TEAM]).open(sealed, OTHER_TEAM)


def test_shredding_the_case_reaches_the_inbox(pipeline: Pipeline, inbox_store: InboxStore) -> None:
    doomed, kept = pipeline.referral(TEAM, 7), pipeline.referral(TEAM, 8)
    pipeline.produce(pipeline.routed(doomed, TEAM), pipeline.routed(kept, TEAM))
    ingest(pipeline, inbox_store)
    assert pipeline.hub.case_keys is not None
    pipeline.hub.case_keys.shred(doomed["referral_id"])
    fmt = pipeline.format([TEAM])
    with pytest.raises(ShreddedError):
        fmt.open(inbox_store.record_of(TEAM, doomed["referral_id"]), TEAM)
    still = fmt.open(inbox_store.record_of(TEAM, kept["referral_id"]), TEAM)
    assert str(still.granted["referral_id"]) == kept["referral_id"]


def test_refused_records_go_to_dead_letters_and_good_ones_still_arrive(
    pipeline: Pipeline, inbox_store: InboxStore
) -> None:
    out = topic_name(pipeline.settings, "out", TEAM)
    good = pipeline.referral(TEAM, 9)
    for_other = pipeline.routed(pipeline.referral(OTHER_TEAM, 10), OTHER_TEAM)
    genuine = pipeline.routed(pipeline.referral(TEAM, 11), TEAM)
    tampered = bytearray(genuine.value)
    tampered[-1] ^= 0x01
    producer = build_producer(pipeline.settings, pipeline.bootstrap)
    try:
        producer.send(out, b"\x00garbage bytes\xff", b"not-a-referral")  # unsigned garbage
        producer.send(out, for_other.value, for_other.key, for_other.headers)  # copied to the wrong topic
        producer.send(out, bytes(tampered), genuine.key, genuine.headers)  # one bit flipped
        producer.flush()
    finally:
        producer.close()
    pipeline.produce(pipeline.routed(good, TEAM))
    stats = ingest(pipeline, inbox_store)
    assert (stats.new, stats.dead_lettered) == (1, 3)
    assert [r.referral_id for r in inbox_store.list_referrals(TEAM)] == [good["referral_id"]]
    letters = read_topic(pipeline.settings, topic_name(pipeline.settings, "dlq"), expect=3)
    assert len(letters) == 3
    for letter in letters:
        h = dict(letter.headers)
        assert h["rb-dlq-stage"] == b"inbox-ingest" and h["rb-dlq-source-topic"] == out.encode()
        assert h["rb-dlq-reason"] and int(h["rb-dlq-source-offset"]) in (0, 1, 2)
    assert {letter.value for letter in letters} == {
        b"\x00garbage bytes\xff",
        for_other.value,
        bytes(tampered),
    }


def test_a_status_reaches_the_referrers_adapter_through_the_router(
    pipeline: Pipeline, inbox_store: InboxStore
) -> None:
    record = pipeline.referral(TEAM, 12)
    fmt = pipeline.format([TEAM])
    routed = as_sealed(pipeline.routed(record, TEAM))
    inbox_store.ingest(TEAM, fmt.summarise(routed, TEAM), routed)
    reason = "It needs children's social care instead. Synthetic explanation."

    def encode(decided, referral):  # what the web app does for a member's action
        words = reason if decided.action is Action.DECLINE else None
        return fmt.seal_status(
            status_record(decided, referral, actor_role="Family worker", reason=words), TEAM
        )

    now = datetime.now(UTC)
    for action in (Action.OPEN, Action.DECLINE):
        inbox_store.apply(
            TEAM, record["referral_id"], action, actor="fen.worker", at=now, encode_status=encode
        )
    [_, declined] = inbox_store.pending_status(TEAM)
    assert declined.status_record is not None and reason.encode() not in declined.status_record.value
    outbound = Outbound(pipeline.settings, fmt)
    try:
        assert outbound.publish_pending(inbox_store, now=now) == 2
    finally:
        outbound.close()
    assert pipeline.route(statuses=2) == (0, 2)
    got = pipeline.statuses_received(REFERRER, expect=2)
    assert [r.record["status"] for r in got] == ["opened", "declined"]
    assert all(r.referral_id == record["referral_id"] and r.sender == "council" for r in got)
    assert (got[1].record["reason"], got[1].record["from_party"]) == (reason, TEAM)
    assert not [r for r in pipeline.received(OTHER_TEAM) if isinstance(r, Received) and r.kind == "status"]


def test_the_web_servers_and_the_ingest_loops_outbounds_do_not_both_send_a_status(
    pipeline: Pipeline, inbox_store: InboxStore
) -> None:
    """The inbox's web server and each team's ingest loop publish the outbox with outbounds of
    their own, in one process; when both look at once (a member's action, the loop's retry),
    each pending status goes out once, not once by each (it did, now and then, under load)."""
    import threading

    record = pipeline.referral(TEAM, 14)
    pipeline.produce(pipeline.routed(record, TEAM))
    ingest(pipeline, inbox_store)
    fmt = pipeline.format([TEAM])

    def encode(decided, referral):
        return fmt.seal_status(status_record(decided, referral, actor_role="Family worker", reason=None), TEAM)

    now = datetime.now(UTC)
    for action in (Action.OPEN, Action.ACCEPT):
        inbox_store.apply(TEAM, record["referral_id"], action, actor="fen.worker", at=now, encode_status=encode)
    outbounds = [Outbound(pipeline.settings, fmt) for _ in range(2)]
    start = threading.Barrier(2)
    sent: list[int] = []

    def publish(outbound: Outbound) -> None:
        start.wait()
        sent.append(outbound.publish_pending(inbox_store, now=now))

    try:
        threads = [threading.Thread(target=publish, args=(o,)) for o in outbounds]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        for o in outbounds:
            o.close()
    assert sorted(sent) == [0, 2]
    on_topic = read_topic(pipeline.settings, topic_name(pipeline.settings, "status", TEAM), expect=3, timeout_s=5)
    assert len(on_topic) == 2 and inbox_store.pending_status(TEAM) == []


def test_a_new_version_answers_a_request_for_information(pipeline: Pipeline, inbox_store: InboxStore) -> None:
    first = pipeline.referral(TEAM, 13)
    pipeline.produce(pipeline.routed(first, TEAM))
    ingest(pipeline, inbox_store)
    now = datetime.now(UTC)
    fmt = pipeline.format([TEAM])

    def encode(decided, referral):
        words = "Synthetic: please add consent." if decided.action is Action.REQUEST_INFORMATION else None
        return fmt.seal_status(
            status_record(decided, referral, actor_role="Family worker", reason=words), TEAM
        )

    for action in (Action.OPEN, Action.REQUEST_INFORMATION):
        inbox_store.apply(
            TEAM, first["referral_id"], action, actor="fen.worker", at=now, encode_status=encode
        )
    second = {**first, "version": 2, "priority": "urgent"}
    pipeline.produce(pipeline.routed(second, TEAM))
    assert ingest(pipeline, inbox_store).updated == 1
    row = inbox_store.get_referral(TEAM, first["referral_id"])
    assert row is not None and (row.version, row.state, row.priority) == (2, ReferralState.NEW, "urgent")
    opened = fmt.open(inbox_store.record_of(TEAM, first["referral_id"]), TEAM)
    assert opened.granted["version"] == 2
    assert fmt.open(inbox_store.record_of(TEAM, first["referral_id"], 1), TEAM).granted["version"] == 1


def test_a_worker_that_cannot_reach_its_topic_retries_reports_it_and_recovers(
    pipeline: Pipeline, inbox_store: InboxStore
) -> None:
    """The inbox started before its team's topic exists (or the cluster went away): the ingest
    thread does not die behind a page that still answers. It retries, /healthz's check names
    it while it fails, and once the topic is back it stores what the router sends."""
    import time

    from referral_broker.cluster.topics import admin_client, ensure_party_topics
    from referral_broker.consumers.inbox.background import failing

    settings, out = pipeline.settings, topic_name(pipeline.settings, "out", TEAM)
    admin = admin_client(settings, pipeline.bootstrap)
    try:
        admin.delete_topics([out])
        deadline = time.monotonic() + 60
        while out in admin.list_topics():
            assert time.monotonic() < deadline, "the topic was not deleted"
            time.sleep(0.5)
    finally:
        admin.close()
    worker = TeamIngest(settings, TEAM, inbox_store, pipeline.format([TEAM]))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while worker.error is None:
            assert time.monotonic() < deadline, "the missing topic was never reported"
            time.sleep(0.2)
        assert "does not exist" in str(worker.error)
        assert failing([worker]) == [f"ingest {TEAM}"]
        assert worker._thread is not None and worker._thread.is_alive()  # retrying, not dead

        ensure_party_topics(settings, pipeline.bootstrap, [TEAM])
        record = pipeline.referral(TEAM, 41)
        pipeline.send_referrals([record])
        assert pipeline.route(routed=1) == (1, 0)
        deadline = time.monotonic() + 90
        while inbox_store.get_referral(TEAM, record["referral_id"]) is None:
            assert time.monotonic() < deadline, f"not stored after the topic came back: {worker.error!r}"
            time.sleep(0.5)
        assert worker.error is None and failing([worker]) == []
    finally:
        worker.stop()
