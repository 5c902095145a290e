"""A large native file checked and sealed by worker processes (issue 20, goal 4: 100k DWP rows
in a minute needs more than the one core a Python process uses).

The pool must be the one-process send in everything but speed: the same problems for a bad
file (and nothing sent), the same records left out with --skip-invalid, the same order on the
topic (urgent referrals alone in the file first, versions in order), messages the hub opens to
the very records of the file, and a clear error, with nothing lost, when a worker dies."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest
from county import DWP, SENDER
from test_router import read_all
from test_urgent_rows_first import SAME_REFERRAL, URGENT_ROWS, dwp_records, write_dwp

from referral_broker import adapters
from referral_broker.cluster.clients import Record
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings, load_settings
from referral_broker.errors import BrokerError, ConfigError, PartnerInputError
from referral_broker.identity import load_identity
from referral_broker.parties import HUB, all_parties
from referral_broker.producers import file_pool, sending
from referral_broker.producers.checked import check_file
from referral_broker.producers.outbox import Outbox
from referral_broker.producers.sending import PartnerSender
from referral_broker.sealing.key_admin import init_parties

ROWS = 120
CHUNK = 7  # so two workers take turns many times in a small file


@pytest.fixture
def pooled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any file is large enough for the pool, and chunks are small."""
    monkeypatch.setattr(file_pool, "MIN_BYTES", 0)
    monkeypatch.setattr(file_pool, "CHUNK", CHUNK)


def with_problems(path: Path) -> Path:
    """Record 3 gets a bad id; records 20 and 106 (different workers' chunks) become the same
    referral version; record 55 loses its child's date of birth."""
    with path.open(encoding="utf-8", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    version, birth = header.index("VERSION"), header.index("CHILD_DOB")
    rows[3 - 1][0] = "not-a-uuid"
    rows[106 - 1][0], rows[106 - 1][version] = rows[20 - 1][0], rows[20 - 1][version]
    rows[55 - 1][birth] = ""
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def test_the_pool_finds_the_problems_and_totals_a_one_process_check_does(
    settings: Settings, tmp_path: Path, pooled: None
) -> None:
    path = with_problems(write_dwp(tmp_path / "dwp.csv", dwp_records(ROWS)))
    alone = check_file(DWP, path, skip_invalid=True)  # no settings: one process
    assert alone.pool is None
    pooled_file = check_file(DWP, path, skip_invalid=True, settings=settings.replace(send_workers=2))
    try:
        assert pooled_file.pool is not None and pooled_file.pool.workers == 2
        assert pooled_file.total == alone.total == ROWS - 4
        assert pooled_file.rejected == alone.rejected
        assert [r.split(": ")[1] for r in pooled_file.rejected] == ["record 3", "record 20", "record 55", "record 106"]
        assert "same referral id and version as record 106" in pooled_file.rejected[1]
        with pytest.raises(BrokerError, match="sealed by them"):
            iter(pooled_file)  # the records are in the workers, not here
    finally:
        pooled_file.close()
    assert all(not p.is_alive() for p in pooled_file.pool._processes)

    counted: list[int] = []
    with pytest.raises(PartnerInputError) as refused:
        check_file(DWP, path, settings=settings.replace(send_workers=3), on_checked=counted.append)
    with pytest.raises(PartnerInputError) as refused_alone:
        check_file(DWP, path)
    assert str(refused.value) == str(refused_alone.value)
    assert "4 record(s) rejected" in str(refused.value) and "nothing sent" in str(refused.value)
    assert counted and counted[-1] == ROWS  # the progress the check bar shows, every record once


def test_a_pooled_send_puts_on_the_topic_what_a_one_process_send_does(
    topics: Settings, kafka_bootstrap: str, tmp_path: Path, pooled: None
) -> None:
    """Same order on each partition (urgent rows alone in the file at the head, row 45 behind
    row 10, its earlier version), and the hub opens every message to the file's own record."""
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    records = dwp_records(ROWS)
    path = write_dwp(tmp_path / "dwp.csv", records)
    expected = [r for r in adapters.iter_file("dwp", path, urgent_first=True)]

    sender = PartnerSender(topics.replace(send_workers=2), kafka_bootstrap, DWP)
    report = sender.send_file(path)
    assert len(report.delivered) == ROWS and not report.queued and not report.rejected
    # the report lists the rows in the order they were sent: the one-process order
    assert [(s.referral_id, s.version) for s in report.delivered] == [
        (str(p.record["referral_id"]), int(p.record["version"])) for p in expected if p.record
    ]
    intake = read_all(topics, kafka_bootstrap, topic_name(topics, "intake", DWP))
    assert len(intake) == ROWS
    hub = load_identity(topics, kafka_bootstrap, HUB)
    from_file = {(str(p.record["referral_id"]), int(p.record["version"])): p.record for p in expected if p.record}
    for record in intake:  # each message opens, for the hub, to the very record the file holds
        opened = hub.opener.open(record)
        assert opened.record == from_file[opened.referral_id, opened.referral_version]
    # each worker's chunk (and the urgent rows sent ahead) goes out under one signature, each
    # message with its proof: the router verifies a signature per chunk, not per referral
    signatures = Counter(dict(r.headers)["rb-signature"] for r in intake)
    assert all("rb-batch-proof" in dict(r.headers) for r in intake)
    assert 1 < len(signatures) <= -(-ROWS // CHUNK) + 2 and max(signatures.values()) > 1  # a chunk, a worker's urgent rows
    key_of = {n: str(records[n - 1]["referral_id"]).encode() for n in range(1, ROWS + 1)}
    for number in URGENT_ROWS:
        (found,) = [r for r in intake if r.key == key_of[number]]
        assert found.offset == 0, f"urgent row {number} at offset {found.offset}"
    earlier, later = sorted((r for r in intake if r.key == key_of[SAME_REFERRAL[0]]), key=lambda r: r.offset)
    assert opened_version(hub, earlier) < opened_version(hub, later)

    checked = check_file(DWP, path, settings=topics.replace(send_workers=2))
    again = sender.send_checked(checked)  # the outbox still sends each referral version once
    assert len(again.already_sent) == ROWS and not again.delivered
    assert checked.pool is not None and checked.pool.already_kept == ROWS  # and nothing was sealed again
    assert len(read_all(topics, kafka_bootstrap, topic_name(topics, "intake", DWP))) == ROWS


def test_what_an_earlier_send_kept_is_not_sealed_again_and_keeps_its_place(
    topics: Settings, kafka_bootstrap: str, tmp_path: Path, pooled: None
) -> None:
    """Records the outbox already holds (an urgent one among them) come without a message, in
    the one-process order, and the workers seal exactly the others."""
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    path = write_dwp(tmp_path / "dwp.csv", dwp_records(ROWS))
    expected = [p for p in adapters.iter_file("dwp", path, urgent_first=True) if p.record]
    mid = {p.number: f"{p.record['referral_id']}:{p.record['version']}" for p in expected if p.record}
    kept_numbers = {n for n in mid if n % 3 == 0} | {URGENT_ROWS[0]}
    asked: list[list[str]] = []

    def kept(mids: list[str]) -> set[str]:
        asked.append(mids)
        return {mid[n] for n in kept_numbers}

    checked = check_file(DWP, path, settings=topics.replace(send_workers=2))
    assert checked.pool is not None
    directory = load_identity(topics, kafka_bootstrap, DWP).directory
    sealed = list(checked.pool.sealed(directory, kept=kept))
    # asked for every good record once, a chunk at a time (flat memory however long the file)
    assert sorted(m for chunk in asked for m in chunk) == sorted(mid.values()) and max(map(len, asked)) <= CHUNK
    assert [s.number for s in sealed] == [p.number for p in expected]
    assert {s.number for s in sealed if s.message is None} == kept_numbers
    assert checked.pool.already_kept == len(kept_numbers)
    hub = load_identity(topics, kafka_bootstrap, HUB)
    by_number = {p.number: p.record for p in expected}
    for referral in sealed:
        if referral.message is not None:
            message = referral.message
            produced = Record(message.topic, 0, 0, message.key, message.value, message.headers, 0)
            assert hub.opener.open(produced).record == by_number[referral.number]


def test_skip_invalid_through_the_pool_sends_the_good_rows_a_one_process_send_would(
    topics: Settings, kafka_bootstrap: str, tmp_path: Path, pooled: None
) -> None:
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    path = with_problems(write_dwp(tmp_path / "dwp.csv", dwp_records(ROWS)))
    stream = adapters.iter_file("dwp", path, urgent_first=True, skip_invalid=True)
    good = [(str(p.record["referral_id"]), int(p.record["version"])) for p in stream if p.record]
    assert len(good) == ROWS - 4

    checked = check_file(DWP, path, skip_invalid=True, settings=topics.replace(send_workers=2))
    report = PartnerSender(topics, kafka_bootstrap, DWP).send_checked(checked)
    assert [(s.referral_id, s.version) for s in report.delivered] == good
    assert [r.split(": ")[1] for r in report.rejected] == ["record 3", "record 20", "record 55", "record 106"]
    assert len(read_all(topics, kafka_bootstrap, topic_name(topics, "intake", DWP))) == ROWS - 4
    with pytest.raises(BrokerError, match="sealing workers have stopped"):
        PartnerSender(topics, kafka_bootstrap, DWP).send_checked(checked)  # a pool seals once


def opened_version(hub: object, record: object) -> int:
    return int(hub.opener.open(record).referral_version)  # type: ignore[attr-defined]


def test_a_worker_that_dies_stops_the_send_with_its_reason_and_nothing_is_lost(
    topics: Settings, kafka_bootstrap: str, tmp_path: Path, pooled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed mid-seal: the send raises naming the worker and its exit code; what was
    kept is delivered, nothing is half-sent, and sending the file again sends the rest once."""
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    rows = 600  # more sealed messages than the pipes hold, so the workers are still busy
    monkeypatch.setattr(sending, "BATCH", 20)
    path = write_dwp(tmp_path / "dwp.csv", dwp_records(rows))
    settings = topics.replace(send_workers=2)
    checked = check_file(DWP, path, settings=settings)
    assert checked.pool is not None
    victim = checked.pool._processes[1]
    delivered: list[int] = []

    def kill_after_first_batch(n: int) -> None:
        delivered.append(n)
        if victim.is_alive():
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(5)

    with pytest.raises(BrokerError, match=r"sealing worker 2 stopped \(exit code -9\)"):
        PartnerSender(settings, kafka_bootstrap, DWP).send_checked(checked, progress=kill_after_first_batch)
    assert all(not p.is_alive() for p in checked.pool._processes)
    with Outbox.open(settings, DWP) as outbox:
        assert outbox.summary().get("queued", 0) == 0  # what was kept went out
    first = len(read_all(topics, kafka_bootstrap, topic_name(topics, "intake", DWP)))
    assert 0 < first < rows

    report = PartnerSender(settings, kafka_bootstrap, DWP).send_file(path)
    assert len(report.delivered) == rows - first and len(report.already_sent) == first
    assert len(read_all(topics, kafka_bootstrap, topic_name(topics, "intake", DWP))) == rows


def test_a_worker_that_died_after_the_check_stops_the_send_before_anything_is_kept(
    topics: Settings, kafka_bootstrap: str, tmp_path: Path, pooled: None
) -> None:
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    path = write_dwp(tmp_path / "dwp.csv", dwp_records(ROWS))
    settings = topics.replace(send_workers=2)
    checked = check_file(DWP, path, settings=settings)
    assert checked.pool is not None
    victim = checked.pool._processes[0]
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(5)
    with pytest.raises(BrokerError, match=r"sealing worker 1 stopped \(exit code -9\)"):
        PartnerSender(settings, kafka_bootstrap, DWP).send_checked(checked)
    with Outbox.open(settings, DWP) as outbox:
        assert not any(outbox.summary().values())


def test_a_file_that_changes_during_the_check_is_refused(settings: Settings, tmp_path: Path, pooled: None) -> None:
    path = write_dwp(tmp_path / "dwp.csv", dwp_records(ROWS))
    touched = threading.Event()

    def touch(n: int) -> None:
        if not touched.is_set():
            touched.set()
            with path.open("a", encoding="utf-8") as handle:
                handle.write("")
            os.utime(path, ns=(1, 1))

    with pytest.raises(PartnerInputError, match="the file changed while it was being read"):
        check_file(DWP, path, settings=settings.replace(send_workers=2), on_checked=touch)


def test_a_file_changed_after_its_check_is_not_sent(
    topics: Settings, kafka_bootstrap: str, tmp_path: Path, pooled: None
) -> None:
    """The workers find the change when they start sealing; their error reaches the sender as
    the same class, and nothing is kept or sent."""
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    path = write_dwp(tmp_path / "dwp.csv", dwp_records(ROWS))
    settings = topics.replace(send_workers=2)
    checked = check_file(DWP, path, settings=settings)
    os.utime(path, ns=(1, 1))
    with pytest.raises(PartnerInputError, match=r"dwp\.csv: the file changed while it was being read"):
        PartnerSender(settings, kafka_bootstrap, DWP).send_checked(checked)
    assert checked.pool is not None and all(not p.is_alive() for p in checked.pool._processes)
    with Outbox.open(settings, DWP) as outbox:
        assert not any(outbox.summary().values())
    assert read_all(topics, kafka_bootstrap, topic_name(topics, "intake", DWP)) == []


def test_workers_are_used_for_large_files_and_configured_like_every_setting(
    settings: Settings, tmp_path: Path
) -> None:
    small = tmp_path / "small.csv"
    small.write_text("x\n", encoding="utf-8")
    big = tmp_path / "big.csv"
    with big.open("wb") as handle:
        handle.truncate(file_pool.MIN_BYTES)
    assert file_pool.workers_for(settings.replace(send_workers=3), small) == 1
    assert file_pool.workers_for(settings.replace(send_workers=3), big) == 3
    assert file_pool.workers_for(settings.replace(send_workers=1), big) == 1
    auto = file_pool.workers_for(settings.replace(send_workers=0), big)
    assert auto == min(os.cpu_count() or 1, file_pool.MAX_WORKERS) or auto == 1
    assert load_settings(environ={"REFERRAL_BROKER_SEND_WORKERS": "2"}).send_workers == 2
    with pytest.raises(ConfigError, match="workers"):
        load_settings(environ={"REFERRAL_BROKER_SEND_WORKERS": "-1"})


FORMATS = [("schools", None), ("schools", "ctf"), ("health", None), ("health", "xml"), ("police", None), ("charities", None)]


@pytest.mark.parametrize(("kind", "fmt"), FORMATS, ids=[f"{k}-{f or 'own'}" for k, f in FORMATS])
def test_every_partner_format_seals_through_the_pool_to_the_records_one_process_reads(
    county: Settings, kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, fmt: str | None
) -> None:
    """Each format (CSV, JSON, FHIR JSON and XML, DfE CTF) read by two workers taking records in
    turn: the same count, and each sealed message opens, for the hub, to the record a
    one-process read gives, in the same order."""
    monkeypatch.setattr(file_pool, "CHUNK", 1)
    examples = adapters.load_file(kind, adapters.example_file(kind)).referrals
    records = []
    for n in range(12):
        record = dict(examples[n % len(examples)])
        record["referral_id"] = uuid.uuid4()
        records.append(record)
    rendered = adapters.render_file(kind, records, tmp_path, fmt=fmt)
    assert rendered.path is not None and rendered.count == 12
    party = SENDER[kind]
    expected = [p.record for p in adapters.iter_file(kind, rendered.path, urgent_first=True)]

    pool = file_pool.FilePool(kind, party, rendered.path, county, workers=2, skip_invalid=False)
    with pool:
        assert pool.total == len(expected) == 12 and not pool.rejected
        sealed = list(pool.sealed(load_identity(county, kafka_bootstrap, party).directory))
    hub = load_identity(county, kafka_bootstrap, HUB)
    opened = [
        hub.opener.open(Record(s.message.topic, 0, 0, s.message.key, s.message.value, s.message.headers, 0)).record
        for s in sealed
    ]
    assert opened == expected


def test_send_from_the_command_line_checks_and_seals_a_large_file_with_workers(
    county: Settings, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The real command in a process of its own (the workers are spawned from it) on a DWP
    batch over ``MIN_BYTES``: every row on the intake topic, the urgent last row first."""
    from referral_broker.producers.batch_bench import write_batch

    path = tmp_path / "dwp-batch.csv"
    size, urgent_id = write_batch(path, 7000)
    assert size >= file_pool.MIN_BYTES
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "REFERRAL_BROKER_TOPIC_PREFIX": county.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": county.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(county.paths_data_dir),
        "REFERRAL_BROKER_SEND_WORKERS": "2",
    }
    done = subprocess.run(
        [sys.executable, "-m", "referral_broker.cli.main", "--log-level", "info", "send", "--as", DWP, "--file", str(path), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    (pooled,) = [e for e in logged if e.get("event") == "file checked by worker processes"]
    assert pooled["workers"] == 2 and pooled["count"] == 7000
    report = json.loads(done.stdout)
    assert len(report["delivered"]) == 7000 and report["delivered"][0] == urgent_id
    assert len(read_all(county, kafka_bootstrap, topic_name(county, "intake", DWP))) == 7000


def test_the_dry_run_checks_a_large_file_with_workers_and_reports_what_one_process_does(tmp_path: Path) -> None:
    """``validate --as dwp`` on a batch over ``MIN_BYTES`` with problems in two workers' chunks:
    checked by two workers (the log says so), with the report and exit code of a one-process
    check, and no broker or key touched."""
    from referral_broker.producers.batch_bench import write_batch

    path = tmp_path / "dwp-batch.csv"
    size, _ = write_batch(path, 7000)
    assert size >= file_pool.MIN_BYTES
    with path.open(encoding="utf-8", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    rows[10][0], rows[6500][header.index("CHILD_DOB")] = "not-a-uuid", ""
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])

    def dry_run(workers: int) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # nothing listens: the dry run needs no broker
            "REFERRAL_BROKER_DATA_DIR": str(tmp_path / "none"),
            "REFERRAL_BROKER_SEND_WORKERS": str(workers),
        }
        args = ["--log-level", "info", "validate", "--as", DWP, "--file", str(path), "--json"]
        return subprocess.run(
            [sys.executable, "-m", "referral_broker.cli.main", *args], env=env, capture_output=True, text=True, timeout=300
        )

    pooled, alone = dry_run(2), dry_run(1)
    assert pooled.returncode == alone.returncode == PartnerInputError.exit_code, pooled.stderr[-2000:]
    logged = [json.loads(line) for line in pooled.stderr.splitlines() if line.startswith("{")]
    (checked,) = [e for e in logged if e.get("event") == "file checked by worker processes"]
    assert checked["workers"] == 2 and checked["count"] == 6998
    assert "worker processes" not in alone.stderr
    report = json.loads(pooled.stdout)
    assert report == json.loads(alone.stdout)
    assert (report["records"], report["valid"], report["invalid"]) == (7000, 6998, 2)
    assert [p["record"] for p in report["problems"]] == [11, 6501]


def test_a_program_without_a_main_guard_can_use_the_workers(tmp_path: Path) -> None:
    """A partner's own script calls the library at its top level, with no ``__main__`` guard:
    the workers never import it (``multiprocessing``'s spawn would, and each worker would start
    the script's send again)."""
    path = write_dwp(tmp_path / "dwp.csv", dwp_records(ROWS))
    script = tmp_path / "partner_script.py"
    script.write_text(
        "import sys\n"
        "from referral_broker.config import load_settings\n"
        "from referral_broker.producers import file_pool\n"
        "from referral_broker.producers.checked import check_file\n"
        "file_pool.MIN_BYTES = 0\n"
        "print('script ran', flush=True)\n"
        "checked = check_file(sys.argv[1], sys.argv[2], settings=load_settings().replace(send_workers=2))\n"
        "print('workers', checked.pool.workers, 'total', checked.total, flush=True)\n"
        "checked.close()\n",
        "utf-8",
    )
    env = {**os.environ, "REFERRAL_BROKER_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(
        [sys.executable, str(script), DWP, str(path)], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["script ran", f"workers 2 total {ROWS}"]  # the script ran once


def test_the_batch_bench_counts_the_workers_while_they_run(settings: Settings, tmp_path: Path, pooled: None) -> None:
    from referral_broker.producers import batch_bench

    path = write_dwp(tmp_path / "dwp.csv", dwp_records(ROWS))
    alone = batch_bench.rss_mb()
    with file_pool.FilePool(DWP, DWP, path, settings, workers=2, skip_invalid=False) as pool:
        assert sorted(file_pool.worker_pids()) == sorted(w.pid for w in pool._processes)
        assert batch_bench.rss_mb() > alone + 40  # two Pythons with the project imported
    assert file_pool.worker_pids() == []
    assert all(w.exitcode == 0 for w in pool._processes)  # told to stop, they stopped
