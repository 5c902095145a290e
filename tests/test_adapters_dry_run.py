"""The dry run, ``validate --as KIND --file F [--json]``: a partner checks its own file with no
broker and no keys, and the answer is the one ``send`` gives on the real broker: the same exit
code, the same problems, the same count of records that would go.

The fixtures are every broken file of ``test_adapters_messages`` (word-for-word messages), the
UK Core Bundles in JSON and XML, a DfE CTF, and every partner's example file.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from county import SENDER
from test_adapters_messages import CASES
from test_adapters_uk_core import as_xml, message_bundle

from referral_broker import adapters
from referral_broker.config import Settings
from referral_broker.errors import EmptyInputError, PartnerInputError
from referral_broker.parties import all_parties
from referral_broker.sealing.key_admin import init_parties

NOW = dt.datetime(2025, 10, 1, tzinfo=dt.UTC)


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "referral_broker.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def dry_run(tmp_path: Path, kind: str, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # No broker (an address nothing listens on) and an empty data folder: no keys.
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "REFERRAL_BROKER_DATA_DIR": str(tmp_path / "none")}
    return run(env, "validate", "--as", kind, "--file", str(path), *extra)


def fixtures(folder: Path) -> list[tuple[str, str, Path]]:
    """(name, kind, file) for every fixture, written under ``folder``."""
    found = []
    for name, case in CASES.items():
        path = folder / name.replace(" ", "-") / case.file_name
        path.parent.mkdir(parents=True)
        path.write_text(case.data, "utf-8")
        found.append((name, case.kind, path))
    for syntax in ("json", "xml"):
        path = folder / f"uk-core-{syntax}" / f"health.{syntax}"
        path.parent.mkdir()
        bundle = message_bundle()
        path.write_bytes(as_xml(bundle) if syntax == "xml" else json.dumps(bundle).encode())
        found.append((f"UK Core message Bundle ({syntax})", "health", path))
    referrals = adapters.load_file("schools", adapters.example_file("schools"), now=NOW).referrals
    ctf = folder / "ctf"
    rendered = adapters.render_file("schools", referrals, ctf, fmt="ctf").path
    assert rendered is not None
    # sent as schools too, so the (id, version) pairs are new to the outbox: new ids
    text = rendered.read_text("utf-8")
    for referral in referrals:
        old = str(referral["referral_id"])
        text = text.replace(old, old[:-4] + "beef")
    rendered.write_text(text, "utf-8")
    found.append(("DfE CTF", "schools", rendered))
    for kind in adapters.adapter_kinds():
        found.append((f"{kind} example", kind, adapters.example_file(kind)))
    return found


def test_the_dry_run_reports_in_json_and_words(tmp_path: Path) -> None:
    case = CASES["repeated referral id and version"]
    path = tmp_path / case.file_name
    path.write_text(case.data, "utf-8")
    proc = dry_run(tmp_path, case.kind, path, "--json")
    assert proc.returncode == PartnerInputError.exit_code
    report = json.loads(proc.stdout)
    assert report == {
        "file": "police.json",
        "as": "police",
        "format": "JSON",
        "records": 3,
        "valid": 1,
        "invalid": 2,
        "problems": [
            {
                "record": 1,
                "path": '"reference" (referral_id)',
                "reason": "the same referral id and version as record 3: a file holds each once",
            },
            {
                "record": 3,
                "path": '"reference" (referral_id)',
                "reason": "the same referral id and version as record 1: a file holds each once",
            },
        ],
        "warnings": [],
        "error": {
            "class": "PartnerInputError",
            "exit_code": 7,
            "message": f"{case.message}; nothing would be sent",
        },
    }
    words = dry_run(tmp_path, case.kind, path)
    assert words.returncode == 7
    assert words.stdout.splitlines() == [*case.problems, "police.json (JSON) as police: 3 record(s): 1 valid, 2 invalid."]
    assert words.stderr == f"Error: {case.message}; nothing would be sent\n"
    skipping = dry_run(tmp_path, case.kind, path, "--skip-invalid", "--json")
    assert skipping.returncode == 0 and json.loads(skipping.stdout)["error"] is None


def test_an_empty_file_exits_with_its_own_code(tmp_path: Path) -> None:
    path = tmp_path / "charities.json"
    path.write_text("[]", "utf-8")
    proc = dry_run(tmp_path, "charities", path, "--json")
    assert proc.returncode == EmptyInputError.exit_code == 71
    assert json.loads(proc.stdout)["error"] == {
        "class": "EmptyInputError",
        "exit_code": 71,
        "message": "charities.json: the JSON array is empty: no records",
    }


def test_a_uk_core_dry_run_names_its_format_and_warnings(tmp_path: Path) -> None:
    path = tmp_path / "health.xml"
    path.write_bytes(as_xml(message_bundle()))
    report = json.loads(dry_run(tmp_path, "health", path, "--json").stdout)
    assert (report["format"], report["valid"], report["error"]) == ("FHIR XML", 1, None)
    assert len(report["warnings"]) == 2 and "interpreterRequired" in report["warnings"][0]


def test_the_canonical_lines_mode_still_works(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"referral_id": 1}\n\n', "utf-8")
    proc = run({**os.environ}, "validate", "--file", str(bad), "--json")
    assert proc.returncode == 4
    report = json.loads(proc.stdout)
    assert (report["records"], report["invalid"]) == (1, 1)


@pytest.fixture
def send_env(topics: Settings, kafka_bootstrap: str) -> dict[str, str]:
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "REFERRAL_BROKER_TOPIC_PREFIX": topics.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": topics.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(topics.paths_data_dir),
    }


def test_the_dry_run_and_send_agree_on_every_fixture(send_env: dict[str, str], tmp_path: Path) -> None:
    checked = 0
    for name, kind, path in fixtures(tmp_path / "fixtures"):
        sender = SENDER[kind]  # the county's organisation sending in that format
        dry = dry_run(tmp_path, sender, path, "--json")
        report = json.loads(dry.stdout)
        assert report["as"] == sender, name
        sent = run(send_env, "send", "--as", sender, "--file", str(path), "--json")
        assert dry.returncode == sent.returncode, (name, dry.stderr, sent.stderr)
        if sent.returncode == 0:
            data = json.loads(sent.stdout)
            assert report["error"] is None, name
            assert len(data["delivered"]) + len(data["already_sent"]) == report["valid"] > 0, name
        else:
            assert report["error"]["exit_code"] == sent.returncode, name
            # send --json prints an error object with the dry run's fields, problems and class
            failed = json.loads(sent.stdout)
            assert set(failed) == set(report) | {"delivered", "queued", "already_sent", "rejected"}, name
            assert failed["problems"] == report["problems"], name
            assert failed["error"]["class"] == report["error"]["class"], name
            assert failed["error"]["exit_code"] == sent.returncode, name
            assert failed["delivered"] == [], name
            said = sent.stderr.strip().removeprefix("Error: ").removesuffix("; nothing sent")
            assert report["error"]["message"].removesuffix("; nothing would be sent") == said, name
            if name in CASES:
                assert said == CASES[name].message, name
        checked += 1
    assert checked == len(CASES) + 3 + len(adapters.adapter_kinds())


def test_a_rendered_health_xml_file_is_what_the_dry_run_reads(tmp_path: Path) -> None:
    referrals = adapters.load_file("health", adapters.example_file("health"), now=NOW).referrals
    out = io.StringIO()
    adapters.render_file("health", referrals, out, fmt="xml")
    path = tmp_path / "health.xml"
    path.write_text(out.getvalue(), "utf-8")
    report = json.loads(dry_run(tmp_path, "health", path, "--json").stdout)
    assert (report["format"], report["records"], report["valid"]) == ("FHIR XML", 2, 2)
