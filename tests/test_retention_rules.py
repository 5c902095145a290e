"""The retention schedule (issue 16, Build 3): the reviewed rules file, loaded and checked like
the sharing policy; a case's due date from its record types, closure and date of birth (stored
only rounded up to the month); the topic plan's retention held against the rules, in the plan
and on the real cluster."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kafka.admin import ConfigResource, ConfigResourceType

from referral_broker.cli.main import cli
from referral_broker.cluster.topics import admin_client, topic_name
from referral_broker.config import Settings
from referral_broker.errors import ConfigError
from referral_broker.retention_rules import (
    YEAR_MS,
    assess,
    check_topics,
    default_rules_path,
    load_rules,
    month_after,
)

CLOSED = datetime(2026, 11, 30, 10, 15, tzinfo=UTC)
SHIPPED = default_rules_path().read_text(encoding="utf-8")


def _referral(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "child": {"date_of_birth": date(2016, 5, 20)},
        "send": None,
        "flags": {"safeguarding_concern": False, "crime_prevention": False, "early_support_pathway": False},
        "concern_types": ["parenting"],
        "concerns": [{"type": "parenting", "detail": "x", "since": None}],
    }
    return base | changes


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_shipped_rules_load() -> None:
    rules = load_rules()
    assert [r.record_type for r in rules.rules] == ["early_help", "send", "child_protection"]
    assert rules.closing_statuses == ("closed", "declined")
    assert rules.longest_years == 25
    assert rules.rules[0].years_after_closure == 6 and not rules.rules[0].when_any


def test_a_case_is_kept_until_the_latest_date_its_rules_give() -> None:
    rules = load_rules()
    plain = assess(rules, _referral(), CLOSED)
    assert (plain.record_types, plain.due) == (("early_help",), date(2032, 11, 30))
    # SEND: the 25th birthday (20 May 2041) rounded up to the month, later than six years
    send = assess(
        rules, _referral(send={"status": "ehc_plan", "primary_need": None, "details": None}), CLOSED
    )
    assert (send.record_types, send.due) == (("early_help", "send"), date(2041, 6, 1))
    assert send.basis == "send: 25th birthday (to the month)"
    assert "2041-05-20" not in json.dumps(send.as_dict())  # no date of birth in what is stored
    # SEND for a young adult: six years after closure come later than the 25th birthday
    older = _referral(
        child={"date_of_birth": date(2006, 6, 15)},
        send={"status": "sen_support", "primary_need": None, "details": None},
    )
    assert assess(rules, older, CLOSED).due == date(2032, 11, 30)
    # no SEND recorded (no_sen) is not a SEND record
    assert assess(
        rules, _referral(send={"status": "no_sen", "primary_need": None, "details": None}), CLOSED
    ).record_types == ("early_help",)
    # a safeguarding concern, by flag or by concern type (arrays are looked into)
    flagged = _referral(
        flags={"safeguarding_concern": True, "crime_prevention": False, "early_support_pathway": False}
    )
    typed = _referral(concern_types=["parenting", "safeguarding"])
    for referral in (flagged, typed):
        found = assess(rules, referral, CLOSED)
        assert found.record_types == ("early_help", "child_protection") and found.due == date(2041, 6, 1)
    # no date of birth (an unborn child): the birthday clock does not apply, and says so
    unborn = assess(rules, _referral(child={"date_of_birth": None}, concern_types=["safeguarding"]), CLOSED)
    assert unborn.due == date(2032, 11, 30) and "no date of birth recorded" in unborn.notes[0]
    # no readable archive copy: only the rule for every case
    blind = assess(rules, None, CLOSED)
    assert blind.record_types == ("early_help",) and blind.due == date(2032, 11, 30) and blind.notes
    # 29 February closed: six years later there is none, so 1 March
    assert assess(rules, _referral(), datetime(2028, 2, 29, tzinfo=UTC)).due == date(2034, 3, 1)
    assert month_after(date(2040, 12, 2)) == date(2041, 1, 1) and month_after(date(2040, 3, 1)) == date(
        2040, 3, 1
    )


def test_a_bad_rules_file_names_every_problem_with_its_line(tmp_path: Path) -> None:
    bad = SHIPPED.replace('"ehc_plan"]', '"ehc_plans"]').replace(
        'record_type = "child_protection"', 'record_type = "send"\ncolour = "red"'
    )
    bad = bad.replace(
        '"flags.safeguarding_concern" = [true]', '"child.first_language" = ["en"], "child.hair" = [true]'
    )
    with pytest.raises(ConfigError) as caught:
        load_rules(_write(tmp_path, bad))
    text = str(caught.value)
    lines = bad.splitlines()
    assert "'ehc_plans' is not a value of 'send.status'" in text
    assert "record type 'send' has two rules" in text
    assert "unknown key 'colour'" in text
    assert "'child.first_language' is a string field; match enum or boolean fields only" in text
    assert "'child.hair' is not a field of the referral schema" in text
    plans = next(i + 1 for i, ln in enumerate(lines) if "ehc_plans" in ln)
    assert f"rules.toml:{plans}: rule 'send'" in text
    colour = next(i + 1 for i, ln in enumerate(lines) if "colour" in ln)
    assert f"rules.toml:{colour}: rule 3: unknown key 'colour'" in text

    no_clock = SHIPPED.replace("years_after_closure = 6\n", "")
    with pytest.raises(ConfigError, match="rule 'early_help' has no clock"):
        load_rules(_write(tmp_path, no_clock))
    no_baseline = SHIPPED.replace(
        "years_after_closure = 6\n", 'years_after_closure = 6\nwhen_any = { "send.status" = ["ehc_plan"] }\n'
    )
    with pytest.raises(ConfigError, match="no rule applies to every case"):
        load_rules(_write(tmp_path, no_baseline))
    with pytest.raises(ConfigError, match="closing status 'finished' is not a status code"):
        load_rules(_write(tmp_path, SHIPPED.replace('"closed", "declined"', '"closed", "finished"')))
    with pytest.raises(ConfigError, match="'dlq': 'forever' is not one of record, transit"):
        load_rules(_write(tmp_path, SHIPPED.replace('dlq = "transit"', 'dlq = "forever"')))


def test_topics_are_held_against_the_longest_rule() -> None:
    rules = load_rules()
    day = 24 * 3600 * 1000
    found = check_topics(
        rules,
        [
            ("intake", "referrals.intake.<organisation>", 3 * day),  # fits
            ("dlq", "referrals.dlq", -1),  # personal data kept forever
            ("status", "referrals.status.<organisation>", 30 * YEAR_MS),  # longer than 25 years
            ("archive", "referrals.archive", 365 * day),  # records lost after a year
            ("audit", "audit.decisions", -1),  # fits
            ("outbox", "referrals.outbox", 7 * day),  # not classed
        ],
    )
    problems = {f.topic: f.problem for f in found}
    assert set(problems) == {
        "referrals.dlq",
        "referrals.status.<organisation>",
        "referrals.archive",
        "referrals.outbox",
    }
    assert "keeps personal data forever" in problems["referrals.dlq"]
    assert "longer than the longest rule (25 years)" in problems["referrals.status.<organisation>"]
    assert "shorter than the longest rule (25 years)" in problems["referrals.archive"]
    assert "not classed in the retention rules" in problems["referrals.outbox"]


def _cli(settings: Settings, *args: str) -> Any:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "REFERRAL_BROKER_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": settings.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(settings.paths_data_dir),
    }
    return CliRunner().invoke(cli, list(args), env=env)


def test_retention_check_reports_the_plan_and_the_cluster(topics: Settings, tmp_path: Path) -> None:
    ok = _cli(topics, "retention", "check")
    assert ok.exit_code == 0, ok.output
    assert "Every topic's retention fits the rules (longest rule: 25 years)" in ok.stdout
    # a schedule that calls the intake topics records: their 3 days are too short for them
    strict = _write(tmp_path, SHIPPED.replace('intake = "transit"', 'intake = "record"'))
    result = _cli(topics, "retention", "check", "--json", "--rules", str(strict))
    assert result.exit_code == 1, result.output
    findings = json.loads(result.stdout)["findings"]
    assert [(f["role"], f["retention_ms"]) for f in findings] == [("intake", 259200000)]
    assert "shorter than the longest rule" in findings[0]["problem"]

    # the cluster's dead-letter topic drifted to "keep forever": --live names it
    dlq = topic_name(topics, "dlq")
    admin = admin_client(topics, topics.bootstrap_servers)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, dlq, configs={"retention.ms": "-1"})])
    finally:
        admin.close()
    deadline = time.monotonic() + 20  # the broker applies a config change through its metadata log
    while True:
        live = _cli(topics, "retention", "check", "--live", "--json")
        found = json.loads(live.stdout)["findings"] if live.stdout.startswith("{") else []
        if found or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert live.exit_code == 1, live.output
    assert [(f["topic"], f["retention_ms"]) for f in found] == [(dlq, -1)]
    assert found[0]["problem"].startswith("cluster: keeps personal data forever")
