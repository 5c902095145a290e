"""Prometheus metrics from the partners' send path (issue 16, Build 5) on the real broker:
``send --metrics-file`` adds each run's records read, refused by reason, files, messages and
bytes sent and check/delivery time to a node_exporter textfile, counts only; the counts are
those of the run (a refused file: its records by reason, nothing sent); no label or value
carries an identifier, a referral id or a file name; ``outbox flush --every --metrics-port``
serves them like the router and the inbox."""

from __future__ import annotations

import csv
import io
import json
import socket
import urllib.request
from pathlib import Path
from types import SimpleNamespace

from county import cli
from prometheus_client.parser import text_string_to_metric_families

from referral_broker.adapters import example_file
from referral_broker.config import Settings
from referral_broker.producers.adapter_metrics import REASONS, AdapterMetrics, refusal_reason

SCHOOL = "school-110123"


def exercised() -> AdapterMetrics:
    """A registry with every adapter metric and label in use (for the dashboard test)."""
    m = AdapterMetrics()
    m.read("schools", 3)
    m.refused("schools", [(1, "identifiers.upn", "not a valid UPN")])
    m.file("schools", "checked")
    m.sent([SimpleNamespace(kind="referral", value=b"x" * 10)])
    m.delivery_failures.inc()
    m.seconds.labels("check").observe(0.2)
    m.seconds.labels("deliver").observe(0.1)
    return m


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_send_counts_what_it_read_refused_and_sent_without_identifiers(
    county: Settings, kafka_bootstrap: str, tmp_path: Path
) -> None:
    prom = tmp_path / "textfile" / "referral_adapter.prom"
    source = example_file("schools")
    rows = list(csv.DictReader(io.StringIO(source.read_text("utf-8"))))
    sent = cli(county, kafka_bootstrap, "send", "--as", SCHOOL, "--file", str(source), "--metrics-file", str(prom), "--json")
    assert sent.exit_code == 0, sent.output
    delivered = json.loads(sent.stdout)["delivered"]
    assert len(delivered) == len(rows) > 0
    first = samples(prom.read_text("utf-8"))
    assert prom.stat().st_mode & 0o777 == 0o644
    assert value(first, "referral_adapter_records_read_total", format="schools") == len(rows)
    assert value(first, "referral_adapter_files_total", format="schools", outcome="checked") == 1
    assert value(first, "referral_adapter_messages_sent_total", kind="referral") == len(rows)
    assert value(first, "referral_adapter_bytes_sent_total", kind="referral") > 500 * len(rows)  # sealed, signed
    assert value(first, "referral_adapter_seconds_count", stage="check") == 1
    assert value(first, "referral_adapter_seconds_count", stage="deliver") >= 1
    assert not any(name == "referral_adapter_records_refused_total" for name, _ in first)

    # a file with a broken UPN and a referral twice (both copies refused): nothing sent, each counted
    bad_rows = [dict(r) for r in rows]
    bad_rows[0]["UPN"] = "R873236421875"
    bad_rows.append(dict(rows[1]))
    bad = tmp_path / "bad-export-for-fenland.csv"
    out = io.StringIO()
    writer = csv.DictWriter(out, list(rows[0]))
    writer.writeheader()
    writer.writerows(bad_rows)
    bad.write_text(out.getvalue(), "utf-8")
    refused = cli(county, kafka_bootstrap, "send", "--as", SCHOOL, "--file", str(bad), "--metrics-file", str(prom))
    assert refused.exit_code != 0 and "nothing sent" in str(refused.exception)
    text = prom.read_text("utf-8")
    second = samples(text)
    assert value(second, "referral_adapter_records_read_total", format="schools") == 2 * len(rows) + 1  # added up
    assert value(second, "referral_adapter_files_total", format="schools", outcome="refused") == 1
    assert value(second, "referral_adapter_records_refused_total", format="schools", reason="invalid") == 1
    assert value(second, "referral_adapter_records_refused_total", format="schools", reason="repeated") == 2
    assert value(second, "referral_adapter_messages_sent_total", kind="referral") == len(rows)  # nothing more sent
    assert value(second, "referral_adapter_seconds_count", stage="check") == 2

    # counts and fixed words only: no identifier, referral id, file name or value
    for r in rows:
        for cell in (r["UPN"], r["Referral ID"], r["Legal Surname"], r["Legal Forename"], r["Postcode"]):
            assert not cell or cell not in text
    assert "R873236421875" not in text and bad.name not in text and "fenland" not in text and SCHOOL not in text
    labels = {k for _, ls in second for k, _ in ls}
    assert labels <= {"format", "reason", "outcome", "kind", "stage", "le"}
    assert {dict(ls).get("reason") for name, ls in second if name == "referral_adapter_records_refused_total"} <= set(REASONS)


def test_refusal_reasons_are_fixed_words() -> None:
    assert refusal_reason("<row>", "expected a JSON object ({...}), found a list") == "unreadable"
    assert refusal_reason("", "not valid JSON (column 3)") == "unreadable"
    assert refusal_reason('"Ref" (referral_id)', "the same referral as record 2: a file holds each once") == "repeated"
    assert refusal_reason("shoe_size", "unknown field") == "unknown_field"
    assert refusal_reason("child.sex", "not one of the allowed values: female, male") == "not_allowed"
    assert refusal_reason("child.family_name", "required") == "missing"
    assert refusal_reason("identifiers.upn", "not a valid UPN (check letter)") == "invalid"
    m = AdapterMetrics()
    m.refused("police", [(4, "a", "required"), (4, "b", "unknown field"), (None, "<record>", "expected a JSON object")])
    got = samples(m.exposition().decode())
    assert value(got, "referral_adapter_records_refused_total", format="police", reason="missing") == 1  # once per record
    assert value(got, "referral_adapter_records_refused_total", format="police", reason="unreadable") == 1
    assert value(got, "referral_adapter_records_refused_total", format="police", reason="unknown_field") == 0


def test_metrics_are_served_on_a_loopback_port_and_the_flush_option_needs_every(
    county: Settings, kafka_bootstrap: str
) -> None:
    m = exercised()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m.serve(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    got = samples(body)
    assert value(got, "referral_adapter_records_read_total", format="schools") == 3
    assert value(got, "referral_adapter_delivery_failures_total") == 1
    once = cli(county, kafka_bootstrap, "outbox", "flush", "--as", SCHOOL, "--metrics-port", str(port))
    assert once.exit_code == 2 and "--metrics-port needs --every" in once.output
