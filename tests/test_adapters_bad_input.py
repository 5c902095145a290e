"""Bad partner files: each error names the file, the record and the field, never the value, and
nothing partial comes back unless the caller asked to skip invalid records.

Every case starts from a partner's example file and breaks one thing in it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from referral_broker import adapters
from referral_broker.errors import PartnerInputError, ValidationError

NOW = dt.datetime(2025, 10, 1, tzinfo=dt.UTC)


def example_text(kind: str) -> str:
    return adapters.example_file(kind).read_text("utf-8")


def csv_rows(kind: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(example_text(kind))))


def csv_text(rows: list[dict[str, str]], drop: str | None = None) -> str:
    out = io.StringIO()
    columns = [c for c in rows[0] if c != drop]
    writer = csv.DictWriter(out, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def edit_csv(kind: str, row: int, column: str, value: str) -> str:
    rows = csv_rows(kind)
    rows[row - 1][column] = value
    return csv_text(rows)


def edit_json(kind: str, edit: Callable[[object], None]) -> str:
    document = json.loads(example_text(kind))
    edit(document)
    return json.dumps(document, indent=2)


def bundle_entry(document: object, number: int) -> dict:
    assert isinstance(document, dict)
    return document["entry"][number - 1]["resource"]


@dataclass(frozen=True)
class Case:
    """A broken file: its partner kind, its bytes, and what the error must say."""

    kind: str
    data: bytes
    error: type[Exception]
    says: tuple[str, ...]
    secret: str | None = None  # a value from the file that must not appear in the error


def _cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    text = example_text("police")
    cases["malformed JSON"] = Case(
        "police",
        text[: len(text) // 2].encode(),
        PartnerInputError,
        ("police.json", "line", "malformed JSON"),
    )
    cases["malformed CSV"] = Case(
        "schools",
        (example_text("schools") + '"unterminated,' + "," * 10).encode(),
        PartnerInputError,
        ("schools.csv", "line 5", "malformed CSV"),
    )
    cases["missing column"] = Case(
        "schools",
        csv_text(csv_rows("schools"), drop="UPN").encode(),
        PartnerInputError,
        ("schools.csv", 'missing column(s) "UPN"'),
    )
    renamed = example_text("dwp").replace("POSTCODE", "POST_CODE", 1)
    cases["unknown column"] = Case(
        "dwp", renamed.encode(), PartnerInputError, ("dwp.csv", 'unknown column(s) "POST_CODE"', '"POSTCODE"')
    )
    rows = csv_rows("dwp")
    rows[2]["CHILD_FORENAME"] = "Zoë"
    cases["latin-1 bytes"] = Case(
        "dwp",
        csv_text(rows).encode("latin-1"),
        PartnerInputError,
        ("dwp.csv", "line 4", "not UTF-8", "save it as UTF-8"),
    )
    cases["UTF-16 file"] = Case(
        "schools", example_text("schools").encode("utf-16"), PartnerInputError, ("schools.csv", "UTF-16")
    )
    cases["UTF-16 JSON without a BOM"] = Case(
        "charities",
        example_text("charities").encode("utf-16-le"),
        PartnerInputError,
        ("charities.json", "UTF-16"),
    )
    data = edit_csv("schools", 2, "UPN", "R873236421875")
    cases["bad UPN"] = Case(
        "schools",
        data.encode(),
        ValidationError,
        ("schools.csv", "record 2", '"UPN" (identifiers.upn)', "check"),
        "R873236421875",
    )
    row = next(n for n, r in enumerate(csv_rows("dwp"), 1) if r["ADULT_1_FORENAME"])
    data = edit_csv("dwp", row, "ADULT_1_NINO", "QQ123456Z")
    cases["bad NI number"] = Case(
        "dwp",
        data.encode(),
        ValidationError,
        (
            "dwp.csv",
            f'record {row}: "ADULT_1_NINO" (household[0].ni_number): not a valid NI number',
            "1 record(s)",
        ),
        "QQ123456Z",
    )

    def bad_nhs(document: object) -> None:
        patient = bundle_entry(document, 6)
        patient["identifier"][0]["value"] = "9449305553"

    cases["bad NHS number"] = Case(
        "health",
        edit_json("health", bad_nhs).encode(),
        ValidationError,
        (
            "health.json",
            "record 10",
            "Patient.identifier[system=https://fhir.nhs.uk/Id/nhs-number].value",
            "identifiers.nhs_number",
            "check digit",
        ),
        "9449305553",
    )

    def no_intent(document: object) -> None:
        del bundle_entry(document, 5)["intent"]

    cases["FHIR ServiceRequest without intent"] = Case(
        "health",
        edit_json("health", no_intent).encode(),
        ValidationError,
        ("health.json", "record 5", "ServiceRequest.intent", "FHIR"),
    )

    def bad_birth_date(document: object) -> None:
        bundle_entry(document, 1)["birthDate"] = "2014-02-30"

    cases["FHIR Patient with an impossible date"] = Case(
        "health",
        edit_json("health", bad_birth_date).encode(),
        ValidationError,
        ("health.json", "record 5", "Patient.birthDate"),
        "2014-02-30",
    )

    def bogus_status(document: object) -> None:
        bundle_entry(document, 5)["status"] = "bogus"

    cases["FHIR status outside its value set"] = Case(
        "health",
        edit_json("health", bogus_status).encode(),
        ValidationError,
        ("record 5", '"ServiceRequest.status"', "must be one of active"),
        "bogus",
    )

    def bad_gender(document: object) -> None:
        bundle_entry(document, 1)["gender"] = "boy"

    cases["FHIR gender outside its value set"] = Case(
        "health",
        edit_json("health", bad_gender).encode(),
        ValidationError,
        ('"Patient.gender" (child.sex)', "not one of the codes"),
        "boy",
    )

    def bad_postcode(document: object) -> None:
        assert isinstance(document, dict)
        document["postcode"] = "NOT A CODE"

    cases["bad postcode"] = Case(
        "charities",
        edit_json("charities", bad_postcode).encode(),
        ValidationError,
        ("charities.json", "record 1", '"postcode" (child.address.postcode)', "not a valid UK postcode"),
        "NOT A CODE",
    )

    def misspelt_key(document: object) -> None:
        assert isinstance(document, list)
        document[1]["child"]["surnmae"] = document[1]["child"].pop("surname")

    cases["unknown JSON key"] = Case(
        "police",
        edit_json("police", misspelt_key).encode(),
        ValidationError,
        ("police.json", "record 2", "child.surnmae", "unknown field"),
    )

    def encompass_without_school(document: object) -> None:
        assert isinstance(document, list)
        del document[1]["school"]

    cases["Operation Encompass without a school"] = Case(
        "police",
        edit_json("police", encompass_without_school).encode(),
        ValidationError,
        ("record 2", '"notification_type"', "names the school"),
    )
    data = edit_csv("schools", 1, "Referred By", "health")
    cases["a file speaking for another partner"] = Case(
        "schools",
        data.encode(),
        ValidationError,
        ("record 1", '"Referred By" (referrer.partner)', "must be empty or 'schools'"),
    )
    data = edit_csv("schools", 3, "DOB", "31/02/2014")
    cases["impossible date in a CSV"] = Case(
        "schools",
        data.encode(),
        ValidationError,
        ("record 3", '"DOB" (child.date_of_birth)', "DD/MM/YYYY"),
        "31/02/2014",
    )
    lines = example_text("dwp").splitlines(keepends=True)
    lines[2] = lines[2].rstrip("\r\n") + ",extra\r\n"
    cases["row with an extra cell"] = Case(
        "dwp", "".join(lines).encode(), ValidationError, ("dwp.csv", "record 2", "cells where the header has")
    )
    return cases


CASES = _cases()


def write(tmp_path: Path, case: Case) -> Path:
    path = tmp_path / f"{case.kind}{adapters.get_adapter(case.kind).native_suffix}"
    path.write_bytes(case.data)
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_bad_file_is_refused_with_file_record_and_field(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    path = write(tmp_path, case)
    with pytest.raises(case.error) as raised:
        adapters.load_file(case.kind, path, now=NOW)
    message = str(raised.value)
    for expected in case.says:
        assert expected in message, f"{expected!r} not in {message!r}"
    if case.secret:
        assert case.secret not in message
    # The streaming reader refuses the file before it yields a single record.
    with pytest.raises(case.error):
        adapters.iter_file(case.kind, path, now=NOW)


RECORD_CASES = [name for name, case in CASES.items() if case.error is ValidationError]


@pytest.mark.parametrize("name", RECORD_CASES)
def test_skip_invalid_returns_the_good_records_and_reports_each_rejected_one(
    name: str, tmp_path: Path
) -> None:
    case = CASES[name]
    path = write(tmp_path, case)
    total = len(adapters.load_file(case.kind, adapters.example_file(case.kind), now=NOW).records)
    result = adapters.load_file(case.kind, path, skip_invalid=True, now=NOW)
    assert len(result.rejected) == 1
    rejected = result.rejected[0]
    assert rejected.record is None and rejected.problems
    assert len(result.records) == total - 1
    assert rejected.number not in {parsed.number for parsed in result.records}
    assert str(rejected).startswith(f"{path.name}: record {rejected.number}: ")
    if case.secret:
        assert case.secret not in str(rejected)
    stream = adapters.iter_file(case.kind, path, skip_invalid=True, now=NOW)
    assert [r.number for r in stream.rejected] == [rejected.number]
    assert [p.record for p in stream] == [p.record for p in result.records]


def test_structural_errors_are_not_skippable(tmp_path: Path) -> None:
    path = write(tmp_path, CASES["missing column"])
    with pytest.raises(PartnerInputError):
        adapters.load_file("schools", path, skip_invalid=True)


def test_every_problem_of_every_record_is_listed(tmp_path: Path) -> None:
    rows = csv_rows("schools")
    rows[0]["UPN"] = "X"
    rows[0]["Postcode"] = "nowhere"
    rows[2]["Possible Sessions"] = "many"
    path = tmp_path / "schools.csv"
    path.write_text(csv_text(rows), "utf-8")
    with pytest.raises(ValidationError) as raised:
        adapters.load_file("schools", path, now=NOW)
    where = {(p.record, p.path.split(" ")[0]) for p in raised.value.problems}
    assert where == {(1, '"UPN"'), (1, '"Postcode"'), (3, '"Possible')}
    assert "2 record(s) rejected, nothing accepted" in str(raised.value)


def test_a_file_that_changes_between_passes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dwp.csv"
    path.write_bytes(adapters.example_file("dwp").read_bytes())
    stream = adapters.iter_file("dwp", path, now=NOW)
    path.write_text(path.read_text("utf-8").replace("Y,", "N,", 1), "utf-8")
    with pytest.raises(PartnerInputError, match="changed while it was being read"):
        list(stream)


def test_missing_file_is_a_partner_input_error(tmp_path: Path) -> None:
    with pytest.raises(PartnerInputError, match=r"nothing\.csv: file not found"):
        adapters.load_file("schools", tmp_path / "nothing.csv")


def test_streams_are_read_like_files() -> None:
    data = adapters.example_file("schools").read_bytes()
    from_bytes = adapters.load_file("schools", io.BytesIO(data), now=NOW).referrals
    from_text = adapters.load_file("schools", io.StringIO(data.decode("utf-8")), now=NOW).referrals
    assert [r["referral_id"] for r in from_bytes] == [r["referral_id"] for r in from_text]
    with pytest.raises(PartnerInputError, match="<stream>: the file is UTF-16"):
        adapters.load_file("schools", io.BytesIO(b"\xff\xfeU\x00P\x00N\x00"))


@pytest.mark.parametrize("kind", ["schools", "dwp"])
def test_a_header_in_other_capitals_spacing_or_underscores_names_the_same_columns(kind: str, tmp_path: Path) -> None:
    """An MIS export or a re-typed spreadsheet header ("REFERRAL ID", "Referral_Id ") is the
    format's own header: the records read are the example's, field for field."""
    text = example_text(kind)
    header, rest = text.split("\n", 1)
    columns = next(csv.reader([header]))
    assert len(columns) > 20
    restyled = [
        (c.upper() if i % 3 == 0 else c.lower().replace(" ", "_") if i % 3 == 1 else f"  {c.title()} ")
        for i, c in enumerate(columns)
    ]
    assert restyled != columns
    path = tmp_path / f"{kind}.csv"
    path.write_text(",".join(f'"{c}"' for c in restyled) + "\n" + rest, "utf-8")
    expected = adapters.load_file(kind, adapters.example_file(kind), now=NOW).referrals
    assert adapters.load_file(kind, path, now=NOW).referrals == expected
    # the same column twice under two spellings is still a repeated column, by the format's name
    doubled = tmp_path / "doubled.csv"
    doubled.write_text(f'{header},"{columns[0].upper()}"\n' + "\n".join(r + ",x" for r in rest.splitlines()), "utf-8")
    with pytest.raises(PartnerInputError, match=f'repeated column\\(s\\) "{columns[0]}"'):
        adapters.load_file(kind, doubled, now=NOW)
