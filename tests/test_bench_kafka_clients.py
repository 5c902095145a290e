"""``scripts/bench_kafka_clients.py`` (issue 20: what a compiled Kafka client would take off the
router's CPU) with a small count on the real broker: both clients do the job's reads and writes
over TLS and SCRAM, each topic read back holds exactly 6 records a referral (the script exits
non-zero otherwise), and the ratio printed is the one its own medians give. The figures
themselves are never asserted: they are what the script is for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_kafka_clients.py"


@pytest.mark.timeout(300)
def test_both_clients_do_the_whole_job_and_the_ratio_is_their_medians(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    count = 60
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "REFERRAL_BROKER_TOPIC_PROFILE": "test",
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--count", str(count), "--rounds", "2", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["count"] == count and r["rounds"] == 2 and r["messages_per_referral"] == 6
    figures, medians = r["cpu_ms_per_referral"], r["median_cpu_ms_per_referral"]
    assert set(figures) == set(medians) == {"kafka-python", "librdkafka"}
    for client, values in figures.items():
        assert len(values) == 2 and all(v > 0 for v in values)
        assert medians[client] == pytest.approx(sum(values) / 2)
    ratio = medians["kafka-python"] / medians["librdkafka"]
    assert r["kafka_python_over_librdkafka"] == pytest.approx(ratio, abs=0.01)
    # the clients took turns: kafka-python first in round 1, librdkafka first in round 2
    assert proc.stderr.index("round 1 of 2: kafka-python") < proc.stderr.index("round 1 of 2: librdkafka")
    assert proc.stderr.index("round 2 of 2: librdkafka") < proc.stderr.index("round 2 of 2: kafka-python")


def test_without_confluent_kafka_it_says_what_to_install(tmp_path: Path) -> None:
    blocker = tmp_path / "confluent_kafka.py"
    blocker.write_text("raise ImportError('not installed here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    args = [sys.executable, str(SCRIPT), "--count", "10", "--rounds", "1"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "confluent-kafka is not installed" in proc.stderr and proc.stdout == ""
