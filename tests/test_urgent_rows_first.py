"""Urgent rows of a partner's own file go first (issue 20: an urgent safeguarding referral
should land in seconds whatever else is queued, and that includes the rest of its own batch).

A file is still checked whole before anything is sent; after that, the urgent referrals are
sealed and sent before the routine ones, so the router, which takes a partition holding an
urgent referral first, finds them at the head of the partner's partitions."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from county import DWP
from test_router import read_all

from referral_broker import adapters
from referral_broker.adapters import file_verbs
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.identity import H_PRIORITY
from referral_broker.parties import all_parties
from referral_broker.producers.checked import check_file
from referral_broker.producers.sending import PartnerSender
from referral_broker.schemas.json_form import to_json_form
from referral_broker.schemas.registry import referral_schema
from referral_broker.schemas.synth import synthetic_referrals
from referral_broker.sealing.key_admin import init_parties

NOW = dt.datetime(2025, 10, 1, tzinfo=dt.UTC)
URGENT_ROWS = (40, 47)  # 1-based record numbers of urgent referrals alone in the file
# record 45 is urgent too, but record 10 is an earlier version of the same referral
SAME_REFERRAL = (10, 45)


def dwp_records(rows: int) -> list[dict[str, Any]]:
    """``rows`` routine DWP referrals, urgent at ``URGENT_ROWS`` and ``SAME_REFERRAL[1]``."""
    out = []
    for number, record in enumerate(synthetic_referrals(rows, seed=77), 1):
        record = copy.deepcopy(record)
        record["referrer"]["partner"] = "dwp"
        record["priority"] = "urgent" if number in (*URGENT_ROWS, SAME_REFERRAL[1]) else "routine"
        out.append(record)
    earlier, later = (out[n - 1] for n in SAME_REFERRAL)
    later["referral_id"] = earlier["referral_id"]
    later["version"] = earlier["version"] + 1
    return out


def write_dwp(path: Path, records: list[dict[str, Any]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        adapters.get_adapter("dwp").render(records, handle)
    return path


def ids(records: list[dict[str, Any]], numbers: list[int] | tuple[int, ...]) -> list[tuple[str, int]]:
    return [(str(records[n - 1]["referral_id"]), int(records[n - 1]["version"])) for n in numbers]


def expected_order(rows: int) -> list[int]:
    return [*URGENT_ROWS, *(n for n in range(1, rows + 1) if n not in URGENT_ROWS)]


def test_a_stream_yields_urgent_referrals_first_and_keeps_a_referrals_versions_in_order(tmp_path: Path) -> None:
    records = dwp_records(50)
    path = write_dwp(tmp_path / "dwp.csv", records)

    plain = [p.number for p in adapters.iter_file("dwp", path, now=NOW)]
    assert plain == list(range(1, 51))  # the default is file order (validate, tools)

    stream = adapters.iter_file("dwp", path, now=NOW, urgent_first=True)
    assert stream.total == 50
    got = list(stream)
    assert [p.number for p in got] == expected_order(50)
    assert [(str(p.record["referral_id"]), int(p.record["version"])) for p in got if p.record] == ids(
        records, expected_order(50)
    )
    # record 45 stays behind record 10, the earlier version of its referral
    numbers = [p.number for p in got]
    assert numbers.index(SAME_REFERRAL[0]) < numbers.index(SAME_REFERRAL[1])
    # a second iteration is the same (the urgent ones are kept, not consumed)
    assert [p.number for p in stream] == expected_order(50)


def test_at_most_urgent_ahead_referrals_move_and_the_rest_keep_file_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_verbs, "URGENT_AHEAD", 1)
    path = write_dwp(tmp_path / "dwp.csv", dwp_records(50))
    got = [p.number for p in adapters.iter_file("dwp", path, now=NOW, urgent_first=True)]
    assert got == [URGENT_ROWS[0], *(n for n in range(1, 51) if n != URGENT_ROWS[0])]


def test_a_skipped_record_is_not_sent_ahead_nor_does_it_hold_back_an_urgent_one(tmp_path: Path) -> None:
    """With --skip-invalid, a bad row is left out wherever it is; the urgent rows still move."""
    records = dwp_records(50)
    path = write_dwp(tmp_path / "dwp.csv", records)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    bad = lines[URGENT_ROWS[1]].split(",")  # line 0 is the header
    bad[0] = "not-a-uuid"
    lines[URGENT_ROWS[1]] = ",".join(bad)
    path.write_text("".join(lines), encoding="utf-8")
    stream = adapters.iter_file("dwp", path, now=NOW, urgent_first=True, skip_invalid=True)
    assert [r.number for r in stream.rejected] == [URGENT_ROWS[1]]
    got = [p.number for p in stream]
    assert got == [URGENT_ROWS[0], *(n for n in range(1, 51) if n not in URGENT_ROWS)]


def test_a_checked_file_puts_urgent_referrals_first_in_both_formats(tmp_path: Path) -> None:
    records = dwp_records(50)
    native = check_file(DWP, write_dwp(tmp_path / "dwp.csv", records))
    assert [(c.referral_id, c.version) for c in native] == ids(records, expected_order(50))

    schema = referral_schema()
    canonical_path = tmp_path / "canonical.jsonl"
    canonical_path.write_text(
        "".join(json.dumps(to_json_form(r, schema)) + "\n" for r in records), encoding="utf-8"
    )
    canonical = check_file(DWP, canonical_path, fmt="canonical")
    assert [(c.referral_id, c.version) for c in canonical] == ids(records, expected_order(50))


def test_an_urgent_row_at_the_end_of_a_batch_is_sent_first(topics: Settings, kafka_bootstrap: str, tmp_path: Path) -> None:
    """Through the real broker: the urgent referrals are at the head of DWP's intake partitions
    (offset 0 of theirs, produced before any routine one), not behind the rest of the file."""
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    rows = 240
    records = dwp_records(rows)
    path = write_dwp(tmp_path / "dwp.csv", records)
    report = PartnerSender(topics, kafka_bootstrap, DWP).send_file(path)
    assert len(report.sent) == rows and not report.rejected
    intake = read_all(topics, kafka_bootstrap, topic_name(topics, "intake", DWP))
    assert len(intake) == rows
    key_of = {n: str(records[n - 1]["referral_id"]).encode() for n in range(1, rows + 1)}
    priority = {(r.partition, r.offset): dict(r.headers)[H_PRIORITY] for r in intake}
    first_routine = min(r.timestamp_ms for r in intake if priority[r.partition, r.offset] == b"routine")
    for number in URGENT_ROWS:  # rows 40 and 47 of 240 in the file: now the head of their partitions
        (record,) = [r for r in intake if r.key == key_of[number]]
        assert priority[record.partition, record.offset] == b"urgent"
        assert record.offset == 0, f"row {number} is at offset {record.offset} of partition {record.partition}"
        assert record.timestamp_ms <= first_routine
    # row 45 is urgent but a later version of row 10's referral: it stays behind that version
    earlier, later = sorted((r for r in intake if r.key == key_of[SAME_REFERRAL[0]]), key=lambda r: r.offset)
    assert (priority[earlier.partition, earlier.offset], priority[later.partition, later.offset]) == (
        b"routine",
        b"urgent",
    )
    assert earlier.offset > 0  # in file order among the routine rows (row 10 of 240)
