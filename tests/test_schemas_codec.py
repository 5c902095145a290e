"""The wire codec: single-object encoding, identity round trips, history, translated errors."""

from __future__ import annotations

import copy
import json
import random
import traceback
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from test_schemas_strategies import avro_records, valid_referrals

from referral_broker.errors import ContractError, ValidationError
from referral_broker.schemas import codec, registry
from referral_broker.schemas.json_form import from_json_form, to_json_form
from referral_broker.schemas.synth import synthetic_referral

SCHEMA = registry.referral_schema()


def referral(seed: int = 1) -> dict[str, Any]:
    return synthetic_referral(random.Random(seed))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_referrals())
def test_encode_decode_is_identity_for_any_valid_referral(record: dict[str, Any]) -> None:
    assert codec.decode(codec.encode(record)) == record


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(avro_records(SCHEMA))
def test_encode_decode_is_identity_for_any_record_the_schema_can_carry(record: dict[str, Any]) -> None:
    assert codec.decode(codec.encode(record, SCHEMA)) == record


STATUS, AUDIT = registry.status_schema(), registry.audit_decision_schema()


@settings(max_examples=50, deadline=None)
@given(avro_records(STATUS), avro_records(AUDIT))
def test_status_and_audit_records_round_trip(status: dict[str, Any], audit: dict[str, Any]) -> None:
    assert codec.decode(codec.encode(status, STATUS)) == status
    assert codec.decode(codec.encode(audit, AUDIT)) == audit


@settings(max_examples=50, deadline=None)
@given(valid_referrals())
def test_json_form_round_trips(record: dict[str, Any]) -> None:
    text = json.dumps(to_json_form(record, SCHEMA))
    assert from_json_form(json.loads(text), SCHEMA) == record


def test_header_is_single_object_encoding() -> None:
    data = codec.encode(referral())
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == registry.fingerprint(SCHEMA)
    assert codec.writer_fingerprint(data) == registry.fingerprint(SCHEMA)


def test_a_message_from_an_older_version_is_read_in_todays_shape() -> None:
    # An "old" version: the current one without the optional sharing_override field.
    old = copy.deepcopy(SCHEMA)
    old["fields"] = [f for f in old["fields"] if f["name"] != "sharing_override"]
    registry.register_writer_schema(old)
    record = referral(2)
    record.pop("sharing_override")
    data = codec.encode(record, old)
    assert codec.writer_fingerprint(data) == registry.fingerprint(old)
    assert codec.decode(data) == record  # as written
    assert codec.decode(data, SCHEMA) == {**record, "sharing_override": None}  # resolved, default filled


def test_unknown_fingerprint_is_a_contract_error() -> None:
    data = b"\xc3\x01" + bytes(8) + b"\x00"
    with pytest.raises(ContractError, match="unknown writer schema"):
        codec.decode(data)


@pytest.mark.parametrize("data", [b"", b"\xc3", b"\x00\x01" + bytes(8), b"{}"])
def test_not_single_object_encoding(data: bytes) -> None:
    with pytest.raises(ContractError, match="single-object"):
        codec.decode(data)


def test_a_truncated_body_is_translated_not_leaked() -> None:
    data = codec.encode(referral())
    with pytest.raises(ContractError, match="cannot decode") as caught:
        codec.decode(data[:-5])
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # fastavro text never travels
    assert "EOFError" in str(caught.value) or "Error" in str(caught.value)


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(ContractError, match="trailing bytes"):
        codec.decode(codec.encode(referral()) + b"\x00")


def test_a_record_the_schema_cannot_encode_names_paths_not_values() -> None:
    record = referral()
    record["district"] = "Secret Street"
    record["child"]["given_name"] = 12345
    with pytest.raises(ValidationError) as caught:
        codec.encode(record)
    assert {p.path for p in caught.value.problems} >= {"district", "child.given_name"}
    assert "Secret Street" not in str(caught.value)
    # from None: fastavro's own message (which can quote the value) is not chained into a traceback
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert "Secret Street" not in "".join(traceback.format_exception(caught.value))


def test_resolution_failure_is_a_contract_error() -> None:
    incompatible = copy.deepcopy(SCHEMA)
    incompatible["fields"].append(
        {"name": "new_required", "type": "int", "doc": "x", "data_class": "operational"}
    )
    with pytest.raises(ContractError, match="cannot decode") as caught:
        codec.decode(codec.encode(referral()), incompatible)
    assert "(SchemaResolutionError)" in str(caught.value) and caught.value.__cause__ is None


def test_field_bodies_round_trip_for_sealing() -> None:
    record = referral(4)
    for path in ("household", "child.date_of_birth", "concerns", "identifiers.nhs_number"):
        field_schema = registry.field_schema(SCHEMA, path)
        prepared = codec.prepare(field_schema)
        value: Any = record
        for part in path.split("."):
            value = value[part]
        assert codec.decode_body(codec.encode_body(value, prepared), prepared) == value


# -- RepeatedFieldsEncoder: the audit record's field lists written once per distinct view --------
REPEATED = ("fields_shared", "fields_withheld")


def _lists_key(audit: dict[str, Any]) -> Any:
    return (tuple(audit["fields_shared"]), tuple((w["path"], w["reason"]) for w in audit["fields_withheld"]))


@settings(max_examples=100, deadline=None)
@given(avro_records(AUDIT), avro_records(AUDIT))
def test_repeated_fields_encoder_writes_what_encode_writes(first: dict[str, Any], second: dict[str, Any]) -> None:
    encoder = codec.RepeatedFieldsEncoder(AUDIT, REPEATED)
    # the second record has the first's lists: its bytes come from the kept ones, the rest its own
    second = {**second, "fields_shared": first["fields_shared"], "fields_withheld": first["fields_withheld"]}
    for audit in (first, second, first):
        assert encoder.encode(audit, _lists_key(audit)) == codec.encode(audit, AUDIT)
    assert codec.decode(encoder.encode(second, _lists_key(second))) == second
    assert list(encoder._kept) == [_lists_key(first)]  # written by parts, not by the fallback


def test_repeated_fields_encoder_keeps_at_most_its_size() -> None:
    encoder = codec.RepeatedFieldsEncoder(AUDIT, REPEATED, size=2)
    base = _an_audit()
    for n in range(5):
        audit = {**base, "fields_shared": [f"child.path_{n}"]}
        assert encoder.encode(audit, _lists_key(audit)) == codec.encode(audit, AUDIT)
    assert len(encoder._kept) == 2


def test_repeated_fields_encoder_refuses_fields_that_are_not_adjacent() -> None:
    with pytest.raises(ContractError, match="not a run of adjacent fields"):
        codec.RepeatedFieldsEncoder(AUDIT, ("fields_shared", "ground"))
    with pytest.raises(ContractError, match="not a run of adjacent fields"):
        codec.RepeatedFieldsEncoder(AUDIT, ("no_such_field",))


def test_repeated_fields_encoder_names_paths_of_a_bad_record_as_encode_does() -> None:
    encoder = codec.RepeatedFieldsEncoder(AUDIT, REPEATED)
    audit = {**_an_audit(), "recipient": 12345}
    with pytest.raises(ValidationError) as caught:
        encoder.encode(audit, _lists_key(audit))
    assert "recipient" in {p.path for p in caught.value.problems}


def _an_audit() -> dict[str, Any]:
    import datetime as dt

    return {
        "decision_id": "d-1",
        "referral_id": "r-1",
        "version": 1,
        "recipient": "nhs-zsn01",
        "purpose": "family_support",
        "fields_shared": ["child.given_name", "district"],
        "fields_withheld": [{"path": "child.ethnicity", "reason": "not needed"}],
        "ground": "uk_gdpr_6_1_e",
        "conditions_met": ["basis:consent"],
        "override_reference": None,
        "view_fingerprint": None,
        "decided_at": dt.datetime(2026, 12, 4, 10, 0, tzinfo=dt.UTC),
        "delivered": True,
        "basis": "consent",
        "special_category_conditions": [],
        "no_onward_sharing": [],
        "policy_version": 3,
        "recipient_name": None,
        "recipient_rules": [],
        "unresolved_reason": None,
        "referrer": None,
        "subject_keys": [],
    }
