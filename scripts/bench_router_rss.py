"""Benchmark (not CI): is the router's peak memory flat as the referrals it has routed grow?

Issue 20, goal 7: the router's peak RSS flat (within 10%) from 100k to 1M referrals. On the
real broker (KAFKA_BOOTSTRAP_SERVERS, or the local one), under a fresh topic prefix and a
temporary data dir (the shipped county, every party's keys), ONE ``referral-broker route``
process runs for the whole measurement while this script seals and produces ``--count``
referrals to 3 recipients (``--recipients 1``: the district team only) from a school,
``--chunk`` at a time: each chunk is generated only when it is sent, and never more than two
chunks ahead of what the router has committed, so neither this script's memory nor the backlog
grows with ``--count``.

Every second it reads the router's VmRSS and VmHWM (its peak) from /proc/<pid>/status and the
referrals routed so far (the router group's committed offsets on the school's intake topic),
and prints a row at each 10% of ``--count``: routed, RSS, peak, elapsed, the rate since the
row before. The baseline is the first sample after ``--warmup`` referrals (default 10% of the
count: the router's memory grows at first with imports, caches and the key directory); the
verdict compares the peak at the end with the peak at the baseline: "flat" within 10% (the
goal), else the growth in MB per 100k referrals. It also prints the time 100k and 1M take at
the measured steady rate (on a shared 2-core machine about 50/s: 1M takes hours; the script
can run that long). Exits 1 with the tail of the router's stderr if the router dies, or if
nothing is routed for ``--stall`` seconds. Deletes its topics, group and data dir unless
--keep. Prints a table, or JSON with --json.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19192 .venv/bin/python scripts/bench_router_rss.py --count 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GOAL = 1.10  # peak at the end within 10% of the peak at the baseline


@dataclass
class Sample:
    elapsed_s: float  # since the route process started
    routed: int  # the router group's committed offsets on the intake topic
    rss_mb: float  # VmRSS
    peak_mb: float  # the highest VmHWM read so far


def proc_memory_mb(pid: int | str) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) of ``pid`` in MB, None once the process is gone."""
    found: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    found[line[:5]] = int(line.split()[1]) / 1024
    except OSError:
        return None
    if "VmRSS" not in found or "VmHWM" not in found:
        return None  # a zombie has no memory lines
    return round(found["VmRSS"], 2), round(found["VmHWM"], 2)


def clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Sampler:
    """Every ``interval`` s: the router's memory and the referrals it has committed. Records
    the first sample at or past each 10% mark of ``count`` and at ``warmup``."""

    def __init__(self, pid: int, started: float, routed: Any, count: int, warmup: int, show: bool) -> None:
        self.pid, self.started, self.routed_now, self.show = pid, started, routed, show
        self.marks = [math.ceil(count * k / 10) for k in range(1, 11)]
        self.warmup = warmup
        self.rows: list[tuple[int, Sample, float | None]] = []  # (percent, sample, rate since the last row)
        self.baseline: Sample | None = None
        self.latest: Sample | None = None
        self.samples = 0
        self.first_routed_at: float | None = None
        self.last_progress = started
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> Sample | None:
        memory = proc_memory_mb(self.pid)
        if memory is None:
            return None
        routed = self.routed_now()
        if routed is None:  # the coordinator did not answer: keep the last figure
            routed = self.latest.routed if self.latest else 0
        now = time.monotonic()
        rss, peak = memory
        if self.latest is not None:
            # Linux 6.2+ counts RSS per CPU and VmHWM is max(the recorded peak, an approximate
            # current RSS), so a read can come out a few hundred KB under the one before it
            peak = max(peak, self.latest.peak_mb)
        s = Sample(round(now - self.started, 1), routed, rss, peak)
        if self.latest is None or routed > self.latest.routed:
            self.last_progress = now
        if not routed:  # the busy time starts after the last sample with nothing routed
            self.first_routed_at = s.elapsed_s
        self.latest = s
        self.samples += 1
        if self.baseline is None and routed >= self.warmup:
            self.baseline = s
        while len(self.rows) < len(self.marks) and routed >= self.marks[len(self.rows)]:
            before = self.rows[-1][1] if self.rows else None
            since = before.elapsed_s if before else (self.first_routed_at or 0.0)
            done = routed - (before.routed if before else 0)
            rate = done / (s.elapsed_s - since) if s.elapsed_s > since and done else None
            self.rows.append((10 * (len(self.rows) + 1), s, rate))
            if self.show:
                print(row(10 * len(self.rows), s, rate), flush=True)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    interval = 1.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


HEADER = f"{'mark':>5} {'routed':>9} {'RSS MB':>8} {'peak MB':>8} {'elapsed':>9} {'rate/s':>7}"


def row(percent: int, s: Sample, rate: float | None) -> str:
    shown = f"{rate:7.1f}" if rate is not None else f"{'-':>7}"
    return f"{percent:>4}% {s.routed:>9} {s.rss_mb:>8.1f} {s.peak_mb:>8.1f} {clock(s.elapsed_s):>9} {shown}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="referrals to route (1000000 for the goal)")
    parser.add_argument("--chunk", type=int, default=2000, help="referrals generated and sent at a time")
    parser.add_argument("--warmup", type=int, default=None, help="referrals before the baseline (default 10%%)")
    parser.add_argument("--stall", type=float, default=600.0, help="fail when nothing is routed this long (s)")
    parser.add_argument("--recipients", type=int, choices=(1, 3), default=3, help="recipients a referral (1 routes about twice as fast)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the topics, group and data dir")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.count < 10 or args.chunk < 1:
        parser.error("--count must be at least 10 and --chunk at least 1")
    warmup = math.ceil(args.count / 10) if args.warmup is None else args.warmup
    if not 0 <= warmup < args.count:
        parser.error("--warmup must be below --count")

    from kafka.errors import KafkaError

    from referral_broker.cluster.topics import admin_client, ensure_with_county, topic_name
    from referral_broker.config import load_settings
    from referral_broker.consumers.router import GROUP
    from referral_broker.consumers.router_bench import SENDER, _shaped, router_env
    from referral_broker.parties import HUB, all_parties
    from referral_broker.producers.intake import IntakeSender
    from referral_broker.sealing.key_admin import init_parties

    def note(message: str) -> None:
        if not args.json:
            print(message, flush=True)

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19192")
    tmp = Path(tempfile.mkdtemp(prefix="bench-router-rss-"))
    settings = load_settings().replace(kafka_topic_prefix=f"bench{secrets.token_hex(3)}.", paths_data_dir=tmp / "data")
    prefix = settings.kafka_topic_prefix
    group = f"{prefix}{GROUP}"
    intake = topic_name(settings, "intake", SENDER)
    admin = admin_client(settings, bootstrap)
    proc: subprocess.Popen[bytes] | None = None
    sampler: Sampler | None = None
    stderr_path = tmp / "route.stderr"
    failure: str | None = None
    result: dict[str, Any] = {}
    try:
        note(f"topics and keys under {prefix} ...")
        ensure_with_county(settings, bootstrap)
        init_parties(settings, [HUB, SENDER, *[p for p in all_parties() if p not in (SENDER, HUB)]], bootstrap=bootstrap)

        def routed_now() -> int | None:
            try:
                offsets = admin.list_group_offsets({group: None}).get(group, {})
            except KafkaError:
                return None
            return int(sum(max(o.offset, 0) for tp, o in offsets.items() if tp.topic == intake))

        cmd = [sys.executable, "-m", "referral_broker.cli.main", "route", "--json"]
        cmd += ["--stop-when-idle", str(int(args.stall)), "--instance", f"rss-{secrets.token_hex(2)}"]
        with stderr_path.open("wb") as err, (tmp / "route.stdout").open("wb") as out:
            proc = subprocess.Popen(cmd, env=router_env(settings, bootstrap), stdout=out, stderr=err)
        started = time.monotonic()
        sampler = Sampler(proc.pid, started, routed_now, args.count, warmup, show=not args.json)
        note(
            f"router pid {proc.pid}; {args.count} referrals to {args.recipients} recipient(s) in chunks of "
            f"{args.chunk}, baseline after {warmup}"
        )
        note(HEADER)
        sampler.start()
        produced = chunks = 0
        with IntakeSender(settings, bootstrap, SENDER) as sender:
            while True:
                latest = sampler.latest
                routed = latest.routed if latest else 0
                if proc.poll() is not None:
                    failure = f"the route process exited {proc.returncode} after {routed} of {args.count} referrals"
                    break
                if routed >= args.count:
                    break
                if time.monotonic() - sampler.last_progress > args.stall:
                    failure = f"nothing routed for {args.stall:.0f} s ({routed} of {args.count})"
                    break
                size = min(args.chunk, args.count - produced)
                if size and produced + size <= routed + 2 * args.chunk:
                    sender.send_referrals(_shaped(size, args.recipients, seed=args.seed * 1_000_003 + chunks))
                    produced += size
                    chunks += 1
                else:
                    time.sleep(0.5)
        sampler.stop()
        if failure is None:
            end = sampler.sample()  # routed == count: the final figure
            proc.send_signal(signal.SIGTERM)  # the CLI's clean stop: commits, leaves the group
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                failure = "the route process did not stop within 120 s of SIGTERM"
            if failure is None and proc.returncode != 0:
                failure = f"the route process exited {proc.returncode} when stopped"
            if failure is None and (end is None or sampler.baseline is None or len(sampler.rows) < 10):
                failure = "the router's memory could not be read at the end"
            if failure is None:
                assert end is not None and sampler.baseline is not None
                result = report(args, warmup, sampler, end, produced, tmp)
                result["prefix"] = prefix
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        if sampler is not None:
            sampler.stop()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if not args.keep:
            with contextlib.suppress(Exception):
                admin.delete_topics([t for t in admin.list_topics() if t.startswith(prefix)])
            with contextlib.suppress(Exception):
                admin.delete_groups([group])
        admin.close()
        if failure is not None:
            tail = stderr_path.read_text(errors="replace")[-3000:] if stderr_path.exists() else ""
            print(f"bench_router_rss: {failure}\n--- the route process's stderr (tail) ---\n{tail}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if failure is not None:
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)
    return 0


def report(args: argparse.Namespace, warmup: int, sampler: Sampler, end: Sample, produced: int, tmp: Path) -> dict[str, Any]:
    base = sampler.baseline
    assert base is not None
    ratio = round(end.peak_mb / base.peak_mb, 4)
    flat = ratio <= GOAL
    grown = end.routed - base.routed
    steady = grown / (end.elapsed_s - base.elapsed_s) if end.elapsed_s > base.elapsed_s and grown else None
    busy = end.elapsed_s - (sampler.first_routed_at or 0.0)
    stats: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        stats = json.loads((tmp / "route.stdout").read_text())
    own = proc_memory_mb("self")
    return {
        "count": args.count,
        "chunk": args.chunk,
        "recipients": args.recipients,
        "warmup": warmup,
        "produced": produced,
        "routed": end.routed,
        "marks": [{"percent": p, **asdict(s), "rate_per_s": None if r is None else round(r, 1)} for p, s, r in sampler.rows],
        "baseline": asdict(base),
        "end": asdict(end),
        "peak_baseline_mb": base.peak_mb,
        "peak_end_mb": end.peak_mb,
        "ratio": ratio,
        "goal_ratio": GOAL,
        "verdict": "flat" if flat else "grows",
        "growth_mb_per_100k": None if flat or not grown else round((end.peak_mb - base.peak_mb) / grown * 100_000, 2),
        "steady_rate_per_s": None if steady is None else round(steady, 1),
        "overall_rate_per_s": round(end.routed / busy, 1) if busy > 0 else None,
        "expected_s": {"100000": round(100_000 / steady) if steady else None, "1000000": round(1_000_000 / steady) if steady else None},
        "samples": sampler.samples,
        "router_stats": {k: stats.get(k) for k in ("consumed", "routed", "delivered", "audited", "dead_lettered", "rebuilds")},
        "script_peak_mb": own[1] if own else None,
        "cpus": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def show(r: dict[str, Any]) -> None:
    b, e = r["baseline"], r["end"]
    print()
    print(f"baseline after {b['routed']} referrals ({clock(b['elapsed_s'])}): RSS {b['rss_mb']:.1f} MB, peak {r['peak_baseline_mb']:.1f} MB")
    print(f"end after {e['routed']} referrals ({clock(e['elapsed_s'])}): RSS {e['rss_mb']:.1f} MB, peak {r['peak_end_mb']:.1f} MB")
    verdict = "flat (goal: within 10%)" if r["verdict"] == "flat" else f"grows {r['growth_mb_per_100k']} MB per 100k referrals (goal: within 10%)"
    print(f"peak end / peak baseline = {r['ratio']:.3f}: {verdict}")
    rate = r["steady_rate_per_s"]
    if rate:
        print(
            f"steady rate {rate}/s (overall {r['overall_rate_per_s']}/s): 100k take {clock(r['expected_s']['100000'])}, "
            f"1M take {clock(r['expected_s']['1000000'])}"
        )
    s = r["router_stats"]
    print(
        f"router: consumed {s['consumed']}, routed {s['routed']}, delivered {s['delivered']}, "
        f"dead letters {s['dead_lettered']}, rebuilds {s['rebuilds']}; this script's peak {r['script_peak_mb']} MB; "
        f"{r['cpus']} cores, load average {r['load_average'][0]}"
    )


if __name__ == "__main__":
    sys.exit(main())
