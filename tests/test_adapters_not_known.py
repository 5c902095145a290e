"""Every format carries "not known" (null, referral schema v3) for the two yes/no fields a source
may leave unsaid: rendering writes nothing there (a blank cell, no element, no key) and reading
that back gives null again, never "no"; a stated yes/no is still carried."""

from __future__ import annotations

import datetime as dt
import io
import random

import pytest

from referral_broker import adapters
from referral_broker.schemas.synth import synthetic_referral

FORMATS = [
    (kind, fmt) for kind in adapters.adapter_kinds() for fmt in (None, *adapters.get_adapter(kind).formats)
]
NOW = dt.datetime(2025, 10, 1, tzinfo=dt.UTC)


def referral(kind: str, interpreter: bool | None, responsibility: bool | None) -> dict:
    record = synthetic_referral(random.Random(11), partner=kind)
    record["child"]["interpreter_needed"] = interpreter
    record["household"] = record["household"][:1] or []
    assert record["household"], "seed 11 has a household"
    record["household"][0]["parental_responsibility"] = responsibility
    return record


@pytest.mark.parametrize(("kind", "fmt"), FORMATS)
@pytest.mark.parametrize(("interpreter", "responsibility"), [(None, None), (True, False), (False, True)])
def test_not_known_and_stated_values_survive_every_format(
    kind: str, fmt: str | None, interpreter: bool | None, responsibility: bool | None
) -> None:
    adapter = adapters.get_adapter(kind)
    carried = adapter.carried_paths()
    out = io.StringIO()
    adapter.render([referral(kind, interpreter, responsibility)], out, fmt=fmt)
    [back] = list(adapter.parse(io.BytesIO(out.getvalue().encode()), now=NOW))
    assert back.ok, back.problems
    assert back.record is not None
    if "child.interpreter_needed" in carried:
        assert back.record["child"]["interpreter_needed"] is interpreter
    if "household.parental_responsibility" in carried:
        assert back.record["household"][0]["parental_responsibility"] is responsibility
