"""Identifier rules, driven by the vectors in tests/data/schemas/identifier_vectors.json."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from referral_broker.schemas import identifiers, synth

VECTORS = json.loads(
    (Path(__file__).parent / "data" / "schemas" / "identifier_vectors.json").read_text("utf-8")
)
CHECKS = {
    "nhs_number": identifiers.nhs_number_problem,
    "upn": identifiers.upn_problem,
    "ni_number": identifiers.ni_number_problem,
    "postcode": identifiers.postcode_problem,
}
VALID = [(kind, value) for kind in CHECKS for value in VECTORS[kind]["valid"]]
INVALID = [(kind, value, fragment) for kind in CHECKS for value, fragment in VECTORS[kind]["invalid"]]


@pytest.mark.parametrize(("kind", "value"), VALID)
def test_valid_values_pass(kind: str, value: str) -> None:
    assert CHECKS[kind](value) is None


@pytest.mark.parametrize(("kind", "value", "fragment"), INVALID)
def test_invalid_values_are_rejected_with_a_reason_that_never_holds_the_value(
    kind: str, value: str, fragment: str
) -> None:
    reason = CHECKS[kind](value)
    assert reason is not None and fragment in reason
    if value.strip():
        assert value not in reason and value.replace(" ", "") not in reason


def test_compact_forms_are_what_validation_accepts() -> None:
    assert identifiers.compact_nhs_number("944 930 5552") == "9449305552"
    assert identifiers.compact_ni_number(" ab 12 34 56 c ") == "AB123456C"
    assert identifiers.compact_upn("b801 2000 05001") == "B801200005001"
    assert identifiers.normalise_postcode("cb21tn") == "CB2 1TN"


@given(st.text(alphabet="0123456789", min_size=9, max_size=9))
def test_nhs_check_digit_agrees_with_the_library(first_nine: str) -> None:
    check = identifiers.nhs_check_digit(first_nine)
    if check is None:
        assert all(not identifiers.is_valid_nhs_number(f"{first_nine}{d}") for d in range(10))
    else:
        assert identifiers.is_valid_nhs_number(f"{first_nine}{check}")
        wrong = (check + 1) % 10
        assert not identifiers.is_valid_nhs_number(f"{first_nine}{wrong}")


@given(st.integers(min_value=0, max_value=2**32))
def test_synthetic_identifiers_are_valid_and_synthetic(seed: int) -> None:
    rng = random.Random(seed)
    nhs = synth.synthetic_nhs_number(rng)
    assert identifiers.is_valid_nhs_number(nhs) and nhs.startswith("999")  # NHS test range
    assert identifiers.is_valid_ni_number(synth.synthetic_ni_number(rng))
    upn = synth.synthetic_upn(rng, 2019)
    assert identifiers.is_valid_upn(upn) and upn[1:4] == "873"
    assert identifiers.is_valid_postcode(synth.synthetic_postcode(rng, "PE13"))
