"""The inbox's background threads (each team's ingest, the delivery watcher) outlive a broker
that goes away: a failed run is logged and run again after a growing wait, never left dead
behind a web page that still answers. Until a run succeeds again the worker's ``error`` says
why, and ``/healthz`` answers 503 naming the worker (never a referral or a person)."""

from __future__ import annotations

import threading
import time
from typing import Any

from referral_broker.structured_log import get_logger

log = get_logger(__name__)
BACKOFF_S = (0.5, 30.0)  # first and longest wait between runs
HEALTHY_RUN_S = 60.0  # a run that lasted this long was healthy: the next wait starts short again


class BackgroundWorker:
    """A worker whose blocking ``run()`` a thread calls until :meth:`stop` (always joined). A
    failed run is logged and run again after a growing wait (0.5 s, doubling to 30 s; short
    again after a run that lasted ``HEALTHY_RUN_S``); ``error`` holds the last failure until
    ``run`` clears it on a successful poll. Subclasses set ``label`` (in logs and /healthz)
    and ``thread_name``."""

    label = "worker"
    thread_name = "inbox-worker"

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> Any:
        raise NotImplementedError

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep_running, name=self.thread_name)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _keep_running(self) -> None:
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.run()
                return
            except Exception as exc:
                failures = 1 if time.monotonic() - started > HEALTHY_RUN_S else failures + 1
                self.error = exc
                wait = min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** (failures - 1))
                log.error(
                    "background worker failed; running it again",
                    worker=self.label,
                    error=type(exc).__name__,
                    count=failures,
                    wait_s=wait,
                )
                self._stop.wait(wait)


def failing(workers: Any) -> list[str]:
    """The background workers whose last run failed and has not succeeded since."""
    return [w.label for w in workers if getattr(w, "error", None) is not None]
