"""The one verified receive path (``consumers.receiving``): what it refuses and why, and the
one reload of the key directory on a key id it does not know, on real keys and a real broker."""

from __future__ import annotations

import time

import pytest
from county import POLICE
from test_inbox_fixtures import OTHER_TEAM, REFERRER, TEAM, Pipeline, as_record, make_pipeline

from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.receiving import Refused, open_record, open_verified, verify_arrival
from referral_broker.errors import ContractError, KeyNotFoundError, SealingError
from referral_broker.identity import load_identity
from referral_broker.parties import HUB
from referral_broker.schemas.registry import referral_schema
from referral_broker.sealing.key_admin import rotate


@pytest.fixture
def pipeline(topics: Settings) -> Pipeline:
    return make_pipeline(topics)


def test_a_routed_referral_opens_for_its_team_with_the_routers_headers(pipeline: Pipeline) -> None:
    record = pipeline.referral(TEAM, 1)
    routed = pipeline.routed(record, TEAM)
    got = open_verified(pipeline.partner(TEAM), as_record(routed), sender=HUB, kinds=("referral",))
    assert got.referral_id == record["referral_id"]
    assert got.sender == HUB and got.kind == "referral"
    assert got.referrer == REFERRER
    assert got.decision_id  # rb-decision was read from the verified headers
    assert str(got.record["referral_id"]) == record["referral_id"]


def test_another_team_is_refused_before_anything_is_opened(pipeline: Pipeline) -> None:
    routed = pipeline.routed(pipeline.referral(TEAM, 2), TEAM)
    other = pipeline.partner(OTHER_TEAM)
    with pytest.raises(SealingError, match=f"addressed to {TEAM}, not to {OTHER_TEAM}"):
        verify_arrival(other, as_record(routed), sender=HUB)
    refused = open_record(other, as_record(routed))
    assert isinstance(refused, Refused) and f"not to {OTHER_TEAM}" in refused.reason


def test_a_message_not_from_the_expected_sender_is_refused(pipeline: Pipeline) -> None:
    # a partner seals straight for another partner (skipping the router): signed, not by the hub
    record = pipeline.referral(TEAM, 3)
    direct = pipeline.partner(REFERRER).sealer.seal(
        record,
        referral_schema(),
        topic=topic_name(pipeline.settings, "out", POLICE),
        recipient=POLICE,
        referral_id=record["referral_id"],
        referral_version=record["version"],
        kind="referral",
    )
    police = pipeline.partner(POLICE)
    with pytest.raises(SealingError, match=f"signed by {REFERRER}, not by {HUB}"):
        open_verified(police, as_record(direct), sender=HUB)
    assert isinstance(open_record(police, as_record(direct)), Refused)
    assert open_verified(police, as_record(direct), sender=REFERRER).sender == REFERRER


def test_a_kind_the_caller_does_not_take_is_refused(pipeline: Pipeline) -> None:
    routed = pipeline.routed(pipeline.referral(TEAM, 4), TEAM)
    with pytest.raises(ContractError, match="message kind referral is not status"):
        open_verified(pipeline.partner(TEAM), as_record(routed), sender=HUB, kinds=("status",))


def test_an_unknown_key_reloads_the_directory_once(pipeline: Pipeline) -> None:
    team = load_identity(pipeline.settings, pipeline.bootstrap, TEAM)
    rotate(pipeline.settings, HUB, bootstrap=pipeline.bootstrap)  # the hub signs with a new key
    hub = load_identity(pipeline.settings, pipeline.bootstrap, HUB)
    pipeline.hub = hub
    routed = as_record(pipeline.routed(pipeline.referral(TEAM, 5), TEAM))
    # loaded a moment ago: no reload yet (a bogus key id cannot make every record a directory read);
    # "a moment ago" is set here, so a slow machine cannot have aged the load past RELOAD_AFTER_S
    team.loaded_at = time.monotonic()
    with pytest.raises(KeyNotFoundError):
        open_verified(team, routed, sender=HUB)
    team.loaded_at -= 60  # the directory is a minute old: one reload, then it opens
    before = team.directory
    got = open_verified(team, routed, sender=HUB)
    assert team.directory is not before
    assert got.sender == HUB
