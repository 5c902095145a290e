"""The recipe for one field: round trips for every Avro type, binding to the context, and
every way a sealed value can be damaged refused with a precise reason and no plaintext."""

from __future__ import annotations

import datetime as dt
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from referral_broker.errors import ContractError, TamperedError
from referral_broker.sealing.fields import (
    FORMAT_VERSION,
    NONCE_SIZE,
    Binding,
    DataKey,
    FieldCodec,
    FieldContext,
    MessageCipher,
    _NoncePool,
    associated_data,
    message_aad_prefix,
    nonces,
    open_value,
    seal_value,
)

FP = bytes.fromhex("0102030405060708")
BOUND = Binding("schools", "referrals.intake.schools", "referral", bytes(32))
CTX = FieldContext("ref-0001", 3, "health", FP, BOUND)
NAME = FieldCodec("child.given_name", "string")
SECRET = "Zephyrine Quillfeather"

PERSON = {
    "type": "record",
    "name": "test.P",
    "fields": [
        {"name": "given_name", "type": "string"},
        {"name": "born", "type": {"type": "int", "logicalType": "date"}},
    ],
}
TYPES = [
    ("string", "Zephyrine"),
    ("int", -42),
    ("long", 2**40),
    ("float", 1.5),
    ("double", 87.25),
    ("boolean", True),
    ("bytes", b"\x00\xffsynthetic"),
    ({"type": "int", "logicalType": "date"}, dt.date(2019, 5, 4)),
    (["null", "string"], None),
    (["null", "string"], "9990001112"),
    ({"type": "enum", "name": "test.E", "symbols": ["white_british", "mixed"]}, "mixed"),
    ({"type": "fixed", "name": "test.F", "size": 2}, b"QX"),
    ({"type": "array", "items": PERSON}, [{"given_name": "Bartholomew", "born": dt.date(2015, 1, 2)}]),
    ({"type": "map", "values": "float"}, {"phonics": 31.5}),
]


@pytest.mark.parametrize(("avro_type", "value"), TYPES, ids=[str(i) for i in range(len(TYPES))])
def test_every_avro_type_round_trips(avro_type: object, value: object) -> None:
    codec = FieldCodec("child.field", avro_type)
    key = DataKey.generate()
    sealed = seal_value(value, codec, key, CTX)
    assert sealed[0] == FORMAT_VERSION
    assert open_value(sealed, codec, key, CTX) == value


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=300))
def test_any_string_round_trips_and_never_shows(text: str) -> None:
    key = DataKey.generate()
    sealed = seal_value(text, NAME, key, CTX)
    assert open_value(sealed, NAME, key, CTX) == text
    if len(text.encode()) >= 8:
        assert text.encode() not in sealed


def test_sealing_twice_differs_and_short_values_look_alike() -> None:
    key = DataKey.generate()
    assert seal_value(SECRET, NAME, key, CTX) != seal_value(SECRET, NAME, key, CTX)
    # padding to 16 bytes: "Al" and "Alexandra" cannot be told apart by length
    assert len(seal_value("Al", NAME, key, CTX)) == len(seal_value("Alexandra", NAME, key, CTX))


@pytest.mark.parametrize(
    ("what", "context", "path"),
    [
        ("another referral", FieldContext("ref-0002", 3, "health", FP, BOUND), NAME.path),
        ("another version", FieldContext("ref-0001", 4, "health", FP, BOUND), NAME.path),
        ("another recipient", FieldContext("ref-0001", 3, "schools", FP, BOUND), NAME.path),
        ("another schema", FieldContext("ref-0001", 3, "health", bytes(8), BOUND), NAME.path),
        ("another field", CTX, "child.family_name"),
        (
            "another sender",
            FieldContext(
                "ref-0001", 3, "health", FP, Binding("charities", BOUND.topic, "referral", bytes(32))
            ),
            NAME.path,
        ),
        (
            "another topic",
            FieldContext(
                "ref-0001",
                3,
                "health",
                FP,
                Binding("schools", "referrals.intake.charities", "referral", bytes(32)),
            ),
            NAME.path,
        ),
        (
            "another kind",
            FieldContext("ref-0001", 3, "health", FP, Binding("schools", BOUND.topic, "status", bytes(32))),
            NAME.path,
        ),
        (
            "other clear fields",
            FieldContext(
                "ref-0001", 3, "health", FP, Binding("schools", BOUND.topic, "referral", b"\x01" + bytes(31))
            ),
            NAME.path,
        ),
    ],
)
def test_a_sealed_value_cannot_be_moved(what: str, context: FieldContext, path: str) -> None:
    key = DataKey.generate()
    sealed = seal_value(SECRET, NAME, key, CTX)
    with pytest.raises(TamperedError, match="authentication failed") as info:
        open_value(sealed, FieldCodec(path, "string"), key, context)
    assert path in str(info.value)
    assert SECRET not in str(info.value)


def test_associated_data_is_unambiguous() -> None:
    """Length prefixes: shifting characters between parts never gives the same bytes."""
    fp = CTX.schema_fingerprint
    a = associated_data(FieldContext("ref-1", 1, "health", fp), "a.b", version=1, cipher=1, data_key_id=b"k")
    b = associated_data(FieldContext("ref-1", 1, "health", fp), "a.bx", version=1, cipher=1, data_key_id=b"k")
    c = associated_data(FieldContext("ref-1", 1, "healtha", fp), ".b", version=1, cipher=1, data_key_id=b"k")
    assert len({a, b, c}) == 3


def test_every_single_byte_change_is_detected() -> None:
    key = DataKey.generate()
    sealed = seal_value(SECRET, NAME, key, CTX)
    for i in range(len(sealed)):
        for flip in (0x01, 0x80):
            damaged = bytearray(sealed)
            damaged[i] ^= flip
            with pytest.raises(TamperedError) as info:
                open_value(bytes(damaged), NAME, key, CTX)
            assert SECRET not in str(info.value)


def test_every_truncation_is_refused() -> None:
    key = DataKey.generate()
    sealed = seal_value(SECRET, NAME, key, CTX)
    header = 3 + len(key.key_id) + 12
    for n in range(len(sealed)):
        with pytest.raises(TamperedError) as info:
            open_value(sealed[:n], NAME, key, CTX)
        if 0 < n < header + 16 + 16 and n >= 3:
            assert "truncated sealed value in field child.given_name" in str(info.value)


def test_unknown_version_and_cipher_are_named() -> None:
    key = DataKey.generate()
    sealed = seal_value(SECRET, NAME, key, CTX)
    with pytest.raises(TamperedError, match="unknown sealed-value format version 7"):
        open_value(b"\x07" + sealed[1:], NAME, key, CTX)
    with pytest.raises(TamperedError, match="unknown cipher id 9"):
        open_value(sealed[:1] + b"\x09" + sealed[2:], NAME, key, CTX)


def test_unsealed_value_is_refused() -> None:
    key = DataKey.generate()
    with pytest.raises(TamperedError, match="arrived unsealed"):
        open_value(SECRET, NAME, key, CTX)  # type: ignore[arg-type]
    with pytest.raises(TamperedError, match="unknown sealed-value format version") as info:
        open_value(SECRET.encode(), NAME, key, CTX)
    assert SECRET not in str(info.value)


def test_wrong_key_is_refused() -> None:
    key = DataKey.generate()
    sealed = seal_value(SECRET, NAME, key, CTX)
    impostor = DataKey(key.key_id, DataKey.generate().secret)
    with pytest.raises(TamperedError, match="authentication failed"):
        open_value(sealed, NAME, impostor, CTX)
    with pytest.raises(TamperedError, match="sealed under data key"):
        open_value(sealed, NAME, DataKey.generate(), CTX)


def test_value_of_the_wrong_type_is_a_contract_error_without_the_value() -> None:
    with pytest.raises(ContractError, match=r"field child.age: value does not match its Avro type") as info:
        seal_value({"name": SECRET}, FieldCodec("child.age", "int"), DataKey.generate(), CTX)
    assert SECRET not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_keys_do_not_print() -> None:
    key = DataKey.generate()
    assert key.secret.hex() not in repr(key) and key.key_id.hex() in repr(key)


def test_a_message_cipher_seals_exactly_what_seal_value_does() -> None:
    """The per-message fast path (associated data framed once, nonces from the pool) is the
    same recipe: its values open with the per-value opener, its prefix plus the framed path is
    the associated data, every nonce differs, and a value moved to another path fails."""
    key = DataKey.generate()
    prefix = message_aad_prefix(CTX, key)
    assert prefix + NAME.framed_path == associated_data(
        CTX, NAME.path, version=FORMAT_VERSION, cipher=1, data_key_id=key.key_id
    )
    cipher = MessageCipher(key, CTX)
    codecs = [FieldCodec(f"child.f{i}", "string") for i in range(20)]
    sealed = [cipher.seal(f"{SECRET} {i}", c) for i, c in enumerate(codecs)]
    nonces = {s[3 + len(key.key_id) : 3 + len(key.key_id) + 12] for s in sealed}
    assert len(nonces) == len(sealed)
    for i, (s, c) in enumerate(zip(sealed, codecs, strict=True)):
        assert open_value(s, c, key, CTX) == f"{SECRET} {i}"
        assert open_value(s, c, key, CTX, aad_prefix=prefix) == f"{SECRET} {i}"
    with pytest.raises(TamperedError, match="authentication failed"):
        open_value(sealed[0], codecs[1], key, CTX, aad_prefix=prefix)
    with pytest.raises(ValueError, match="binding"):
        MessageCipher(key, CTX.unbound())


FAST_TYPES = [
    ("string", st.text(max_size=300)),
    (["null", "string"], st.none() | st.text(max_size=40)),
    ("boolean", st.booleans()),
    (["null", "boolean"], st.none() | st.booleans()),
    ("int", st.integers(-(2**31), 2**31 - 1)),
    ("long", st.integers(-(2**63), 2**63 - 1)),
    (["null", "int"], st.none() | st.integers(-(2**31), 2**31 - 1)),
    ({"type": "enum", "name": "test.Fast", "symbols": ["a", "b", "c"]}, st.sampled_from(["a", "b", "c"])),
    (["null", {"type": "enum", "name": "test.Fast2", "symbols": ["x", "y"]}], st.none() | st.sampled_from(["x", "y"])),
]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_fast_field_encoder_writes_fastavros_bytes(data: object) -> None:
    """Strings, booleans, ints, longs, enums and their optionals skip fastavro's per-call cost:
    every value gives exactly fastavro's bytes, and a value not of the type is still refused."""
    import io

    from fastavro import parse_schema, schemaless_writer

    for index, (avro_type, values) in enumerate(FAST_TYPES):
        codec = FieldCodec(f"child.f{index}", avro_type)
        assert codec._fast is not None, avro_type
        value = data.draw(values)  # type: ignore[attr-defined]
        expected = io.BytesIO()
        schemaless_writer(expected, parse_schema(avro_type, named_schemas={}), value)
        assert codec.encode(value) == expected.getvalue()
    with pytest.raises(ContractError, match=r"child\.f7"):
        FieldCodec("child.f7", FAST_TYPES[7][0]).encode("not-a-symbol")
    with pytest.raises(ContractError):
        FieldCodec("child.f5", "long").encode(2**64)
    assert FieldCodec("child.d", {"type": "int", "logicalType": "date"})._fast is None  # fastavro's


def test_pooled_nonces_are_never_handed_out_twice_not_even_across_a_fork() -> None:
    """Nonces come from the OS a block at a time: every take is new bytes, across blocks, and
    a forked child does not go on with its parent's block (two sealers, one nonce)."""
    pool = _NoncePool()
    taken = [pool.take(3) for _ in range(_NoncePool.BLOCK)] + [pool.take(1) for _ in range(_NoncePool.BLOCK)]
    assert [len(t) for t in taken[:1]] == [3 * NONCE_SIZE] and len(taken[-1]) == NONCE_SIZE
    singles = [t[i : i + NONCE_SIZE] for t in taken for i in range(0, len(t), NONCE_SIZE)]
    assert len(set(singles)) == len(singles) == 4 * _NoncePool.BLOCK  # three blocks drawn
    assert len(pool.take(_NoncePool.BLOCK + 1)) == (_NoncePool.BLOCK + 1) * NONCE_SIZE

    nonces.take()  # the module's pool has a block in hand before the fork
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, nonces.take(4))
        os._exit(0)
    os.close(write)
    from_child = os.read(read, 4 * NONCE_SIZE)
    os.close(read)
    os.waitpid(child, 0)
    assert len(from_child) == 4 * NONCE_SIZE
    assert nonces.take(4) != from_child
