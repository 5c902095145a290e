"""The long-running commands freeze their startup heap out of the garbage collector's walks
(``referral_broker.startup_heap``): only in a process of their own (the ``referral-broker``
program), what a freeze leaves for a full collection, and that ``send``, ``route`` and
``inbox ingest`` ask for it once their setup is done."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from county import cli

from referral_broker.adapters import example_file
from referral_broker.config import Settings

SCHOOL = "school-110123"

_PROBE = """
import gc, json
import referral_broker.consumers.router, referral_broker.producers.intake  # a router's and a sender's modules
from referral_broker.startup_heap import freeze_startup_heap, own_process

untouched = (freeze_startup_heap(), gc.get_freeze_count())  # not the command's own process yet
own_process()
before = len(gc.get_objects())
frozen = freeze_startup_heap()
walked = len(gc.get_objects())  # what a full collection walks now
a, b = [], []
a.append(b); b.append(a)  # a reference cycle made after the freeze
del a, b
print(json.dumps({"untouched": untouched, "before": before, "frozen": frozen, "walked": walked, "collected": gc.collect()}))
"""


def test_only_a_process_of_our_own_freezes_and_then_later_cycles_are_still_collected() -> None:
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(probe.stdout)
    assert got["untouched"] == [0, 0]  # a program that only imports us keeps its heap as it is
    assert got["before"] > 50_000  # the startup heap of a router or sender process
    assert got["frozen"] >= got["before"] * 0.9  # all of it, less the garbage collected first
    assert got["walked"] < 1_000  # a full collection no longer walks it
    assert got["collected"] >= 2  # garbage made afterwards is collected as before


def test_the_referral_broker_program_owns_its_process() -> None:
    probe = (
        "import contextlib, referral_broker.startup_heap as heap\n"
        "from referral_broker.cli.main import main\n"
        "with contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print('frozen', heap.freeze_startup_heap())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True).stdout
    assert int(out.rsplit("frozen ", 1)[1]) > 0  # 0 in a process that is not ours


@pytest.fixture
def freezes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each call of ``freeze_startup_heap`` a command makes (run in this test's process, which
    is not the command's own, it would do nothing anyway)."""
    calls: list[str] = []
    monkeypatch.setattr("referral_broker.startup_heap.freeze_startup_heap", lambda: calls.append("frozen") or 0)
    return calls


def test_send_route_and_ingest_freeze_their_startup_heap_once_before_their_loop(
    county: Settings, kafka_bootstrap: str, freezes: list[str], tmp_path: Path
) -> None:
    sent = cli(county, kafka_bootstrap, "send", "--as", SCHOOL, "--file", str(example_file("schools")), "--json")
    assert sent.exit_code == 0, sent.output
    delivered = json.loads(sent.stdout)["delivered"]
    assert delivered and freezes == ["frozen"]

    routed = cli(county, kafka_bootstrap, "route", "--stop-when-idle", "3", "--json")
    assert routed.exit_code == 0, routed.output
    assert json.loads(routed.stdout)["routed"] == len(delivered)
    assert freezes == ["frozen"] * 2

    ingested = cli(county, kafka_bootstrap, "inbox", "ingest", "--stop-when-idle", "2", "--json")
    assert ingested.exit_code == 0, ingested.output
    assert sum(team["new"] for team in json.loads(ingested.stdout).values()) >= 1
    assert freezes == ["frozen"] * 3
