"""Sealed format 2 (issue 15, attack 7): the sealed fields are bound to who sealed them, for
which topic, as which kind of message, and to the message's clear fields.

The attack, as it was run: a charity copied a school's intake message, changed its clear fields
(district, flags, priority) and signed the copy with its own key on its own intake topic; the
hub opened it and routed the child's data to another district. Here that copy, and a copy
moved to another topic, are dead-lettered by the real router on the real broker with a reason
that names the cause, and nothing is delivered; every other way of re-binding a sealed copy is
refused by the opener with its own reason; and messages written by the old code (sealed format
1, ``tests/data/sealing_legacy_v1``) still open.

Sealed format 3 (issue 20) seals one AEAD per data class instead of one per field; the binding
is the same, so every refusal above holds for it, and messages written in format 2
(``tests/data/sealing_legacy_v2``) still open.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from county import CHARITY, FORMAT, SCHOOL, in_county
from test_sealing_support import SCHEMA as TEST_SCHEMA
from test_sealing_support import sample_referral

from referral_broker.cluster.clients import Record, build_consumer, build_producer, drain
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.dead_letters import read_dead_letters
from referral_broker.consumers.router import Router
from referral_broker.errors import ContractError, ShreddedError, TamperedError
from referral_broker.parties import all_parties
from referral_broker.producers.intake import IntakeSender
from referral_broker.schemas.registry import referral_schema
from referral_broker.schemas.synth import synthetic_referrals
from referral_broker.sealing import (
    CaseKeyStore,
    DekCache,
    KeyDirectory,
    KeyEntry,
    KeyStore,
    MessageOpener,
    MessageSealer,
    OutgoingMessage,
    schema_book,
    sealing_plan,
)
from referral_broker.sealing.classes import SEALED_FIELD
from referral_broker.sealing.envelope import (
    H_BINDING,
    H_DEK,
    H_FORMAT,
    H_KIND,
    H_SEALED_AT,
    H_SENDER,
    H_SENDER_KEY,
    H_SIGNATURE,
)
from referral_broker.sealing.fields import Binding, DataKey, FieldContext
from referral_broker.sealing.key_admin import init_parties
from referral_broker.sealing.signing import BATCH_PROOF_HEADER, sign_message
from referral_broker.sealing.wrapping import MODE_RECIPIENT_AND_CASE, read_wrapped_header

HUB = "council"
TEAM = "district-fenland"
LEGACY = Path(__file__).parent / "data" / "sealing_legacy_v1"
FORMAT_2 = Path(__file__).parent / "data" / "sealing_legacy_v2"
FORMAT_3_CASE_MODE_2 = Path(__file__).parent / "data" / "sealing_legacy_v3"
Headers = list[tuple[str, bytes]]


# -- helpers -----------------------------------------------------------------------------------
def school_referral(seed: int) -> dict[str, Any]:
    """A synthetic referral from the school, in the fenland district (so a changed district
    is a different team), naming the county's organisations."""
    record = copy.deepcopy(next(iter(synthetic_referrals(1, seed=seed))))
    record["referrer"]["partner"] = FORMAT[SCHOOL]
    record["district"] = "fenland"
    return in_county(record)


def resigned(
    record: Any,
    keys_dir: Path,
    signer: str,
    topic: str,
    *,
    value: bytes | None = None,
    set_headers: dict[str, bytes] | None = None,
    drop: tuple[str, ...] = (),
) -> Record:
    """``record`` as ``signer`` would re-sign it for ``topic`` with its own real key: its
    value (or ``value``) and headers kept, the sender headers and the signature replaced (and
    the batch proof of a message its sender signed with others dropped)."""
    pair = KeyStore.open(keys_dir, signer).active()
    changes = {
        H_SENDER: signer.encode(),
        H_SENDER_KEY: pair.key_id.encode(),
        H_SEALED_AT: str(int(time.time() * 1000)).encode(),
        **(set_headers or {}),
    }
    headers: Headers = [
        (n, changes.get(n, v)) for n, v in record.headers if n not in (H_SIGNATURE, BATCH_PROOF_HEADER, *drop)
    ]
    value = record.value if value is None else value
    headers.append((H_SIGNATURE, sign_message(pair.signing, topic, record.key, headers, value)))
    return Record(topic, 0, 0, record.key, value, headers, 0)


def edited_clear_fields(value: bytes) -> bytes:
    """The attack's edit of the clear fields: another district, flags flipped, another priority."""
    plan = sealing_plan(referral_schema())
    wire = plan.decode_wire(value)
    wire["district"] = "cambridge" if wire["district"] != "cambridge" else "fenland"
    wire["flags"] = {name: not on for name, on in wire["flags"].items()}
    wire["priority"] = "urgent" if wire["priority"] != "urgent" else "routine"
    return plan.encode_wire(wire)


def produce(settings: Settings, bootstrap: str, records: list[Record]) -> None:
    producer = build_producer(settings, bootstrap)
    try:
        for r in records:
            producer.send(r.topic, r.value or b"", key=r.key, headers=list(r.headers))
        producer.flush()
    finally:
        producer.close()


def read_topic(settings: Settings, bootstrap: str, topic: str) -> list[Record]:
    consumer = build_consumer(settings, bootstrap, [topic], group_id=None)
    try:
        return [r for batch in drain(consumer, idle_s=2) for r in batch]
    finally:
        consumer.close()


def secrets_of(record: dict[str, Any]) -> list[str]:
    """Distinctive sealed values of a synthetic referral, which no error may carry."""
    child = record["child"]
    found = [child["given_name"], child["family_name"], record["identifiers"]["nhs_number"]]
    return [s for s in found if s and len(s) >= 4]  # a shorter one could match any text


@pytest.fixture
def broker(topics: Settings, kafka_bootstrap: str) -> Settings:
    """The topic plan plus keys for every party, published on the keys topic."""
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    return topics


# -- the attack on the real broker --------------------------------------------------------------
def test_a_school_intake_copied_edited_and_resigned_by_a_charity_is_dead_lettered(
    broker: Settings, kafka_bootstrap: str
) -> None:
    referral = school_referral(seed=701)
    with IntakeSender(broker, kafka_bootstrap, SCHOOL) as sender:
        sender.send_referrals([referral])
    first = Router(broker, kafka_bootstrap).run(stop_when_idle=3)
    assert first.routed == 1 and first.dead_lettered == 0  # the school's own message is fine
    audited_before = len(read_topic(broker, kafka_bootstrap, topic_name(broker, "audit")))

    # The charity copies the school's intake message, edits the clear fields and re-signs the
    # copy with its own key for its own intake topic.
    (original,) = read_topic(broker, kafka_bootstrap, topic_name(broker, "intake", SCHOOL))
    charity_topic = topic_name(broker, "intake", CHARITY)
    forged = resigned(
        original, broker.keys_dir, CHARITY, charity_topic, value=edited_clear_fields(original.value or b"")
    )
    produce(broker, kafka_bootstrap, [forged])

    second = Router(broker, kafka_bootstrap).run(stop_when_idle=3)
    assert second.consumed == 1 and second.dead_lettered == 1
    assert second.routed == 0 and second.delivered == 0 and second.audited == 0
    letters = [d for _, d in read_dead_letters(broker, kafka_bootstrap)]
    assert len(letters) == 1
    (letter,) = letters
    assert letter.source_topic == charity_topic and letter.stage == "verify-open"
    assert letter.reason.startswith("TamperedError: re-signed copy")
    assert f"sealed by {SCHOOL}" in letter.reason and f"signed by {CHARITY}" in letter.reason
    assert not any(secret in letter.reason for secret in secrets_of(referral))
    # nothing reached the district the edit named, nor anyone else: no audit, no delivery
    cambridge = read_topic(broker, kafka_bootstrap, topic_name(broker, "out", "district-cambridge"))
    assert not [r for r in cambridge if r.key == original.key]
    assert len(read_topic(broker, kafka_bootstrap, topic_name(broker, "audit"))) == audited_before


def test_a_moved_copy_and_a_copy_with_edited_clear_fields_are_dead_lettered(
    broker: Settings, kafka_bootstrap: str
) -> None:
    """Even the party that sealed it cannot re-sign its message onto another topic, or with
    other clear fields: the sealed fields stay bound to the topic and clear fields they were
    sealed with. The original still routes, once."""
    referral = school_referral(seed=702)
    with IntakeSender(broker, kafka_bootstrap, SCHOOL) as sender:
        sender.send_referrals([referral])
    intake = topic_name(broker, "intake", SCHOOL)
    (original,) = read_topic(broker, kafka_bootstrap, intake)
    status_topic = topic_name(broker, "status", SCHOOL)
    moved = resigned(original, broker.keys_dir, SCHOOL, status_topic, set_headers={H_KIND: b"status"})
    edited = resigned(
        original, broker.keys_dir, SCHOOL, intake, value=edited_clear_fields(original.value or b"")
    )
    produce(broker, kafka_bootstrap, [moved, edited])

    stats = Router(broker, kafka_bootstrap).run(stop_when_idle=3)
    assert stats.routed == 1 and stats.dead_lettered == 2 and stats.statuses == 0
    by_topic = {d.source_topic: d.reason for _, d in read_dead_letters(broker, kafka_bootstrap)}
    assert by_topic[status_topic].startswith("TamperedError: moved: the sealed fields were sealed for topic")
    assert intake in by_topic[status_topic] and f"on topic {status_topic}" in by_topic[status_topic]
    changed = by_topic[intake]
    assert changed.startswith("TamperedError: clear fields changed after sealing: ")
    named = changed.split(": ", 2)[2].removesuffix("; refused").split(", ")
    assert {"district", "priority"} <= set(named) and any(n.startswith("flags.") for n in named)
    for reason in by_topic.values():
        assert not any(secret in reason for secret in secrets_of(referral))


# -- every re-binding refused by the opener, with its cause --------------------------------------
@pytest.fixture
def parties(tmp_path: Path) -> dict[str, KeyStore]:
    return {p: KeyStore.create(tmp_path / "keys", p) for p in (SCHOOL, CHARITY, HUB)}


def opener_and_message(
    parties: dict[str, KeyStore], seed: int = 1
) -> tuple[MessageOpener, Record, dict[str, Any]]:
    directory = KeyDirectory(e for s in parties.values() for e in s.public_entries())
    referral = school_referral(seed)
    msg = MessageSealer(parties[SCHOOL], directory).seal(
        referral,
        referral_schema(),
        topic="referrals.intake." + SCHOOL,
        recipient=HUB,
        referral_id=str(referral["referral_id"]),
        referral_version=referral["version"],
    )
    record = Record(msg.topic, 0, 0, msg.key, msg.value, list(msg.headers), 0)
    return MessageOpener(parties[HUB], directory), record, referral


def test_each_rebinding_is_refused_with_its_cause(parties: dict[str, KeyStore], tmp_path: Path) -> None:
    opener, good, referral = opener_and_message(parties)
    keys = tmp_path / "keys"
    opened = opener.open(good)
    assert opened.record == referral and opened.sealed_format == 3
    assert dict(good.headers)[H_FORMAT] == b"3" and H_BINDING in dict(good.headers)
    plan = sealing_plan(referral_schema())
    wire = plan.decode_wire(good.value or b"")
    # a nested record of sealed fields, dropped from the copy (the old format let that through)
    dropped = next(n for n in ("home_circumstances", "health_and_development", "send", "school") if wire[n])
    nulled = dict(wire, **{dropped: None})
    cases = [
        (
            resigned(good, keys, CHARITY, "referrals.intake." + CHARITY),
            f"re-signed copy: the sealed fields were sealed by {SCHOOL}, but this message is signed by {CHARITY}",
        ),
        (
            resigned(good, keys, SCHOOL, "referrals.status." + SCHOOL),
            f"moved: the sealed fields were sealed for topic referrals.intake.{SCHOOL}, but this message is "
            f"on topic referrals.status.{SCHOOL}",
        ),
        (
            resigned(good, keys, SCHOOL, good.topic, set_headers={H_KIND: b"status"}),
            "relabelled: the sealed fields were sealed as a referral message, but this message says status",
        ),
        (
            resigned(good, keys, SCHOOL, good.topic, value=edited_clear_fields(good.value or b"")),
            "clear fields changed after sealing: district, priority, flags",
        ),
        (
            resigned(good, keys, SCHOOL, good.topic, value=plan.encode_wire(nulled)),
            f"clear fields changed after sealing: {dropped}; refused",
        ),
        (
            # the downgrade: labelled format 1 (no binding) to escape the binding
            resigned(
                good,
                keys,
                CHARITY,
                "referrals.intake." + CHARITY,
                set_headers={H_FORMAT: b"1"},
                drop=(H_BINDING,),
            ),
            "message value is sealed in format 3 but labelled format 1",
        ),
        (
            # or as format 2 (one AEAD per field), by its own sender
            resigned(good, keys, SCHOOL, good.topic, set_headers={H_FORMAT: b"2"}),
            "message value is sealed in format 3 but labelled format 2",
        ),
        (
            resigned(good, keys, SCHOOL, good.topic, drop=(H_BINDING,)),
            f"lacks sealing header {H_BINDING}",
        ),
    ]
    for record, reason in cases:
        with pytest.raises(TamperedError) as info:
            opener.open(record)
        assert reason in str(info.value), (reason, str(info.value))
        assert not any(secret in str(info.value) for secret in secrets_of(referral))


def test_a_binding_taken_from_another_message_does_not_open(
    parties: dict[str, KeyStore], tmp_path: Path
) -> None:
    """Two messages under one cached data key: the sealed binding of one, put on the other
    (re-signed by its own sender), is refused: it is bound to its own referral."""
    directory = KeyDirectory(e for s in parties.values() for e in s.public_entries())
    sealer = MessageSealer(parties[SCHOOL], directory, cache=DekCache(100, 300.0))
    msgs: list[OutgoingMessage] = []
    for seed in (11, 12):
        referral = school_referral(seed)
        msgs.append(
            sealer.seal(
                referral,
                referral_schema(),
                topic="referrals.intake." + SCHOOL,
                recipient=HUB,
                referral_id=str(referral["referral_id"]),
                referral_version=referral["version"],
            )
        )
    a, b = (Record(m.topic, 0, 0, m.key, m.value, list(m.headers), 0) for m in msgs)
    swapped = resigned(
        a, tmp_path / "keys", SCHOOL, a.topic, set_headers={H_BINDING: dict(b.headers)[H_BINDING]}
    )
    with pytest.raises(TamperedError, match=r"sealed binding .* authentication failed"):
        MessageOpener(parties[HUB], directory).open(swapped)


def test_varied_referrals_round_trip_in_the_new_format(parties: dict[str, KeyStore]) -> None:
    """The clear-field digest is the same before sealing and after decoding, whatever the
    record holds (optional records present or null, empty arrays, every enum)."""
    directory = KeyDirectory(e for s in parties.values() for e in s.public_entries())
    sealer = MessageSealer(parties[SCHOOL], directory)
    opener = MessageOpener(parties[HUB], directory)
    rng = random.Random(15)
    for record in synthetic_referrals(25, seed=rng.randrange(10_000)):
        msg = sealer.seal(
            record,
            referral_schema(),
            topic="referrals.intake." + SCHOOL,
            recipient=HUB,
            referral_id=str(record["referral_id"]),
            referral_version=record["version"],
        )
        assert opener.open(Record(msg.topic, 0, 0, msg.key, msg.value, msg.headers, 0)).record == record


# -- messages in the old format still open -----------------------------------------------------
def legacy_keys(tmp_path: Path, folder: Path = LEGACY) -> Path:
    """The fixture's key stores, copied with the permissions a key store must have."""
    keys = tmp_path / f"{folder.name}-keys"
    shutil.copytree(folder / "keys", keys)
    for path in [keys, *keys.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    return keys


def fixture_through_broker(
    folder: Path, settings: Settings, bootstrap: str, sealed_format: bytes
) -> tuple[dict[str, Any], Record, Record]:
    """The fixture's messages (an intake and a case-sealed routed copy), produced to and read
    back from the real broker byte for byte, on the fixture's own topics (the signature covers
    the topic; a prefix no deployment uses)."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from referral_broker.cluster.topics import admin_client

    doc = json.loads((folder / "messages.json").read_text("utf-8"))
    b64 = base64.b64decode
    fixtures = [
        Record(m["topic"], 0, 0, b64(m["key"]), b64(m["value"]), [(n, b64(v)) for n, v in m["headers"]], 0)
        for m in doc["messages"]
    ]
    assert all(dict(r.headers)[H_FORMAT] == sealed_format for r in fixtures)
    admin = admin_client(settings, bootstrap)
    try:
        for r in fixtures:
            with contextlib.suppress(TopicAlreadyExistsError):  # made by an earlier run
                admin.create_topics([NewTopic(r.topic, 1, 1)])
    finally:
        admin.close()
    produce(settings, bootstrap, fixtures)
    arrived = {r.topic: r for r in fixtures}
    for topic in arrived:
        got = [r for r in read_topic(settings, bootstrap, topic) if r.value == arrived[topic].value]
        assert got, topic  # read back from the broker, byte for byte
        arrived[topic] = got[-1]
    intake, routed = (arrived[m["topic"]] for m in doc["messages"])
    return doc, intake, routed


def fixture_directory(folder: Path) -> KeyDirectory:
    doc = json.loads((folder / "directory.json").read_text())
    return KeyDirectory(KeyEntry.from_json(e) for e in doc["keys"])


def open_fixture(
    folder: Path, sealed_format: int, settings: Settings, bootstrap: str, tmp_path: Path
) -> tuple[dict[str, Any], Record, Path, KeyDirectory, MessageOpener]:
    """The fixture through the broker, both messages opened as the hub and the district team
    (the routed copy with the case key) and checked; the hub's opener for more."""
    doc, intake, routed = fixture_through_broker(folder, settings, bootstrap, str(sealed_format).encode())
    keys = legacy_keys(tmp_path, folder)
    directory = fixture_directory(folder)
    at = doc["sealed_at"] + 60
    expected = sample_referral(7)
    hub = MessageOpener(KeyStore.open(keys, doc["hub"]), directory, schema_book(TEST_SCHEMA))
    opened = hub.open(intake, now=at)
    assert opened.record == expected and opened.sealed_format == sealed_format
    assert opened.sender == doc["sender"]
    team = MessageOpener(
        KeyStore.open(keys, doc["team"]),
        directory,
        schema_book(TEST_SCHEMA),
        case_keys=CaseKeyStore.open(keys).lookup,
    )
    opened = team.open(routed, now=at)
    assert opened.record == expected and opened.sealed_format == sealed_format and opened.case_id == "ref-0007"
    assert dict(opened.extra_headers)["rb-referrer"] == doc["sender"].encode()
    return doc, intake, keys, directory, hub


def test_messages_sealed_by_the_old_code_still_open(
    kafka_bootstrap: str, settings: Settings, tmp_path: Path
) -> None:
    """The format-1 fixture (an intake for the hub and a case-sealed copy for a district team,
    written by the code before this format) goes through the real broker and opens; a receiver
    built without legacy support refuses it with the reason."""
    doc, intake, keys, directory, hub = open_fixture(LEGACY, 1, settings, kafka_bootstrap, tmp_path)
    assert H_BINDING not in dict(intake.headers)
    at = doc["sealed_at"] + 60
    strict = MessageOpener(
        KeyStore.open(keys, doc["hub"]), directory, schema_book(TEST_SCHEMA), accept_legacy=False
    )
    with pytest.raises(TamperedError, match="sealed format 1, which binds neither the sender"):
        strict.open(intake, now=at)
    # Relabelled as format 2 by its own sender, an old message does not pass as a new one.
    relabelled = resigned(
        intake,
        keys,
        doc["sender"],
        intake.topic,
        set_headers={H_FORMAT: b"2", H_SEALED_AT: str(int(doc["sealed_at"] * 1000)).encode()},
    )
    with pytest.raises(TamperedError, match="lacks sealing header rb-binding"):
        hub.open(relabelled, now=at)


def test_messages_sealed_in_format_2_still_open(kafka_bootstrap: str, settings: Settings, tmp_path: Path) -> None:
    """The format-2 fixture (one AEAD per field, written before format 3) goes through the real
    broker and opens, the case-sealed copy too; relabelled as format 3 by its own sender, it is
    refused (a format-3 value has its own wire schema)."""
    doc, intake, keys, _, hub = open_fixture(FORMAT_2, 2, settings, kafka_bootstrap, tmp_path)
    at = doc["sealed_at"] + 60
    relabelled = resigned(
        intake,
        keys,
        doc["sender"],
        intake.topic,
        set_headers={H_FORMAT: b"3", H_SEALED_AT: str(int(doc["sealed_at"] * 1000)).encode()},
    )
    with pytest.raises(TamperedError, match="a format-3 message value must be written with wire schema"):
        hub.open(relabelled, now=at)


def test_format_3_messages_with_a_share_wrapped_per_message_still_open(
    kafka_bootstrap: str, settings: Settings, tmp_path: Path
) -> None:
    """The format-3 fixture written before wrap mode 3 (its case-sealed copy wraps a fresh share
    per message, mode 2) goes through the real broker and opens as the district team with the
    case key; without the case key it is refused as shredded."""
    doc, _, keys, directory, _ = open_fixture(FORMAT_3_CASE_MODE_2, 3, settings, kafka_bootstrap, tmp_path)
    routed = json.loads((FORMAT_3_CASE_MODE_2 / "messages.json").read_text("utf-8"))["messages"][1]
    wrapped = base64.b64decode(dict(routed["headers"])[H_DEK])
    assert read_wrapped_header(wrapped)[0].mode == MODE_RECIPIENT_AND_CASE
    team = MessageOpener(KeyStore.open(keys, doc["team"]), directory, schema_book(TEST_SCHEMA))
    record = Record(
        routed["topic"],
        0,
        0,
        base64.b64decode(routed["key"]),
        base64.b64decode(routed["value"]),
        [(n, base64.b64decode(v)) for n, v in routed["headers"]],
        0,
    )
    with pytest.raises(ShreddedError, match="case ref-0007"):
        team.open(record, now=doc["sealed_at"] + 60)


# -- sealed format 3: one AEAD per data class ----------------------------------------------------
def test_format_3_seals_each_data_class_once_and_binds_it_to_its_class(
    parties: dict[str, KeyStore], tmp_path: Path
) -> None:
    """On the wire: the clear fields and one sealed value per data class, no sealed field of its
    own. A class value swapped with another, dropped, or taken from another referral sealed
    under the same cached data key is refused with the class named; no value is in an error."""
    opener, good, referral = opener_and_message(parties)
    plan = sealing_plan(referral_schema())
    wire = plan.decode_wire(good.value or b"")
    assert plan.layout.classes == ("personal", "identifier", "special_category")
    assert len(wire[SEALED_FIELD]) == 3
    assert not {u for u in plan.units if "." not in u} & set(wire)  # no top-level unit on the wire
    assert not any(secret.encode() in (good.value or b"") for secret in secrets_of(referral))
    keys = tmp_path / "keys"
    a, b, c = wire[SEALED_FIELD]
    directory = KeyDirectory(e for s in parties.values() for e in s.public_entries())
    sealer = MessageSealer(parties[SCHOOL], directory, cache=DekCache(100, 300.0))
    other = school_referral(2)
    msgs = [
        sealer.seal(
            r,
            referral_schema(),
            topic=good.topic,
            recipient=HUB,
            referral_id=str(r["referral_id"]),
            referral_version=r["version"],
        )
        for r in (referral, other)
    ]
    mine, theirs = (plan.decode_wire(m.value) for m in msgs)
    assert dict(msgs[0].headers)["rb-dek"] == dict(msgs[1].headers)["rb-dek"]  # one data key
    cases = [
        (dict(wire, **{SEALED_FIELD: [b, a, c]}), "sealed class personal: authentication failed"),
        (dict(wire, **{SEALED_FIELD: [a, b]}), "carries 2 sealed data classes; Referral has 3"),
        (
            dict(mine, **{SEALED_FIELD: [theirs[SEALED_FIELD][0], *mine[SEALED_FIELD][1:]]}),
            "sealed class personal: authentication failed",
        ),
    ]
    base = Record(msgs[0].topic, 0, 0, msgs[0].key, msgs[0].value, list(msgs[0].headers), 0)
    for i, (edited, reason) in enumerate(cases):
        source = good if i < 2 else base
        with pytest.raises(TamperedError) as info:
            opener.open(resigned(source, keys, SCHOOL, source.topic, value=plan.encode_wire(edited)))
        assert reason in str(info.value), (reason, str(info.value))
        assert not any(secret in str(info.value) for secret in secrets_of(referral))
    # unchanged, both open (the data key was shared, the classes are each message's own)
    assert opener.open(base).record == referral


def test_format_3_refuses_a_record_present_in_one_class_and_null_in_another() -> None:
    """Only a holder of the data key could splice this: a nested record of two classes,
    present in the clear fields and one class but null in the other, is refused with its path
    (and no value), not put together from what happens to be there."""
    plan = sealing_plan(referral_schema())
    layout = plan.layout
    present = next(school_referral(seed) for seed in range(50) if school_referral(seed)["health_and_development"])
    absent = dict(present, health_and_development=None)
    key = DataKey.generate()
    binding = Binding(SCHOOL, "t", "referral", bytes(32))
    context = FieldContext(str(present["referral_id"]), 1, HUB, plan.fingerprint, binding)
    (clear, projection, blobs), (_, _, others) = (
        layout.decode(layout.seal(r, layout.projection(r), key, context)) for r in (present, absent)
    )
    assert layout.open(clear, projection, blobs, key, context)[0] == present  # as sealed, it opens whole
    special = layout.classes.index("special_category")
    spliced = [*blobs[:special], others[special], *blobs[special + 1 :]]
    refused = r"^record health_and_development: present in some data classes and null in others"
    with pytest.raises(TamperedError, match=refused):
        layout.open(clear, projection, spliced, key, context)


def test_format_3_names_the_field_of_a_value_that_does_not_fit(parties: dict[str, KeyStore]) -> None:
    """One Avro call seals a whole class, but a value of the wrong type is still refused with
    its field's path, never with the value."""
    directory = KeyDirectory(e for s in parties.values() for e in s.public_entries())
    sealer = MessageSealer(parties[SCHOOL], directory)
    record = sample_referral(3)
    record["child"] = dict(record["child"], ethnicity="Synthetic-not-an-ethnicity")
    with pytest.raises(ContractError) as info:
        sealer.seal(record, TEST_SCHEMA, topic="t", recipient=HUB, referral_id="ref-3", referral_version=1)
    assert "child.ethnicity" in str(info.value) and "Synthetic-not" not in str(info.value)
    record = sample_referral(3)
    record["priority"] = "Synthetic-priority"  # a clear field
    with pytest.raises(ContractError) as info:
        sealer.seal(record, TEST_SCHEMA, topic="t", recipient=HUB, referral_id="ref-3", referral_version=1)
    assert "priority" in str(info.value) and "Synthetic-priority" not in str(info.value)


def test_format_3_fills_defaults_as_format_2_did(parties: dict[str, KeyStore]) -> None:
    """A field missing from the record is written with its schema default in format 3 as in
    format 2, a nested record's too (its default may hold fields of every class), whichever
    order its union declares; absent with no default, it is refused with its path."""
    schema = {
        "type": "record",
        "name": "Small",
        "namespace": "test.format3",
        "fields": [
            {"name": "referral_id", "type": "string", "data_class": "operational"},
            {
                "name": "contact",
                "data_class": "personal",
                "default": {"route": "post", "phone": "01234 567890"},
                "type": {
                    "type": "record",
                    "name": "Contact",
                    "fields": [
                        {"name": "route", "type": "string", "data_class": "operational"},
                        {"name": "phone", "type": "string", "data_class": "personal"},
                    ],
                },
            },
            {
                "name": "alias",
                "data_class": "personal",
                "default": {"name": "Synthetic Alias"},
                "type": [
                    {
                        "type": "record",
                        "name": "Alias",
                        "fields": [{"name": "name", "type": "string", "data_class": "personal"}],
                    },
                    "null",
                ],
            },
            {"name": "note", "type": ["null", "string"], "default": None, "data_class": "special_category"},
        ],
    }
    directory = KeyDirectory(e for s in parties.values() for e in s.public_entries())
    sealer = MessageSealer(parties[SCHOOL], directory)
    opener = MessageOpener(parties[HUB], directory, schema_book(schema))

    def round_trip(record: dict[str, Any]) -> dict[str, Any]:
        msg = sealer.seal(record, schema, topic="t", recipient=HUB, referral_id="ref-9", referral_version=1)
        assert dict(msg.headers)[H_FORMAT] == b"3"
        return opener.open(Record(msg.topic, 0, 0, msg.key, msg.value, list(msg.headers), 0)).record

    assert round_trip({"referral_id": "ref-9"}) == {
        "referral_id": "ref-9",
        "contact": {"route": "post", "phone": "01234 567890"},
        "alias": {"name": "Synthetic Alias"},
        "note": None,
    }
    given = {"referral_id": "ref-9", "contact": {"route": "sms", "phone": "0700"}, "alias": None, "note": "x"}
    assert round_trip(given) == given
    with pytest.raises(ContractError, match=r"field contact\.phone: missing and has no default"):
        round_trip({"referral_id": "ref-9", "contact": {"route": "sms"}})
