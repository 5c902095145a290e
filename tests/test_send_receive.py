"""``send`` and ``receive`` on the real broker: native in at a partner, native out at the
recipients, nothing partial sent from a bad file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from county import CHARITY, POLICE, SCHOOL, schools_of

from referral_broker.adapters import example_file
from referral_broker.cluster.clients import build_consumer, drain
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.router import Router
from referral_broker.errors import PartnerInputError
from referral_broker.parties import all_parties
from referral_broker.sealing.key_admin import init_parties


@pytest.fixture
def cli(topics: Settings, kafka_bootstrap: str):
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "REFERRAL_BROKER_TOPIC_PREFIX": topics.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": topics.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(topics.paths_data_dir),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "referral_broker.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    return run


def count_on(settings: Settings, bootstrap: str, topic: str) -> int:
    consumer = build_consumer(settings, bootstrap, [topic], group_id=None)
    try:
        return sum(len(b) for b in drain(consumer, idle_s=2))
    finally:
        consumer.close()


def police_example_in_county(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The police example with each notification naming a registered school of its district
    (the example's own URNs are not in the county): the file, and referral id -> school party."""
    notifications = json.loads(example_file("police").read_text())
    schools = {}
    for n in notifications:
        n["school"]["urn"] = schools_of(n["district"])[0]
        schools[n["reference"]] = f"school-{n['school']['urn']}"
    path = tmp_path / "police.json"
    path.write_text(json.dumps(notifications))
    return path, schools


def test_native_in_native_out(cli, topics: Settings, kafka_bootstrap: str, tmp_path: Path) -> None:
    example, school_of = police_example_in_county(tmp_path)
    encompass = "83451088-6e06-4e2a-85f9-fc80c63482c2"
    school = school_of[encompass]
    other_schools = sorted(set(school_of.values()) - {school})
    assert other_schools  # the other notification names another school
    sent = cli("send", "--as", POLICE, "--file", str(example), "--json")
    assert sent.returncode == 0, sent.stderr
    ids = json.loads(sent.stdout)["delivered"]
    assert len(ids) == len(json.loads(example.read_text()))
    Router(topics, kafka_bootstrap).run(stop_when_idle=3)
    outputs = {}
    for party in (
        school,
        *other_schools,
        "district-cambridge",
        "district-east-cambs",
        "district-fenland",
        "district-huntingdonshire",
        "district-south-cambs",
    ):
        got = cli("receive", "--as", party, "--json", "--out", str(tmp_path / party), "--stop-when-idle", "2")
        assert got.returncode == 0, got.stderr
        outputs[party] = json.loads(got.stdout)
    teams = [r for p, o in outputs.items() if p.startswith("district-") for r in o["received"]]
    assert sorted(r["referral_id"] for r in teams) == sorted(ids)
    for party, o in outputs.items():
        # one file for a party that received anything (only referrals travel here), none otherwise
        assert len(o["written"]) == (1 if o["received"] else 0), party
        for path in o["written"]:
            assert Path(path).stat().st_size > 0
    # Operation Encompass: the child's school hears of the child, not of the household or the detail.
    # Both example notifications are domestic abuse, but the purpose needs consent: the first was never
    # asked, the second is shared under an approved no-consent override, so only it reaches its school.
    assert [r["referral_id"] for r in outputs[school]["received"]] == [encompass]
    assert all(outputs[other]["received"] == [] for other in other_schools)
    assert outputs[school]["written"][0].endswith(".csv")
    for item in outputs[school]["received"]:
        assert "household.given_name" in item["withheld"] and "concerns.detail" in item["withheld"]


def test_bad_file_sends_nothing_unless_skip_invalid(
    cli, topics: Settings, kafka_bootstrap: str, tmp_path: Path
) -> None:
    lines = example_file("schools").read_text().splitlines()
    header = lines[0].split(",")
    upn = header.index("UPN")
    row = lines[1].split(",")
    row[upn] = "A801200005001"  # wrong check letter
    bad = tmp_path / "schools.csv"
    bad.write_text("\n".join([lines[0], *lines[1:], ",".join(row)]) + "\n")
    refused = cli("send", "--as", SCHOOL, "--file", str(bad))
    assert refused.returncode == PartnerInputError.exit_code, refused.stderr
    assert str(bad.name) in refused.stderr and "UPN" in refused.stderr and "identifiers.upn" in refused.stderr
    assert "A801200005001" not in refused.stderr and "Traceback" not in refused.stderr
    assert count_on(topics, kafka_bootstrap, topic_name(topics, "intake", SCHOOL)) == 0
    skipped = cli("send", "--as", SCHOOL, "--file", str(bad), "--skip-invalid", "--json")
    assert skipped.returncode == 0, skipped.stderr
    data = json.loads(skipped.stdout)
    assert len(data["delivered"]) == len(lines) - 1 and len(data["rejected"]) == 1
    assert count_on(topics, kafka_bootstrap, topic_name(topics, "intake", SCHOOL)) == len(lines) - 1


def test_canonical_lines_from_synth(cli, topics: Settings, kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "synth.jsonl"
    assert cli("synth", "--count", "5", "--seed", "3", "--out", str(out)).returncode == 0
    sent = cli("send", "--as", CHARITY, "--file", str(out), "--format", "canonical", "--json")
    assert sent.returncode == 0, sent.stderr
    assert len(json.loads(sent.stdout)["delivered"]) == 5
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text(out.read_text() + "{not json\n")
    refused = cli("send", "--as", CHARITY, "--file", str(garbage), "--format", "canonical")
    assert refused.returncode == PartnerInputError.exit_code and "record 6: not valid JSON" in refused.stderr
