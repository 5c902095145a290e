"""docker-compose.yml's services without Docker, on the real secured broker (issue 14, Build 5).

The commands and environments are read from docker-compose.yml, so this cannot drift from it.
Each named volume is a folder; each service sees its volumes at their container paths through
its own root folder (symbolic links), so a path in the file (``/secrets/kafka-password``) is
the same file here as in the containers. What changes: the broker address (the test broker), a
fresh topic prefix (user names are ``<prefix><name>`` under a prefix, as ``acls.user_name``
makes them), the ``test`` topic profile, and the ``pki`` volume, which holds the test broker's
administrator password and CA instead of the broker's own.

The setup service runs (twice: the second run changes nothing and keeps the passwords); then a
school sends a referral, the router service routes it as ``router`` and the district team's
inbox service (``inbox serve``, its exact command) stores it as ``district-fenland``, with its
delivery watcher in its own group, and writes nothing to the hub's data volume it mounts
read-only. Neither identity can do what only the administrator may.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from county import FORMAT, SCHOOL, in_county
from test_acls import clean_up, free_port
from test_compose import SERVICES, mounts

from referral_broker.audit_chain import chain_headers, read_topic
from referral_broker.audit_log import read_event_value
from referral_broker.cluster import acls
from referral_broker.cluster import security as sec
from referral_broker.config import Settings, load_settings
from referral_broker.errors import ConfigError, NotAuthorisedError

TEAM = "district-fenland"
INBOX = next(n for n, s in SERVICES.items() if s["command"][:2] == ["inbox", "serve"] and TEAM in s["command"])


@dataclass
class Deployment:
    settings: Settings  # the administrator's, under the prefix, with the hub's data volume
    bootstrap: str
    root: Path  # volumes/<volume>, containers/<service>/<container path>, home
    admin_user: str
    first_setup: dict[str, Any] | None = None  # what the setup service's first run reported

    @property
    def prefix(self) -> str:
        return self.settings.kafka_topic_prefix

    def volume(self, name: str) -> Path:
        return self.root / "volumes" / name

    def container(self, service: str) -> Path:
        """The service's root folder: each of its mounts a link to the volume's folder."""
        top = self.root / "containers" / service
        if not top.exists():
            for target, (volume, _ro) in mounts(SERVICES[service]).items():
                link = top / target.lstrip("/")
                link.parent.mkdir(parents=True, exist_ok=True)
                self.volume(volume).mkdir(parents=True, exist_ok=True)
                link.symlink_to(self.volume(volume), target_is_directory=True)
        return top

    def path(self, service: str, container_path: str) -> Path:
        return self.container(service) / container_path.lstrip("/")

    def env(self, service: str) -> dict[str, str]:
        """The service's environment from the file, its paths inside its own root."""
        env: dict[str, str] = {}
        for key, value in SERVICES[service]["environment"].items():
            value = str(value)
            env[key] = str(self.path(service, value)) if value.startswith("/") else value
        user = env["KAFKA_SASL_USERNAME"]
        home = self.root / "home"
        home.mkdir(exist_ok=True)
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            KAFKA_SASL_USERNAME=self.admin_user if user == sec.ADMIN_USER else self.prefix + user,
            REFERRAL_BROKER_TOPIC_PREFIX=self.prefix,
            REFERRAL_BROKER_TOPIC_PROFILE="test",
            # the GOV.UK Frontend assets the image installs when it is built
            REFERRAL_BROKER_CACHE_DIR=str(load_settings(environ={}).paths_cache_dir),
            PATH=os.environ.get("PATH", "/usr/bin:/bin"),
            HOME=str(home),
        )
        return env

    def args(self, service: str, *extra: str) -> list[str]:
        command = [str(self.path(service, a)) if a.startswith("/") else a for a in SERVICES[service]["command"]]
        return [*command, *extra]

    def run(self, service: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """A command in the service's container: only its environment and its volumes."""
        try:
            return subprocess.run(
                [sys.executable, "-m", "referral_broker.cli.main", *args],
                env=self.env(service),
                cwd=self.root / "home",
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            pytest.fail(f"{service}: {' '.join(args)} did not finish in {timeout:.0f} s: {err[-3000:]}")


def identities() -> list[str]:
    """Who the setup service enrols: the router and the teams its command names."""
    command = SERVICES["setup"]["command"]
    return [acls.ROUTER, *(command[i + 1] for i, a in enumerate(command) if a == "--team")]


@pytest.fixture(scope="module")
def deployment(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("compose")
    admin = sec.client_security(load_settings(environ={}, kafka_bootstrap_servers=kafka_bootstrap), kafka_bootstrap)
    assert admin.sasl and admin.cafile and admin.password and admin.username, "the test broker is not secured"
    d = Deployment(
        load_settings(
            environ={},
            kafka_bootstrap_servers=kafka_bootstrap,
            kafka_topic_prefix=f"c{uuid.uuid4().hex[:10]}.",
            kafka_topic_profile="test",
            kafka_request_timeout_ms=10_000,
        ),
        kafka_bootstrap,
        root,
        admin.username,
    )
    d.settings = d.settings.replace(paths_data_dir=d.path("setup", SERVICES["setup"]["environment"]["REFERRAL_BROKER_DATA_DIR"]))
    # the pki volume, as the pki service writes it: the administrator's password and the CA
    pki = d.volume("pki")
    pki.mkdir(parents=True, exist_ok=True)  # made for the setup container above
    sec.write_private(pki / "admin.password", (admin.password + "\n").encode())
    shutil.copyfile(admin.cafile, pki / "ca.pem")
    try:
        done = d.run("setup", *d.args("setup", "--json"))
        assert done.returncode == 0, done.stderr[-3000:]
        d.first_setup = json.loads(done.stdout)
        yield d
    finally:
        clean_up(d.settings, kafka_bootstrap, [acls.user_name(d.settings, n) for n in identities()])


def test_the_setup_service_prepares_the_cluster_and_each_service_identity(deployment: Deployment) -> None:
    d = deployment
    data = d.first_setup
    assert data is not None
    assert data["organisations"]["added"] > 20 and data["acl"]["created"] > 100
    assert data["quotas"]["set"] >= 3 * data["organisations"]["added"]  # every organisation's three
    enrolled = {e["name"]: e for e in data["enrolled"]}
    assert sorted(enrolled) == sorted(identities())
    admin_password = (d.volume("pki") / "admin.password").read_text()
    passwords = {}
    for name, entry in enrolled.items():
        assert entry["user"] == d.prefix + name and entry["password"] == "new"
        # the file each service reads, through its own mounts, is the one the setup wrote
        service = next(s for s in SERVICES if SERVICES[s].get("environment", {}).get("KAFKA_SASL_USERNAME") == name)
        password_file = d.path(service, SERVICES[service]["environment"]["KAFKA_SASL_PASSWORD_FILE"])
        assert password_file.resolve() == Path(entry["folder"]) / "kafka-password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(password_file.resolve().parent.stat().st_mode) == 0o700
        passwords[name] = password_file.read_text()
        assert passwords[name] != admin_password and len(passwords[name].strip()) >= 24
        assert sorted(p.name for p in password_file.resolve().parent.iterdir()) == [
            "ca.pem", "kafka-password", "referral-broker.toml", "trust-anchor.pem",
        ]

    again = d.run("setup", *d.args("setup", "--json"))  # idempotent: nothing changes
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(again.stdout)
    assert second["organisations"]["added"] == 0
    assert (second["acl"]["created"], second["acl"]["deleted"]) == (0, 0)
    assert (second["quotas"]["set"], second["quotas"]["removed"]) == (0, 0)
    assert {e["name"]: e["password"] for e in second["enrolled"]} == dict.fromkeys(enrolled, "kept")
    for name, entry in enrolled.items():
        assert (Path(entry["folder"]) / "kafka-password").read_text() == passwords[name]
    checked = d.run("setup", "acl", "check")  # in the setup container: the cluster holds exactly the plan
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # a team that is not one: one error line (after the progress lines), the configuration
    # error's exit code, nobody enrolled
    wrong = d.run("setup", "setup", "--out", str(d.root / "wrong"), "--team", "district-nowhere")
    assert wrong.returncode == ConfigError.exit_code, wrong.stderr
    assert "Traceback" not in wrong.stderr
    line = wrong.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: not an active district team: district-nowhere;"), line
    assert not (d.root / "wrong").exists()


def _referral() -> dict[str, object]:
    """A synthetic referral from the school about a family in the team's district."""
    from referral_broker.schemas.synth import synthetic_referral

    record = copy.deepcopy(synthetic_referral(random.Random(1)))
    record["referral_id"] = str(uuid.uuid4())
    record["district"] = "fenland"
    record["referrer"]["partner"] = FORMAT[SCHOOL]
    return in_county(record)


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, stat.S_IMODE(p.stat().st_mode))
        for p in sorted(folder.rglob("*"))
    }


def _stored(db: Path, referral_id: str) -> bool:
    from referral_broker.consumers.inbox.store import InboxStore

    if not db.exists():
        return False
    with InboxStore(db) as store:
        return any(r.referral_id == referral_id for r in store.list_referrals(TEAM))


def _delivery_group_members(d: Deployment) -> int:
    admin = sec.super_admin_client(d.settings, d.bootstrap)
    try:
        group = acls.inbox_delivery_group(d.settings, TEAM)
        info = admin.describe_groups([group]).get(group) or {}
    finally:
        admin.close()
    return len(info.get("members") or [])


def _refused_sign_in(base: str) -> int:
    """A sign-in with an unknown account and a wrong password: the page's status code."""
    import re

    import httpx

    with httpx.Client(base_url=base, timeout=30.0) as client:
        page = client.get("/sign-in")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None, page.text[:500]
        data = {"csrf_token": token.group(1), "username": "nobody", "password": "not-a-password", "next": "/inbox"}
        return client.post("/sign-in", data=data, follow_redirects=False).status_code


def test_a_school_referral_reaches_the_team_inbox_through_the_router_under_their_own_identities(
    deployment: Deployment,
) -> None:
    from referral_broker.producers.intake import IntakeSender

    d = deployment
    record = _referral()
    with IntakeSender(d.settings, d.bootstrap, SCHOOL) as sender:  # the school's machine, not a service
        sent = [s.referral_id for s in sender.send_referrals([record])]
    assert sent == [record["referral_id"]]

    routed = d.run("router", *d.args("router", "--stop-when-idle", "3", "--json"), timeout=180)
    assert routed.returncode == 0, routed.stderr[-3000:]
    stats = json.loads(routed.stdout)
    assert stats["routed"] == 1 and stats["dead_lettered"] == 0 and stats["delivered"] >= 1, stats
    # the router's environment is the router, not the administrator
    refused = d.run("router", "acl", "check")
    assert refused.returncode == NotAuthorisedError.exit_code, refused.stderr
    assert refused.stderr.strip() == "Error: not authorised to describe the cluster"

    data = d.volume(mounts(SERVICES[INBOX])["/data"][0])
    assert mounts(SERVICES[INBOX])["/data"][1], "the inbox mounts the hub's data read-only"
    before = _snapshot(data)
    db = d.path(INBOX, SERVICES[INBOX]["environment"]["REFERRAL_BROKER_INBOX_DATABASE"])
    port = str(free_port())
    args = d.args(INBOX)
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = port
    env = d.env(INBOX)
    server = subprocess.Popen(
        [sys.executable, "-m", "referral_broker.cli.main", *args],
        env=env,
        cwd=d.root / "home",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (_stored(db, record["referral_id"]) and _delivery_group_members(d) == 1):
            if server.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(1)
        alive = server.poll() is None
        # a refused sign-in is audited on the team's own chain, under the team's identity
        signed_in = _refused_sign_in(f"http://127.0.0.1:{port}") if alive else None
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _out, err = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            _out, err = server.communicate()
    assert alive, f"inbox serve stopped: {err[-3000:]}"
    assert server.returncode == 0, err[-3000:]
    assert _stored(db, record["referral_id"]), err[-3000:]
    assert "background worker failed" not in err and "not authorised" not in err, err[-3000:]
    assert _snapshot(data) == before, "the inbox wrote to the hub's data volume"
    assert signed_in == 401, f"a refused sign-in gave {signed_in} (503: its audit could not be written)"
    events = [
        (chain_headers(r.headers), read_event_value(r.value or b""))
        for r in read_topic(d.settings, d.bootstrap, "audit")
        if dict(r.headers).get("rb-kind") == b"inbox.access"
    ]
    assert [(c[0] if c else None, e["kind"]) for c, e in events] == [("inbox-" + TEAM, "sign_in_refused")]
    assert stat.S_IMODE(db.stat().st_mode) == 0o600

    # the inbox's environment is the team, which may not read another team's out topic
    other = next(n for n in identities() if n not in (acls.ROUTER, TEAM))
    tried = d.run(INBOX, "receive", "--as", other)
    assert tried.returncode == NotAuthorisedError.exit_code, tried.stderr
    assert f"not authorised to read topic {d.prefix}referrals.out.{other}" in tried.stderr
