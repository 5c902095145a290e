"""The CLI's contract: help everywhere, JSON where output is data, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from referral_broker.cli.main import COMMANDS, cli
from referral_broker.errors import BrokerError, ConfigError


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "referral_broker.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _all_commands(group: click.Group, ctx: click.Context, prefix: tuple[str, ...] = ()):
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, ctx, (*prefix, name))


def test_every_subcommand_has_help() -> None:
    ctx = click.Context(cli)
    seen = list(_all_commands(cli, ctx))
    assert {path[0] for path, _ in seen} == set(COMMANDS)
    for path, cmd in seen:
        assert cmd.help or cmd.short_help, f"{' '.join(path)} has no help text"
        assert run(*path, "--help").returncode == 0


def test_unknown_subcommand_is_one_line_error() -> None:
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert "No such command" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreachable_broker_is_clear(tmp_path) -> None:
    import os

    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "REFERRAL_BROKER_DATA_DIR": str(tmp_path),
    }
    proc = run("topics", "list", env=env)
    assert proc.returncode == BrokerError.exit_code == 3
    assert "cannot reach Kafka at 127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_kafka_start_refuses_when_cluster_configured() -> None:
    import os

    proc = run("kafka", "start", env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert proc.returncode == ConfigError.exit_code
    assert "KAFKA_BOOTSTRAP_SERVERS is set" in proc.stderr


def test_status_json_against_session_broker(kafka_bootstrap: str) -> None:
    import os

    proc = run("kafka", "status", "--json", env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["answering"] is True and data["bootstrap"] == kafka_bootstrap


@pytest.mark.parametrize("bad", ["[kafka]\nbootstrap_server = 'x'\n", "not toml ["])
def test_config_file_errors(tmp_path, bad: str) -> None:
    path = tmp_path / "rb.toml"
    path.write_text(bad)
    proc = run("--config", str(path), "kafka", "status")
    assert proc.returncode == ConfigError.exit_code == 11  # not 2: that is click's usage error
    assert str(path) in proc.stderr


def test_status_human_output_running_and_not(kafka_bootstrap: str) -> None:
    import os

    up = run("kafka", "status", env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap})
    assert up.returncode == 0 and f"answering at {kafka_bootstrap}" in up.stdout
    down = run("kafka", "status", env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert (
        down.returncode == 1
        and "not running at 127.0.0.1:1" in down.stdout
        and "Traceback" not in down.stderr
    )
