"""Record-level sealing over schemas tagged with data classes: which fields are sealed, the
wire schema, round trips (the test schema and the real Referral schema), and fields moved
between fields, records or recipients detected."""

from __future__ import annotations

import copy
import random

import pytest
from test_sealing_support import SCHEMA, needles, sample_referral

from referral_broker.errors import ContractError, TamperedError
from referral_broker.sealing import DataKey, FieldContext, sealing_plan
from referral_broker.sealing.fields import Binding

PLAN = sealing_plan(SCHEMA)
# the sealed format binds sender, topic, kind and clear fields: one fixed binding here
BOUND = Binding("council", "referrals.out.health", "referral", bytes(32))


def ctx(referral_id: str = "ref-0001", version: int = 1, recipient: str = "health") -> FieldContext:
    return FieldContext(referral_id, version, recipient, PLAN.fingerprint, BOUND)


def test_sealing_units_follow_the_data_classes() -> None:
    units = set(PLAN.units)
    # leaves under records are units of their own; arrays and maps are sealed whole
    assert {"child.given_name", "child.address.postcode", "carer.nhs_number", "household", "scores"} <= units
    assert not any(u.startswith("household.") for u in units)
    # operational fields stay clear, wherever they are
    assert not {"referral_id", "version", "priority", "flags.safeguarding_concern", "child.role"} & units


def test_wire_schema_has_bytes_where_sealed() -> None:
    fields = {f["name"]: f for f in PLAN.wire_schema["fields"]}
    assert fields["household"]["type"] == "bytes"
    assert fields["attendance_percent"]["type"] == ["null", "bytes"]
    assert fields["referral_id"]["type"] == "string"
    child = {f["name"]: f for f in fields["child"]["type"]["fields"]}
    assert child["given_name"]["type"] == "bytes" and child["role"]["type"] == "string"


def test_round_trip_and_no_plaintext_on_the_wire() -> None:
    record = sample_referral(1)
    key = DataKey.generate()
    value = PLAN.encode_wire(PLAN.seal(record, key, ctx()))
    assert PLAN.open(PLAN.decode_wire(value), key, ctx()) == record
    for needle in needles(record):
        assert needle not in value
    assert b"fenland" in value  # operational fields are in the clear, as designed


def test_nulls_are_sealed_too() -> None:
    """An absent optional value is sealed like any other: the wire does not show it is absent."""
    record = sample_referral(2)
    record["carer"]["nhs_number"] = None
    record["attendance_percent"] = None
    wire = PLAN.seal(record, DataKey.generate(), ctx())
    assert isinstance(wire["attendance_percent"], bytes) and isinstance(wire["carer"]["nhs_number"], bytes)


def test_null_record_stays_null() -> None:
    record = sample_referral(3)
    record["carer"] = None
    key = DataKey.generate()
    assert PLAN.open(PLAN.decode_wire(PLAN.encode_wire(PLAN.seal(record, key, ctx()))), key, ctx()) == record


def test_swapping_two_fields_of_one_record_is_detected() -> None:
    key = DataKey.generate()
    wire = PLAN.seal(sample_referral(1), key, ctx())
    wire["child"]["given_name"], wire["child"]["family_name"] = (
        wire["child"]["family_name"],
        wire["child"]["given_name"],
    )
    with pytest.raises(TamperedError, match=r"field child.given_name: authentication failed"):
        PLAN.open(wire, key, ctx())


def test_same_field_moved_between_person_records_is_detected() -> None:
    key = DataKey.generate()
    wire = PLAN.seal(sample_referral(1), key, ctx())
    wire["child"]["given_name"] = wire["carer"]["given_name"]
    with pytest.raises(TamperedError, match=r"field child.given_name: authentication failed"):
        PLAN.open(wire, key, ctx())


@pytest.mark.parametrize(
    "other",
    [ctx(referral_id="ref-0002"), ctx(version=2), ctx(recipient="schools")],
    ids=["record", "version", "recipient"],
)
def test_field_moved_to_another_record_or_recipient_is_detected(other: FieldContext) -> None:
    """Even under the same data key (the cache reuses one), a field from another referral,
    version or recipient's copy does not open here."""
    key = DataKey.generate()
    mine = PLAN.seal(sample_referral(1), key, ctx())
    theirs = PLAN.seal(sample_referral(1), key, other)
    mine["concern_summary"] = theirs["concern_summary"]
    with pytest.raises(TamperedError, match="field concern_summary: authentication failed"):
        PLAN.open(mine, key, ctx())


def test_unsealed_or_null_sealing_unit_is_refused() -> None:
    key = DataKey.generate()
    wire = PLAN.seal(sample_referral(1), key, ctx())
    plain = copy.deepcopy(wire)
    plain["child"]["family_name"] = b"Quillfeather1"
    with pytest.raises(
        TamperedError, match=r"child.family_name: unknown sealed-value format version"
    ) as info:
        PLAN.open(plain, key, ctx())
    assert "Quillfeather" not in str(info.value)
    nulled = copy.deepcopy(wire)
    nulled["attendance_percent"] = None
    with pytest.raises(TamperedError, match="field attendance_percent: arrived unsealed"):
        PLAN.open(nulled, key, ctx())


def test_wire_value_damage_is_refused() -> None:
    key = DataKey.generate()
    value = PLAN.encode_wire(PLAN.seal(sample_referral(1), key, ctx()))
    with pytest.raises(TamperedError, match="trailing bytes"):
        PLAN.decode_wire(value + b"\x00")
    with pytest.raises(TamperedError, match="not Avro single-object encoded"):
        PLAN.decode_wire(value[2:])
    with pytest.raises(TamperedError, match="written with wire schema"):
        PLAN.decode_wire(value[:2] + bytes(8) + value[10:])
    with pytest.raises(TamperedError, match="does not decode"):
        PLAN.decode_wire(value[: len(value) // 2])


def _schema_with(field: dict) -> dict:
    return {"type": "record", "name": "test.Bad", "fields": [field]}


def test_operational_array_hiding_a_personal_field_is_refused() -> None:
    bad = _schema_with(
        {
            "name": "contacts",
            "data_class": "operational",
            "type": {
                "type": "array",
                "items": {
                    "type": "record",
                    "name": "test.Contact",
                    "fields": [{"name": "phone", "type": "string", "data_class": "personal"}],
                },
            },
        }
    )
    with pytest.raises(
        ContractError, match=r"contacts is operational .* contains the non-operational field contacts.phone"
    ):
        sealing_plan(bad)


@pytest.mark.parametrize("tag", [None, "secret"])
def test_missing_or_unknown_data_class_is_refused(tag: str | None) -> None:
    field = {"name": "given_name", "type": "string"}
    if tag:
        field["data_class"] = tag
    with pytest.raises(ContractError, match="field given_name: data_class must be one of"):
        sealing_plan(_schema_with(field))


def test_real_referral_schema_seals_and_opens() -> None:
    """The shipped Referral schema: the same sealing units as the schema registry computes,
    and synthetic referrals round-trip with none of their personal values on the wire."""
    from referral_broker.schemas.registry import referral_schema, sealing_units
    from referral_broker.schemas.synth import synthetic_referral

    schema = referral_schema()
    plan = sealing_plan(schema)
    assert list(plan.units) == sealing_units(schema)
    rng = random.Random(5)
    checked: list[str] = []
    for _ in range(5):
        record = synthetic_referral(rng)
        context = FieldContext(str(record["referral_id"]), record["version"], "health", plan.fingerprint, BOUND)
        key = DataKey.generate()
        value = plan.encode_wire(plan.seal(record, key, context))
        assert plan.open(plan.decode_wire(value), key, context) == record
        child = record["child"]
        # the NHS number lives under identifiers (child.get("nhs_number") was always None, so it
        # was never checked); names shorter than 4 bytes could match ciphertext by chance
        texts = [child["given_name"], child["family_name"], record["identifiers"]["nhs_number"]]
        for text in (t for t in texts if isinstance(t, str) and len(t) >= 4):
            assert text.encode() not in value
            checked.append(text)
    assert len(checked) >= 10 and any(t.isdigit() and len(t) == 10 for t in checked)  # NHS numbers too
