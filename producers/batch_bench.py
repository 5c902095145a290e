"""``bench batch`` (issue 20, goal 4): DWP's monthly batch through ``send``, end to end.

Makes a synthetic DWP batch CSV in the real adapter format (``adapters/dwp.py``, FORMATS.md):
``DISTINCT`` synthetic households from the project's generator rendered by the DWP adapter, then
repeated with a fresh ``REFERRAL_ID`` per row up to ``rows`` (rendering is ~3 ms a row; the file
is not what is measured). Then times exactly what ``referral-broker send --as dwp --file F``
does: ``producers.checked.check_file`` (read and validate every row, nothing sent if one is
invalid), then ``PartnerSender.send_checked`` (convert again, seal for the hub, sign, keep in the
outbox, deliver to the real broker), under a fresh topic prefix whose topics are deleted at the
end. A file of ``file_pool.MIN_BYTES`` or more is checked and sealed by worker processes, as
``send`` does (``--workers`` sets how many; 1: none). The RSS of the send's processes is
sampled every ``SAMPLE_S`` during the run: flat memory is the goal.

Beside the rate it prints the CPU a row cost: the send's (its kafka-python thread and its
workers too) and the local broker's, the cores the goal's rate would need at those costs, and,
when the goal is missed for want of them, why (``capacity.why``).

Figures are printed, never asserted: they depend on the machine and what else runs on it.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from referral_broker.bench_profile import process_cpu_s
from referral_broker.cluster.topics import admin_client, ensure_with_county, plan, topic_name
from referral_broker.config import Settings
from referral_broker.errors import BrokerError
from referral_broker.parties import HUB
from referral_broker.startup_heap import freeze_startup_heap

PARTY = "dwp"
DISTINCT = 1000  # distinct synthetic households rendered; the rest repeat them with new ids
GOAL_ROWS = 100_000
GOAL_SECONDS = 60.0
SAMPLE_S = 0.25


def write_batch(path: Path, rows: int, *, seed: int = 20) -> tuple[int, str]:
    """A valid DWP batch of ``rows`` rows at ``path``; returns its size in bytes and the referral
    id of its last row, the batch's one urgent referral (the others are routine or high), to
    time the urgent lane."""
    from referral_broker.adapters import get_adapter
    from referral_broker.schemas.synth import synthetic_referrals

    records = []
    distinct = list(synthetic_referrals(min(rows, DISTINCT) + 1, seed=seed))
    for n, r in enumerate(distinct, 1):
        urgent = n == len(distinct)
        r = {**r, "referrer": {**r["referrer"], "partner": "dwp"}}
        r["priority"] = "urgent" if urgent else ("routine" if r["priority"] == "urgent" else r["priority"])
        r["service_providers"] = []  # no charity named: a batch row names no organisation
        if r.get("health_and_development"):
            r["health_and_development"] = {**r["health_and_development"], "gp_practice_ods": None}
        if r.get("school"):
            r["school"] = {**r["school"], "urn": None}
        records.append(r)
    rendered = io.StringIO()
    get_adapter("dwp").render(records, rendered)
    header, *lines = rendered.getvalue().splitlines(keepends=True)
    if not header.startswith("REFERRAL_ID,") or len(lines) != len(records):
        raise BrokerError("the DWP adapter rendered an unexpected layout (one row per referral, REFERRAL_ID first)")
    *lines, urgent_line = lines
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(header)
        for number in range(rows):
            line = urgent_line if number == rows - 1 else lines[number % len(lines)]
            referral_id = str(uuid.uuid4())
            out.write(referral_id + line[36:])  # a fresh id in the first column
    return path.stat().st_size, referral_id


def rss_mb() -> float:
    """The resident set now of this process and the worker processes it started (the send's
    checking and sealing pool), from /proc/<pid>/statm."""
    from .file_pool import worker_pids

    total = 0
    for pid in ["self", *map(str, worker_pids())]:
        with contextlib.suppress(OSError, IndexError):  # a worker that has just exited
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return total * os.sysconf("SC_PAGE_SIZE") / 1e6


def _children_cpu_s() -> float:
    """CPU seconds of this process's children: those waited for, and those still running."""
    from .file_pool import worker_pids

    running = [process_cpu_s(pid) for pid in worker_pids()]  # polling them reaps the finished
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done.ru_utime + done.ru_stime + sum(c for c in running if c is not None)


class RssSampler:
    """Samples the send's RSS (this process and its workers) every ``interval`` seconds in a
    thread: (seconds, MB)."""

    def __init__(self, interval: float = SAMPLE_S) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = 0.0

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self._t0, rss_mb()))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic() - self._t0, rss_mb()))

    def summary(self) -> dict[str, Any]:
        values = [mb for _, mb in self.samples]
        # the last sample is taken once the send has returned (its workers gone): the end, not
        # a quarter of the run
        running = values[:-1] if len(values) > 2 else values
        n = len(running)
        # RSS at each quarter of the run: a leak shows as a rise from quarter to quarter
        quarters = [round(running[min(n - 1, (n * q) // 4)], 1) for q in (1, 2, 3, 4)]
        return {
            "start_mb": round(values[0], 1),
            "peak_mb": round(max(values), 1),
            "end_mb": round(values[-1], 1),
            "at_quarters_mb": quarters,
            "growth_second_half_mb": round(running[-1] - running[n // 2], 1),
            "samples": len(values),
        }


def _on_topic(settings: Settings, bootstrap: str, topic: str) -> int:
    """Records on ``topic`` (sum of its partitions' end offsets; a fresh topic starts at 0)."""
    from kafka import TopicPartition
    from kafka.admin import OffsetSpec

    parts = next(s.partitions for s in plan(settings.kafka_topic_profile, settings.kafka_topic_prefix) if s.name == topic)
    admin = admin_client(settings, bootstrap)
    try:
        found = admin.list_partition_offsets({TopicPartition(topic, p): OffsetSpec.LATEST for p in range(parts)})
        return sum(o.offset for o in found.values())
    finally:
        admin.close()


def run(
    base: Settings,
    bootstrap: str,
    *,
    rows: int = GOAL_ROWS,
    progress: Callable[[str], None] = lambda s: None,
    profile: bool = False,
    broker: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Every figure of one run; with ``profile``, the timed part runs under cProfile and its
    time by component is returned too (the rates are then the profiled ones). ``broker``: the
    local broker's pid, so its CPU is counted (None: a remote broker). ``workers``: the send's
    checking and sealing processes (``[send] workers``; None: as configured)."""
    import cProfile

    from referral_broker.bench_profile import by_component
    from referral_broker.producers.checked import check_file
    from referral_broker.producers.sending import PartnerSender
    from referral_broker.sealing.key_admin import init_parties

    prefix = f"benchb{uuid.uuid4().hex[:6]}."
    with tempfile.TemporaryDirectory(prefix="rb-bench-batch-") as tmp:
        settings = base.replace(kafka_topic_prefix=prefix, paths_data_dir=Path(tmp) / "data")
        if workers is not None:
            settings = settings.replace(send_workers=workers)
        path = Path(tmp) / "dwp-batch.csv"
        progress(f"writing a {rows:,}-row DWP batch")
        size, urgent_id = write_batch(path, rows)
        try:
            progress("topics and keys")
            ensure_with_county(settings, bootstrap)
            init_parties(settings, [HUB, PARTY], bootstrap=bootstrap)
            progress(f"send --as {PARTY} --file {path.name}")
            profiler = cProfile.Profile() if profile else None
            with RssSampler() as sampler:
                if profiler is not None:
                    profiler.enable()
                broker0, cpu0 = process_cpu_s(broker), time.process_time() + _children_cpu_s()
                t0 = time.perf_counter()
                # read + validate, as 'send' does: by worker processes for a large file
                checked = check_file(PARTY, path, fmt="native", settings=settings)
                t1, cpu1 = time.perf_counter(), time.process_time() + _children_cpu_s()
                processes = 1 if checked.pool is None else 1 + checked.pool.workers
                delivered: list[tuple[float, int]] = []  # (seconds since t0, rows delivered by then)
                sender = PartnerSender(settings, bootstrap, PARTY)
                freeze_startup_heap()  # as 'send' does before its loop
                report = sender.send_checked(
                    checked, progress=lambda n: delivered.append((time.perf_counter() - t0, n))
                )
                t2, broker2 = time.perf_counter(), process_cpu_s(broker)
                cpu2 = time.process_time() + _children_cpu_s()
                if profiler is not None:
                    profiler.disable()
            intake = topic_name(settings, "intake", PARTY)
            on_topic = _on_topic(settings, bootstrap, intake)
        finally:
            admin = admin_client(settings, bootstrap)
            try:
                admin.delete_topics([s.name for s in plan(settings.kafka_topic_profile, prefix)])
            finally:
                admin.close()
    seconds = t2 - t0
    rate = rows / seconds
    goal_rate = GOAL_ROWS / GOAL_SECONDS
    return {
        "party": PARTY,
        "rows_in_file": rows,
        "file_mb": round(size / 1e6, 1),
        "distinct_households": min(rows, DISTINCT),
        "rows_checked": checked.total,
        "rows_sent": len(report.delivered),
        "rows_queued": len(report.queued),
        "rows_rejected": len(report.rejected),
        "records_on_intake_topic": on_topic,
        "seconds": {"total": round(seconds, 2), "read_validate": round(t1 - t0, 2), "seal_send": round(t2 - t1, 2)},
        "rows_per_second": round(rate, 1),
        "processes": processes,
        "urgent_last_row": _urgent_last_row(urgent_id, report.delivered, delivered),
        "rss": sampler.summary(),
        "peak_rss_mb_getrusage": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "goal": {"rows": GOAL_ROWS, "seconds": GOAL_SECONDS, "rows_per_second": round(goal_rate, 1)},
        "projected_seconds_for_goal_rows": round(GOAL_ROWS / rate, 1),
        "ratio_to_goal": round(rate / goal_rate, 3),
        "capacity": capacity(
            rows,
            rate,
            {"read_validate": cpu1 - cpu0, "seal_send": cpu2 - cpu1},
            None if broker0 is None or broker2 is None else broker2 - broker0,
            processes=processes,
        ),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "prefix": prefix,
        "profile": by_component(profiler) if profiler is not None else None,
    }


def _urgent_last_row(
    referral_id: str, delivered: Sequence[Any], progress: list[tuple[float, int]]
) -> dict[str, Any]:
    """When the file's last row, its one urgent referral, was on the intake topic: its place
    in the send order and the seconds from the start of ``send`` to the flush that delivered
    it (the urgent lane sends it right after the check pass, not after every other row)."""
    place = next((n for n, d in enumerate(delivered, 1) if d.referral_id == referral_id), None)
    if place is None:
        return {"sent_as": None, "seconds": None}
    total = 0
    for seconds, n in progress:
        total += n
        if total >= place:
            return {"sent_as": place, "seconds": round(seconds, 2)}
    return {"sent_as": place, "seconds": None}


def capacity(
    rows: int, rate: float, send_cpu_s: dict[str, float], broker_cpu_s: float | None, *, processes: int = 1
) -> dict[str, Any]:
    """The CPU a row cost the send (by phase, its worker processes included) and the broker,
    the cores the goal's rate would need at those costs, and, when the goal was missed for want
    of them, why. ``processes``: the send's (1: no worker pool, so one core at most)."""
    cores = os.cpu_count() or 1
    goal_rate = GOAL_ROWS / GOAL_SECONDS
    send = {k: round(v / rows * 1000, 3) for k, v in send_cpu_s.items()}
    send_ms = round(sum(send.values()), 3)
    broker_ms = None if broker_cpu_s is None else round(broker_cpu_s / rows * 1000, 3)
    needed = round((send_ms + (broker_ms or 0.0)) * goal_rate / 1000, 2)
    one_core = round(1000 / send_ms, 1) if send_ms > 0 else None
    result: dict[str, Any] = {
        "send_cpu_ms_per_row": send | {"total": send_ms},
        "broker_cpu_ms_per_row": broker_ms,
        "cores": cores,
        "cores_needed_for_goal": needed,
        "send_rows_per_second_one_core": one_core,
        "why": None,
    }
    if rate >= goal_rate:
        return result
    reasons = []
    if needed > cores:
        broker = f"the broker {broker_ms}" if broker_ms is not None else "the broker elsewhere, not counted"
        reasons.append(
            f"{goal_rate:,.0f} rows/s need {needed} cores at the CPU a row cost in this run ({send_ms} ms "
            f"the send: {send['read_validate']} reading and validating, {send['seal_send']} converting, "
            f"sealing, signing, keeping and sending; {broker}); this machine has {cores}"
        )
    if processes == 1 and one_core is not None and one_core < goal_rate:
        reasons.append(
            f"one send process runs its Python on one core at a time: at {send_ms} ms a row it sends at "
            f"most about {one_core:,.0f} rows/s"
        )
    if reasons:
        result["why"] = "; ".join(reasons)
    return result
