"""Partner files as they really go wrong, each message asserted word for word: repeated records
and keys refused by record number, and messages that point at the fix (XML where JSON is
expected, the wrong CSV delimiter, a list for an object, the allowed values, a hyphenated key
named, an empty file or array with its own exit code).

Every fixture is built from a partner's synthetic example file with one thing changed.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from referral_broker import adapters
from referral_broker.errors import EmptyInputError, PartnerInputError, ValidationError

NOW = dt.datetime(2025, 10, 1, tzinfo=dt.UTC)


def example(kind: str) -> str:
    return adapters.example_file(kind).read_text("utf-8")


def police(edit: Callable[[list[dict[str, Any]]], Any]) -> str:
    records = json.loads(example("police"))
    result = edit(records)
    if isinstance(result, str):
        return result
    return json.dumps(records if result is None else result, indent=2)


def charity(edit: Callable[[dict[str, Any]], None]) -> str:
    document = json.loads(example("charities"))
    first = document[0] if isinstance(document, list) else document
    edit(first)
    return json.dumps(first, indent=2)


def schools_with(extra: dict[str, str]) -> str:
    rows = list(csv.reader(io.StringIO(example("schools"))))
    rows[0] += list(extra)
    for row in rows[1:]:
        row += list(extra.values())
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


def _duplicate_district(records: list[dict[str, Any]]) -> str:
    text = json.dumps(records[:1], indent=2)
    # JSON allows a key twice; the last value would silently win (and change the routing).
    return text.replace('"district": "', '"district": "fenland",\n    "district": "', 1)


def _household_as_object(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    records[0]["household"] = records[0]["household"][0]
    return records[:1]


def _child_as_list(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    records[0]["child"] = [records[0]["child"]]
    return records[:1]


def _hyphenated(record: dict[str, Any]) -> None:
    record["child-first-name"] = record.pop("child_first_name")


def _unknown_district(record: dict[str, Any]) -> None:
    record["district"] = "peterborough"


@dataclass(frozen=True)
class Case:
    kind: str
    file_name: str
    data: str
    error: type[Exception]
    message: str  # the whole message, word for word
    problems: tuple[str, ...] = ()  # for a ValidationError: each problem, word for word


CASES = {
    "repeated referral id and version": Case(
        "police",
        "police.json",
        police(lambda r: [r[0], r[1], dict(r[0])]),
        ValidationError,
        "invalid referrals in police.json (2 record(s) rejected, nothing accepted): "
        'record 1: "reference" (referral_id): the same referral id and version as record 3: a file '
        'holds each once; record 3: "reference" (referral_id): the same referral id and version as '
        "record 1: a file holds each once",
        (
            'record 1: "reference" (referral_id): the same referral id and version as record 3: a file holds each once',
            'record 3: "reference" (referral_id): the same referral id and version as record 1: a file holds each once',
        ),
    ),
    "duplicate JSON key": Case(
        "police",
        "police.json",
        police(_duplicate_district),
        ValidationError,
        "invalid referrals in police.json (1 record(s) rejected, nothing accepted): "
        'record 1: "district": the key appears more than once in its object; keep one',
        ('record 1: "district": the key appears more than once in its object; keep one',),
    ),
    "XML where JSON is expected": Case(
        "police",
        "police.json",
        '<?xml version="1.0" encoding="UTF-8"?>\n<referrals/>\n',
        PartnerInputError,
        "police.json: the file is XML, but police files are JSON (see adapters/FORMATS.md)",
    ),
    "CSV where JSON is expected": Case(
        "charities",
        "charities.json",
        "submission_id,district\n1,fenland\n",
        PartnerInputError,
        "charities.json: the file is not JSON (it starts with neither { nor [), but charities files "
        "are JSON (see adapters/FORMATS.md)",
    ),
    "a list given as an object": Case(
        "police",
        "police.json",
        police(_household_as_object),
        ValidationError,
        "invalid referrals in police.json (1 record(s) rejected, nothing accepted): "
        'record 1: "household": expected a list ([...]), found an object',
        ('record 1: "household": expected a list ([...]), found an object',),
    ),
    "an object given as a list": Case(
        "police",
        "police.json",
        police(_child_as_list),
        ValidationError,
        "invalid referrals in police.json (1 record(s) rejected, nothing accepted): "
        'record 1: "child": expected an object ({...}), found a list',
        ('record 1: "child": expected an object ({...}), found a list',),
    ),
    "hyphenated key": Case(
        "charities",
        "charities.json",
        charity(_hyphenated),
        ValidationError,
        "invalid referrals in charities.json (1 record(s) rejected, nothing accepted): "
        'record 1: "child-first-name": unknown field (did you mean "child_first_name"?)',
        ('record 1: "child-first-name": unknown field (did you mean "child_first_name"?)',),
    ),
    "value outside an enum": Case(
        "charities",
        "charities.json",
        charity(_unknown_district),
        ValidationError,
        "invalid referrals in charities.json (1 record(s) rejected, nothing accepted): "
        'record 1: "district" (district): not one of the allowed values: cambridge, east_cambs, '
        "fenland, huntingdonshire, south_cambs",
        (
            'record 1: "district" (district): not one of the allowed values: cambridge, east_cambs, '
            "fenland, huntingdonshire, south_cambs",
        ),
    ),
    "semicolon-delimited CSV": Case(
        "schools",
        "schools.csv",
        example("schools").replace(",", ";"),
        PartnerInputError,
        "schools.csv: line 1 (header): the columns are separated by semicolons, not commas; save the "
        "file as comma-separated CSV (in Excel: 'CSV UTF-8 (Comma delimited)')",
    ),
    "tab-delimited CSV": Case(
        "dwp",
        "dwp.csv",
        example("dwp").replace(",", "\t"),
        PartnerInputError,
        "dwp.csv: line 1 (header): the columns are separated by tabs, not commas; save the file as "
        "comma-separated CSV (in Excel: 'CSV UTF-8 (Comma delimited)')",
    ),
    "JSON where CSV is expected": Case(
        "dwp", "dwp.csv", '[{"REFERRAL_ID": ""}]\n', PartnerInputError, "dwp.csv: the file is JSON, not CSV"
    ),
    "extra MIS columns refused where the format has no MIS": Case(
        "dwp",
        "dwp.csv",
        example("dwp").replace("POSTCODE", "POSTCODE,TENANCY_REF", 1),
        PartnerInputError,
        'dwp.csv: line 1 (header): unknown column(s) "TENANCY_REF"',
    ),
    "empty JSON file": Case(
        "police", "police.json", "  \n", EmptyInputError, "police.json: the file is empty: no records"
    ),
    "empty JSON array": Case(
        "charities", "charities.json", "[]\n", EmptyInputError, "charities.json: the JSON array is empty: no records"
    ),
    "empty CSV file": Case(
        "dwp", "dwp.csv", "", EmptyInputError, "dwp.csv: the file is empty: no header row and no records"
    ),
    "CSV with a header only": Case(
        "schools",
        "schools.csv",
        example("schools").splitlines(keepends=True)[0],
        EmptyInputError,
        "schools.csv: the file has a header row but no records",
    ),
    "malformed JSON": Case(
        "police",
        "police.json",
        '[{"reference": "x",}]',
        PartnerInputError,
        "police.json: line 1 column 20: malformed JSON (Expecting property name enclosed in double quotes)",
    ),
}


def write(tmp_path: Path, case: Case) -> Path:
    path = tmp_path / case.file_name
    path.write_text(case.data, "utf-8")
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_message_points_at_the_fix(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    path = write(tmp_path, case)
    with pytest.raises(case.error) as raised:
        adapters.load_file(case.kind, path, now=NOW)
    assert type(raised.value) is case.error
    assert str(raised.value) == case.message
    if isinstance(raised.value, ValidationError):
        assert [str(p) for p in raised.value.problems] == list(case.problems)
    # The streaming reader that ``send`` uses says the same before yielding anything.
    with pytest.raises(case.error) as streamed:
        adapters.iter_file(case.kind, path, now=NOW)
    assert str(streamed.value) == case.message


def test_an_empty_file_has_its_own_exit_code() -> None:
    assert EmptyInputError.exit_code == 71
    assert issubclass(EmptyInputError, PartnerInputError)


def test_a_repeated_referral_is_refused_but_the_others_are_kept_with_skip_invalid(tmp_path: Path) -> None:
    path = write(tmp_path, CASES["repeated referral id and version"])
    result = adapters.load_file("police", path, skip_invalid=True, now=NOW)
    assert [p.number for p in result.records] == [2]
    assert [p.number for p in result.rejected] == [1, 3]
    stream = adapters.iter_file("police", path, skip_invalid=True, now=NOW)
    assert [p.number for p in stream.rejected] == [1, 3]
    assert [p.number for p in stream] == [2] and stream.total == 1


def test_the_same_id_with_another_version_is_not_a_repeat(tmp_path: Path) -> None:
    def bump(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [records[0], {**records[0], "version": 2}]

    path = tmp_path / "police.json"
    path.write_text(police(bump), "utf-8")
    assert len(adapters.load_file("police", path, now=NOW).referrals) == 2


def test_a_duplicate_key_is_named_where_it_is_nested(tmp_path: Path) -> None:
    def nested(records: list[dict[str, Any]]) -> str:
        text = json.dumps(records[:1], indent=2)
        return text.replace('"surname": "', '"surname": "X",\n      "surname": "', 1)

    path = tmp_path / "police.json"
    path.write_text(police(nested), "utf-8")
    with pytest.raises(ValidationError) as raised:
        adapters.load_file("police", path, now=NOW)
    assert [str(p) for p in raised.value.problems] == [
        'record 1: "child.surname": the key appears more than once in its object; keep one'
    ]
    assert '"X"' not in str(raised.value)


def test_a_key_that_could_hold_data_is_not_shown(tmp_path: Path) -> None:
    def odd_key(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        records[0]["Zoë's note: call 07700 900123"] = "x"
        return records[:1]

    path = tmp_path / "police.json"
    path.write_text(police(odd_key), "utf-8")
    with pytest.raises(ValidationError) as raised:
        adapters.load_file("police", path, now=NOW)
    assert [str(p) for p in raised.value.problems] == ['record 1: "<unnamed>": unknown field']


def test_schools_accept_extra_mis_columns_and_name_them_in_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "schools.csv"
    path.write_text(schools_with({"Admission Number": "001234", "Tutor Group": "7B"}), "utf-8")
    plain = adapters.load_file("schools", adapters.example_file("schools"), now=NOW)
    result = adapters.load_file("schools", path, now=NOW)
    assert [r["referral_id"] for r in result.referrals] == [r["referral_id"] for r in plain.referrals]
    assert result.warnings == [
        'schools.csv: line 1 (header): column(s) not used, ignored: "Admission Number", "Tutor Group"'
    ]
    assert plain.warnings == []
    assert adapters.iter_file("schools", path, now=NOW).warnings == result.warnings
