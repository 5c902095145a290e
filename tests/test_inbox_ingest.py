"""Ingest from the real broker with real sealed messages: idempotent, sealed at rest, opened
only with the team's key and the case key, refused records dead-lettered with their reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from referral_broker.consumers.inbox.ingest import TeamIngest
from referral_broker.consumers.inbox.outbound import status_record
from referral_broker.consumers.inbox.records import WithheldField, flatten
from referral_broker.consumers.inbox.states import Action, ReferralState, transition
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.schemas.views import project, view_schema
from test_inbox_fixtures import OTHER_TEAM, TEAM, Routing, make_routing, make_store, read_topic

from referral_broker.cluster.clients import build_producer
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.errors import SealingError, ShreddedError, SignatureError


@pytest.fixture
def routing(topics: Settings) -> Routing:
    return make_routing(topics)


@pytest.fixture
def inbox_store(topics: Settings) -> Iterator[InboxStore]:
    store = make_store(topics)
    yield store
    store.close()


def ingest(routing: Routing, store: InboxStore, team: str = TEAM, idle: float = 3.0):
    worker = TeamIngest(routing.settings, team, store, routing.format([TEAM, OTHER_TEAM]))
    return worker.run(stop_when_idle=idle)


def test_routed_referrals_are_stored_once_and_sealed_at_rest(
    routing: Routing, inbox_store: InboxStore
) -> None:
    first, second = routing.referral(TEAM, 1), routing.referral(TEAM, 2)
    m1, m2 = routing.route(first, TEAM), routing.route(second, TEAM)
    routing.send(m1, m2, m1)  # the first one delivered twice
    stats = ingest(routing, inbox_store)
    assert (stats.new, stats.duplicate, stats.dead_lettered) == (2, 1, 0)
    rows = inbox_store.list_referrals(TEAM)
    assert sorted(r.referral_id for r in rows) == sorted([first["referral_id"], second["referral_id"]])
    row = inbox_store.get_referral(TEAM, first["referral_id"])
    assert row is not None
    assert row.referrer == first["referrer"]["partner"]
    assert row.referrer_organisation == first["referrer"]["organisation"]
    assert list(row.concern_types) == first["concern_types"] and row.priority == first["priority"]
    assert row.state is ReferralState.NEW and row.withheld == ()
    kept = inbox_store.record_of(TEAM, first["referral_id"])
    assert (kept.key, kept.value, kept.headers) == (m1.key, m1.value, m1.headers)

    # Nothing personal in the database file: it holds only the sealed bytes.
    inbox_store.close()
    raw = b"".join(p.read_bytes() for p in inbox_store.path.parent.glob(inbox_store.path.name + "*"))
    for person in (first, second):
        for value in (
            person["child"]["given_name"],
            person["child"]["family_name"],
            person["child"]["address"]["postcode"],
        ):
            assert value.encode() not in raw


def test_offsets_are_committed_after_storing(routing: Routing, inbox_store: InboxStore) -> None:
    routing.send(routing.route(routing.referral(TEAM, 3), TEAM))
    assert ingest(routing, inbox_store).new == 1
    again = ingest(routing, inbox_store, idle=2.0)  # same group: nothing left to read
    assert (again.new, again.duplicate) == (0, 0)


def test_opening_gives_exactly_the_granted_fields(routing: Routing, inbox_store: InboxStore) -> None:
    record = routing.referral(TEAM, 4)
    granted = ["referral_id", "version", "priority", "concern_types", "referrer.partner", "child.given_name"]
    withheld = {
        "identifiers.nhs_number": "not granted to this recipient by any purpose (default deny)",
        "child.date_of_birth": "withheld: consent is 'refused' and there is no sharing override record",
    }
    routing.send(routing.route(record, TEAM, granted=granted, withheld=withheld))
    ingest(routing, inbox_store)
    row = inbox_store.get_referral(TEAM, record["referral_id"])
    assert row is not None
    assert set(row.withheld) == {WithheldField(p, r) for p, r in withheld.items()}
    fmt = routing.format([TEAM])
    opened = fmt.open(inbox_store.record_of(TEAM, record["referral_id"]), TEAM)
    assert opened.granted == project(record, view_schema(granted))
    assert set(flatten(opened.granted)) == set(granted)
    assert opened.granted["child"]["given_name"] == record["child"]["given_name"]


def test_another_team_cannot_open_it(routing: Routing, inbox_store: InboxStore) -> None:
    record = routing.referral(TEAM, 5)
    routing.send(routing.route(record, TEAM))
    ingest(routing, inbox_store)
    sealed = inbox_store.record_of(TEAM, record["referral_id"])
    with pytest.raises(SealingError):
        routing.format([OTHER_TEAM]).open(sealed, OTHER_TEAM)


def test_shredding_the_case_reaches_the_inbox(routing: Routing, inbox_store: InboxStore) -> None:
    doomed, kept = routing.referral(TEAM, 6), routing.referral(TEAM, 7)
    routing.send(routing.route(doomed, TEAM), routing.route(kept, TEAM))
    ingest(routing, inbox_store)
    routing.case_keys.shred(doomed["referral_id"])
    fmt = routing.format([TEAM])
    with pytest.raises(ShreddedError):
        fmt.open(inbox_store.record_of(TEAM, doomed["referral_id"]), TEAM)
    still = fmt.open(inbox_store.record_of(TEAM, kept["referral_id"]), TEAM)
    assert str(still.granted["referral_id"]) == kept["referral_id"]


def test_refused_records_go_to_dead_letters_and_good_ones_still_arrive(
    routing: Routing, inbox_store: InboxStore
) -> None:
    out = topic_name(routing.settings, "out", TEAM)
    good = routing.referral(TEAM, 8)
    for_other = routing.route(routing.referral(OTHER_TEAM, 9), OTHER_TEAM)
    genuine = routing.route(routing.referral(TEAM, 10), TEAM)
    tampered = bytearray(genuine.value)
    tampered[-1] ^= 0x01
    producer = build_producer(routing.settings, routing.settings.bootstrap_servers)
    try:
        producer.send(out, b"\x00garbage bytes\xff", b"not-a-referral")  # unsigned garbage
        producer.send(out, for_other.value, for_other.key, for_other.headers)  # copied to the wrong topic
        producer.send(out, bytes(tampered), genuine.key, genuine.headers)  # one bit flipped
        producer.flush()
    finally:
        producer.close()
    routing.send(routing.route(good, TEAM))
    stats = ingest(routing, inbox_store)
    assert (stats.new, stats.dead_lettered) == (1, 3)
    assert [r.referral_id for r in inbox_store.list_referrals(TEAM)] == [good["referral_id"]]
    letters = read_topic(routing.settings, topic_name(routing.settings, "dlq"), expect=3)
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


def test_status_message_is_sealed_for_the_hub_and_signed_by_the_team(
    routing: Routing, inbox_store: InboxStore
) -> None:
    record = routing.referral(TEAM, 11)
    record["referrer"]["partner"] = "health"
    routing.send(routing.route(record, TEAM))
    ingest(routing, inbox_store)
    row = inbox_store.get_referral(TEAM, record["referral_id"])
    assert row is not None
    now = datetime.now(UTC)
    opened = transition(row.state, Action.OPEN, at=now)
    declined = transition(opened.after, Action.DECLINE, at=now)
    reason = "It needs children's social care instead. Synthetic explanation."
    status = status_record(declined, row, actor_role="Family worker", reason=reason)
    sealed = routing.format([TEAM]).seal_status(status, TEAM)
    assert reason.encode() not in sealed.value
    assert sealed.key == record["referral_id"].encode()

    class Consumed:  # what a consumer hands the router: the record as produced on the topic
        topic = topic_name(routing.settings, "status", TEAM)
        key, value, headers = sealed.key, sealed.value, sealed.headers

    message = routing.open_status(Consumed)
    assert message.sender == TEAM and message.kind == "status"
    assert message.record["status"] == "declined" and message.record["reason"] == reason
    assert message.record["to_party"] == "health"
    # A referrer kind that is no party itself (a district team) is answered through the hub.
    onward = status_record(declined, replace(row, referrer="district_team"), actor_role="x", reason=reason)
    assert onward["to_party"] == "council"
    with pytest.raises(SignatureError):  # copied onto another team's status topic
        Consumed.topic = topic_name(routing.settings, "status", OTHER_TEAM)
        routing.open_status(Consumed)


def test_withheld_header_must_be_paths_to_reasons(routing: Routing, inbox_store: InboxStore) -> None:
    record = routing.referral(TEAM, 12)
    message = routing.route(record, TEAM, granted=["referral_id", "version"], withheld={"child": "x"})
    assert json.loads(dict(message.headers)["rb-withheld"]) == {"child": "x"}
    routing.send(message)
    assert ingest(routing, inbox_store).new == 1
