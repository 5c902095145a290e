"""Schema v2 fields from partner data: the GP practice's ODS code from a UK Core Patient, and
the charity a referrer names for a requested service from the charities JSON, the schools CSV
and the CTF. Every file here is synthetic; the organisations are the demo county's."""

from __future__ import annotations

import copy
import csv
import datetime as dt
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from fhir.resources.R4B.patient import Patient

from referral_broker import adapters
from referral_broker.adapters.fhir_files import write_fhir
from referral_broker.adapters.health import ODS_SYSTEM
from referral_broker.errors import ValidationError
from referral_broker.schemas.registry import referral_schema
from referral_broker.schemas.synth import NamedOrganisation, synthetic_referrals

NOW = dt.datetime(2025, 10, 1, tzinfo=dt.UTC)
# The demo county's organisations (referral_broker/organisations.toml), named once.
GP_PRACTICE, GP_PRACTICE_NAME = "Z90001", "Fenland Bridge Surgery"
EXAMPLE_PRACTICE, EXAMPLE_PRACTICE_NAME = "Z90002", "Cam Valley Medical Practice"
CITIZENS_ADVICE = "1190001"
PARENTING_CHARITY = "1190003"
GMP_SYSTEM = "https://fhir.hl7.org.uk/Id/gmp-number"
ODS_PROBLEM = "not a GP practice ODS code (a letter and 5 digits, e.g. A81001)"
CHARITY_PROBLEM = "not a registered charity number (6 to 8 digits, '-N' for a linked charity, e.g. 1190001)"


def example(kind: str) -> str:
    return adapters.example_file(kind).read_text("utf-8")


def parse(kind: str, text: str) -> list[adapters.ParsedRecord]:
    # XML is read as bytes (its declaration names the encoding), everything else as text
    source = io.BytesIO(text.encode()) if text.lstrip().startswith("<") else io.StringIO(text)
    return list(adapters.get_adapter(kind).parse(source, now=NOW))


def only_record(kind: str, text: str) -> dict[str, Any]:
    parsed = parse(kind, text)
    assert [str(p) for p in parsed if not p.ok] == []
    assert parsed[0].record is not None
    return parsed[0].record


def problems(kind: str, text: str) -> list[str]:
    return [f"{p.path}: {p.reason}" for parsed in parse(kind, text) for p in parsed.problems]


# --- health: Patient.generalPractitioner -----------------------------------------------------------


def health_bundle(change: Callable[[dict[str, Any], list[dict[str, Any]]], None]) -> str:
    """The shipped example Bundle cut to its first referral, with ``change(patient, entries)``."""
    bundle = json.loads(example("health"))
    bundle["entry"] = bundle["entry"][:5]
    patient = bundle["entry"][0]["resource"]
    assert patient["resourceType"] == "Patient" and bundle["entry"][4]["resource"]["resourceType"] == "ServiceRequest"
    change(patient, bundle["entry"])
    return json.dumps(bundle)


def gp(record: dict[str, Any]) -> tuple[Any, Any]:
    health = record["health_and_development"]
    return health["gp_practice_ods"], health["gp_practice"]


def test_the_health_example_names_its_practices_by_ods_code() -> None:
    records = adapters.load_file("health", adapters.example_file("health"), now=NOW).referrals
    assert [gp(r) for r in records] == [(EXAMPLE_PRACTICE, EXAMPLE_PRACTICE_NAME)] * 2


def logical(patient: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """As PDS gives it: a logical reference by ODS code (typed in lower case with a space here)."""
    patient["generalPractitioner"] = [{"type": "Organization", "identifier": {"system": ODS_SYSTEM, "value": "z9 0001"}}]


def bundle_entry_after_the_referral(patient: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """A reference to an Organization entry that comes after the ServiceRequest."""
    url = "urn:uuid:5b1f0a43-9f5e-4c1e-9c55-6c1d2b3a4f01"
    patient["generalPractitioner"] = [{"reference": url}]
    entries.append(
        {
            "fullUrl": url,
            "resource": {
                "resourceType": "Organization",
                "identifier": [
                    {"system": "https://example.org/Id/local-code", "value": "LOCAL-7"},
                    {"system": ODS_SYSTEM, "value": GP_PRACTICE},
                ],
                "name": GP_PRACTICE_NAME,
            },
        }
    )


def contained_in_the_patient(patient: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    patient["contained"] = [
        {
            "resourceType": "Organization",
            "id": "practice",
            "identifier": [{"system": ODS_SYSTEM, "value": GP_PRACTICE}],
            "name": GP_PRACTICE_NAME,
        }
    ]
    patient["generalPractitioner"] = [{"reference": "#practice"}]


def named_gp_before_the_practice(patient: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """The GP (a Practitioner, by GMP number) listed before the practice."""
    patient["generalPractitioner"] = [
        {"type": "Practitioner", "identifier": {"system": GMP_SYSTEM, "value": "G8123456"}, "display": "Dr A Example"},
        {"type": "Organization", "identifier": {"system": ODS_SYSTEM, "value": GP_PRACTICE}, "display": GP_PRACTICE_NAME},
    ]


GP_FORMS = {
    "logical reference by ODS code": (logical, (GP_PRACTICE, None)),
    "Organization entry after the referral": (bundle_entry_after_the_referral, (GP_PRACTICE, GP_PRACTICE_NAME)),
    "Organization contained in the Patient": (contained_in_the_patient, (GP_PRACTICE, GP_PRACTICE_NAME)),
    "the GP listed before the practice": (named_gp_before_the_practice, (GP_PRACTICE, GP_PRACTICE_NAME)),
}


@pytest.mark.parametrize(("change", "expected"), GP_FORMS.values(), ids=GP_FORMS.keys())
def test_the_gp_practice_is_read_in_each_uk_core_form(
    change: Callable[[dict[str, Any], list[dict[str, Any]]], None], expected: tuple[str, str | None]
) -> None:
    assert gp(only_record("health", health_bundle(change))) == expected


@pytest.mark.parametrize(("change", "expected"), GP_FORMS.values(), ids=GP_FORMS.keys())
def test_fhir_xml_gives_the_same_gp_practice(
    change: Callable[[dict[str, Any], list[dict[str, Any]]], None], expected: tuple[str, str | None]
) -> None:
    out = io.StringIO()
    write_fhir(json.loads(health_bundle(change)), out, "xml")
    assert out.getvalue().lstrip().startswith("<")
    assert gp(only_record("health", out.getvalue())) == expected


def test_a_gp_known_only_by_another_identifier_gives_no_practice_code() -> None:
    def gmp_only(patient: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        patient["generalPractitioner"] = [
            {"type": "Practitioner", "identifier": {"system": GMP_SYSTEM, "value": "G8123456"}, "display": "Dr A Example"}
        ]

    assert gp(only_record("health", health_bundle(gmp_only))) == (None, "Dr A Example")


def test_a_trust_code_where_a_practice_is_expected_is_refused_naming_the_element() -> None:
    def trust(patient: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        patient["generalPractitioner"] = [{"type": "Organization", "identifier": {"system": ODS_SYSTEM, "value": "RGT"}}]

    assert problems("health", health_bundle(trust)) == [
        f'"Patient.generalPractitioner[0].identifier" (health_and_development.gp_practice_ods): {ODS_PROBLEM}'
    ]


def test_a_rendered_health_message_names_the_practice_as_uk_core_does() -> None:
    record = adapters.load_file("health", adapters.example_file("health"), now=NOW).referrals[0]
    record["health_and_development"]["gp_practice_ods"] = GP_PRACTICE
    for fmt in (None, "xml"):
        out = io.StringIO()
        adapters.get_adapter("health").render([record], out, fmt=fmt)
        back = only_record("health", out.getvalue())
        assert gp(back) == (GP_PRACTICE, EXAMPLE_PRACTICE_NAME)
        assert back == record
    out = io.StringIO()
    adapters.get_adapter("health").render([record], out)
    patient = next(e["resource"] for e in json.loads(out.getvalue())["entry"] if e["resource"]["resourceType"] == "Patient")
    assert patient["generalPractitioner"] == [
        {"type": "Organization", "identifier": {"system": ODS_SYSTEM, "value": GP_PRACTICE}, "display": EXAMPLE_PRACTICE_NAME}
    ]
    Patient.model_validate(patient)  # valid FHIR R4


def test_without_a_practice_code_nothing_is_invented() -> None:
    record = adapters.load_file("health", adapters.example_file("health"), now=NOW).referrals[0]
    record["health_and_development"]["gp_practice_ods"] = None
    out = io.StringIO()
    adapters.get_adapter("health").render([record], out)
    patient = next(e["resource"] for e in json.loads(out.getvalue())["entry"] if e["resource"]["resourceType"] == "Patient")
    assert patient["generalPractitioner"] == [{"display": EXAMPLE_PRACTICE_NAME}]


# --- charities: support_providers --------------------------------------------------------------------


def charity_form(edit: Callable[[dict[str, Any]], None]) -> str:
    document = json.loads(example("charities"))
    edit(document)
    return json.dumps(document)


def test_the_charities_example_names_its_parenting_charity() -> None:
    record = only_record("charities", example("charities"))
    assert record["service_providers"] == [{"service": "parenting_programme", "provider": PARENTING_CHARITY}]


def test_a_charity_number_is_compacted_then_checked() -> None:
    spaced = charity_form(lambda d: d["support_providers"][0].update(charity_number=" 1 190 003 "))
    assert only_record("charities", spaced)["service_providers"][0]["provider"] == PARENTING_CHARITY
    short = charity_form(lambda d: d["support_providers"][0].update(charity_number="11900"))
    assert problems("charities", short) == [
        f'"support_providers[0].charity_number" (service_providers[0].provider): {CHARITY_PROBLEM}'
    ]


def test_a_provider_for_a_service_not_asked_for_is_refused() -> None:
    def carers(document: dict[str, Any]) -> None:
        document["support_providers"].append({"service": "caring_together", "charity_number": "1190002"})

    assert problems("charities", charity_form(carers)) == [
        '"support_providers[1].service" (service_providers[1].service): is not one of services_requested'
    ]


def test_a_form_without_providers_still_reads() -> None:
    record = only_record("charities", charity_form(lambda d: d.pop("support_providers")))
    assert record["service_providers"] == []


# --- schools: the Service Providers column, and the CTF ---------------------------------------------


def schools_rows() -> list[list[str]]:
    return list(csv.reader(io.StringIO(example("schools"), newline="")))


def schools_csv(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


def test_the_schools_example_names_charities_by_number() -> None:
    records = adapters.load_file("schools", adapters.example_file("schools"), now=NOW).referrals
    assert [r["service_providers"] for r in records] == [
        [{"service": "citizens_advice", "provider": CITIZENS_ADVICE}],
        [{"service": "citizens_advice", "provider": CITIZENS_ADVICE}],
        [],
    ]


def test_an_export_from_before_the_column_still_reads_without_a_warning() -> None:
    rows = schools_rows()
    column = rows[0].index("Service Providers")
    older = [row[:column] + row[column + 1 :] for row in rows]
    adapter = adapters.get_adapter("schools")
    parsed = list(adapter.parse(io.StringIO(schools_csv(older)), now=NOW))
    assert all(p.ok for p in parsed)
    assert [p.record["service_providers"] for p in parsed if p.record] == [[], [], []]
    assert adapter.warnings == []


def test_a_malformed_service_providers_cell_is_named() -> None:
    rows = schools_rows()
    column = rows[0].index("Service Providers")
    rows[1][column] = "citizens_advice"
    rows[2][column] = "citizens_advice:CA-77"
    assert problems("schools", schools_csv(rows)) == [
        '"Service Providers" (service_providers): item 1 is not SERVICE:CHARITY NUMBER',
        f'"Service Providers" (service_providers[0].provider): {CHARITY_PROBLEM}',
    ]


def test_schools_render_the_column_and_the_ctf_carries_it_too() -> None:
    records = adapters.load_file("schools", adapters.example_file("schools"), now=NOW).referrals
    for fmt in (None, "ctf"):
        out = io.StringIO()
        adapters.get_adapter("schools").render(records, out, fmt=fmt)
        text = out.getvalue()
        if fmt is None:
            assert "Service Providers" in text.splitlines()[0]
        else:
            assert "<CharityNumber>1190001</CharityNumber>" in text
        back = [p.record for p in parse("schools", text)]
        assert [r["service_providers"] for r in back if r] == [r["service_providers"] for r in records]


# --- every format that carries them, from synthetic referrals ----------------------------------------

CHARITIES = (NamedOrganisation(CITIZENS_ADVICE), NamedOrganisation(PARENTING_CHARITY))
PRACTICES = (NamedOrganisation(GP_PRACTICE, GP_PRACTICE_NAME), NamedOrganisation(EXAMPLE_PRACTICE, EXAMPLE_PRACTICE_NAME))
CARRIERS = {"health": ["health_and_development.gp_practice_ods"], "charities": ["service_providers"], "schools": ["service_providers"]}


@pytest.mark.parametrize("kind", sorted(CARRIERS))
def test_synthetic_referrals_keep_the_new_fields_through_the_native_format(kind: str) -> None:
    originals = [
        {**copy.deepcopy(r), "referrer": {**r["referrer"], "partner": kind}}
        for r in synthetic_referrals(60, seed=12, gp_practices=PRACTICES, charities=CHARITIES)
    ]
    out = io.StringIO()
    rendered = adapters.get_adapter(kind).render(originals, out)
    assert not set(CARRIERS[kind]) & rendered.not_carried
    parsed = parse(kind, out.getvalue())
    assert [str(p) for p in parsed if not p.ok] == []

    def values(record: dict[str, Any], path: str) -> Any:
        head, _, rest = path.partition(".")
        return (record.get(head) or {}).get(rest) if rest else record.get(head)

    for path in CARRIERS[kind]:
        before = [values(r, path) for r in originals]
        assert [values(p.record, path) for p in parsed if p.record] == before
        assert any(before), f"the sample never fills {path}"
    assert "service_providers" in {f["name"] for f in referral_schema()["fields"]}


def test_a_dry_run_refuses_a_bad_charity_number_before_anything_is_sent(tmp_path: Any) -> None:
    bad = tmp_path / "charities.json"
    bad.write_text(charity_form(lambda d: d["support_providers"][0].update(charity_number="SC012345")), "utf-8")
    with pytest.raises(ValidationError) as caught:
        adapters.load_file("charities", bad, now=NOW)
    assert [str(p) for p in caught.value.problems] == [
        f'record 1: "support_providers[0].charity_number" (service_providers[0].provider): {CHARITY_PROBLEM}'
    ]
    assert "SC012345" not in str(caught.value)
