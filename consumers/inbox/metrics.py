"""Prometheus metrics for the district-team inbox (issue 16, Build 5).

Labels are route templates (``/referrals/{referral_id}``, never the path with the id in it),
methods, status codes, team party names, referral states and copy kinds: never a referral id,
a user name, a field value or anything a person could be found by.

* ``referral_inbox_http_requests_total{route,method,status}`` and
  ``referral_inbox_http_request_seconds{route}``: every request, counted by the middleware
  :class:`MetricsMiddleware` (a request no route matched is ``route="unmatched"``);
* read from the store at each scrape (:class:`StoreCollector`):
  ``referral_inbox_referrals{team,state}``, ``referral_inbox_referrals_overdue{team}``,
  ``referral_inbox_referrals_new_urgent{team}``, ``referral_inbox_statuses_unsent`` (statuses
  the referrer has not been sent yet: the outbox), ``referral_inbox_duplicates_total{team,kind}``;
* ``referral_key_directory_refused_records_total{reason}`` (key-directory records this process
  refused, as the router's registry has it).

``InboxMetrics.serve(port)`` exposes them on their own loopback port (like ``route
--metrics-port``), apart from the web app, so the metrics are not on the inbox's public address.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from referral_broker.consumers.inbox.deadlines import local_date
from referral_broker.consumers.inbox.states import ReferralState
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.consumers.inbox.store_referrals import COPY_KINDS
from referral_broker.sealing.trust import RefusalCollector

METHODS = ("GET", "POST", "HEAD")
UNSENT_SCAN_LIMIT = 100_000  # statuses counted in the outbox at one scrape


class StoreCollector:
    """Counts read from the inbox store when Prometheus scrapes (one cheap query each)."""

    def __init__(self, store: InboxStore, teams: Sequence[str], clock: Callable[[], datetime]) -> None:
        self.store = store
        self.teams = tuple(teams)
        self.clock = clock

    def collect(self) -> Iterator[Any]:
        referrals = GaugeMetricFamily(
            "referral_inbox_referrals", "Referrals held by the inbox, by team and state.", labels=["team", "state"]
        )
        states = self.store.state_counts()
        for team in self.teams:
            counts = states.get(team, {})
            for state in ReferralState:
                referrals.add_metric([team, state.value], counts.get(state.value, 0))
        yield referrals
        overdue = GaugeMetricFamily(
            "referral_inbox_referrals_overdue", "Undecided referrals past their due date, by team.", labels=["team"]
        )
        urgent = GaugeMetricFamily(
            "referral_inbox_referrals_new_urgent", "New urgent referrals nobody has opened, by team.", labels=["team"]
        )
        today = local_date(self.clock())
        for team in self.teams:
            views = self.store.view_counts(team, "", today)
            overdue.add_metric([team], views.get("overdue", 0))
            urgent.add_metric([team], views.get("new_urgent", 0))
        yield overdue
        yield urgent
        unsent = GaugeMetricFamily(
            "referral_inbox_statuses_unsent",
            "Status messages for referrers that Kafka has not confirmed yet (the inbox's outbox).",
        )
        unsent.add_metric([], len(self.store.pending_status(limit=UNSENT_SCAN_LIMIT)))
        yield unsent
        duplicates = CounterMetricFamily(
            "referral_inbox_duplicates",
            "Copies recognised as duplicates and not stored, by team and kind.",
            labels=["team", "kind"],
        )
        counted = self.store.duplicate_counts()
        for team in self.teams:  # every team and kind, 0 until one is seen (a panel needs a series)
            kinds = counted.get(team, {})
            for kind in COPY_KINDS:
                duplicates.add_metric([team, kind], kinds.get(kind, 0))
        yield duplicates


class InboxMetrics:
    """One registry per inbox app, so several apps (and tests) in one process stay apart."""

    def __init__(
        self,
        store: InboxStore,
        teams: Sequence[str],
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "referral_inbox_http_requests",
            "Requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "referral_inbox_http_request_seconds",
            "Time to answer a request, by route template.",
            ["route"],
            registry=self.registry,
        )
        self.registry.register(StoreCollector(store, teams, clock or (lambda: datetime.now(UTC))))
        self.registry.register(RefusalCollector())

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (what /metrics serves)."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics on ``host:port`` (a daemon thread; it ends with the process)."""
        start_http_server(port, addr=host, registry=self.registry)

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = route_label(scope)
        method = scope.get("method", "GET")
        self.requests.labels(route, method if method in METHODS else "other", str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)


def route_label(scope: Scope) -> str:
    """The matched route's template (``/referrals/{referral_id}``), never the path itself."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return "unmatched"
    if "endpoint" in scope and hasattr(route, "routes"):  # a mount (the static assets)
        return path + "/{path}"
    return path


class MetricsMiddleware:
    """Counts and times every HTTP request (pure ASGI: the response is streamed untouched)."""

    def __init__(self, app: ASGIApp, metrics: InboxMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()
        observed = False

        def observe() -> None:
            nonlocal observed
            if not observed:
                observed = True
                self.metrics.observe(scope, status, time.perf_counter() - started)

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                observe()  # counted before the client has the whole response
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            observe()  # a request that failed before its response ended
