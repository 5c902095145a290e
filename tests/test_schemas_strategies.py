"""Hypothesis strategies shared by the schema tests (this module holds no tests of its own).

``avro_records(schema)`` draws any value the schema can carry, structurally: every optional
field null or present, every list empty or not, any text. ``valid_referrals()`` draws referrals
that also pass the edge rules (check digits, dates, consistency), from the synthetic generator
seeded by Hypothesis and then varied in their free text.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

from hypothesis import strategies as st

from referral_broker.schemas.registry import Schema, full_name, named_types, resolve_type
from referral_broker.schemas.synth import DEFAULT_ANCHOR, synthetic_referral

# Text Avro can carry: any character but lone surrogates (not encodable as UTF-8).
TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
NON_BLANK_TEXT = TEXT.filter(lambda s: s.strip() != "")
MS_TIMESTAMPS = st.datetimes(
    min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2200, 1, 1), timezones=st.just(dt.UTC)
).map(lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000))
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def avro_values(node: Any, names: dict[str, Schema], namespace: str | None) -> st.SearchStrategy[Any]:
    node = resolve_type(node, names, namespace)
    if isinstance(node, list):
        return st.one_of(*[avro_values(branch, names, namespace) for branch in node])
    if node == "null":
        return st.none()
    if isinstance(node, dict):
        logical = node.get("logicalType")
        if logical == "uuid":
            return st.uuids()
        if logical == "date":
            return st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2200, 1, 1))
        if logical == "timestamp-millis":
            return MS_TIMESTAMPS
        kind = node["type"]
        if kind == "record":
            inner = full_name(node["name"], node.get("namespace", namespace)).rpartition(".")[0] or None
            return st.fixed_dictionaries(
                {item["name"]: avro_values(item["type"], names, inner) for item in node["fields"]}
            )
        if kind == "array":
            return st.lists(avro_values(node["items"], names, namespace), max_size=3)
        if kind == "enum":
            return st.sampled_from(node["symbols"])
        return avro_values(kind, names, namespace)
    return {
        "string": TEXT,
        "int": INT32,
        "long": INT64,
        "boolean": st.booleans(),
        "double": st.floats(allow_nan=False),
        "bytes": st.binary(max_size=16),
    }[node]


def avro_records(schema: Schema) -> st.SearchStrategy[dict[str, Any]]:
    """Any record the schema can encode (the edge rules are not applied)."""
    return avro_values(schema, named_types(schema), None)


def _with_text(record: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """The referral with its free-text fields replaced by drawn text (still non-blank)."""
    record["child"]["first_language"] = texts[0]
    for concern, text in zip(record["concerns"], texts[1:], strict=False):
        concern["detail"] = text
    return record


@st.composite
def valid_referrals(draw: st.DrawFn) -> dict[str, Any]:
    """Referrals that pass validation: synthetic ones, seeded and varied by Hypothesis."""
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    record = synthetic_referral(random.Random(seed), DEFAULT_ANCHOR)
    texts = draw(st.lists(NON_BLANK_TEXT, min_size=4, max_size=4))
    return _with_text(record, texts)


# The clock the tests validate against: just after the synthetic anchor.
TEST_NOW = DEFAULT_ANCHOR + dt.timedelta(days=1)
