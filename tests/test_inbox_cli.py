"""``referral-broker inbox ...`` as a user runs it: accounts, set-up, ingest and serve, with
clean one-line errors and JSON output built from the same data."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_inbox_fixtures import TEAM, make_pipeline

from referral_broker.config import Settings
from referral_broker.consumers.inbox.frontend import GOVUK_FRONTEND_VERSION
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.errors import ConfigError, UnknownUserError, UserExistsError


def env_for(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "REFERRAL_BROKER_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": settings.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(settings.paths_data_dir),
    }


def run(settings: Settings, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "referral_broker.cli.main", "inbox", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env_for(settings),
        timeout=180,
    )


def test_users_add_list_disable(settings: Settings) -> None:
    added = run(
        settings,
        "users",
        "add",
        "fen.worker",
        "--team",
        TEAM,
        "--password-stdin",
        "--json",
        stdin="a long password\n",
    )
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout) == {
        "username": "fen.worker",
        "team": TEAM,
        "role": "Early Help practitioner",
    }
    listed = json.loads(run(settings, "users", "list", "--json").stdout)
    assert [(u["username"], u["team"], u["disabled"]) for u in listed] == [("fen.worker", TEAM, False)]
    assert "argon2" not in run(settings, "users", "list", "--json").stdout
    assert run(settings, "users", "disable", "fen.worker").returncode == 0
    assert json.loads(run(settings, "users", "list", "--json").stdout)[0]["disabled"] is True
    human = run(settings, "users", "list")
    assert "fen.worker" in human.stdout and "yes" in human.stdout
    with InboxStore(settings.inbox_db_path) as store:
        user = store.get_user("fen.worker")
        assert user is not None and user.password_hash.startswith("$argon2id$")


@pytest.mark.parametrize(
    ("args", "stdin", "code", "message"),
    [
        (
            ["users", "add", "x.y", "--team", "district-nowhere", "--password-stdin"],
            "long enough pw\n",
            ConfigError.exit_code,
            "unknown district team",
        ),
        (["users", "add", "x.y", "--team", TEAM, "--password-stdin"], "short\n", ConfigError.exit_code, "at least 12 characters"),
        (
            ["users", "add", "Bad Name!", "--team", TEAM, "--password-stdin"],
            "long enough pw\n",
            ConfigError.exit_code,
            "username must be",
        ),
        (["users", "disable", "nobody"], None, UnknownUserError.exit_code, "no user 'nobody'"),
    ],
)
def test_bad_input_is_one_clean_line(
    settings: Settings, args: list[str], stdin: str | None, code: int, message: str
) -> None:
    proc = run(settings, *args, stdin=stdin)
    assert proc.returncode == code
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert "long enough pw" not in proc.stderr + proc.stdout


def test_adding_a_user_twice_is_refused(settings: Settings) -> None:
    args = ["users", "add", "dup.user", "--team", TEAM, "--password-stdin"]
    assert run(settings, *args, stdin="a long password\n").returncode == 0
    again = run(settings, *args, stdin="a long password\n")
    assert again.returncode == UserExistsError.exit_code and "already exists" in again.stderr


def test_setup_is_idempotent(settings: Settings) -> None:
    first = json.loads(run(settings, "setup", "--json").stdout)
    started = time.monotonic()
    second = run(settings, "setup", "--json")
    assert second.returncode == 0 and json.loads(second.stdout) == first
    assert first["govuk_frontend"] == GOVUK_FRONTEND_VERSION
    folder = Path(first["path"])
    for name in ("govuk-frontend.min.css", "govuk-frontend.min.js", "fonts", "images", "manifest.json"):
        assert (folder / name).exists()
    assert time.monotonic() - started < 30  # nothing fetched the second time


def test_ingest_command_reads_routed_referrals(topics: Settings) -> None:
    pipeline = make_pipeline(topics)
    pipeline.produce(
        pipeline.routed(pipeline.referral(TEAM, 1), TEAM), pipeline.routed(pipeline.referral(TEAM, 2), TEAM)
    )
    proc = run(topics, "ingest", "--team", TEAM, "--stop-when-idle", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[TEAM] == {
        "new": 2,
        "updated": 0,
        "older": 0,
        "duplicate": 0,
        "copies": {},
        "dead_lettered": 0,
        "status_published": 0,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_answers_and_stops_cleanly(topics: Settings, stop: signal.Signals) -> None:
    make_pipeline(topics)  # the team's key store and the key directory
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "referral_broker.cli.main",
            "inbox",
            "serve",
            "--team",
            TEAM,
            "--port",
            str(port),
        ],
        env=env_for(topics),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "inbox serve did not answer"
            time.sleep(0.3)
        page = httpx.get(f"http://127.0.0.1:{port}/sign-in", timeout=5)
        assert page.status_code == 200 and "Sign in to your team" in page.text
        cookie = page.headers["set-cookie"]
        assert "HttpOnly" in cookie and "Secure" not in cookie  # loopback: plain HTTP cookies
        css = httpx.get(f"http://127.0.0.1:{port}/assets/govuk-frontend.min.css", timeout=5)
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert httpx.get(f"http://127.0.0.1:{port}/inbox", timeout=5).status_code == 303
    finally:
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"Inbox for {TEAM} at http://localhost:{port}/" in err
