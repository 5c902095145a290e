"""The README's main job, end to end on the real broker, and the README's promises."""

from __future__ import annotations

import re
from pathlib import Path

from county import POLICE, SCHOOL_NURSING

from referral_broker.cli.demo_run import PARTNERS, SENDERS, run_demo
from referral_broker.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_twice_and_shows_each_rule(settings: Settings, kafka_bootstrap: str) -> None:
    for _ in range(2):  # running it twice works (registry, keys and topics are kept)
        result = run_demo(settings, kafka_bootstrap, per_partner=2)
        sent = sum(len(v) for v in result.sent.values())
        assert set(result.sent) == set(SENDERS.values()) and sent == 2 * len(PARTNERS)
        assert result.routed.routed == sent and result.routed.dead_lettered == 0
        got = {p: s for p, s in result.recipients.items() if s.referrals}
        assert {POLICE, SCHOOL_NURSING} <= set(got)
        assert any(p.startswith("charity-") for p in got)
        # the police referral (Operation Encompass) reaches one school, never the county's eight
        schools = {p for p in got if p.startswith("school-")}
        assert 1 <= len(schools) < 8
        assert sum(s.referrals for p, s in got.items() if p.startswith("district-")) == sent
        assert "identifiers.nhs_number" in got[POLICE].withheld_fields
        assert not got[POLICE].received_fields & {
            "identifiers.nhs_number",
            "health_and_development.summary",
        }
        assert all(not s.refused for s in result.recipients.values())
        # partners answer here; district teams answer from the inbox, so the demo sends none for them
        # and each status goes back to the referring organisation only
        assert sum(result.statuses_back.values()) == sum(
            s.referrals for p, s in got.items() if not p.startswith("district-")
        )
        assert set(result.statuses_back) == set(SENDERS.values())
        assert any(result.outbox.rglob("*.csv")) and any(result.inbox.rglob("*"))


def test_readme_opens_with_the_two_commands_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^bash (scripts/\S+\.sh)", readme, re.M)
    assert commands[:2] == ["scripts/demo.sh", "scripts/test.sh"]
    assert all((ROOT / c).is_file() for c in commands)
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_demo_names_the_local_broker_it_leaves_running(settings: Settings) -> None:
    from referral_broker.cli.demo_cmd import broker_left_running

    local = settings.replace(kafka_bootstrap_servers="", local_port=19999)
    note = broker_left_running(local)
    assert note is not None and "127.0.0.1:19999" in note and "'referral-broker kafka stop'" in note
    # a cluster the user configured is not the demo's to stop
    assert broker_left_running(settings.replace(kafka_bootstrap_servers="kafka.example:9093")) is None
