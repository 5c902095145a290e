"""Partner adapters: the registry, the example files, and round trips in both directions.

The example files under ``adapters/examples`` are the data: each must parse to valid canonical
referrals, render back to the same native records, and every format must carry synthetic
referrals through native and back without changing a field it carries.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from referral_broker import adapters
from referral_broker.adapters.field_map import Codec, CodeTable, Const, Field, Items
from referral_broker.errors import ConfigError
from referral_broker.parties import all_parties
from referral_broker.policy.load import load_policy
from referral_broker.policy.review import granted_fields
from referral_broker.schemas.json_form import to_json_form
from referral_broker.schemas.registry import field_paths, field_schema, referral_schema, without_null
from referral_broker.schemas.synth import synthetic_referrals
from referral_broker.schemas.validation import validate_referral
from referral_broker.schemas.views import project, view_schema

KINDS = adapters.adapter_kinds()


def _partner_views() -> list[tuple[str, str]]:
    """(format, organisation): one organisation for each distinct widest view the policy can
    give the organisations that receive in a partner format (every school gets the same; a GP
    practice, a health visiting and a school nursing service get different ones)."""
    policy, seen, out = load_policy(), set(), []
    for name, party in sorted(all_parties().items()):
        if party.kind == "partner" and party.format:
            view = (party.format, frozenset(granted_fields(policy, name)))
            if view not in seen:
                seen.add(view)
                out.append((party.format, name))
    return out


PARTNER_VIEWS = _partner_views()
FORMATS_MD = Path(adapters.__file__).parent / "FORMATS.md"
NOW = dt.datetime(2025, 10, 1, tzinfo=dt.UTC)


def flat(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(indexed path, value) for every value present; lists of scalars are one value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flat(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        for index, item in enumerate(value):
            yield from flat(item, f"{path}[{index}]")
    elif value not in (None, [], ""):
        yield path, value


def carried(adapter: adapters.PartnerAdapter, record: dict[str, Any]) -> dict[str, Any]:
    """The values of ``record`` the adapter's format carries: list items with nothing carried are
    dropped and the rest numbered again, then cut to the format's numbered column groups."""
    paths = adapter.carried_paths()
    slots = {e.canonical: e.slots for e in adapter.referral_map.entries if isinstance(e, Items) and e.slots}

    def keep(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            kept = {key: keep(item, f"{path}.{key}" if path else key) for key, item in value.items()}
            return {key: item for key, item in kept.items() if item not in (None, [], {}, "")}
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            items = [item for item in (keep(item, path) for item in value) if item]
            return items[: slots[path]] if path in slots else items
        return value if any(path == p or path.startswith(f"{p}.") for p in paths) else None

    return dict(flat(keep(record, "")))


def native_documents(kind: str, source: Any) -> list[Any]:
    """Native records as read, with FHIR's generated references (subject, requester, a role's
    practitioner and organization: new urn:uuids each time) left out."""
    adapter = adapters.get_adapter(kind)
    documents = [n.document for n in adapter.read_native(source, adapter.referral_map)]
    for document in documents:
        if kind == "health":
            document["ServiceRequest"].pop("subject")
            document["ServiceRequest"].pop("requester", None)
            document["PractitionerRole"].pop("practitioner", None)
            document["PractitionerRole"].pop("organization", None)
    return documents


def test_registry_matches_the_partner_organisations_formats() -> None:
    """Every partner organisation sends and receives in a format with an adapter, and every
    adapter is some registered organisation's format."""
    formats = {party.format for party in all_parties().values() if party.kind == "partner"}
    assert formats == set(KINDS)
    assert {fmt for fmt, _ in PARTNER_VIEWS} == set(KINDS)


def test_unknown_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no adapter for partner kind 'nobody'"):
        adapters.get_adapter("nobody")


@pytest.mark.parametrize("kind", KINDS)
def test_example_parses_to_valid_canonical_referrals(kind: str) -> None:
    result = adapters.load_file(kind, adapters.example_file(kind), now=NOW)
    assert result.records and not result.rejected
    for parsed in result.records:
        assert parsed.record is not None
        assert validate_referral(parsed.record, now=NOW) == []
        assert parsed.record["referrer"]["partner"] == kind


@pytest.mark.parametrize("kind", KINDS)
def test_native_round_trip_keeps_every_field_the_format_carries(kind: str, tmp_path: Path) -> None:
    example = adapters.example_file(kind)
    records = adapters.load_file(kind, example, now=NOW).referrals
    rendered = adapters.render_file(kind, records, tmp_path)
    assert rendered.path is not None and rendered.count == len(records)
    assert native_documents(kind, rendered.path) == native_documents(kind, example)
    again = adapters.load_file(kind, rendered.path, now=NOW).referrals
    assert again == records


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_referrals_survive_native_and_back(kind: str) -> None:
    adapter = adapters.get_adapter(kind)
    originals = [
        {**r, "referrer": {**r["referrer"], "partner": kind}} for r in synthetic_referrals(150, seed=7)
    ]
    out = io.StringIO()
    adapter.render(originals, out)
    parsed = list(adapter.parse(io.StringIO(out.getvalue()), now=NOW))
    assert [p.problems for p in parsed if not p.ok] == []
    for original, back in zip(originals, parsed, strict=True):
        assert back.record is not None
        assert carried(adapter, back.record) == carried(adapter, original)


@pytest.mark.parametrize("kind", KINDS)
def test_every_code_table_covers_its_canonical_symbols(kind: str) -> None:
    """A canonical value with no native code would make rendering fail for some recipient."""
    schema = referral_schema()
    adapter = adapters.get_adapter(kind)
    fields = [
        (f"{e.canonical}.{f.canonical}", f)
        for e in adapter.referral_map.entries
        if isinstance(e, Items)
        for f in e.fields
        if isinstance(f, Field) and f.canonical
    ] + [(e.canonical, e) for e in adapter.referral_map.entries if isinstance(e, Field)]
    for path, entry in fields:
        if isinstance(entry.codec, CodeTable):
            enum = without_null(field_schema(schema, path))
            assert set(enum["symbols"]) <= entry.codec.symbols, path


def test_schools_exclusion_codes_cover_the_canonical_symbols() -> None:
    schema = referral_schema()
    for path, table in (
        ("school.exclusions.kind", adapters.schools.EXCLUSION_CATEGORY),
        ("school.exclusions.reason", adapters.schools.EXCLUSION_REASON),
    ):
        assert set(without_null(field_schema(schema, path))["symbols"]) == table.symbols


def _documented_names(kind: str) -> list[tuple[str, str]]:
    adapter = adapters.get_adapter(kind)
    names = []
    for entry in adapter.referral_map.entries:
        if isinstance(entry, Items):
            names.extend((f.native, f.canonical) for f in entry.fields if isinstance(f, Field))
            names.append((entry.native, entry.canonical))
        elif isinstance(entry, Field):
            names.append((entry.native, entry.canonical))
        elif isinstance(entry, Const):
            names.append((entry.native, ""))
    return names


@pytest.mark.parametrize("kind", KINDS)
def test_formats_md_documents_every_native_field(kind: str) -> None:
    text = FORMATS_MD.read_text("utf-8")
    section = text.split(f"<!-- {kind} -->")[1].split("<!-- end -->")[0]
    missing = [
        (native, canonical)
        for native, canonical in _documented_names(kind)
        if f"`{native.strip()}`" not in section or (canonical and f"`{canonical}`" not in section)
    ]
    assert missing == []


def test_codes_render_the_first_code_of_a_symbol() -> None:
    table = adapters.health.PRIORITY
    assert isinstance(table, Codec)
    assert [table.parse(c) for c in ("routine", "urgent", "asap", "stat")] == [
        "routine",
        "high",
        "urgent",
        "urgent",
    ]
    assert table.render("urgent") == "asap"


@pytest.mark.parametrize("kind", KINDS)
def test_format_can_carry_everything_the_policy_grants_its_partner(kind: str) -> None:
    """A recipient's native file must have a place for each field the sharing policy grants it:
    every organisation receiving in this format."""
    carried_paths = adapters.get_adapter(kind).carried_paths()
    policy = load_policy()
    organisations = [name for name, party in all_parties().items() if party.format == kind]
    assert organisations
    for name in organisations:
        granted = granted_fields(policy, name)
        assert granted, name
        missing = [g for g in granted if not any(g == c or g.startswith(f"{c}.") for c in carried_paths)]
        assert missing == [], name


# --- recipient views: rendering what a recipient may see, and nothing else ----------------------


def _render_views(
    kind: str, views: list[dict[str, Any]]
) -> tuple[list[str], adapters.Rendered, list[dict[str, Any]]]:
    """Render views as one native file and read it back: each record's native text and canonical form."""
    adapter = adapters.get_adapter(kind)
    out = io.StringIO()
    rendered = adapter.render(views, out)
    documents = [n.document for n in adapter.read_native(io.StringIO(out.getvalue()), adapter.referral_map)]
    texts = [json.dumps(document) for document in documents]
    return texts, rendered, [adapter.referral_map.to_canonical(d)[0] for d in documents]


def _assert_faithful(kind: str, view: dict[str, Any], back: dict[str, Any]) -> None:
    adapter = adapters.get_adapter(kind)
    # concern_types is derived from the concerns when a file is read, not read from it.
    expected = {path: value for path, value in carried(adapter, view).items() if path != "concern_types"}
    assert carried(adapter, back) == expected


@pytest.mark.parametrize(("kind", "recipient"), PARTNER_VIEWS)
def test_a_recipient_view_renders_with_only_its_granted_fields(kind: str, recipient: str) -> None:
    view_schema_ = view_schema(granted_fields(load_policy(), recipient))
    originals = list(synthetic_referrals(80, seed=3))
    views = [project(record, view_schema_) for record in originals]
    texts, rendered, backs = _render_views(kind, views)
    assert rendered.count == len(views)
    assert rendered.not_carried <= {"household"}  # only members beyond a CSV's numbered groups
    for original, view, back, text in zip(originals, views, backs, texts, strict=True):
        _assert_faithful(kind, view, back)
        visible = {str(value) for _, value in flat(view)}
        withheld = {
            value
            for path, value in flat(original)
            if isinstance(value, str)
            and len(value) > 6
            and value not in visible
            and not any(value in seen for seen in visible)
        }
        assert [value for value in withheld if value in text] == []


@settings(max_examples=40, deadline=None)
@given(
    granted=st.sets(st.sampled_from(field_paths(referral_schema())), max_size=30), kind=st.sampled_from(KINDS)
)
def test_any_view_renders_without_failing_and_without_inventing(granted: set[str], kind: str) -> None:
    view_schema_ = view_schema(granted | {"referral_id"})  # every real view carries the id
    views = [project(record, view_schema_) for record in synthetic_referrals(6, seed=len(granted))]
    _, rendered, backs = _render_views(kind, views)
    assert rendered.count == len(views)
    for view, back in zip(views, backs, strict=True):
        _assert_faithful(kind, view, back)


def test_a_health_view_with_practitioner_and_organisation_but_no_role_keeps_both() -> None:
    """Found by the property above: the requester names one resource, so without a role tying
    the practitioner to the organisation the organisation was written but never read back."""
    view_schema_ = view_schema({"referral_id", "referrer.practitioner.name", "referrer.organisation"})
    views = [project(record, view_schema_) for record in synthetic_referrals(3, seed=2)]
    _, rendered, backs = _render_views("health", views)
    assert rendered.count == 3
    for view, back in zip(views, backs, strict=True):
        assert back["referrer"]["organisation"] == view["referrer"]["organisation"]
        assert back["referrer"]["practitioner"]["name"] == view["referrer"]["practitioner"]["name"]


def test_a_view_in_json_form_renders_like_the_typed_one() -> None:
    record = next(synthetic_referrals(1, seed=5))
    typed = io.StringIO()
    adapters.get_adapter("police").render([record], typed)
    as_json = io.StringIO()
    adapters.get_adapter("police").render([to_json_form(record, referral_schema())], as_json)
    assert as_json.getvalue() == typed.getvalue()


def test_a_compiled_table_reads_long_lists_labels_problems_and_keeps_a_bounded_cache() -> None:
    """The table compiles its reads once (paths parsed and split ahead); a JSON list of any
    length still converts item by item, a bad item's problem names its canonical index, and
    the compiled item reads kept are bounded (a hostile file cannot grow them)."""
    from referral_broker.adapters.field_map import ITEM_PLANS, TEXT, FieldMap, _integer

    table = FieldMap(
        (
            Field("id", "referral_id"),
            Const("kind", "list", frozenset({"list"})),
            Items("people", "household", (Field("name", "name"), Field("age", "age", Codec(_integer)))),
            Field("meta.note", "notes.text", TEXT),
        )
    )
    people = [{"name": f" p{n} ", "age": str(n)} for n in range(3 * ITEM_PLANS)]
    people[100]["age"] = "old"
    people[5] = {"name": "  "}  # blank: an empty item, kept by its index
    record, problems = table.to_canonical(
        {"id": "r1", "kind": "list", "people": people, "meta": {"note": " hi "}}
    )
    assert record["referral_id"] == "r1" and record["notes"] == {"text": "hi"}
    assert len(record["household"]) == 3 * ITEM_PLANS
    assert record["household"][7] == {"name": "p7", "age": 7} and record["household"][5] == {}
    assert record["household"][100] == {"name": "p100"}
    assert [(p.native, p.canonical, p.reason) for p in problems] == [
        ("people[100].age", "household[100].age", "expected a whole number")
    ]
    assert len(table.__dict__["_items_cache"]) == ITEM_PLANS * 1  # one Items, the first positions only
    _, refused = table.to_canonical({"id": "r2", "kind": "card", "people": "x"})
    assert [(p.native, p.canonical) for p in refused] == [("kind", ""), ("people", "household")]
    # the same table converts the same way a second time (the compiled reads are reused)
    assert table.to_canonical({"id": "r1", "kind": "list", "people": people, "meta": {"note": " hi "}}) == (
        record,
        problems,
    )
