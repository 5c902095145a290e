"""Prometheus metrics for the router. Labels are stages, party names and topic roles only:
never a referral id, a field value or anything a person could be found by."""

from __future__ import annotations

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
        self.batch_seconds = Histogram(
            "referral_router_batch_seconds", "Time to route and commit one batch.", registry=self.registry
        )
        # key-directory records this process refused (forged, replayed, colliding, ...), by reason
        self.registry.register(RefusalCollector())

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics on ``host:port`` (a daemon thread; it ends with the process)."""
        start_http_server(port, addr=host, registry=self.registry)
