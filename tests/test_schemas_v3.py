"""Referral schema v3: "not known" for the two yes/no fields a source may not state.

UK Core has no parental-responsibility element and its interpreter-required extension is
optional, so a health referral often says neither; reading the silence as "no" would tell a
worker something false. v3 makes ``child.interpreter_needed`` and
``household.parental_responsibility`` nullable (default null = not known). That is a backward-
only change (a v2 reader's plain boolean cannot hold null), declared in the v3 file against v2's
fingerprint; the gate still checks the other direction and every other pair in full. Old
messages decode unchanged; the inbox shows null as "Not known".
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest

from referral_broker.consumers.inbox.presentation import display_value
from referral_broker.errors import ContractError
from referral_broker.identity import H_VIEW, SchemaBook
from referral_broker.schemas import codec, evolution, registry, views
from referral_broker.schemas.synth import DEFAULT_ANCHOR, synthetic_referral, synthetic_referrals
from referral_broker.schemas.validation import validate
from referral_broker.sealing.envelope import H_SCHEMA

V2 = registry.referral_schema(2)
V3 = registry.referral_schema(3)
NULLABLE = ("child.interpreter_needed", "household.parental_responsibility")


def field_at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    return next(info.field for info in registry.walk_fields(schema) if info.path == path)


def plain_referral(seed: int) -> dict[str, Any]:
    """A synthetic referral with every yes/no stated (so a v2 writer can write it)."""
    record = synthetic_referral(random.Random(seed))
    record["child"]["interpreter_needed"] = record["child"]["interpreter_needed"] or False
    for member in record["household"]:
        member["parental_responsibility"] = bool(member["parental_responsibility"])
    return record


def test_v3_is_the_latest_and_only_the_two_fields_change() -> None:
    assert registry.referral_schema() == V3
    for path in NULLABLE:
        assert field_at(V2, path)["type"] == "boolean"
        assert field_at(V3, path)["type"] == ["null", "boolean"] and field_at(V3, path)["default"] is None
    assert registry.field_classes(V3) == registry.field_classes(V2)
    assert registry.check_schema(V3) == []
    everything_else = copy.deepcopy(V3)
    del everything_else["evolution"]
    everything_else["doc"] = V2["doc"]
    for path in NULLABLE:
        field_at(everything_else, path).update(field_at(V2, path))
        field_at(everything_else, path).pop("default")
    assert everything_else == V2


def test_the_gate_checks_v3_as_declared_backward_against_v2_only() -> None:
    # In full, the change is refused in exactly one direction: old readers, new data.
    full = evolution.check_full_compatibility(V2, V3)
    assert full and {p.direction for p in full} == {evolution.OLD_READS_NEW}
    assert "boolean not compatible with writer type: null" in full[0].detail
    # As declared (against v2's fingerprint) it passes.
    assert evolution.declared_mode(V2, V3)[0] == evolution.BACKWARD
    assert evolution.check_declared_compatibility(V2, V3) == []
    # The other direction is still checked: a v3 that v2 data cannot fill is refused.
    no_default = copy.deepcopy(V3)
    field_at(no_default, "child.interpreter_needed").pop("default")
    field_at(no_default, "child.first_language")["type"] = "int"
    problems = evolution.check_declared_compatibility(V2, no_default)
    assert {p.direction for p in problems} == {evolution.NEW_READS_OLD}


def test_the_declaration_does_not_carry_over_to_a_copy() -> None:
    """A v4 started as a copy of v3 keeps the declaration text, but it names v2: checked in full."""
    v4 = copy.deepcopy(V3)
    field_at(v4, "child.sex")["doc"] = "Sex as recorded."
    assert evolution.declared_mode(V3, v4) == (evolution.FULL, "")
    breaking = copy.deepcopy(v4)
    field_at(breaking, "child.given_name")["type"] = ["null", "string"]
    field_at(breaking, "child.given_name")["default"] = None
    assert {p.direction for p in evolution.check_declared_compatibility(V3, breaking)} == {
        evolution.OLD_READS_NEW
    }


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        ({"mode": "sideways", "from": "0" * 16, "reason": "x"}, "'evolution.mode' must be one of full, backward"),
        ({"mode": "backward", "reason": "x"}, "'evolution.from' must be the previous version's fingerprint"),
        ({"mode": "backward", "from": "0" * 16, "reason": " "}, "'evolution.reason' must say why"),
    ],
)
def test_a_bad_declaration_is_refused(declaration: dict[str, Any], message: str) -> None:
    bad = {**V3, "evolution": declaration}
    with pytest.raises(ContractError, match=message):
        evolution.check_declared_compatibility(V2, bad)


def test_check_evolution_on_files_reports_the_mode(tmp_path: Path) -> None:
    old, new = tmp_path / "v2.avsc", tmp_path / "v3.avsc"
    old.write_text(json.dumps(V2), "utf-8")
    new.write_text(json.dumps(V3), "utf-8")
    result = evolution.check_files(old, new)
    assert (result.compatible, result.mode) == (True, "backward")
    assert result.verdict.startswith("backward compatible, as declared (A field that was required yes/no")
    reverse = evolution.check_files(new, new)
    assert (result.compatible, reverse.mode) == (True, "full")


def test_old_messages_decode_unchanged_and_v3_carries_null() -> None:
    record = plain_referral(5)
    for old in (V2,):
        message = codec.encode(record, old)
        assert codec.decode(message, V3) == record  # an old writer's yes/no reads as written
    unknown = copy.deepcopy(record)
    unknown["child"]["interpreter_needed"] = None
    for member in unknown["household"]:
        member["parental_responsibility"] = None
    assert validate(unknown, V3, now=DEFAULT_ANCHOR) == []
    message = codec.encode(unknown)
    assert codec.writer_fingerprint(message) == registry.fingerprint(V3)
    assert codec.decode(message) == unknown
    # v2 cannot hold it: the contract refuses null there, naming the field
    problems = validate(unknown, V2, now=DEFAULT_ANCHOR)
    assert "child.interpreter_needed" in {p.path for p in problems}


def test_a_dict_without_the_keys_validates_as_not_known() -> None:
    record = plain_referral(6)
    del record["child"]["interpreter_needed"]
    assert validate(record, V3, now=DEFAULT_ANCHOR) == []
    assert codec.decode(codec.encode(record))["child"]["interpreter_needed"] is None


def test_synth_sometimes_says_not_known_and_keeps_other_fields() -> None:
    sample = list(synthetic_referrals(300, seed=17))
    assert all(validate(r, V3, now=DEFAULT_ANCHOR) == [] for r in sample)
    interpreter = [r["child"]["interpreter_needed"] for r in sample]
    responsibility = [m["parental_responsibility"] for r in sample for m in r["household"]]
    assert {None, True, False} <= set(interpreter) and {None, True, False} <= set(responsibility)
    assert 0 < interpreter.count(None) < len(sample) // 10
    # siblings' responsibility is always stated (no)
    assert all(
        m["parental_responsibility"] is False
        for r in sample
        for m in r["household"]
        if m["relationship"] in ("sibling", "half_sibling", "step_sibling")
    )


def test_the_inbox_shows_null_as_not_known() -> None:
    assert display_value(None, "child.interpreter_needed") == "Not known"
    assert display_value(True, "child.interpreter_needed") == "Yes"
    household = display_value([{"given_name": "Ann", "parental_responsibility": None}], "household")
    assert household == [{"Given name": "Ann", "Parental responsibility": "Not known"}]
    assert display_value(None, "child.preferred_name") == "Not given"  # other nulls as before


def test_a_view_routed_under_v2_still_opens_under_v3() -> None:
    """A recipient learns a message's view by deriving it from the granted paths in ``rb-view``
    and checking the fingerprint in ``rb-schema``. A view holding a field v3 made nullable
    derives differently under v2, so a message routed before v3 is derived from v2 (the
    version it names); a claim no shipped version derives is still refused."""
    granted = ["referral_id", "district", "child.interpreter_needed", "household.parental_responsibility"]
    under_v2 = registry.fingerprint(views.view_schema(granted, V2))
    under_v3 = registry.fingerprint(views.view_schema(granted, V3))
    assert under_v2 != under_v3
    plain = ["referral_id", "district", "child.given_name"]  # views without them do not change
    assert registry.fingerprint(views.view_schema(plain, V2)) == registry.fingerprint(views.view_schema(plain, V3))
    book = SchemaBook()
    raw = json.dumps(granted).encode()
    for fp in (under_v3, under_v2, under_v3):
        book.learn([(H_VIEW, raw), (H_SCHEMA, fp.hex().encode())])
        assert book(fp) is not None and registry.fingerprint(book(fp)) == fp
    assert len(book) == 2
    assert field_at(book(under_v2), "child.interpreter_needed")["type"] == "boolean"
    with pytest.raises(ContractError, match="does not derive the schema named in"):
        book.learn([(H_VIEW, raw), (H_SCHEMA, b"00" * 8)])
    with pytest.raises(ContractError, match="names field paths the Referral schema does not have"):
        book.learn([(H_VIEW, json.dumps(["child.shoe_size"]).encode()), (H_SCHEMA, under_v3.hex().encode())])


def test_not_known_is_sealed_and_opens_again_as_not_known() -> None:
    from referral_broker.sealing import DataKey, FieldContext, sealing_plan
    from referral_broker.sealing.fields import Binding

    record = plain_referral(7)
    bound = Binding("council", "referrals.out.district-fenland", "referral", bytes(32))
    for interpreter, responsibility in ((None, None), (True, False)):
        record["child"]["interpreter_needed"] = interpreter
        for member in record["household"]:
            member["parental_responsibility"] = responsibility
        plan = sealing_plan(V3)
        assert {"child.interpreter_needed", "household"} <= set(plan.units)
        context = FieldContext(str(record["referral_id"]), 1, "district-fenland", plan.fingerprint, bound)
        key = DataKey.generate()
        opened = plan.open(plan.decode_wire(plan.encode_wire(plan.seal(record, key, context))), key, context)
        assert opened == record
        assert opened["child"]["interpreter_needed"] is interpreter
