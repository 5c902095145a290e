"""Trust II on the receive side (issue 15, attacks 6, 8, 9 and duplicates), each on the real
broker with the attack records written by a plain kafka-python producer, as someone who can
write a topic (the ACLs of Trust I are not set up here: the receiver must hold on its own).

- attack 6: a charity signs a referral straight onto a partner's out topic: refused, nothing
  delivered, nothing written;
- attack 8: unsigned records with malformed ``rb-view`` (and other) headers: each refused with
  a reason, never a crash, and the next run starts after them; learned views are bounded;
- attack 9: a planted, an altered and a hub-signed-but-misdirected dead letter: ``dlq replay``
  refuses each with the reason and a non-zero exit, and nothing reaches the keys topic; a letter
  the router signed goes back to its intake topic;
- duplicates: a replayed copy and a re-delivery of a message already received are reported,
  not delivered twice.
"""

from __future__ import annotations

import copy
import json
import os
import random
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import county
import pytest
from kafka import KafkaProducer
from test_inbox_fixtures import Pipeline, as_record, district_of, make_pipeline

from referral_broker.cluster.clients import Record, build_consumer, drain
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.dead_letters import dead_letter, replay_target, verify_dead_letter
from referral_broker.consumers.receiving import (
    Duplicate,
    PartnerReceiver,
    Received,
    Refused,
    ledger_path,
    message_id,
    open_record,
)
from referral_broker.consumers.router import Router
from referral_broker.errors import ContractError, SealingError, SignatureError
from referral_broker.identity import H_VIEW, MAX_LEARNED_VIEWS, SchemaBook
from referral_broker.parties import HUB, get_party
from referral_broker.schemas.registry import referral_schema
from referral_broker.schemas.synth import synthetic_referral
from referral_broker.schemas.views import field_paths
from referral_broker.sealing import KeyStore
from referral_broker.sealing.envelope import H_SCHEMA

# Party names in one place (organisations since issue 13; tests/county.py names the county).
SCHOOL = county.SCHOOL
CHARITY = county.CHARITY
TEAM = "district-fenland"
OTHER_TEAM = "district-cambridge"


@pytest.fixture
def pipeline(topics: Settings) -> Pipeline:
    return make_pipeline(topics)


@pytest.fixture
def cli(pipeline: Pipeline) -> Callable[..., subprocess.CompletedProcess[str]]:
    settings = pipeline.settings
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": pipeline.bootstrap,
        "REFERRAL_BROKER_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": settings.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(settings.paths_data_dir),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "referral_broker.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    return run


def produce(
    settings: Settings, topic: str, records: list[tuple[bytes | None, bytes | None, list[Any]]]
) -> None:
    """As an attacker with write access would: a plain kafka-python producer, no project code."""
    from referral_broker.cluster.security import client_security

    bootstrap = settings.bootstrap_servers
    producer = KafkaProducer(bootstrap_servers=bootstrap, **client_security(settings, bootstrap).kafka_kwargs())
    try:
        for key, value, headers in records:
            producer.send(topic, key=key, value=value, headers=headers)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)


def read_all(settings: Settings, topic: str) -> list[Record]:
    consumer = build_consumer(settings, settings.bootstrap_servers, [topic], group_id=None)
    try:
        return [r for batch in drain(consumer, idle_s=2) for r in batch]
    finally:
        consumer.close()


def referral(pipeline: Pipeline, seed: int, *, team: str = TEAM, partner: str = SCHOOL) -> dict[str, Any]:
    """A synthetic referral from organisation ``partner`` about a family in ``team``'s district."""
    record = copy.deepcopy(synthetic_referral(random.Random(seed)))
    record["referral_id"] = str(uuid.UUID(int=random.Random(f"trust{seed}").getrandbits(128), version=4))
    record["district"] = district_of(team)
    org = get_party(partner)
    record["referrer"]["partner"] = org.format or org.kind  # the partner kind, in the clear
    record["referrer"]["organisation"] = org.description
    return county.in_county(record)


def receive_json(cli: Callable[..., Any], party: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    got = cli("receive", "--as", party, "--json", "--stop-when-idle", "2", *extra)
    assert "Traceback" not in got.stderr, got.stderr
    return got.returncode, json.loads(got.stdout), got.stderr


# -- attack 8 ---------------------------------------------------------------------------------
MALFORMED_VIEWS = [
    b"\xff\xfe",  # not UTF-8
    b"[[1]]",  # a list of lists (was: unhashable, a TypeError)
    b"[1, 2]",  # not strings (was: an AttributeError in the view builder)
    b"[" * 100_000,  # nesting (was: a RecursionError)
    b'["no.such.field"]',
    b"{}",
    b"5",
    b"null",
    b'["' + b"a" * 70_000 + b'"]',  # over the header bound
]


def test_attack_8_malformed_unsigned_headers_are_refused_and_never_crash(
    pipeline: Pipeline, cli: Callable[..., Any]
) -> None:
    out = topic_name(pipeline.settings, "out", TEAM)
    good = pipeline.routed(referral(pipeline, 81), TEAM, partner=SCHOOL)
    attacks: list[tuple[bytes | None, bytes | None, list[Any]]] = [
        (b"k", b"v", [(H_VIEW, view), (H_SCHEMA, b"00")]) for view in MALFORMED_VIEWS
    ]
    attacks += [
        (b"k", None, [(H_VIEW, b"[[1]]")]),  # no value (a tombstone)
        (b"k", b"v", [("rb-signature", b""), (H_VIEW, b"[1]")]),  # an empty signature header
        (b"k", b"v", [("rb-signature", b"x" * 64), ("rb-signature", b"y" * 64)]),
    ]
    # a hub-signed message with a malformed view cannot be made by an attacker: a real one
    # copied with its view changed no longer verifies
    tampered = [(n, b"[[1]]" if n == H_VIEW else v) for n, v in good.headers]
    attacks.append((good.key, good.value, tampered))
    produce(pipeline.settings, out, attacks)
    produce(pipeline.settings, out, [(good.key, good.value, list(good.headers))])

    code, first, stderr = receive_json(cli, TEAM)
    assert code == 1, stderr  # refusals are reported with a non-zero exit, not a crash
    assert len(first["refused"]) == len(attacks)
    reasons = [r["reason"] for r in first["refused"]]
    assert all(r.startswith("SignatureError: ") for r in reasons), reasons  # the signature first
    assert sum("unsigned" in r for r in reasons) == len(MALFORMED_VIEWS) + 1
    assert sum("is 0 bytes, not 64" in r for r in reasons) == 1
    assert sum("more than one rb-signature" in r for r in reasons) == 1
    assert sum("does not verify" in r for r in reasons) == 1  # the tampered hub message
    assert [r["referral_id"] for r in first["received"]] == [good.key.decode()]
    # the offsets moved on: the next run starts after the bad records instead of dying on them
    code, second, stderr = receive_json(cli, TEAM)
    assert code == 0, stderr
    assert second["received"] == [] and second["refused"] == []


def test_attack_8_the_signature_is_checked_before_any_header_is_parsed(pipeline: Pipeline) -> None:
    team = pipeline.partner(TEAM)
    out = topic_name(pipeline.settings, "out", TEAM)
    for view in MALFORMED_VIEWS:
        record = Record(out, 0, 0, b"k", b"v", [(H_VIEW, view), (H_SCHEMA, b"00")], 0)
        with pytest.raises(SignatureError, match="unsigned"):
            team.open(record)  # Identity.open: verify, then learn the view
        refused = open_record(team, record, topic=out)
        assert isinstance(refused, Refused) and "unsigned" in refused.reason
    assert len(team.schemas) == 0  # nothing was learned from an unsigned record


def test_attack_8_learned_views_are_bounded_and_malformed_views_are_contract_errors() -> None:
    assert MAX_LEARNED_VIEWS == 256
    book = SchemaBook(max_views=4)
    paths = sorted(p for p in field_paths(referral_schema()) if p != "referral_id")
    views = [json.dumps(["referral_id", p]).encode() for p in paths[:10]]
    fingerprints = []
    for raw in views:
        from referral_broker.schemas.registry import fingerprint
        from referral_broker.schemas.views import view_schema

        fp = fingerprint(view_schema(json.loads(raw)))
        book.learn([(H_VIEW, raw), (H_SCHEMA, fp.hex().encode())])
        fingerprints.append(fp)
        assert book(fp) is not None
    assert len(book) == 4  # least recently used dropped first
    assert book(fingerprints[0]) is None and book(fingerprints[-1]) is not None
    for raw in MALFORMED_VIEWS:
        with pytest.raises(ContractError):
            book.learn([(H_VIEW, raw), (H_SCHEMA, b"00")])
    assert len(book) == 4


# -- attack 6 ---------------------------------------------------------------------------------
def test_attack_6_a_charity_signed_referral_on_a_partners_out_topic_is_refused(
    pipeline: Pipeline, cli: Callable[..., Any], tmp_path: Path
) -> None:
    out = topic_name(pipeline.settings, "out", SCHOOL)
    record = referral(pipeline, 61, partner=CHARITY)
    # the charity seals the child's details for the school and signs them with its own key,
    # for the school's out topic, skipping the router
    direct = pipeline.partner(CHARITY).sealer.seal(
        record,
        referral_schema(),
        topic=out,
        recipient=SCHOOL,
        referral_id=record["referral_id"],
        referral_version=record["version"],
        kind="referral",
    )
    # a genuine hub message for another party, copied onto the school's topic
    routed = pipeline.routed(referral(pipeline, 62), TEAM, partner=SCHOOL)
    produce(
        pipeline.settings,
        out,
        [(direct.key, direct.value, list(direct.headers)), (routed.key, routed.value, list(routed.headers))],
    )
    code, got, stderr = receive_json(cli, SCHOOL, "--out", str(tmp_path / "inbox"))
    assert code == 1, stderr
    assert got["received"] == [] and got["written"] == []
    reasons = sorted(r["reason"] for r in got["refused"])
    assert len(reasons) == 2
    assert any(f"signed by {CHARITY}, not by {HUB}" in r for r in reasons), reasons
    assert any("does not verify" in r for r in reasons), reasons  # signed for another topic
    assert not (tmp_path / "inbox").exists() or not any((tmp_path / "inbox").iterdir())
    # the Python API refuses the same, and so does a hub message read from another topic
    items = list(
        PartnerReceiver(pipeline.settings, pipeline.bootstrap, SCHOOL).receive(stop_when_idle=2, group=None)
    )
    assert len(items) == 2 and all(isinstance(i, Refused) for i in items)
    team = pipeline.partner(TEAM)
    assert isinstance(open_record(team, as_record(routed)), Received)
    moved = open_record(team, as_record(routed), topic=topic_name(pipeline.settings, "out", OTHER_TEAM))
    assert isinstance(moved, Refused) and "another topic" in moved.reason


# -- attack 9 ---------------------------------------------------------------------------------
def test_attack_9_dlq_replay_goes_only_to_the_source_topic_the_router_signed(
    pipeline: Pipeline, cli: Callable[..., Any]
) -> None:
    settings = pipeline.settings
    intake = topic_name(settings, "intake", SCHOOL)
    keys = topic_name(settings, "keys")
    dlq = topic_name(settings, "dlq")
    # a genuine dead letter: an unsigned record on the school's intake, dead-lettered (and
    # signed) by the real router
    produce(
        settings, intake, [(str(uuid.uuid4()).encode(), b"not a sealed referral", [("rb-kind", b"referral")])]
    )
    stats = Router(settings, pipeline.bootstrap, policy=pipeline.policy, identity=pipeline.hub).run(
        stop_when_idle=3
    )
    assert stats.dead_lettered == 1
    (genuine,) = read_all(settings, dlq)
    verify_dead_letter(pipeline.hub.directory, genuine)  # the router signed it
    keys_before = len(read_all(settings, keys))
    forged_key = json.dumps({"key_id": "police-forged", "party": HUB}).encode()
    # 1. planted: an unsigned dead letter naming the keys topic
    planted = (b"police", forged_key, [("rb-dlq-source-topic", keys.encode()), ("rb-dlq-stage", b"validate")])
    # 2. the genuine letter with its source topic changed to the keys topic
    altered_headers = [(n, keys.encode() if n == "rb-dlq-source-topic" else v) for n, v in genuine.headers]
    altered = (genuine.key, forged_key, altered_headers)
    # 3. signed by another party's key (a charity has a key, not the router's)
    charity_signed = dead_letter(
        settings,
        Record(keys, 0, 0, b"police", forged_key, [], 0),
        SealingError("x"),
        "validate",
        signer=KeyStore.open(settings.keys_dir, CHARITY),
    )
    # 4. even a letter the hub signed never goes to a topic the router does not read
    hub_signed_keys = dead_letter(
        settings,
        Record(keys, 0, 0, b"police", forged_key, [], 0),
        SealingError("x"),
        "validate",
        signer=pipeline.hub.keystore,
    )
    produce(
        settings,
        dlq,
        [
            planted,
            altered,
            (charity_signed.key, charity_signed.value, charity_signed.headers),
            (hub_signed_keys.key, hub_signed_keys.value, hub_signed_keys.headers),
        ],
    )
    intake_before = len(read_all(settings, intake))
    got = cli("dlq", "replay", "--yes", "--json")
    assert "Traceback" not in got.stderr, got.stderr
    assert got.returncode == SignatureError.exit_code, got.stderr
    report = json.loads(got.stdout)
    assert report["replayed"] == 1  # only the genuine letter, to its own intake topic
    reasons = [r["reason"] for r in report["refused"]]
    assert len(reasons) == 4, reasons
    assert any("not signed by the router" in r for r in reasons)
    assert any("does not verify" in r for r in reasons)
    assert any(f"not signed by {HUB}'s router" in r for r in reasons)
    assert any("not an intake or status topic" in r for r in reasons)
    assert len(read_all(settings, keys)) == keys_before  # nothing reached the keys topic
    replayed = read_all(settings, intake)
    assert len(replayed) == intake_before + 1
    assert replayed[-1].value == b"not a sealed referral"
    assert not any(n.startswith("rb-dlq-") for n, _ in replayed[-1].headers)
    # the human form names each refusal
    human = cli("dlq", "replay", "--yes")
    assert human.returncode == SignatureError.exit_code
    assert human.stderr.count("refused dlq") >= 4 and "Traceback" not in human.stderr


# -- duplicates -------------------------------------------------------------------------------
def test_a_replayed_or_redelivered_message_is_reported_not_delivered_twice(
    pipeline: Pipeline, cli: Callable[..., Any], tmp_path: Path
) -> None:
    out = topic_name(pipeline.settings, "out", TEAM)
    record = referral(pipeline, 91)
    first = pipeline.routed(record, TEAM, partner=SCHOOL)
    other = pipeline.routed(referral(pipeline, 92), TEAM, partner=SCHOOL)
    produce(pipeline.settings, out, [(m.key, m.value, list(m.headers)) for m in (first, other)])
    code, got, stderr = receive_json(cli, TEAM)
    assert code == 0, stderr
    assert sorted(r["referral_id"] for r in got["received"]) == sorted(
        [first.key.decode(), other.key.decode()]
    )
    assert got["duplicates"] == []
    # a byte-for-byte replay of the first, and the router sending it again (sealed afresh:
    # another signature, the same decision id)
    again = pipeline.routed(record, TEAM, partner=SCHOOL)
    assert again.value != first.value
    produce(
        pipeline.settings,
        out,
        [(first.key, first.value, list(first.headers)), (again.key, again.value, list(again.headers))],
    )
    code, got, stderr = receive_json(cli, TEAM, "--out", str(tmp_path / "inbox"))
    assert code == 0, stderr
    assert got["received"] == [] and got["written"] == []
    dups = got["duplicates"]
    assert [d["referral_id"] for d in dups] == [first.key.decode()] * 2
    assert all(d["kind"] == "referral" and d["version"] == record["version"] for d in dups)
    assert all(d["message_id"].startswith("decision:") for d in dups)
    # re-reading everything delivers nothing twice either
    code, got, stderr = receive_json(cli, TEAM, "--all")
    assert code == 0 and got["received"] == [] and len(got["duplicates"]) == 4
    human = cli("receive", "--as", TEAM, "--all", "--stop-when-idle", "2")
    assert human.stderr.count("was already received; not delivered again") == 4
    # the record is small, local and private
    path = ledger_path(pipeline.settings, TEAM)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert record["child"]["given_name"].encode() not in path.read_bytes()
    # the Python API reports the same as Duplicate items
    items = list(
        PartnerReceiver(pipeline.settings, pipeline.bootstrap, TEAM).receive(stop_when_idle=2, group=None)
    )
    assert len(items) == 4 and all(isinstance(i, Duplicate) for i in items)


def test_what_makes_a_message_the_same_message_again() -> None:
    def item(kind: str, record: dict[str, Any], decision_id: str | None = None) -> Received:
        return Received("r1", 1, kind, HUB, SCHOOL, record, decision_id=decision_id)

    status_id = uuid.uuid4()
    assert message_id(item("referral", {"a": 1}, "d-1")) == "decision:d-1"
    assert message_id(item("status", {"status_id": status_id})) == f"status:{status_id}"
    # two statuses about the same referral version are two messages, not a duplicate
    assert message_id(item("status", {"status_id": uuid.uuid4()})) != message_id(
        item("status", {"status_id": status_id})
    )
    # without either id, the opened content decides
    assert message_id(item("referral", {"a": 1})) == message_id(item("referral", {"a": 1}))
    assert message_id(item("referral", {"a": 1})) != message_id(item("referral", {"a": 2}))


def test_a_dead_letter_verifies_only_as_the_router_signed_it(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    intake = topic_name(settings, "intake", SCHOOL)
    original = Record(intake, 1, 7, b"rid", b"sealed bytes", [("rb-kind", b"referral")], 0)
    letter = dead_letter(settings, original, SealingError("x"), "verify-open", signer=pipeline.hub.keystore)
    as_read = Record(letter.topic, 0, 0, letter.key, letter.value, list(letter.headers), 0)
    verify_dead_letter(pipeline.hub.directory, as_read)
    assert replay_target(settings, intake) == intake
    changes = {
        "value": Record(letter.topic, 0, 0, letter.key, b"other bytes", list(letter.headers), 0),
        "key": Record(letter.topic, 0, 0, b"other", letter.value, list(letter.headers), 0),
        "topic": Record(
            topic_name(settings, "audit"), 0, 0, letter.key, letter.value, list(letter.headers), 0
        ),
        "reason": Record(
            letter.topic,
            0,
            0,
            letter.key,
            letter.value,
            [(n, b"fixed" if n == "rb-dlq-reason" else v) for n, v in letter.headers],
            0,
        ),
    }
    for record in changes.values():  # any change of value, key, topic or a header
        with pytest.raises(SignatureError, match="does not verify"):
            verify_dead_letter(pipeline.hub.directory, record)
    unsigned = dead_letter(settings, original, SealingError("x"), "verify-open")
    with pytest.raises(SignatureError, match="not signed by the router"):
        verify_dead_letter(
            pipeline.hub.directory,
            Record(unsigned.topic, 0, 0, unsigned.key, unsigned.value, unsigned.headers, 0),
        )
    for topic in (topic_name(settings, "keys"), topic_name(settings, "out", SCHOOL), "elsewhere"):
        with pytest.raises(SignatureError, match="not an intake or status topic"):
            replay_target(settings, topic)
