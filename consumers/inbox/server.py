"""Running the inbox: wiring the store, the sealed format, Kafka and the app, then uvicorn.

``build_inbox`` is what ``referral-broker inbox serve`` (and the demo) call; ``ServerThread``
runs the same app on a loopback port inside a process (tests, the demo) and is always stopped
and joined, never left behind.
"""

from __future__ import annotations

import ipaddress
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from referral_broker.config import Settings
from referral_broker.consumers.inbox.app import create_app
from referral_broker.consumers.inbox.auth import check_team, district_teams
from referral_broker.consumers.inbox.deadlines import DuePolicy
from referral_broker.consumers.inbox.delivery import DeliveryWatcher
from referral_broker.consumers.inbox.frontend import install_frontend
from referral_broker.consumers.inbox.ingest import TeamIngest
from referral_broker.consumers.inbox.notices import UrgentNotifier
from referral_broker.consumers.inbox.outbound import Outbound
from referral_broker.consumers.inbox.records import RecordFormat
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.errors import BrokerError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Inbox:
    """A built inbox: its app and the parts to close when it stops."""

    app: Starlette
    store: InboxStore
    outbound: Outbound
    teams: tuple[str, ...]
    workers: list[TeamIngest] = field(default_factory=list)
    watcher: DeliveryWatcher | None = None

    def close(self) -> None:
        self.outbound.close()
        self.store.close()


def build_inbox(
    settings: Settings,
    *,
    teams: Sequence[str] | None = None,
    record_format: RecordFormat | None = None,
    ingest: bool = True,
    watch_delivery: bool | None = None,
    secure_cookies: bool = True,
    clock: Callable[[], datetime] | None = None,
) -> Inbox:
    """The inbox for ``teams`` (every district team by default): assets installed, key stores
    opened, and (unless ``ingest`` is off) one ingest worker per team for the app's lifetime,
    and (unless ``watch_delivery`` is off; by default as ``ingest``) the watcher that learns
    which statuses reached the referrer."""
    teams = tuple(check_team(t) for t in (teams or district_teams()))
    assets = install_frontend(settings)
    if record_format is None:
        from referral_broker.consumers.inbox.sealed_format import SealedReferralFormat

        record_format = SealedReferralFormat.from_settings(settings, teams)
    store = InboxStore(settings.inbox_db_path)
    store.due_policy = DuePolicy.from_settings(settings)
    outbound = Outbound(settings, record_format)
    notifier = UrgentNotifier.from_settings(settings)
    workers = (
        [TeamIngest(settings, team, store, record_format, clock=clock, notifier=notifier) for team in teams]
        if ingest
        else []
    )
    watch = ingest if watch_delivery is None else watch_delivery
    watcher = DeliveryWatcher(settings, store, record_format, teams, clock=clock) if watch else None
    app = create_app(
        settings,
        store=store,
        record_format=record_format,
        outbound=outbound,
        teams=teams,
        assets_dir=assets,
        secure_cookies=secure_cookies,
        clock=clock,
        background=[*workers, *([watcher] if watcher else [])],
    )
    return Inbox(app, store, outbound, teams, workers, watcher)


def uvicorn_config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_level="warning",
        access_log=False,  # request lines would carry referral ids and query strings
        server_header=False,
        proxy_headers=False,
    )


def _stop_requested(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_forever(app: ASGIApp, host: str, port: int) -> None:
    """Serve in this (main) thread until Ctrl-C or SIGTERM; a requested stop returns normally.

    uvicorn shuts down gracefully (the lifespan stops and joins the ingest workers), then
    re-raises the signal it caught; here that ends the call instead of aborting the program.
    """
    previous = signal.signal(signal.SIGTERM, _stop_requested)
    try:
        uvicorn.Server(uvicorn_config(app, host, port)).run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


class ServerThread:
    """uvicorn in a (joined) thread on ``host``; ``port=0`` picks a free port."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = uvicorn.Server(uvicorn_config(app, host, port))
        self.host = host
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self._thread = threading.Thread(target=self.server.run, name="inbox-http")
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"the inbox server did not start on {self.host}")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
