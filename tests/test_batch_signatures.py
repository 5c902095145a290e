"""Batch signatures: one Ed25519 signature over a Merkle tree of a batch's messages, each
message verified on its own with its proof; any change to a message, its proof or its
signature refused; a message signed on its own still verifies as before."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
from test_sealing_support import World, as_record, make_world

from referral_broker.cluster.clients import Record
from referral_broker.errors import SealingError, SignatureError
from referral_broker.parties import HUB
from referral_broker.sealing import merkle
from referral_broker.sealing.envelope import (
    OutgoingMessage,
    sign_awaiting,
    sign_messages,
    sign_plain,
    verify_signed,
)
from referral_broker.sealing.framing import frame
from referral_broker.sealing.signing import BATCH_PROOF_HEADER, SIGNATURE_HEADER, sign_message, signing_input

TOPIC = "audit"


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 9162's Merkle Tree Hash, as the RFC defines it (split at the largest power of 2)."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33])
def test_the_tree_is_rfc_9162s_and_every_proof_reaches_its_root(size: int) -> None:
    leaves = [merkle.leaf_hash(f"message {i}".encode()) for i in range(size)]
    root, paths = merkle.tree(leaves)
    assert root == _mth(leaves)
    for i, leaf in enumerate(leaves):
        index, width, siblings = merkle.decode_proof(merkle.encode_proof(i, size, paths[i]))
        assert merkle.root_from_proof(leaf, index, width, siblings) == root
        if size > 1:
            other = leaves[(i + 1) % size]
            assert merkle.root_from_proof(other, index, width, siblings) != root


def test_a_proof_of_the_wrong_shape_is_refused() -> None:
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(5)]
    _, paths = merkle.tree(leaves)
    with pytest.raises(SignatureError, match="too short"):
        merkle.root_from_proof(leaves[0], 0, 5, paths[0][:-1])
    with pytest.raises(SignatureError, match="too long"):
        merkle.root_from_proof(leaves[4], 4, 5, [*paths[4], paths[0][0]])
    with pytest.raises(SignatureError, match="outside its tree"):
        merkle.root_from_proof(leaves[0], 5, 5, paths[0])
    with pytest.raises(SignatureError, match="malformed"):
        merkle.decode_proof(merkle.encode_proof(0, 5, paths[0])[:-1])
    with pytest.raises(SignatureError, match="version 9"):
        merkle.decode_proof(b"\x09" + merkle.encode_proof(0, 5, paths[0])[1:])


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path / "keys")


def _batch(world: World, n: int, tag: str = "") -> list[Record]:
    unsigned = [
        sign_plain(
            world.stores[HUB],
            sign=False,
            topic=TOPIC,
            key=f"ref-{i}".encode(),
            value=f"decision {i}{tag}".encode(),
            kind="audit.decision",
            extra_headers=[("rb-chain", b"router-1")],
        )
        for i in range(n)
    ]
    return [as_record(m) for m in sign_messages(world.stores[HUB], unsigned)]


def _check(world: World, record: Record) -> None:
    verify_signed(world.directory, record)


def test_each_message_of_a_batch_verifies_alone_under_one_signature(world: World) -> None:
    batch = _batch(world, 7)
    signatures = {dict(r.headers)[SIGNATURE_HEADER] for r in batch}
    assert len(signatures) == 1
    for record in batch:
        _check(world, record)
    # in any order, one at a time, as a reader that reads one partition meets them
    _check(world, batch[3])
    assert [n for n, _ in batch[0].headers][-2:] == [BATCH_PROOF_HEADER, SIGNATURE_HEADER]


def test_every_byte_of_a_batch_message_is_covered(world: World) -> None:
    record = _batch(world, 5)[2]
    parts: list[tuple[str, int, int]] = [("value", 0, len(record.value or b"")), ("key", 0, len(record.key or b""))]
    parts += [(name, i, len(val)) for i, (name, val) in enumerate(record.headers)]
    for what, where, size in parts:
        for pos in range(size):
            if what == "value":
                value = bytearray(record.value or b"")
                value[pos] ^= 0x01
                changed = replace(record, value=bytes(value))
            elif what == "key":
                key = bytearray(record.key or b"")
                key[pos] ^= 0x01
                changed = replace(record, key=bytes(key))
            else:
                headers = list(record.headers)
                val = bytearray(headers[where][1])
                val[pos] ^= 0x01
                headers[where] = (headers[where][0], bytes(val))
                changed = replace(record, headers=headers)
            with pytest.raises(SealingError):  # the signature, or a signer that is not the hub's
                _check(world, changed)


def test_a_batch_message_moved_stripped_or_given_anothers_proof_is_refused(world: World) -> None:
    batch = _batch(world, 4)
    first, second = batch[0], batch[1]
    with pytest.raises(SignatureError, match="does not verify"):
        _check(world, replace(first, topic="another-topic"))
    without_proof = [(n, v) for n, v in first.headers if n != BATCH_PROOF_HEADER]
    with pytest.raises(SignatureError, match="does not verify"):
        _check(world, replace(first, headers=without_proof))
    swapped = [(n, dict(second.headers)[n] if n == BATCH_PROOF_HEADER else v) for n, v in first.headers]
    with pytest.raises(SignatureError, match="does not verify"):
        _check(world, replace(first, headers=swapped))
    twice = [*first.headers[:-1], (BATCH_PROOF_HEADER, dict(first.headers)[BATCH_PROOF_HEADER]), first.headers[-1]]
    with pytest.raises(SignatureError, match="more than once"):
        _check(world, replace(first, headers=twice))


def test_another_batchs_signature_does_not_verify_even_after_its_own_did(world: World) -> None:
    one, other = _batch(world, 3), _batch(world, 3, tag=" of another batch")
    _check(world, one[0])  # its root is now known to verify
    _check(world, other[0])
    foreign = [(n, dict(other[0].headers)[n] if n == SIGNATURE_HEADER else v) for n, v in one[1].headers]
    with pytest.raises(SignatureError, match="does not verify"):
        _check(world, replace(one[1], headers=foreign))


def test_a_batch_signed_by_another_party_does_not_pass_as_the_hubs(world: World) -> None:
    party = next(p for p in world.stores if p != HUB)
    unsigned = sign_plain(world.stores[party], topic=TOPIC, key=b"k", value=b"v", kind="audit.decision", sign=False)
    signed = as_record(sign_messages(world.stores[party], [unsigned])[0])
    _check(world, signed)  # it is the party's, and says so
    claimed = [(n, HUB.encode() if n == "rb-sender" else v) for n, v in signed.headers]
    with pytest.raises((SignatureError, SealingError)):
        _check(world, replace(signed, headers=claimed))


def test_a_batch_signature_cannot_pass_as_a_message_signature_or_back(world: World) -> None:
    pair = world.stores[HUB].active()
    single = as_record(sign_plain(world.stores[HUB], topic=TOPIC, key=b"k", value=b"v", kind="audit.decision"))
    _check(world, single)  # signed on its own: as before
    # a one-leaf "batch" (no siblings: the leaf is the root) under the message's own signature
    forged = [*single.headers[:-1], (BATCH_PROOF_HEADER, merkle.encode_proof(0, 1, [])), single.headers[-1]]
    with pytest.raises(SignatureError, match="does not verify"):
        _check(world, replace(single, headers=forged))
    with pytest.raises(ValueError, match="no batch proof"):
        sign_message(pair.signing, TOPIC, b"k", [(BATCH_PROOF_HEADER, b"")], b"v")


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("rb-kind", b"audit.decision"), ("rb-kind", b"")],  # a name twice, an empty value
        [("ré-nom", b"\x00" * 300), (SIGNATURE_HEADER, b"s" * 64), ("x", b"1"), (BATCH_PROOF_HEADER, b"p")],
    ],
)
def test_the_signing_input_is_the_framed_parts_it_is_defined_as(headers: list[tuple[str, bytes]]) -> None:
    """Built in one pass with each header name's framing kept by name; it must still be exactly
    ``frame(label, topic, key, count, name, value, ..., value)`` without the signature and proof."""
    signed = [(n, v) for n, v in headers if n not in (SIGNATURE_HEADER, BATCH_PROOF_HEADER)]
    for key, framed_key in ((b"k", b"\x01k"), (None, b"\x00")):
        expected = frame(
            b"referral-broker/message/v1", "tópic", framed_key, len(signed).to_bytes(4, "big"),
            *[p for n, v in signed for p in (n, v)], b"value",
        )
        for _ in range(2):  # the second time from the names kept
            assert signing_input("tópic", key, headers, b"value") == expected


def test_a_message_awaiting_its_signature_is_never_sent_or_signed_twice(world: World) -> None:
    unsigned = sign_plain(world.stores[HUB], topic=TOPIC, key=b"k", value=b"v", kind="audit.decision", sign=False)
    with pytest.raises(SealingError, match="awaiting its batch signature"):
        unsigned.send(None)  # type: ignore[arg-type]  # refused before the producer is touched
    signed = sign_messages(world.stores[HUB], [unsigned])[0]
    assert not signed.awaiting_signature
    with pytest.raises(SealingError, match="only a message awaiting"):
        sign_messages(world.stores[HUB], [signed])


def test_sign_awaiting_signs_only_those_awaiting_under_one_signature_in_their_order(world: World) -> None:
    store = world.stores[HUB]

    def plain(i: int, sign: bool) -> OutgoingMessage:
        return sign_plain(store, topic=TOPIC, key=f"k{i}".encode(), value=f"v{i}".encode(), kind="audit.decision", sign=sign)

    messages = [plain(0, False), plain(1, True), plain(2, False), plain(3, False), plain(4, True)]
    calls: list[int] = []

    def sign_batch(batch: list[OutgoingMessage]) -> list[OutgoingMessage]:
        calls.append(len(batch))
        return sign_messages(store, batch)

    out = sign_awaiting(messages, sign_batch)
    assert calls == [3]  # the three awaiting, together
    assert [m.key for m in out] == [m.key for m in messages]  # in their order
    assert out[1] is messages[1] and out[4] is messages[4]  # signed already: as they were
    assert not any(m.awaiting_signature for m in out)
    assert len({dict(out[i].headers)[SIGNATURE_HEADER] for i in (0, 2, 3)}) == 1
    for m in out:
        _check(world, as_record(m))
    assert sign_awaiting(out, sign_batch) == out and calls == [3]  # nothing awaiting: no batch


def test_a_batch_across_a_key_rotation_gets_a_signature_per_key(world: World) -> None:
    store = world.stores[HUB]
    before = sign_plain(store, topic=TOPIC, key=b"a", value=b"1", kind="audit.decision", sign=False)
    store.rotate()
    world.refresh()
    store = world.stores[HUB]
    after = sign_plain(store, topic=TOPIC, key=b"b", value=b"2", kind="audit.decision", sign=False)
    signed = [as_record(m) for m in sign_messages(store, [before, after])]
    assert dict(signed[0].headers)["rb-sender-key"] != dict(signed[1].headers)["rb-sender-key"]
    assert dict(signed[0].headers)[SIGNATURE_HEADER] != dict(signed[1].headers)[SIGNATURE_HEADER]
    for record in signed:
        _check(world, record)


def test_a_batch_gets_one_tree_per_topic_and_a_proof_tells_only_its_topics_size(world: World) -> None:
    store = world.stores[HUB]
    topics = ["referrals.out.school-nurse", "referrals.out.team-cambridge", TOPIC]
    unsigned = [
        sign_plain(store, topic=topics[i % 3], key=f"r{i}".encode(), value=b"v", kind="audit.decision", sign=False)
        for i in range(3 * 5 + 1)  # 6 to the first topic, 5 to each other
    ]
    signed = [as_record(m) for m in sign_messages(store, unsigned)]
    assert [r.topic for r in signed] == [m.topic for m in unsigned]  # order kept
    by_topic: dict[str, set[bytes]] = {}
    for record in signed:
        _check(world, record)
        by_topic.setdefault(record.topic, set()).add(dict(record.headers)[SIGNATURE_HEADER])
        _, size, _ = merkle.decode_proof(dict(record.headers)[BATCH_PROOF_HEADER])
        assert size == (6 if record.topic == topics[0] else 5)
    assert all(len(s) == 1 for s in by_topic.values())
    assert len(set().union(*by_topic.values())) == 3
    # a message moved to another topic of the same batch no longer verifies
    with pytest.raises(SignatureError):
        _check(world, replace(signed[0], topic=topics[1]))
