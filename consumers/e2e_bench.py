"""``bench e2e`` (issue 20, goal 5): latency from a partner's send to the district team's inbox.

Under a fresh topic prefix (topics deleted at the end) with the shipped county:

- the council's router runs as its own ``referral-broker route`` process (the bench's prefix,
  its own data folder), as it runs in production;
- the team's inbox ingest (``consumers.inbox.ingest.TeamIngest``, the real ``InboxStore`` and
  ``SealedReferralFormat``) runs in a thread of this process; the store records, for each new
  referral, the moment its row was committed;
- a school offers referrals for the Cambridge district team at a fixed rate, **open loop**:
  referral i is due at ``start + i / rate`` whatever happened to the ones before it (queued on
  the school's producer, never waiting for the previous one). Each was validated, sealed for
  the hub and signed by the school's own sealer (as ``IntakeSender`` does) *before* the clock
  started, as a partner's system does at its own pace: the figures are the pipeline's, not
  this process's sealing speed (printed apart). Latency is measured from when a referral was
  *due*, so a sender that fell behind shows in the figures instead of hiding the queue (and
  its lag is reported).

A few warm-up referrals go through first (the router's and the ingest's groups joined, keys
loaded); they are not counted. Figures are printed, never asserted.

It also prints what the offered rate costs in CPU: the router process's, the broker's (when it
runs on this machine; all it did meanwhile, so a broker serving others counts their work too),
this process's (the sender's produce and the inbox ingest) and the whole machine's CPU seconds
from the first due referral to the last stored, per referral stored, and the cores the target
rate would need at those costs (the CPU of the school's sealing ahead added). When the goal is
missed and those exceed the machine, or one router process would need more than the one core
its Python can use at a time, it says so with the figures (``capacity.why``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from referral_broker.bench_profile import machine_cpu_ticks, process_cpu_s
from referral_broker.cluster.topics import ensure_with_county
from referral_broker.config import Settings
from referral_broker.consumers.inbox.ingest import TeamIngest
from referral_broker.consumers.inbox.sealed_format import SealedReferralFormat
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.consumers.inbox.store_referrals import IngestResult
from referral_broker.consumers.router_bench import SENDER, _shaped, delete_namespace, router_env, wait_settled
from referral_broker.errors import BrokerError
from referral_broker.parties import HUB, all_parties
from referral_broker.producers.intake import IntakeSender, as_checked
from referral_broker.sealing.key_admin import init_parties
from referral_broker.startup_heap import freeze_startup_heap

TEAM = "district-cambridge"  # where router_bench._shaped's one-recipient referrals go
GOAL_P99_MS = 250.0
WARMUP = 10
FELL_BEHIND_MS = 100.0  # a referral sent this long after it was due is late; > 1% late: fell behind


class TimedStore(InboxStore):
    """The inbox store, noting when each new referral's row was stored (monotonic clock)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.stored_at: dict[str, float] = {}
        self.routed_at: dict[str, float] = {}  # the router's produce time (record timestamp)
        self.read_at: dict[str, float] = {}  # when the ingest began storing it

    def ingest(self, team: str, summary: Any, record: Any) -> IngestResult:
        begun, wall = time.monotonic(), time.time()
        result = super().ingest(team, summary, record)
        if result.outcome == "new":
            self.stored_at[result.referral_id] = time.monotonic()
            self.read_at[result.referral_id] = begun
            # the record's age on the wall clock, read now: an offset between the two clocks
            # taken once at the start went stale when the wall clock was slewed in a run (the
            # split came out negative)
            self.routed_at[result.referral_id] = begun - (wall - record.timestamp_ms / 1000)
        return result


def _percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile of already sorted values."""
    index = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def wait_stored(store: TimedStore, ids: list[str], timeout_s: float, ingest: TeamIngest) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ingest.error is not None:
            raise BrokerError(f"the inbox ingest stopped: {type(ingest.error).__name__}: {ingest.error}")
        if all(i in store.stored_at for i in ids):
            return True
        time.sleep(0.05)
    return False


def close_inbox(ingest: TeamIngest | None, store: InboxStore | None) -> None:
    """Stop a bench's inbox ingest and close its store (either may never have been made)."""
    if ingest is not None:
        ingest.stop()
    if store is not None:
        store.close()


class RouterProcess:
    """A ``referral-broker route`` process on a bench's namespace; :meth:`stats` after it stopped."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self._stats: dict[str, Any] = {}

    def poll(self) -> int | None:
        return self.popen.poll()

    def stats(self) -> dict[str, Any]:
        return self._stats

    def stop(self) -> None:
        self.popen.send_signal(signal.SIGTERM)  # a clean stop: it leaves the group at once
        try:
            out, _ = self.popen.communicate(timeout=60)
            self._stats = json.loads(out) if out.strip() else {}
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.communicate()
        except json.JSONDecodeError:
            self._stats = {}


@contextlib.contextmanager
def router_process(settings: Settings, bootstrap: str, log: Path, instance: str) -> Iterator[RouterProcess]:
    """The council's router as production runs it, stopped cleanly on the way out (its stderr in ``log``)."""
    cmd = [sys.executable, "-m", "referral_broker.cli.main", "route", "--json", "--instance", instance]
    with log.open("wb") as stderr:
        router = RouterProcess(subprocess.Popen(cmd, env=router_env(settings, bootstrap), stdout=subprocess.PIPE, stderr=stderr))
        try:
            yield router
        finally:
            router.stop()


def run(
    base: Settings,
    bootstrap: str,
    *,
    rate: float = 200.0,
    seconds: float = 60.0,
    broker: int | None = None,
    progress: Callable[[str], None] = lambda s: None,
    routers: int = 1,
) -> dict[str, Any]:
    """``broker``: the local broker's pid, so its CPU is counted (None: a remote broker).
    ``routers``: ``route`` processes in the router group (goal 6's scale-out, here for latency)."""
    count = max(1, round(rate * seconds))
    prefix = f"benche{uuid.uuid4().hex[:6]}."
    with tempfile.TemporaryDirectory(prefix="rb-bench-e2e-") as tmp:
        settings = base.replace(
            kafka_topic_prefix=prefix, paths_data_dir=Path(tmp) / "data", kafka_bootstrap_servers=bootstrap
        )
        settings.paths_data_dir.mkdir(mode=0o700)  # the inbox database's folder is private
        ingest: TeamIngest | None = None
        store: TimedStore | None = None
        stats: dict[str, Any] = {}
        try:
            progress("topics and keys")
            ensure_with_county(settings, bootstrap)
            init_parties(
                settings, [HUB, SENDER, *[p for p in all_parties() if p not in (SENDER, HUB)]], bootstrap=bootstrap
            )
            progress(f"{count + WARMUP} synthetic referrals")
            referrals = _shaped(count + WARMUP, 1, seed=7)
            warm, offered = referrals[:WARMUP], referrals[WARMUP:]
            progress(f"{routers} router process{'es' if routers > 1 else ''} and inbox ingest")
            with contextlib.ExitStack() as running:
                group = [
                    running.enter_context(router_process(settings, bootstrap, Path(tmp) / f"router-{i}.log", f"bench-e2e-{i}"))
                    for i in range(routers)
                ]
                pids = [r.popen.pid for r in group]
                if routers > 1:
                    _settled(settings, bootstrap, group)
                store = TimedStore(settings.inbox_db_path)
                ingest = TeamIngest(settings, TEAM, store, SealedReferralFormat.from_settings(settings, (TEAM,)))
                ingest.start()
                with IntakeSender(settings, bootstrap, SENDER) as sender:
                    # Sealed ahead, as a partner's system does at its own pace: what is timed is the
                    # pipeline from the partner's send, not this one process's sealing speed
                    progress(f"sealing {count} referrals for the hub ahead of the clock")
                    sealing, sealing_cpu = time.perf_counter(), time.process_time()
                    messages = [sender.sealer.referral(c.record) for c in as_checked(offered)]
                    sealing, sealing_cpu = time.perf_counter() - sealing, time.process_time() - sealing_cpu
                    progress(f"warm-up: {WARMUP} referrals through router and ingest")
                    sender.send_referrals(warm)
                    if not wait_stored(store, [str(r["referral_id"]) for r in warm], 180.0, ingest):
                        raise BrokerError("the warm-up referrals did not reach the inbox within 180 s")
                    progress(f"offering {count} referrals at {rate:g}/s for {seconds:g} s")
                    due: list[float] = []
                    sent_at: list[float] = []
                    freeze_startup_heap()  # as the commands whose work this process stands in for do
                    cpu_before = _cpu_now(pids, broker)
                    start = time.monotonic() + 0.05  # the clock starts now
                    for i, message in enumerate(messages):
                        when = start + i / rate
                        wait = when - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                        sent_at.append(time.monotonic())
                        due.append(when)
                        message.send(sender.producer)  # queued; kafka-python's I/O thread sends it
                    sender.producer.flush()  # confirms (or raises) every one of them
                    offered_until = time.monotonic()
                ids = [str(r["referral_id"]) for r in offered]
                drained = wait_stored(store, ids, max(60.0, seconds), ingest)
                finished = time.monotonic()
                cpu_after = _cpu_now(pids, broker)
                ingest.stop()
            every = [r.stats() for r in group]
            stats = {k: sum(s.get(k) or 0 for s in every) for k in ("consumed", "routed", "delivered", "dead_lettered", "batches")}
            consumed = [s.get("consumed") for s in every]
        finally:
            close_inbox(ingest, store)
            delete_namespace(settings, bootstrap)
    stored = [(store.stored_at[i] - d) * 1000 for i, d in zip(ids, due, strict=True) if i in store.stored_at]
    lags = sorted((s - d) * 1000 for s, d in zip(sent_at, due, strict=True))
    delivered = len(stored)
    # A referral not stored by the end counts with the time it had waited then (a lower bound),
    # so the percentiles are never those of the fast ones alone
    waiting = [(finished - d) * 1000 for i, d in zip(ids, due, strict=True) if i not in store.stored_at]
    latencies = sorted(stored + waiting)
    last_stored = max((store.stored_at[i] for i in ids if i in store.stored_at), default=finished)
    figures = (
        {
            "p50": round(_percentile(latencies, 50), 1),
            "p95": round(_percentile(latencies, 95), 1),
            "p99": round(_percentile(latencies, 99), 1),
            "max": round(latencies[-1], 1),
            "min": round(latencies[0], 1),
        }
        if latencies
        else {}
    )
    behind = [v for v in lags if v > FELL_BEHIND_MS]
    fell_behind = len(behind) > count // 100  # more than 1% of the sends late

    def spread(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        if not ordered:
            return {}
        return {q: round(_percentile(ordered, float(q[1:])), 1) for q in ("p50", "p95", "p99")} | {
            "max": round(ordered[-1], 1)
        }

    # where the time went: due -> the router produced the team's copy (its record timestamp, the
    # wall clock's: a split, not exact) -> the ingest began storing it (the router's transaction
    # committed, the ingest polled and verified it) -> its row committed
    stages = {
        "due_to_router_produced": spread([(store.routed_at[i] - d) * 1000 for i, d in zip(ids, due, strict=True) if i in store.routed_at]),
        "produced_to_store_begun": spread([(store.read_at[i] - store.routed_at[i]) * 1000 for i in ids if i in store.read_at]),
        "store": spread([(store.stored_at[i] - store.read_at[i]) * 1000 for i in ids if i in store.read_at]),
    }
    return {
        "team": TEAM,
        "partner": SENDER,
        "rate_target": rate,
        "seconds_target": seconds,
        "offered": count,
        "delivered": delivered,
        "lost_or_late": count - delivered,
        "drained": drained,
        "latency_ms": figures,
        "latency_lower_bound": bool(waiting),
        "stages_ms": stages,
        "offered_rate": round(count / (offered_until - due[0]), 1),
        "sealed_ahead_ms_per_referral": round(sealing / count * 1000, 2),
        "achieved_rate": round(delivered / (last_stored - due[0]), 1) if delivered else 0.0,
        "sender": {
            "lag_ms": {
                "p50": round(_percentile(lags, 50), 1),
                "p99": round(_percentile(lags, 99), 1),
                "max": round(lags[-1], 1),
            },
            "late_sends": len(behind),
            "fell_behind": fell_behind,
        },
        "goal": {"p99_ms": GOAL_P99_MS},
        "ratio_p99_to_goal": round(figures["p99"] / GOAL_P99_MS, 3) if figures else None,
        "router": stats,
        "routers": routers,
        "consumed_by_router": consumed,
        "capacity": capacity(
            cpu_before,
            cpu_after,
            delivered,
            rate,
            sealing_cpu / count * 1000,
            figures.get("p99"),
            broker is not None,
            routers=routers,
        ),
        "router_batches": [batch_profile(s.get("phases") or {}, rate / routers) for s in every],
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "prefix": prefix,
    }


# The phases of a router's batch (route --json's stats, consumers.router_metrics.PHASES) that
# take about as long whatever the batch holds; routing and signing-and-sending grow with it.
FIXED_PHASES = ("poll", "catch_up", "key_sync", "check", "commit")


def batch_profile(phases: dict[str, Any], rate: float) -> dict[str, Any] | None:
    """A router process's batches (its ``route --json`` stats' ``phases``): ms a batch by phase,
    and what they make of a referral's wait at ``rate``/s (what this router was offered).

    A referral arrives while a batch is routed, waits for it, then for its own, which holds
    what arrived meanwhile. A batch takes ``fixed`` ms whatever it holds plus ``per`` ms a
    referral, so at ``rate`` referrals a ms it settles at T = fixed / (1 - rate * per): the
    share of the router's time the referrals themselves take (``busy``) stretches the fixed
    part, and a referral's latency is about two batches plus the inbox's read."""
    if not phases.get("batches"):
        return None
    ms = phases["ms_a_batch"]
    n = phases["records_a_batch"]
    fixed = sum(ms[p]["wall"] for p in FIXED_PHASES if p in ms)
    per = sum(v["wall"] for p, v in ms.items() if p not in FIXED_PHASES) / n if n else 0.0
    busy = rate / 1000 * per
    return {
        **phases,
        "fixed_ms": round(fixed, 2),
        "per_referral_ms": round(per, 3),
        "busy": round(busy, 3),
        "predicted_batch_ms": round(fixed / (1 - busy), 1) if busy < 1 else None,
    }


def _settled(settings: Settings, bootstrap: str, group: list[RouterProcess]) -> None:
    """Wait until every router process holds some of the intake partitions (the group has
    settled), so no rebalance falls inside the timed window."""
    wait_settled(settings, bootstrap, [r.popen for r in group])
    if any(r.poll() is not None for r in group):
        raise BrokerError("a benchmark router exited before the group settled")


def _cpu_now(routers: list[int], broker: int | None) -> dict[str, float | None]:
    """CPU seconds so far: the machine's (busy clock ticks over every core), the router
    processes', the broker's and this process's (all its threads: the sender's produce, the
    inbox ingest)."""
    busy, _ = machine_cpu_ticks()
    each = [process_cpu_s(pid) for pid in routers]
    return {
        "at": time.monotonic(),
        "machine": busy / os.sysconf("SC_CLK_TCK"),
        "router": None if any(c is None for c in each) else sum(c for c in each if c is not None),
        "broker": process_cpu_s(broker),
        "this_process": time.process_time(),
    }


def capacity(
    before: dict[str, float | None],
    after: dict[str, float | None],
    stored: int,
    rate: float,
    sealing_ms: float,
    p99_ms: float | None,
    broker_here: bool,
    *,
    routers: int = 1,
) -> dict[str, Any]:
    """What one stored referral cost each part in CPU over the run, the cores ``rate`` would need
    at those costs, and, when the goal was missed for want of them, why. ``router`` is all the
    ``routers`` processes together."""
    cores = os.cpu_count() or 1
    wall = float(after["at"] or 0.0) - float(before["at"] or 0.0)
    per: dict[str, float | None] = {}
    for part in ("router", "broker", "this_process", "machine"):
        a, b = before[part], after[part]
        per[part] = None if a is None or b is None or not stored else round((b - a) / stored * 1000, 2)
    per["sealing_ahead"] = round(sealing_ms, 2)
    # the pipeline's own processes, not whatever else the machine ran meanwhile
    parts = [v for k in ("router", "broker", "this_process") if (v := per[k]) is not None]
    pipeline = round(sum(parts) + sealing_ms, 2) if per["router"] is not None and per["this_process"] is not None else None
    per["pipeline"] = pipeline
    needed = None if pipeline is None else round(pipeline * rate / 1000, 2)
    router_cores = None if per["router"] is None else round(per["router"] * rate / 1000, 2)
    result: dict[str, Any] = {
        "window_s": round(wall, 1),
        "cpu_ms_per_referral": per,
        "cores": cores,
        "cores_needed_at_rate": needed,
        "router_cores_needed_at_rate": router_cores,
        "router_rate_one_core": None if not per["router"] else round(1000 / per["router"], 1),
        "broker_on_this_machine": broker_here,
        "why": None,
    }
    if p99_ms is None or p99_ms <= GOAL_P99_MS:
        return result
    reasons = []
    if needed is not None and needed > cores:
        reasons.append(
            f"at {rate:g}/s the pipeline needs {needed} cores at the CPU each referral cost it in this run "
            f"({pipeline} ms: the router {per['router']}, the broker {per['broker'] if broker_here else 'elsewhere'}, "
            f"the school's produce and the inbox ingest {per['this_process']}, the school's sealing "
            f"{sealing_ms:.2f}); this machine has {cores}"
        )
    if router_cores is not None and router_cores > routers:
        reasons.append(
            f"{'one router process' if routers == 1 else f'{routers} router processes'} used {per['router']} ms "
            f"of CPU a referral, so {rate:g}/s needs {router_cores} cores of them, and each one's Python runs "
            f"on one core at a time: one router routes at most about {result['router_rate_one_core']}/s here "
            "(`--routers 2` for a second one)"
        )
    if reasons:
        result["why"] = "; ".join(reasons)
    return result
