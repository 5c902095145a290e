"""``bench seal`` prints its figures (they are reported, never asserted as targets)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from referral_broker.cli.main import cli


def test_bench_seal_prints_figures(tmp_path: Path) -> None:
    env = {"REFERRAL_BROKER_DATA_DIR": str(tmp_path)}
    result = CliRunner().invoke(
        cli, ["bench", "seal", "--iterations", "3", "--json"], env=env, catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["per_referral_us"]) == {
        "seal_1_recipient",
        "seal_3_recipients",
        "open_1_recipient",
        "open_3_recipients",
    }
    for row in data["per_referral_us"].values():
        assert row["no_cache"] > 0 and row["cache"] > 0
    assert {
        "aes_gcm_seal_64B",
        "x25519_exchange",
        "ed25519_sign_message",
        "ed25519_verify_message",
        "avro_encode_referral",
    } <= set(data["primitives_us"])
    human = CliRunner().invoke(cli, ["bench", "seal", "--iterations", "2"], env=env, catch_exceptions=False)
    assert "seal 3 recipients" in human.output and "x25519 exchange" in human.output
    assert not list(tmp_path.rglob("*.key"))  # throw-away keys are gone
