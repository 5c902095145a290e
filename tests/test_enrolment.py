"""Enrolment on the real secured broker (issue 14): ``orgs enrol ORG --out DIR`` writes what one
organisation's machine needs and nothing more, and a partner machine sends and receives with
only that folder (a subprocess whose environment names nothing but the folder's config), through
the router running as its own identity; ``orgs rotate-credentials`` makes the old password fail;
``orgs disable`` makes the credentials stop working; bad input is one clear line."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_acls import cli, secured_broker, small_county

from referral_broker.cluster import acls
from referral_broker.cluster import security as sec
from referral_broker.cluster.clients import build_producer
from referral_broker.config import Settings, load_settings
from referral_broker.errors import BrokerAuthenticationError, ConfigError, NotAuthorisedError, RegistryError
from referral_broker.schemas.json_form import to_json_form
from referral_broker.schemas.registry import referral_schema
from referral_broker.sealing.trust import anchor_path

# Parties (organisations of the shipped county), named once.
SCHOOL = "school-110123"  # fenland
TEAM = "district-fenland"
POLICE = "police-35"
OTHER = "school-110245"  # registered, never enrolled
PARTIES = [SCHOOL, TEAM, POLICE, OTHER]
FILES = ["ca.pem", "kafka-password", "referral-broker.toml", "trust-anchor.pem"]


@dataclass
class Hub:
    settings: Settings
    bootstrap: str
    root: Path  # folders of the "machines"


@pytest.fixture(scope="module")
def hub(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    with secured_broker(kafka_bootstrap, tmp_path_factory.mktemp("enrol-cache")) as bootstrap:
        settings = load_settings(
            environ={},
            kafka_bootstrap_servers=bootstrap,
            kafka_topic_prefix=f"e{uuid.uuid4().hex[:10]}.",
            kafka_topic_profile="test",
            kafka_request_timeout_ms=10_000,
            paths_data_dir=tmp_path_factory.mktemp("hub-data"),
        )
        small_county(settings, bootstrap, PARTIES)
        for args in (("keys", "root", "init"), ("keys", "init", "--party", "council", "--party", TEAM), ("acl", "apply")):
            done = cli(settings, bootstrap, *args)
            assert done.exit_code == 0, (args, done.output)
        try:
            yield Hub(settings, bootstrap, tmp_path_factory.mktemp("machines"))
        finally:
            users = [acls.user_name(settings, n) for n in (*PARTIES, *acls.SERVICES)]
            from test_acls import clean_up

            clean_up(settings, bootstrap, users)


def machine(folder: Path, *args: str, data: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """A command on the organisation's own machine: only its folder's config, its own HOME
    (``data``: another data folder, for the router, which routes with the hub's keys)."""
    home = folder.parent / f"{folder.name}-home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "REFERRAL_BROKER_CONFIG": str(folder / "referral-broker.toml"),
    }
    if data is not None:
        env["REFERRAL_BROKER_DATA_DIR"] = str(data)
    try:
        return subprocess.run(
            [sys.executable, "-m", "referral_broker.cli.main", *args],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"{' '.join(args)} did not finish in {timeout:.0f} s: {err[-3000:]}")


def enrol(hub: Hub, org: str) -> Path:
    folder = hub.root / org
    done = cli(hub.settings, hub.bootstrap, "orgs", "enrol", org, "--out", str(folder), "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["user"] == acls.user_name(hub.settings, org)
    return folder


def certify(hub: Hub, folder: Path, org: str) -> None:
    request = folder / "key-request.json"
    made = machine(folder, "keys", "generate", "--as", org, "--public-out", str(request))
    assert made.returncode == 0, made.stderr
    done = cli(hub.settings, hub.bootstrap, "keys", "certify", org, "--public", str(request))
    assert done.exit_code == 0, done.output


def encompass_referral(folder: Path) -> tuple[Path, str]:
    """A police referral naming the school's URN (Operation Encompass): routed to that school."""
    from test_org_routing import encompass

    record = encompass(3, SCHOOL.removeprefix("school-"))
    path = folder / "referral.jsonl"
    path.write_text(json.dumps(to_json_form(record, referral_schema())) + "\n", encoding="utf-8")
    return path, str(record["referral_id"])


# -- the folder ----------------------------------------------------------------------------------
def test_enrol_writes_only_what_the_machine_needs(hub: Hub) -> None:
    folder = enrol(hub, SCHOOL)
    assert sorted(p.name for p in folder.iterdir()) == FILES
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "kafka-password").stat().st_mode) == 0o600
    text = (folder / "referral-broker.toml").read_text()
    settings = load_settings(folder / "referral-broker.toml", environ={})
    assert settings.kafka_sasl_username == acls.user_name(hub.settings, SCHOOL)
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_password_file == folder / "kafka-password"
    assert settings.kafka_topic_prefix == hub.settings.kafka_topic_prefix
    assert settings.paths_data_dir == folder / "data"
    assert anchor_path(settings) == folder / "trust-anchor.pem"
    assert (folder / "trust-anchor.pem").read_bytes() == anchor_path(hub.settings).read_bytes()
    cafile = sec.client_security(hub.settings, hub.bootstrap).cafile
    assert cafile is not None and (folder / "ca.pem").read_bytes() == cafile.read_bytes()
    # nothing of the administrator's, no private key, no other organisation
    assert sec.ADMIN_USER not in text and "PRIVATE KEY" not in "".join(p.read_text() for p in folder.iterdir())
    assert OTHER not in text and TEAM not in text
    password = (folder / "kafka-password").read_text().strip()
    assert password not in text and len(password) >= 24


def test_a_partner_machine_sends_and_receives_with_only_its_folder(hub: Hub) -> None:
    police, school, router = enrol(hub, POLICE), enrol(hub, SCHOOL), enrol(hub, "router")
    certify(hub, police, POLICE)
    certify(hub, school, SCHOOL)
    path, rid = encompass_referral(police)
    sent = machine(police, "send", "--as", POLICE, "--file", str(path), "--format", "canonical", "--json")
    assert sent.returncode == 0, sent.stderr + sent.stdout
    assert json.loads(sent.stdout)["delivered"] == [rid]

    # the router's machine: its own folder, the hub's key store
    routed = machine(router, "route", "--stop-when-idle", "3", "--json", data=hub.settings.paths_data_dir, timeout=150)
    assert routed.returncode == 0, routed.stderr[-3000:]
    stats = json.loads(routed.stdout)
    assert stats["routed"] == 1 and stats["dead_lettered"] == 0, json.dumps(stats)

    got = machine(school, "receive", "--as", SCHOOL, "--json")
    assert got.returncode == 0, got.stderr + got.stdout
    received = json.loads(got.stdout)["received"]
    assert [r["referral_id"] for r in received] == [rid]
    assert received[0]["record"]["child"]["given_name"]

    # with that folder's identity Kafka refuses everything else: one line, its own exit code
    from referral_broker.cluster.clients import build_consumer

    own = load_settings(school / "referral-broker.toml", environ={})
    team_out = f"{hub.settings.kafka_topic_prefix}referrals.out.{TEAM}"
    with pytest.raises(NotAuthorisedError, match=f"^not authorised to read topic {team_out}( |$)"):
        build_consumer(own, hub.bootstrap, [team_out], group_id=None)
    keys = f"{hub.settings.kafka_topic_prefix}keys.directory"
    producer = build_producer(own, hub.bootstrap)
    try:
        producer.send(keys, b"{}", b"council")
        with pytest.raises(NotAuthorisedError, match=f"^not authorised to write topic {keys}$"):
            producer.flush(timeout_s=20)
    finally:
        producer.close()
    refused = machine(school, "dlq", "list")
    assert refused.returncode == NotAuthorisedError.exit_code, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith(f"Error: not authorised to read topic {hub.settings.kafka_topic_prefix}referrals.dlq")


# -- rotation and disabling ------------------------------------------------------------------------------
def _producer_with(hub: Hub, user: str, password: str) -> None:
    settings = hub.settings.replace(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username=user,
        kafka_sasl_password=password,
        kafka_ssl_cafile=sec.client_security(hub.settings, hub.bootstrap).cafile,
    )
    build_producer(settings, hub.bootstrap).close()


def test_rotating_credentials_refuses_the_old_password(hub: Hub) -> None:
    folder = enrol(hub, SCHOOL)
    user = acls.user_name(hub.settings, SCHOOL)
    old = (folder / "kafka-password").read_text().strip()
    _producer_with(hub, user, old)  # works before
    done = cli(hub.settings, hub.bootstrap, "orgs", "rotate-credentials", SCHOOL, "--out", str(folder))
    assert done.exit_code == 0, done.output
    new = (folder / "kafka-password").read_text().strip()
    assert new != old and new not in done.output
    assert stat.S_IMODE((folder / "kafka-password").stat().st_mode) == 0o600
    with pytest.raises(BrokerAuthenticationError, match=f"authentication failed for user {user}"):
        _producer_with(hub, user, old)
    _producer_with(hub, user, new)
    listed = machine(folder, "orgs", "show", SCHOOL, "--json")  # the folder still works as is
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["party"] == SCHOOL


def test_disabling_an_organisation_deletes_its_credentials_and_bindings(hub: Hub, tmp_path: Path) -> None:
    folder = enrol(hub, OTHER)
    user = acls.user_name(hub.settings, OTHER)
    password = (folder / "kafka-password").read_text().strip()
    _producer_with(hub, user, password)
    done = cli(hub.settings, hub.bootstrap, "orgs", "disable", OTHER, "--json")
    assert done.exit_code == 0, done.output
    kafka = json.loads(done.stdout)["kafka"]
    assert kafka["credentials_deleted"] and kafka["bindings_deleted"] > 0 and kafka["quotas_removed"] > 0
    with pytest.raises(BrokerAuthenticationError, match=f"authentication failed for user {user}"):
        _producer_with(hub, user, password)
    tried = machine(folder, "receive", "--as", OTHER)
    assert tried.returncode == BrokerAuthenticationError.exit_code, tried.stderr
    # the plan agrees: no bindings for a disabled organisation, and the cluster holds none
    checked = cli(hub.settings, hub.bootstrap, "acl", "check", "--json")
    assert checked.exit_code == 0, checked.output
    plan = cli(hub.settings, hub.bootstrap, "acl", "plan", "--json")
    assert not [b for b in json.loads(plan.output)["bindings"] if b["principal"] == user]
    assert not [q for q in json.loads(plan.output)["quotas"] if q["user"] == user]
    # and it cannot be enrolled again while disabled
    again = cli(hub.settings, hub.bootstrap, "orgs", "enrol", OTHER, "--out", str(tmp_path / "again"))
    assert isinstance(again.exception, RegistryError) and "disabled" in str(again.exception)


def test_bad_enrolment_input_is_one_clear_line(hub: Hub, tmp_path: Path) -> None:
    unknown = cli(hub.settings, hub.bootstrap, "orgs", "enrol", "school-999999", "--out", str(tmp_path / "x"))
    assert isinstance(unknown.exception, RegistryError), unknown.output
    assert not (tmp_path / "x").exists()
    never = cli(hub.settings, hub.bootstrap, "orgs", "rotate-credentials", "ops", "--out", str(tmp_path / "y"))
    assert isinstance(never.exception, ConfigError) and "orgs enrol ops" in str(never.exception)
    assert not (tmp_path / "y").exists()
