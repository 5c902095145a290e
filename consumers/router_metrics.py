"""Prometheus metrics for the router. Labels are stages, party names and topic roles only:
never a referral id, a field value or anything a person could be found by."""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from referral_broker.sealing.trust import RefusalCollector


class RouterMetrics:
    """One registry per router, so several routers (and tests) in one process stay apart."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.consumed = Counter(
            "referral_router_records_consumed", "Input records read and committed.", registry=self.registry
        )
        self.routed = Counter("referral_router_referrals_routed", "Referrals routed.", registry=self.registry)
        self.deliveries = Counter(
            "referral_router_deliveries",
            "Sealed shares sent, by recipient.",
            ["recipient"],
            registry=self.registry,
        )
        self.statuses = Counter(
            "referral_router_statuses", "Status messages carried back to referrers.", registry=self.registry
        )
        self.dead_letters = Counter(
            "referral_router_dead_letters",
            "Inputs dead-lettered, by stage.",
            ["stage"],
            registry=self.registry,
        )
        self.aborted = Counter(
            "referral_router_batches_aborted", "Transactions aborted and re-read.", registry=self.registry
        )
        self.rebuilds = Counter(
            "referral_router_client_rebuilds",
            "Kafka clients rebuilt after a failed transaction or an unreachable cluster.",
            registry=self.registry,
        )
        self.stalls = Counter(
            "referral_router_stalls",
            "Looks (one every stall period) that found records waiting on this router's partitions "
            "that it could not read: offsets held by an open transaction, or fetches that stopped.",
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "referral_router_batch_seconds", "Time to route and commit one batch.", registry=self.registry
        )
        self.phase_seconds = Histogram(
            "referral_router_batch_phase_seconds",
            "Wall time of one phase of a committed batch (see BatchPhases), by phase.",
            ["phase"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=self.registry,
        )
        # key-directory records this process refused (forged, replayed, colliding, ...), by reason
        self.registry.register(RefusalCollector())

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics on ``host:port`` (a daemon thread; it ends with the process)."""
        start_http_server(port, addr=host, registry=self.registry)


# A batch's phases, in the order the router goes through them (see Router._route_batch).
PHASES = (
    "poll",  # the poll that brought the batch: fetching and parsing (and waiting for records, if any)
    "catch_up",  # the registry, the delivery ledger and the audit chain's heads, read to their ends
    "route",  # each referral opened, validated, decided, its views encoded and sealed, its audit records
    "sign_send",  # one batch signature per topic, and every message handed to the producer
    "key_sync",  # the new case keys made durable (one group of fsyncs) before the commit
    "check",  # the group membership and the batch's partitions checked before the commit
    "commit",  # the transaction: begun (offsets announced), then its offsets committed and ended
)


class BatchClock:
    """One batch's time, phase by phase: :meth:`lap` gives the time since the last lap (wall
    and this thread's CPU) to a phase. Per batch, not per referral; a lap costs two clock reads."""

    __slots__ = ("_at", "_cpu_at", "cpu", "wall")

    def __init__(self) -> None:
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self._at = time.perf_counter()
        self._cpu_at = time.thread_time()

    def lap(self, phase: str) -> None:
        at, cpu_at = time.perf_counter(), time.thread_time()
        self.wall[phase] += at - self._at
        self.cpu[phase] += cpu_at - self._cpu_at
        self._at, self._cpu_at = at, cpu_at


class BatchPhases:
    """Where the committed batches' time went, by phase, since the router started: what an
    operator sees per phase on ``/metrics`` and ``route --json`` prints in its stats, so the
    profile of a batch (what bounds a referral's latency) needs no profiler. Bounded: totals,
    and the last :data:`KEPT` batches' wall times for their percentiles."""

    KEPT = 4096

    def __init__(self, histogram: Histogram | None = None) -> None:
        self._histogram = histogram
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self.batches = 0
        self.referrals = 0
        self._batch_ms: deque[float] = deque(maxlen=self.KEPT)

    def add(self, clock: BatchClock, referrals: int) -> None:
        """Count a committed batch of ``referrals`` records."""
        self.batches += 1
        self.referrals += referrals
        for phase in PHASES:
            self.wall[phase] += clock.wall[phase]
            self.cpu[phase] += clock.cpu[phase]
            if self._histogram is not None:
                self._histogram.labels(phase).observe(clock.wall[phase])
        self._batch_ms.append(sum(clock.wall.values()) * 1000)

    def summary(self) -> dict[str, Any]:
        """Per batch on average, in ms: each phase's wall time and this thread's CPU in it; the
        batches' wall times (p50, p99 of the last :data:`KEPT`) and records a batch."""
        n = self.batches
        if not n:
            return {"batches": 0}
        ordered = sorted(self._batch_ms)
        return {
            "batches": n,
            "records": self.referrals,
            "records_a_batch": round(self.referrals / n, 1),
            "ms_a_batch": {
                p: {"wall": round(self.wall[p] * 1000 / n, 2), "cpu": round(self.cpu[p] * 1000 / n, 2)} for p in PHASES
            },
            "batch_ms": {
                "p50": round(statistics.median(ordered), 1),
                "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
                "max": round(ordered[-1], 1),
            },
        }
