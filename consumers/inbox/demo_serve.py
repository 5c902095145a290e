"""The end of ``referral-broker demo``: the district-team inbox served on loopback with the
demo's routed referrals already in it, and a demo sign-in printed. The hub's router keeps
running beside it, so the statuses the inbox makes reach the referrers (and the inbox's history
says "Referrer told" only once they did).

Each district team gets a demo account (``demo.<district>``) whose password is drawn fresh on
every run and printed once; only its argon2 hash is stored. The inbox is served on 127.0.0.1
only: the demo's data is synthetic, but its accounts are not meant for a network.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from referral_broker.config import Settings
from referral_broker.consumers.inbox.auth import add_user, district_teams, rehash_password
from referral_broker.consumers.inbox.ingest import IngestStats, TeamIngest
from referral_broker.consumers.inbox.server import build_inbox, serve_forever
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.errors import ReferralBrokerError
from referral_broker.structured_log import get_logger

if TYPE_CHECKING:
    from referral_broker.consumers.router import Router

log = get_logger(__name__)

DEMO_ROLE = "Early Help practitioner (demo)"


def demo_username(team: str) -> str:
    return "demo." + team.removeprefix("district-")


def demo_accounts(store: InboxStore, teams: list[str] | tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """team -> (username, password): a demo member per team with a fresh random password."""
    now = datetime.now(UTC)
    accounts: dict[str, tuple[str, str]] = {}
    for team in teams:
        username, password = demo_username(team), f"demo-{secrets.token_urlsafe(9)}"
        if store.get_user(username) is None:
            add_user(store, username, team, password, at=now, role=DEMO_ROLE)
        else:
            rehash_password(store, username, password)
            store.set_disabled(username, False)
        accounts[team] = (username, password)
    return accounts


def ingest_now(workers: list[TeamIngest], idle_s: float = 2.0) -> dict[str, IngestStats]:
    """Read what is waiting for every team, side by side, before the server starts."""
    results: dict[str, IngestStats] = {}

    def run(worker: TeamIngest) -> None:
        results[worker.team] = worker.run(stop_when_idle=idle_s)

    threads = [threading.Thread(target=run, args=(w,), name=f"demo-ingest-{w.team}") for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class RouterLoop:
    """The hub's router in a (joined) thread, run in short idle-bounded rounds so it can stop."""

    def __init__(self, settings: Settings, bootstrap: str, *, idle_s: float = 2.0) -> None:
        self.settings, self.bootstrap, self.idle_s = settings, bootstrap, idle_s
        self.statuses = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._router: Router | None = None  # the round's router, stopped with the loop

    def _run(self) -> None:
        from referral_broker.consumers.router import Router

        while not self._stop.is_set():
            self._router = router = Router(self.settings, self.bootstrap)
            if self._stop.is_set():
                break  # stopped while that router was being made: stop() could not reach it
            try:
                self.statuses += router.run(stop_when_idle=self.idle_s).statuses
            except ReferralBrokerError as exc:  # the broker away for a moment: try again
                log.warning("demo router round failed", error=type(exc).__name__)
                self._stop.wait(2.0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="demo-router")
        self._thread.start()

    def stop(self, timeout_s: float = 120.0) -> None:
        """End the round in hand too: a router whose cluster has gone never counts as idle, so
        waiting for its round alone kept Ctrl-C from ending the demo once the broker was down."""
        self._stop.set()
        if self._router is not None:
            self._router.stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None


def serve_demo(
    settings: Settings, bootstrap: str, *, port: int = 8000, say: Callable[[str], None] = print
) -> None:
    """Ingest the demo's referrals, print the address and a sign-in, serve until Ctrl-C."""
    if settings.kafka_bootstrap_servers != bootstrap:
        settings = settings.replace(kafka_bootstrap_servers=bootstrap)
    teams = tuple(district_teams())
    inbox = build_inbox(settings, teams=teams, secure_cookies=False)
    try:
        accounts = demo_accounts(inbox.store, teams)
        say("Filling the district-team inbox")
        ingest_now(inbox.workers)
        counts = {team: len(inbox.store.list_referrals(team)) for team in teams}
        busiest = max(teams, key=lambda t: counts[t])
        username, password = accounts[busiest]
        say(f"\nDistrict-team inbox: http://localhost:{port}/")
        say(f"Sign in as {username} with password {password} ({counts[busiest]} referral(s) for {busiest}).")
        others = [f"{accounts[t][0]} / {accounts[t][1]}" for t in teams if t != busiest and counts[t]]
        if others:
            say("Other teams: " + "; ".join(others))
        say("The router runs beside the inbox: your statuses reach the referrers. Ctrl-C to stop.")
        router = RouterLoop(settings, bootstrap)
        router.start()
        try:
            serve_forever(inbox.app, "127.0.0.1", port)
        finally:
            router.stop()
    finally:
        inbox.close()
