"""Prometheus metrics for a partner's send path (issue 16, Build 5): what the adapters read and
refused, what reached Kafka, how many bytes, how long it took.

Labels are file formats (``police``, ``ctf``, ``canonical``...), refusal reasons from a fixed
list, message kinds (``referral``, ``status``), outcomes and stages: never a party's record, a
referral id, a file name, a field value or anything a person could be found by.

* ``referral_adapter_records_read_total{format}``: records read from partner files;
* ``referral_adapter_records_refused_total{format,reason}``: records refused before anything
  was sealed, once per record by its first problem (:data:`REASONS`);
* ``referral_adapter_files_total{format,outcome}``: files checked: ``checked`` (sent on, or
  sent with ``--skip-invalid``) or ``refused`` (nothing sent);
* ``referral_adapter_messages_sent_total{kind}`` and ``referral_adapter_bytes_sent_total{kind}``:
  sealed messages Kafka acknowledged from the outbox, and their value bytes;
* ``referral_adapter_delivery_failures_total``: deliveries stopped by the cluster (the rest
  stays queued in the outbox);
* ``referral_adapter_seconds{stage}``: ``check`` (reading and validating one file) and
  ``deliver`` (producing and flushing one outbox batch).

One registry per process (:data:`SEND_METRICS`): the send path counts into it wherever it
runs. A long-running sender exposes it like the router and the inbox do (``outbox flush
--every S --metrics-port P``: :meth:`AdapterMetrics.serve`, 127.0.0.1 only); a one-shot ``send
--metrics-file PATH`` adds its counts to the file node_exporter's textfile collector reads
(:meth:`AdapterMetrics.write_textfile`), so the counters there keep rising across runs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server

REASONS = ("unreadable", "repeated", "unknown_field", "not_allowed", "missing", "invalid")
MESSAGE_KINDS = ("referral", "status")
STAGES = ("check", "deliver")


def refusal_reason(path: str, reason: str) -> str:
    """The label for one problem: a fixed word, never the problem's text (which names fields)."""
    text = reason.lower()
    if path in ("<row>", "<record>", "") and ("expected" in text or "not valid json" in text or "not a canonical" in text):
        return "unreadable"
    if "not valid json" in text or "not a canonical referral" in text or "cannot read" in text:
        return "unreadable"
    if "the same" in text and "a file holds each once" in text:
        return "repeated"
    if "unknown field" in text:
        return "unknown_field"
    if "not one of the allowed values" in text:
        return "not_allowed"
    if "required" in text or "missing" in text:
        return "missing"
    return "invalid"


class AdapterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.records_read = Counter(
            "referral_adapter_records_read", "Records read from partner files, by format.", ["format"],
            registry=self.registry,
        )
        self.records_refused = Counter(
            "referral_adapter_records_refused",
            "Records refused before sealing, by format and reason (one per record).",
            ["format", "reason"],
            registry=self.registry,
        )
        self.files = Counter(
            "referral_adapter_files", "Partner files checked, by format and outcome (checked, refused).",
            ["format", "outcome"], registry=self.registry,
        )
        self.messages_sent = Counter(
            "referral_adapter_messages_sent", "Sealed messages Kafka acknowledged, by kind.", ["kind"],
            registry=self.registry,
        )
        self.bytes_sent = Counter(
            "referral_adapter_bytes_sent", "Bytes of sealed messages Kafka acknowledged, by kind.", ["kind"],
            registry=self.registry,
        )
        self.delivery_failures = Counter(
            "referral_adapter_delivery_failures",
            "Deliveries stopped by the cluster (the rest stays queued in the outbox).",
            registry=self.registry,
        )
        self.seconds = Histogram(
            "referral_adapter_seconds", "Time to check one file, or to deliver one outbox batch.", ["stage"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf")),
            registry=self.registry,
        )

    # -- counting (the send path calls these) -------------------------------------------------
    def read(self, fmt: str, count: int) -> None:
        if count:
            self.records_read.labels(fmt).inc(count)

    def refused(self, fmt: str, problems: Iterable[tuple[int | None, str, str]]) -> None:
        """Count each refused record once: ``problems`` are (record number, path, reason)."""
        first: dict[int | None, str] = {}
        unnumbered = 0
        for number, path, reason in problems:
            if number is None:
                unnumbered += 1
                first[-unnumbered] = refusal_reason(path, reason)
            elif number not in first:
                first[number] = refusal_reason(path, reason)
        for reason in first.values():
            self.records_refused.labels(fmt, reason).inc()

    def file(self, fmt: str, outcome: str) -> None:
        self.files.labels(fmt, outcome).inc()

    def sent(self, messages: Iterable[Any]) -> None:
        """Messages (anything with ``kind`` and ``value``) that Kafka acknowledged."""
        for m in messages:
            kind = m.kind if m.kind in MESSAGE_KINDS else "other"
            self.messages_sent.labels(kind).inc()
            self.bytes_sent.labels(kind).inc(len(m.value or b""))

    # -- exposing ---------------------------------------------------------------------------
    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics on ``host:port`` (a daemon thread; it ends with the process)."""
        start_http_server(port, addr=host, registry=self.registry)

    def snapshot(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample's value now, to count one run's part later (``write_textfile(since=)``)."""
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in self.registry.collect()
            for sample in family.samples
        }

    def write_textfile(
        self, path: Path, *, since: dict[tuple[str, tuple[tuple[str, str], ...]], float] | None = None
    ) -> None:
        """Add what was counted since the snapshot ``since`` (everything, without one) to the
        counts in ``path`` (written by earlier runs, if any) and write the sum there atomically
        (0644: node_exporter reads it; it holds counts only). A file that is not this
        exposition is replaced."""
        from prometheus_client.parser import text_string_to_metric_families

        previous: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        try:
            for family in text_string_to_metric_families(path.read_text("utf-8")):
                for s in family.samples:
                    previous[(s.name, tuple(sorted(s.labels.items())))] = s.value
        except (OSError, ValueError):
            previous = {}
        merged = AdapterMetrics()
        before = since or {}
        for (name, labels), value in self.snapshot().items():
            merged._seed(name, dict(labels), value - before.get((name, labels), 0.0))
        for (name, labels), value in previous.items():
            merged._seed(name, dict(labels), value)
        text = merged.exposition()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _seed(self, name: str, labels: dict[str, str], value: float) -> None:
        """Add one exposed sample's value into this registry (counters and histograms)."""
        if not value or name.endswith("_created"):
            return
        counters = {
            "referral_adapter_records_read_total": (self.records_read, ("format",)),
            "referral_adapter_records_refused_total": (self.records_refused, ("format", "reason")),
            "referral_adapter_files_total": (self.files, ("format", "outcome")),
            "referral_adapter_messages_sent_total": (self.messages_sent, ("kind",)),
            "referral_adapter_bytes_sent_total": (self.bytes_sent, ("kind",)),
        }
        if name in counters:
            metric, names = counters[name]
            if all(n in labels for n in names):
                metric.labels(*(labels[n] for n in names)).inc(value)
        elif name == "referral_adapter_delivery_failures_total":
            self.delivery_failures.inc(value)
        elif name.startswith("referral_adapter_seconds_") and labels.get("stage") in STAGES:
            child: Any = self.seconds.labels(labels["stage"])
            if name == "referral_adapter_seconds_sum":
                child._sum.inc(value)
            elif name == "referral_adapter_seconds_bucket":
                # buckets are exposed cumulatively; the child keeps one count per bucket
                bounds: Sequence[float] = self.seconds._upper_bounds
                le = float(labels["le"])
                if le in bounds:
                    i = list(bounds).index(le)
                    child._buckets[i].inc(value)
                    if i + 1 < len(bounds):
                        child._buckets[i + 1].inc(-value)


SEND_METRICS = AdapterMetrics()
