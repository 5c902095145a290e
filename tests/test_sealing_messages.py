"""Signed, sealed messages on the real broker: per-recipient views, every single-byte change
detected, unsigned/forged/truncated/unknown inputs refused with precise reasons, rotation
keeping old messages readable, and no plaintext in the raw bytes of any topic."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from county import POLICE, SCHOOL
from test_sealing_support import (
    HEALTH,
    SCHEMA,
    TEAM,
    World,
    as_record,
    make_world,
    needles,
    read_all,
    sample_referral,
    send_all,
)

from referral_broker.cluster.clients import Record
from referral_broker.cluster.topics import plan, topic_name
from referral_broker.config import Settings
from referral_broker.errors import (
    ContractError,
    KeyNotFoundError,
    RevokedKeyError,
    SealingError,
    SignatureError,
    TamperedError,
)
from referral_broker.sealing import OutgoingMessage, schema_book, sealing_plan
from referral_broker.sealing.classes import SEALED_FIELD
from referral_broker.sealing.envelope import H_DEK, H_FORMAT, H_SEALED_AT, H_SENDER, H_SENDER_KEY, H_SIGNATURE
from referral_broker.sealing.signing import sign_message
from referral_broker.sealing.wrapping import unwrap_data_key


def seal(
    world: World, recipient: str, topic: str, n: int = 1, *, sender: str = "council", **kw
) -> OutgoingMessage:
    return world.sealer(sender).seal(
        sample_referral(n),
        SCHEMA,
        topic=topic,
        recipient=recipient,
        referral_id=f"ref-{n:04d}",
        referral_version=1,
        **kw,
    )


def resigned(world: World, record: Record, *, headers=None, value=None, signer: str = "council") -> Record:
    """A record altered and then signed again by ``signer``'s real key: what a buggy or
    compromised sender could produce, to test the checks that come after the signature."""
    hs = [(n, v) for n, v in (headers if headers is not None else record.headers) if n != H_SIGNATURE]
    value = record.value if value is None else value
    pair = world.stores[signer].active()
    hs.append((H_SIGNATURE, sign_message(pair.signing, record.topic, record.key, hs, value)))
    return Record(record.topic, 0, 0, record.key, value, hs, 0)


def replace_header(headers, name: str, value: bytes):
    return [(n, value if n == name else v) for n, v in headers]


@pytest.fixture
def world(topics: Settings) -> World:
    return make_world(topics.keys_dir)


def test_each_recipient_opens_only_its_own_copy(topics: Settings, kafka_bootstrap: str, world: World) -> None:
    health_topic, schools_topic = topic_name(topics, "out", HEALTH), topic_name(topics, "out", SCHOOL)
    send_all(
        topics, kafka_bootstrap, [seal(world, HEALTH, health_topic), seal(world, SCHOOL, schools_topic)]
    )
    by_topic = {r.topic: r for r in read_all(topics, kafka_bootstrap, [health_topic, schools_topic])}
    health_msg, schools_msg = by_topic[health_topic], by_topic[schools_topic]
    assert world.opener(HEALTH).open(health_msg).record == sample_referral(1)
    assert world.opener(SCHOOL).open(schools_msg).record == sample_referral(1)
    with pytest.raises(SealingError, match=f"addressed to {HEALTH}, not to {SCHOOL}"):
        world.opener(SCHOOL).open(health_msg)
    # Relabelling the copy for schools breaks the signature ...
    relabelled = Record(
        health_msg.topic,
        0,
        0,
        health_msg.key,
        health_msg.value,
        replace_header(health_msg.headers, "rb-recipient", SCHOOL.encode()),
        0,
    )
    with pytest.raises(SignatureError, match="does not verify"):
        world.opener(SCHOOL).open(relabelled)
    # ... and even re-signed by the council, schools holds no key that opens health's copy:
    with pytest.raises(KeyNotFoundError, match=rf"{SCHOOL} does not hold key {HEALTH}\."):
        world.opener(SCHOOL).open(resigned(world, relabelled))
    # not by key id, and not by trying its own private key on health's wrapped data key.
    with pytest.raises(TamperedError, match="authentication failed"):
        unwrap_data_key(
            dict(health_msg.headers)[H_DEK],
            recipient=SCHOOL,
            private_key=world.stores[SCHOOL].active().encryption,
        )


def test_every_single_byte_change_is_detected(topics: Settings, kafka_bootstrap: str, world: World) -> None:
    """Produce one small sealed message, read it back from Kafka, then change each byte of its
    topic, key, header names, header values and value in turn: every variant is refused."""
    schema = {
        "type": "record",
        "name": "test.Tiny",
        "fields": [
            {"name": "referral_id", "type": "string", "data_class": "operational"},
            {"name": "given_name", "type": "string", "data_class": "personal"},
        ],
    }
    topic = topic_name(topics, "out", HEALTH)
    msg = world.sealer().seal(
        {"referral_id": "r-1", "given_name": "Zephyrine"},
        schema,
        topic=topic,
        recipient=HEALTH,
        referral_id="r-1",
        referral_version=1,
    )
    send_all(topics, kafka_bootstrap, [msg])
    (original,) = read_all(topics, kafka_bootstrap, [topic])
    opener = world.opener(HEALTH, schemas=schema_book(schema))
    assert opener.open(original).record["given_name"] == "Zephyrine"

    def flip(data: bytes, i: int) -> bytes:
        out = bytearray(data)
        out[i] ^= 0x01
        return bytes(out)

    variants: list[tuple[str, Record]] = []
    for i in range(len(original.topic)):
        variants.append(
            (
                f"topic[{i}]",
                Record(
                    flip(original.topic.encode(), i).decode("latin-1"),
                    0,
                    0,
                    original.key,
                    original.value,
                    original.headers,
                    0,
                ),
            )
        )
    for i in range(len(original.key)):
        variants.append(
            (
                f"key[{i}]",
                Record(original.topic, 0, 0, flip(original.key, i), original.value, original.headers, 0),
            )
        )
    for i in range(len(original.value)):
        variants.append(
            (
                f"value[{i}]",
                Record(original.topic, 0, 0, original.key, flip(original.value, i), original.headers, 0),
            )
        )
    for h, (name, val) in enumerate(original.headers):
        for i in range(len(name)):
            headers = list(original.headers)
            headers[h] = (flip(name.encode(), i).decode("latin-1"), val)
            variants.append(
                (
                    f"header {name} name[{i}]",
                    Record(original.topic, 0, 0, original.key, original.value, headers, 0),
                )
            )
        for i in range(len(val)):
            headers = list(original.headers)
            headers[h] = (name, flip(val, i))
            variants.append(
                (
                    f"header {name}[{i}]",
                    Record(original.topic, 0, 0, original.key, original.value, headers, 0),
                )
            )
    assert len(variants) > 400
    for where, variant in variants:
        with pytest.raises(SealingError) as info:
            opener.open(variant)
        assert "Zephyrine" not in str(info.value), where


def test_refusals_have_precise_reasons(world: World, topics: Settings) -> None:
    topic = topic_name(topics, "out", HEALTH)
    good = as_record(seal(world, HEALTH, topic))
    opener = world.opener(HEALTH)

    def refused(record: Record, error: type, reason: str) -> None:
        with pytest.raises(error, match=reason) as info:
            opener.open(record)
        for needle in needles(sample_referral(1)):
            assert needle.decode("latin-1") not in str(info.value)

    unsigned = Record(topic, 0, 0, good.key, good.value, [h for h in good.headers if h[0] != H_SIGNATURE], 0)
    refused(unsigned, SignatureError, "unsigned")
    refused(
        Record(topic, 0, 0, good.key, good.value, [*good.headers, (H_SIGNATURE, bytes(64))], 0),
        SignatureError,
        "more than one rb-signature",
    )
    refused(
        Record(topic, 0, 0, good.key, good.value, [*good.headers[:2], good.headers[1], *good.headers[2:]], 0),
        SignatureError,
        "header rb-kind more than once",
    )
    refused(
        resigned(world, good, headers=replace_header(good.headers, H_FORMAT, b"4")),
        TamperedError,
        "unknown message format version 4",
    )
    # Forged: schools signs and claims to be the council, with either key id.
    forged = as_record(seal(world, HEALTH, topic, sender=SCHOOL))
    council_key = world.stores["council"].active().key_id
    as_council = replace_header(
        replace_header(forged.headers, H_SENDER, b"council"), H_SENDER_KEY, council_key.encode()
    )
    refused(
        Record(topic, 0, 0, forged.key, forged.value, as_council, 0),
        SignatureError,
        "signature of council does not verify",
    )
    refused(
        Record(
            topic, 0, 0, forged.key, forged.value, replace_header(forged.headers, H_SENDER, b"council"), 0
        ),
        SignatureError,
        f"message from council is signed with key {SCHOOL}",
    )
    # Moved to another topic (another recipient's inbox): the signature covers the topic.
    refused(
        Record(topic_name(topics, "out", SCHOOL), 0, 0, good.key, good.value, good.headers, 0),
        SignatureError,
        "moved to another topic",
    )
    # Unknown signer key.
    unknown = replace_header(good.headers, H_SENDER_KEY, b"council.ffffffffffff")
    refused(
        Record(topic, 0, 0, good.key, good.value, unknown, 0),
        KeyNotFoundError,
        "council.ffffffffffff, which is not in the key directory",
    )
    # A signing time in the future.
    refused(
        resigned(
            world,
            good,
            headers=replace_header(good.headers, H_SEALED_AT, str(int((time.time() + 3600) * 1000)).encode()),
        ),
        SignatureError,
        "in the future",
    )
    # Truncated envelope parts, signed by the real sender (a buggy producer).
    refused(resigned(world, good, value=good.value[:-7]), TamperedError, "does not decode")
    dek = dict(good.headers)[H_DEK]
    refused(
        resigned(world, good, headers=replace_header(good.headers, H_DEK, dek[:-1])),
        TamperedError,
        "truncated wrapped data key",
    )
    # A sensitive field in the clear, validly signed: refused, never passed through.
    plan = sealing_plan(SCHEMA)
    wire = plan.decode_wire(good.value)
    wire[SEALED_FIELD] = [b"Synthetic concern narrative number 1 about sleeping rough"] * len(wire[SEALED_FIELD])
    refused(
        resigned(world, good, value=plan.encode_wire(wire)),
        TamperedError,
        "sealed class personal: not a format-3 sealed value",
    )
    # An unknown schema.
    refused(
        resigned(world, good, headers=replace_header(good.headers, "rb-schema", b"00" * 8)),
        ContractError,
        "unknown schema fingerprint",
    )
    # A revoked signer: every message it ever signed is refused.
    world.stores["council"].revoke(council_key)
    world.refresh()
    refused(good, RevokedKeyError, f"revoked key {council_key} of council")


def test_rotation_keeps_old_messages_readable(topics: Settings, kafka_bootstrap: str, world: World) -> None:
    from referral_broker.sealing import key_admin
    from referral_broker.sealing.directory import load_topic, publish

    publish(topics, kafka_bootstrap, [e for s in world.stores.values() for e in s.public_entries()])
    topic = topic_name(topics, "out", HEALTH)
    before = seal(world, HEALTH, topic, 1)
    old_health = world.stores[HEALTH].active().key_id
    old_council = world.stores["council"].active().key_id
    key_admin.rotate(topics, HEALTH, bootstrap=kafka_bootstrap)
    key_admin.rotate(topics, "council", bootstrap=kafka_bootstrap)
    world.stores = {p: type(s).open(topics.keys_dir, p) for p, s in world.stores.items()}
    world.directory = load_topic(topics, kafka_bootstrap)
    after = seal(world, HEALTH, topic, 2)
    assert dict(after.headers)["rb-recipient-key"].decode() != old_health
    assert dict(after.headers)[H_SENDER_KEY].decode() != old_council
    send_all(topics, kafka_bootstrap, [before, after])
    opened = [world.opener(HEALTH).open(r) for r in read_all(topics, kafka_bootstrap, [topic])]
    assert sorted(o.referral_id for o in opened) == ["ref-0001", "ref-0002"]
    assert {o.recipient_key_id for o in opened if o.referral_id == "ref-0001"} == {old_health}
    # Destroying the retired key strands exactly the messages sealed to it, and says which key.
    world.stores[HEALTH].destroy(old_health)
    records = {r.key: r for r in read_all(topics, kafka_bootstrap, [topic])}
    with pytest.raises(KeyNotFoundError, match=f"{HEALTH} does not hold key {old_health}"):
        world.opener(HEALTH).open(records[b"ref-0001"])
    assert world.opener(HEALTH).open(records[b"ref-0002"]).record == sample_referral(2)


def test_no_plaintext_in_any_topic(topics: Settings, kafka_bootstrap: str, world: World) -> None:
    """Seal referrals for partners, a district team and the archive, write audit events, publish
    keys; then read the raw bytes of every topic in the plan and search for every plaintext
    value of every sealed field (test schema and the real Referral schema)."""
    from referral_broker.schemas.registry import referral_schema
    from referral_broker.schemas.synth import synthetic_referral
    from referral_broker.sealing import retention
    from referral_broker.sealing.directory import publish

    publish(topics, kafka_bootstrap, [e for s in world.stores.values() for e in s.public_entries()])
    messages, secrets = [], []
    for n, recipient in enumerate((HEALTH, SCHOOL, POLICE), start=1):
        messages.append(seal(world, recipient, topic_name(topics, "out", recipient), n))
        secrets += needles(sample_referral(n))
    messages.append(
        seal(world, TEAM, topic_name(topics, "out", TEAM), 4, case_id="CASE-4")
    )
    messages.append(seal(world, "council", topic_name(topics, "archive"), 5, case_id="CASE-5"))
    messages.append(seal(world, "council", topic_name(topics, "intake", HEALTH), 6, sender=HEALTH))
    secrets += needles(sample_referral(4)) + needles(sample_referral(5)) + needles(sample_referral(6))
    schema = referral_schema()
    rng = random.Random(11)
    for _ in range(3):
        record = synthetic_referral(rng)
        messages.append(
            world.sealer().seal(
                record,
                schema,
                topic=topic_name(topics, "out", HEALTH),
                recipient=HEALTH,
                referral_id=record["referral_id"],
                referral_version=record["version"],
            )
        )
        child = record["child"]
        secrets += [v.encode() for v in (child["given_name"], child["family_name"]) if len(v) >= 5]
        secrets += [v.encode() for v in (child.get("nhs_number"),) if isinstance(v, str)]
    send_all(topics, kafka_bootstrap, messages)
    retention.hold(topics, kafka_bootstrap, "CASE-5", "synthetic proceedings ref 42")
    retention.shred(topics, kafka_bootstrap, "CASE-4")

    every_topic = [spec.name for spec in plan(topics.kafka_topic_profile, topics.kafka_topic_prefix)]
    raw_records = read_all(topics, kafka_bootstrap, every_topic)
    assert len(raw_records) >= len(messages) + 2
    raw = b"\x00".join(
        b"".join([r.key or b"", r.value or b"", *(n.encode() + v for n, v in r.headers)]) for r in raw_records
    )
    assert len(secrets) > 40
    assert b"synthetic proceedings ref 42" in raw and b"fenland" in raw  # the search does see clear text
    leaked = [s for s in secrets if s in raw]
    assert not leaked, f"{len(leaked)} plaintext values found in raw topic bytes"
    # and nothing private either: no private key and no case key
    for key_file in topics.keys_dir.rglob("*.key"):
        if key_file.read_bytes().startswith(b"-----BEGIN"):  # the council's root signing key (PEM)
            from cryptography.hazmat.primitives import serialization

            pem = key_file.read_bytes()
            root = serialization.load_pem_private_key(pem, password=None)
            raw_private = root.private_bytes(  # type: ignore[union-attr]
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
            body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
            assert raw_private not in raw and body not in raw
            continue
        doc = json.loads(key_file.read_text())
        for name in ("signing_private", "encryption_private", "key"):
            if name in doc:
                assert doc[name].encode() not in raw
                import base64

                assert base64.b64decode(doc[name]) not in raw
    from referral_broker.sealing.case_journal import CaseJournals
    from referral_broker.sealing.case_keys import CaseKeyStore

    journals = CaseJournals(CaseKeyStore.open(topics.keys_dir).root / "journals")
    case_keys = [e.key for tag in journals.tags() for e in journals.scan(tag, 0)[0]]
    assert case_keys and not [k for k in case_keys if k in raw]  # the case keys of the copies sealed


def test_extra_headers_are_signed_and_returned(world: World, tmp_path: Path) -> None:
    msg = seal(world, HEALTH, "t", extra_headers=[("rb-view", b'["child.given_name"]')])
    opened = world.opener(HEALTH).open(as_record(msg))
    assert opened.extra_headers == (("rb-view", b'["child.given_name"]'),)
    with pytest.raises(SealingError, match="reserved"):
        seal(world, HEALTH, "t", extra_headers=[("rb-dek", b"x")])


def test_headers_verified_for_one_record_open_it_without_verifying_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receive path verifies a record before it opens it; the open takes those headers
    instead of checking the signature a second time (one Ed25519 verify a referral fewer in the
    router), but only for the very record they were verified for."""
    import referral_broker.sealing.envelope as envelope

    opener = world.opener(HEALTH)
    record = as_record(seal(world, HEALTH, "t"))
    calls: list[str] = []
    real = envelope.verify_message
    monkeypatch.setattr(envelope, "verify_message", lambda *a, **k: (calls.append("v"), real(*a, **k))[1])

    verified = opener.verify(record)
    assert opener.open(record, verified=verified).record == sample_referral(1)
    assert calls == ["v"]

    # headers verified for another record do not stand in for this one's signature
    forged = as_record(seal(world, HEALTH, "t", n=2))
    forged = Record(forged.topic, 0, 0, forged.key, forged.value[:-1] + bytes([forged.value[-1] ^ 1]), forged.headers, 0)
    with pytest.raises(SignatureError):
        opener.open(forged, verified=verified)
    assert calls == ["v", "v"]


def test_a_copy_sealed_from_the_bytes_it_was_opened_from_needs_no_encoding(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encode once: the router seals a copy of the same shape (the archive, a district team's
    full view) from the plaintext bytes it opened, and the copy opens to the same record; a
    view of another shape (a field fewer) has those of its parts encoded that differ."""
    import referral_broker.sealing.classes as classes

    opened = world.opener("council").open(as_record(seal(world, "council", "intake", sender=HEALTH)))
    assert opened.class_bytes is not None and set(opened.class_bytes.classes) == {"personal", "identifier", "special_category"}
    encodes: list[str] = []
    real = classes.union_branches.write
    monkeypatch.setattr(classes.union_branches, "write", lambda buf, s, r: (encodes.append(s["name"]), real(buf, s, r))[1])

    renamed = json.loads(json.dumps(SCHEMA).replace('"Person"', '"Individual"'))  # names do not make the bytes
    renamed["doc"] = "the same shape"
    for schema in (SCHEMA, renamed):
        copy = world.sealer().seal(
            opened.record, schema, topic="t", recipient=HEALTH, referral_id="ref-0001", referral_version=1,
            reuse=opened.class_bytes,
        )
        assert encodes == []
        assert world.opener(HEALTH, schemas=schema_book(schema)).open(as_record(copy)).record == sample_referral(1)

    fewer = {**SCHEMA, "fields": [f for f in SCHEMA["fields"] if f["name"] != "exclusions"]}
    view = {k: v for k, v in opened.record.items() if k != "exclusions"}
    copy = world.sealer().seal(
        view, fewer, topic="t", recipient=HEALTH, referral_id="ref-0001", referral_version=1, reuse=opened.class_bytes
    )
    assert [e.split("__")[1][:-1] for e in encodes] == ["personal"]  # only the class that changed
    assert world.opener(HEALTH, schemas=schema_book(fewer)).open(as_record(copy)).record == view


def test_a_binary_shape_ignores_names_and_docs_but_not_fields_types_or_order() -> None:
    from referral_broker.sealing.classes import binary_shape

    base = binary_shape(SCHEMA)
    assert binary_shape(json.loads(json.dumps(SCHEMA).replace('"Person"', '"Someone"'))) == base
    assert binary_shape({**SCHEMA, "doc": "x", "name": "Other"}) == base
    fields = SCHEMA["fields"]
    assert binary_shape({**SCHEMA, "fields": [fields[1], fields[0], *fields[2:]]}) != base
    assert binary_shape({**SCHEMA, "fields": [{**fields[0], "name": "renamed"}, *fields[1:]]}) != base
    assert binary_shape({**SCHEMA, "fields": [{**fields[1], "type": "long"}, fields[0], *fields[2:]]}) != base
    assert binary_shape({**SCHEMA, "fields": [fields[0], {**fields[1], "type": "long"}, *fields[2:]]}) != base
    money = {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2}
    with_money = {**SCHEMA, "fields": [*fields, {"name": "award", "type": money}]}
    assert binary_shape(with_money) != binary_shape(
        {**SCHEMA, "fields": [*fields, {"name": "award", "type": {**money, "scale": 3}}]}
    )


def test_a_view_sealed_from_the_whole_referral_opens_to_its_projection(world: World) -> None:
    """The router seals each copy from the whole referral with the recipient's view schema,
    not from a projection of it: the recipient opens exactly the projection, and nothing of
    what the view withholds is in the copy, in the clear or sealed."""
    from referral_broker.schemas import registry, views
    from referral_broker.schemas.synth import synthetic_referral

    referral = synthetic_referral(random.Random(11))
    view = views.view_schema(["referral_id", "child.given_name", "child.date_of_birth", "concerns"])
    copy = world.sealer().seal(
        referral, view, topic="t", recipient=HEALTH, referral_id=str(referral["referral_id"]), referral_version=1
    )
    opened = world.opener(HEALTH, schemas=schema_book(view)).open(as_record(copy)).record
    assert opened == views.project(referral, view, registry.referral_schema())
    withheld = referral["child"]["family_name"].encode()
    assert withheld not in (copy.value or b"") and "family_name" not in opened["child"]
