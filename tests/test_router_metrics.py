"""The router's batch phases: each batch's time given to the phase it was spent in."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram

from referral_broker.consumers.router_metrics import PHASES, BatchClock, BatchPhases


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_lap_gives_the_time_since_the_last_one_to_its_phase_wall_and_cpu_apart() -> None:
    clock = BatchClock()
    time.sleep(0.03)  # waiting: wall time, next to no CPU
    clock.lap("commit")
    _spin(0.03)  # working: wall and CPU alike
    clock.lap("route")
    _spin(0.01)
    clock.lap("route")  # a phase met twice adds up
    assert clock.wall["commit"] >= 0.03 and clock.cpu["commit"] < 0.01
    assert clock.wall["route"] >= 0.04 and clock.cpu["route"] >= 0.03
    assert all(clock.wall[p] == 0 for p in PHASES if p not in ("commit", "route"))


def test_batch_phases_sum_per_batch_and_feed_the_histogram() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("phase_seconds", "test", ["phase"], registry=registry)
    phases = BatchPhases(histogram)
    assert phases.summary() == {"batches": 0}
    for records, wait in ((10, 0.02), (30, 0.04)):
        clock = BatchClock()
        time.sleep(wait)
        clock.lap("poll")
        _spin(0.005)
        clock.lap("route")
        phases.add(clock, records)
    s = phases.summary()
    assert s["batches"] == 2 and s["records"] == 40 and s["records_a_batch"] == 20.0
    assert s["ms_a_batch"]["poll"]["wall"] >= 30.0  # (20 + 40) / 2
    assert s["ms_a_batch"]["route"]["cpu"] >= 4.0 and s["ms_a_batch"]["check"] == {"wall": 0.0, "cpu": 0.0}
    assert 25.0 <= s["batch_ms"]["p50"] <= s["batch_ms"]["p99"] == s["batch_ms"]["max"] and s["batch_ms"]["max"] >= 45.0
    assert registry.get_sample_value("phase_seconds_count", {"phase": "poll"}) == 2
    assert registry.get_sample_value("phase_seconds_sum", {"phase": "poll"}) >= 0.06


def test_batch_phases_keep_a_bounded_number_of_batch_times() -> None:
    phases = BatchPhases()
    for _ in range(BatchPhases.KEPT + 50):
        phases.add(BatchClock(), 1)
    assert phases.batches == BatchPhases.KEPT + 50 and len(phases._batch_ms) == BatchPhases.KEPT
