"""The ops view on the real broker (issue 16, Build 5): ``status --json`` reports exactly the lag
and the dead letters the test created, with a degraded verdict naming them; ``tail`` shows
envelopes and never a field value."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest
from county import CHARITY, FORMAT, HUB, SCHOOL, cli, in_county

from referral_broker import ops
from referral_broker.cluster.clients import build_producer
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.dead_letters import read_dead_letters
from referral_broker.consumers.router import GROUP, Router
from referral_broker.errors import BrokerError
from referral_broker.parties import all_parties
from referral_broker.producers.intake import IntakeSender
from referral_broker.schemas.synth import synthetic_referrals
from referral_broker.sealing.key_admin import init_parties

SENDER = SCHOOL  # the organisation whose intake gets the lag and the dead letter
QUIET_SENDER = CHARITY  # sends nothing: its topics stay empty
RESEARCH_OUT_PARTY = "ons"  # nobody reads its out topic in this test: the rate probe writes there
CHILD_GIVEN = "Quillfeather"  # synthetic names: must never appear in tail's output
CHILD_FAMILY = "Zebedee-Marchbanks"


def referrals(sender: str, count: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for record in synthetic_referrals(count, seed=seed):
        record = copy.deepcopy(record)
        record["referrer"]["partner"] = FORMAT[sender]
        record["child"]["given_name"] = CHILD_GIVEN
        record["child"]["family_name"] = CHILD_FAMILY
        out.append(in_county(record))
    return out


@pytest.fixture
def broker(topics: Settings, kafka_bootstrap: str) -> Settings:
    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    return topics


def status_json(settings: Settings, bootstrap: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = cli(settings, bootstrap, "status", "--json", "--interval", "1", *args)
    return result.exit_code, json.loads(result.stdout)


def test_status_reports_the_lag_and_dead_letters_the_test_created(broker: Settings, kafka_bootstrap: str) -> None:
    intake = topic_name(broker, "intake", SENDER)
    router_group = broker.kafka_topic_prefix + GROUP

    # nothing has happened yet: healthy, exit 0
    code, before = status_json(broker, kafka_bootstrap)
    assert (code, before["verdict"], before["reasons"]) == (0, "healthy", []), before["reasons"]
    assert before["missing_topics"] == [] and before["groups"] == []
    assert before["dead_letters"]["depth"] == 0
    assert before["key_directory"]["refused"] == 0 and before["key_directory"]["entries"] >= len(all_parties())
    assert {t["name"] for t in before["topics"]} >= {intake, topic_name(broker, "dlq")}

    # routed referrals and one garbage record (a dead letter)
    first = referrals(SENDER, 8, seed=21)
    with IntakeSender(broker, kafka_bootstrap, SENDER) as sender:
        sender.send_referrals(first)
    producer = build_producer(broker, kafka_bootstrap)
    producer.send(intake, b"\x00not a sealed message", key=b"garbage-1")
    producer.flush()
    stats = Router(broker, kafka_bootstrap).run(stop_when_idle=3)
    assert (stats.routed, stats.dead_lettered) == (8, 1)

    code, routed = status_json(broker, kafka_bootstrap, "--max-lag-age", "2")
    router_rows = [g for g in routed["groups"] if g["group"] == router_group]
    assert router_rows and all(g["lag"] == 0 for g in routed["groups"]), routed["groups"]
    # the router has committed on every partition of the sender's intake (so later records lag)
    (intake_row,) = [g for g in router_rows if g["topic"] == intake]
    assert intake_row["end"] == next(t["end"] for t in routed["topics"] if t["name"] == intake) == 9
    assert routed["dead_letters"]["depth"] == 1
    assert code == 1 and len(routed["reasons"]) == 1 and "1 dead letters" in routed["reasons"][0]

    # lag: referrals the router has not read, on the partitions it has committed
    sent_at = time.time()
    later = referrals(SENDER, 5, seed=22)
    with IntakeSender(broker, kafka_bootstrap, SENDER) as sender:
        sender.send_referrals(later)
    time.sleep(2.5)  # older than --max-lag-age 2
    code, data = status_json(broker, kafka_bootstrap, "--max-lag-age", "2")
    assert code == 1 and data["verdict"] == "degraded"

    lagging = [g for g in data["groups"] if g["lag"]]
    assert [(g["group"], g["topic"], g["lag"]) for g in lagging] == [(router_group, intake, 5)]
    row = lagging[0]
    assert row["end"] - row["committed"] == 5
    age = row["oldest_unprocessed_age_s"]
    assert age is not None and 2 <= age <= time.time() - sent_at + 1
    # the oldest unprocessed record is one of the later referrals, not the routed ones
    assert row["oldest_unprocessed_at"] >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(sent_at)))

    dl = data["dead_letters"]
    assert (dl["depth"], dl["recent"]) == (1, 1)
    assert dl["by_stage"] == {"verify-open": 1} and dl["by_source_topic"] == {intake: 1}
    assert dl["newest_at"] is not None and dl["newest_at"] == dl["oldest_at"]

    assert data["key_directory"]["refused"] == 0 and data["missing_topics"] == []
    assert len(data["reasons"]) == 2, data["reasons"]
    dead, lag = data["reasons"]
    assert dead.startswith("1 dead letters in the last 24 h") and "verify-open 1" in dead
    assert lag.startswith(f"group {router_group} is 5 behind on {intake}") and "threshold 2 s" in lag

    # the same with a generous threshold and no recent-dead-letter window: healthy, exit 0
    code, calm = status_json(broker, kafka_bootstrap, "--max-lag-age", "3600", "--dead-letter-hours", "0")
    assert (code, calm["verdict"], calm["reasons"]) == (0, "healthy", [])
    assert calm["dead_letters"]["depth"] == 1 and calm["dead_letters"]["recent"] == 0
    # --watch prints one JSON document a line per refresh; --count ends it
    watched = cli(
        broker, kafka_bootstrap, "status", "--json", "--watch", "0.2", "--count", "2", "--interval", "0",
        "--max-lag-age", "3600", "--dead-letter-hours", "0",
    )
    lines = watched.stdout.strip().splitlines()
    assert watched.exit_code == 0 and len(lines) == 2
    assert [json.loads(line)["verdict"] for line in lines] == ["healthy", "healthy"]
    lags = [[(g["group"], g["topic"], g["lag"]) for g in json.loads(line)["groups"]] for line in lines]
    assert lags == [[(g["group"], g["topic"], g["lag"]) for g in calm["groups"]]] * 2

    # the human view says the same
    human = cli(broker, kafka_bootstrap, "status", "--interval", "0", "--max-lag-age", "2")
    assert human.exit_code == 1
    assert "Verdict: DEGRADED" in human.stdout and f"is 5 behind on {intake}" in human.stdout
    assert "Dead letters: 1 on the topic, 1 in the last 24 h" in human.stdout

    # tail: envelopes of the sent referrals and the dead letter, never a field value
    ids = {str(r["referral_id"]) for r in first + later}
    tailed = cli(broker, kafka_bootstrap, "tail", intake, "--from-beginning", "--json")
    assert tailed.exit_code == 0, tailed.output
    envelopes = json.loads(tailed.stdout)
    sealed = [e for e in envelopes if e.get("kind")]
    assert {e["key"] for e in sealed} == ids and len(envelopes) == 14
    assert all(e["sender"] == SENDER and e["recipient"] == HUB and e["size"] > 0 for e in sealed)
    versions = {str(r["referral_id"]): str(r["version"]) for r in first + later}
    assert all(len(e["schema"]) == 16 and e["version"] == versions[e["key"]] for e in sealed), sealed[0]
    garbage = [e for e in envelopes if not e.get("kind")]
    assert [(g["key"], g["size"]) for g in garbage] == [("garbage-1", 21)]
    dlq = cli(broker, kafka_bootstrap, "tail", "referrals.dlq", "--json")  # the name under the prefix
    assert dlq.exit_code == 0
    (letter,) = json.loads(dlq.stdout)
    assert (letter["dlq_stage"], letter["dlq_source_topic"], letter["key"]) == ("verify-open", intake, "garbage-1")
    text_outputs = [tailed.output, dlq.output]
    outs = [t["name"] for t in data["topics"] if t["role"] == "out" and t["end"]]
    assert outs
    copies = 0
    for out in outs:
        shown = cli(broker, kafka_bootstrap, "tail", out, "--last", "50", "--json")
        assert shown.exit_code == 0
        copies += sum(e["key"] in ids and e["sender"] == HUB for e in json.loads(shown.stdout))
        text_outputs.append(shown.output)
    assert copies >= 8  # every routed referral went to at least one recipient, as a hub-signed copy
    human_tail = cli(broker, kafka_bootstrap, "tail", intake, "--from-beginning")
    assert human_tail.exit_code == 0 and "garbage-1" in human_tail.stdout
    assert sum(rid in human_tail.stdout for rid in ids) == len(ids)
    text_outputs.append(human_tail.output)
    postcodes = {r["child"]["address"]["postcode"] for r in first + later if r["child"].get("address")}
    assert postcodes
    for text in text_outputs:
        assert CHILD_GIVEN not in text and CHILD_FAMILY not in text
        assert not [p for p in postcodes if p in text]


def test_rates_come_from_two_samples(broker: Settings, kafka_bootstrap: str) -> None:
    """Records written between the two samples of end offsets make the topic's rate; every
    other topic's rate is 0."""
    target = topic_name(broker, "out", RESEARCH_OUT_PARTY)
    quiet = topic_name(broker, "intake", QUIET_SENDER)

    def letters_and_traffic(settings: Settings, bootstrap: str) -> Any:
        producer = build_producer(settings, bootstrap)  # runs between the two samples
        for i in range(12):
            producer.send(target, b"x" * 10, key=f"probe-{i}".encode())
        producer.flush()
        producer.close()
        return [letter for _, letter in read_dead_letters(settings, bootstrap, idle_s=0.5)]

    started = time.monotonic()
    status = ops.collect(
        broker,
        kafka_bootstrap,
        thresholds=ops.Thresholds(interval_s=2.0),
        dead_letters=letters_and_traffic,
    )
    elapsed = time.monotonic() - started
    by_name = {t.name: t for t in status.topics}
    assert by_name[target].end == 12
    rate = by_name[target].rate_per_s
    assert rate is not None and 12 / elapsed <= rate <= 12 / 2.0
    assert by_name[quiet].end == 0 and by_name[quiet].rate_per_s == 0
    assert all(t.rate_per_s == 0 for t in status.topics if t.name != target)
    assert status.verdict == "healthy" and status.reasons == []


def test_unreachable_broker_is_degraded_with_the_broker_error_code(settings: Settings) -> None:
    result = cli(settings, "127.0.0.1:9", "status", "--json", "--interval", "0")
    assert result.exit_code == BrokerError.exit_code
    data = json.loads(result.stdout)
    assert data["verdict"] == "degraded" and len(data["reasons"]) == 1
    assert data["reasons"][0].startswith("broker unreachable: cannot reach Kafka at 127.0.0.1:9")


def test_inbox_metrics_count_requests_and_referrals_without_identifiers(topics: Settings) -> None:
    """The inbox's Prometheus metrics: requests by route template (never the path with the id),
    referrals by team and state, overdue and urgent counts; no id, user or field value in them."""
    import socket

    import httpx
    from test_inbox_fixtures import OTHER_TEAM, TEAM, make_pipeline, make_store
    from test_inbox_web import Clock, Inbox

    from referral_broker.consumers.inbox.app import create_app
    from referral_broker.consumers.inbox.outbound import Outbound
    from referral_broker.consumers.inbox.server import ServerThread

    pipeline = make_pipeline(topics)
    store = make_store(topics)
    fmt = pipeline.format([TEAM, OTHER_TEAM])
    outbound = Outbound(topics, fmt)
    clock = Clock()
    app = create_app(
        topics, store=store, record_format=fmt, outbound=outbound, teams=[TEAM, OTHER_TEAM],
        secure_cookies=False, clock=clock,
    )
    metrics = app.state.metrics
    try:
        with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30.0) as client:
            inbox = Inbox(topics, pipeline, store, fmt, client, clock)
            urgent = inbox.referral(31, priority="urgent")
            routine = inbox.referral(32, priority="routine")
            assert inbox.sign_in().status_code == 303
            assert client.get("/inbox").status_code == 200
            assert client.get(f"/referrals/{urgent['referral_id']}").status_code == 200
            assert client.get(f"/referrals/{routine['referral_id']}").status_code == 200
            missing = "00000000-0000-4000-8000-000000000000"
            assert client.get(f"/referrals/{missing}").status_code == 404
            assert client.get("/no-such-page").status_code == 404
            text = metrics.exposition().decode()
            # served on its own port too
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            metrics.serve(port)
            scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        outbound.close()
        store.close()

    def sample(name: str, **labels: str) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        found = [ln for ln in text.splitlines() if ln.startswith(f"{name}{{{wanted}}} ")]
        assert len(found) == 1, (name, labels)
        return float(found[0].rsplit(" ", 1)[1])

    route = "/referrals/{referral_id}"
    assert sample("referral_inbox_http_requests_total", method="GET", route=route, status="200") == 2
    assert sample("referral_inbox_http_requests_total", method="GET", route=route, status="404") == 1
    assert sample("referral_inbox_http_requests_total", method="GET", route="/inbox", status="200") == 1
    assert sample("referral_inbox_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert sample("referral_inbox_http_requests_total", method="POST", route="/sign-in", status="303") == 1
    assert sample("referral_inbox_http_request_seconds_count", route=route) == 3
    assert sample("referral_inbox_referrals", state="new", team=TEAM) == 2
    assert sample("referral_inbox_referrals", state="new", team=OTHER_TEAM) == 0
    assert sample("referral_inbox_referrals_new_urgent", team=TEAM) == 1
    assert sample("referral_inbox_referrals_overdue", team=TEAM) == 0
    assert "referral_inbox_statuses_unsent 0.0" in text
    assert "referral_key_directory_refused_records_total" in text
    assert "referral_inbox_referrals{" in scraped and route in scraped
    for exposed in (text, scraped):
        for record in (urgent, routine):
            assert str(record["referral_id"]) not in exposed
            assert record["child"]["given_name"] not in exposed and record["child"]["family_name"] not in exposed
        assert missing not in exposed and "fen.worker" not in exposed and "no-such-page" not in exposed


ALLOWED_LABELS = {
    "stage", "recipient", "reason", "route", "method", "status", "team", "state", "kind", "le", "format", "outcome", "phase",
}


def test_grafana_dashboard_reads_only_metrics_the_stages_expose(settings: Settings) -> None:
    """docs/grafana-dashboard.json: every metric a panel queries is exposed by the router,
    the inbox or the partner senders (adapter metrics), with the labels the panel groups by; no
    label could carry an identifier."""
    import re
    from pathlib import Path

    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from test_inbox_fixtures import TEAM, make_store

    from referral_broker.consumers.inbox.metrics import InboxMetrics
    from referral_broker.consumers.router_metrics import RouterMetrics

    router = RouterMetrics()
    router.deliveries.labels(recipient="school").inc()
    router.dead_letters.labels(stage="verify-open").inc()
    router.batch_seconds.observe(0.1)
    router.phase_seconds.labels("commit").observe(0.01)
    store = make_store(settings)
    try:
        inbox = InboxMetrics(store, [TEAM])
        inbox.requests.labels("/inbox", "GET", "200").inc()
        inbox.request_seconds.labels("/inbox").observe(0.1)
        exposed: dict[str, set[str]] = {}
        from test_adapter_metrics import exercised

        for text in (generate_latest(router.registry), inbox.exposition(), exercised().exposition()):
            for family in text_string_to_metric_families(text.decode()):
                for s in family.samples:
                    exposed.setdefault(s.name, set()).update(s.labels)
    finally:
        store.close()
    assert all(set(labels) <= ALLOWED_LABELS for labels in exposed.values()), exposed

    dashboard = json.loads((Path(__file__).parents[1] / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    names = {n for e in exprs for n in re.findall(r"\b(referral_[a-z_]+)\b", e)}
    assert names, exprs
    missing = sorted(n for n in names if n not in exposed)
    assert not missing, missing
    assert any(n.startswith("referral_router_") for n in names) and any(n.startswith("referral_inbox_") for n in names)
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            grouped = set()
            for by in re.findall(r"by \(([a-z_, ]+)\)", target["expr"]):
                grouped |= {x.strip() for x in by.split(",")}
            grouped |= set(re.findall(r"\{\{([a-z_]+)\}\}", target["legendFormat"]))
            used = set(re.findall(r"\b(referral_[a-z_]+)\b", target["expr"]))
            available = set().union(*(exposed[n] for n in used))
            assert grouped <= available, (panel["title"], grouped - available)
