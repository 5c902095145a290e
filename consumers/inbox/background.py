"""The inbox's background threads (each team's ingest, the delivery watcher) outlive a broker
that goes away: a failed run is logged and run again after a growing wait, never left dead
behind a web page that still answers. Until a run succeeds again the worker's ``error`` says
why, and ``/healthz`` answers 503 naming the worker (never a referral or a person)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from referral_broker.structured_log import get_logger

log = get_logger(__name__)
BACKOFF_S = (0.5, 30.0)  # first and longest wait between runs
HEALTHY_RUN_S = 60.0  # a run that lasted this long was healthy: the next wait starts short again


def keep_running(
    name: str,
    run: Callable[[], Any],
    stop: threading.Event,
    on_error: Callable[[BaseException], None],
    **fields: Any,
) -> None:
    """Call ``run`` until ``stop`` is set; after each failure wait (0.5 s, doubling to 30 s) and
    call it again. ``run`` returning means it was stopped."""
    failures = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            run()
            return
        except Exception as exc:
            failures = 1 if time.monotonic() - started > HEALTHY_RUN_S else failures + 1
            on_error(exc)
            wait = min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** (failures - 1))
            log.error(f"{name} failed; running it again", error=type(exc).__name__, count=failures, wait_s=wait, **fields)
            stop.wait(wait)


def failing(workers: Any) -> list[str]:
    """The background workers whose last run failed and has not succeeded since."""
    return [getattr(w, "label", type(w).__name__) for w in workers if getattr(w, "error", None) is not None]
