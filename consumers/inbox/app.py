"""The inbox web app assembled: Starlette, server-rendered Jinja2 with the GOV.UK Frontend
macros, the routes to the pages (:mod:`pages_signin`, :mod:`pages_referrals`), the error
handlers (:mod:`pages_errors`), the security middleware (:mod:`security`) and the background
workers that run for the app's lifetime.

The one place that knows every page, so the route table reads as the site map; the pages
themselves reach the state built here through :mod:`rendering`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from referral_broker.config import Settings
from referral_broker.consumers.inbox import presentation
from referral_broker.consumers.inbox.auth import SessionCodec
from referral_broker.consumers.inbox.background import failing
from referral_broker.consumers.inbox.metrics import InboxMetrics, MetricsMiddleware
from referral_broker.consumers.inbox.outbound import Outbound
from referral_broker.consumers.inbox.pages_errors import http_error, server_error
from referral_broker.consumers.inbox.pages_list import export_csv, inbox
from referral_broker.consumers.inbox.pages_referrals import (
    accept,
    acknowledge,
    allocate,
    close,
    reason_endpoints,
    reason_label,
    referral_page,
    research_objection,
    text_endpoints,
)
from referral_broker.consumers.inbox.pages_signin import sign_in, sign_in_form, sign_out
from referral_broker.consumers.inbox.records import RecordFormat
from referral_broker.consumers.inbox.rendering import InboxApp
from referral_broker.consumers.inbox.security import SecurityHeaders
from referral_broker.consumers.inbox.states import ReferralState
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.consumers.inbox.throttle import SignInPolicy
from referral_broker.parties import all_parties

SERVICE_NAME = "Early Help referrals"


def _team_label(team: str) -> str:
    party = all_parties().get(team)
    return party.description.split(": ", 1)[-1] if party and ": " in party.description else team


def _referrer_label(referrer: str) -> str:
    return presentation.organisation_name(referrer)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(
            [
                jinja2.PackageLoader("referral_broker.consumers.inbox", "templates"),
                jinja2.PrefixLoader(
                    {"govuk_frontend_jinja": jinja2.PackageLoader("govuk_frontend_jinja", "templates")}
                ),
            ]
        ),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["humanise"] = presentation.humanise
    env.filters["field_label"] = presentation.field_label
    env.globals.update(
        service_name=SERVICE_NAME,
        team_label=_team_label,
        referrer_label=_referrer_label,
        when=presentation.when,
        short_date=presentation.short_date,
        state_tag=lambda s: presentation.STATE_TAG_CLASSES.get(ReferralState(s), ""),
        priority_tag=lambda p: presentation.PRIORITY_TAG_CLASSES.get(p, "govuk-tag--grey"),
        reason_label=reason_label,
    )
    return env


async def home(request: Request) -> Response:
    return RedirectResponse("/inbox", status_code=303)


async def health(request: Request) -> Response:
    """200 "ok", or 503 naming the background workers that cannot reach the cluster (the pages
    still answer, but what they show stops being current)."""
    down = failing(request.app.state.inbox.background)
    if down:
        return PlainTextResponse(f"degraded: {', '.join(down)} failing, retrying", status_code=503)
    return PlainTextResponse("ok")


def create_app(
    settings: Settings,
    *,
    store: InboxStore,
    record_format: RecordFormat,
    outbound: Outbound,
    teams: Sequence[str],
    assets_dir: Path | None = None,
    secure_cookies: bool = True,
    clock: Callable[[], datetime] | None = None,
    background: Sequence[Any] = (),
    sign_in_policy: SignInPolicy | None = None,
) -> Starlette:
    """The inbox app for ``teams``. ``background`` objects with ``start()`` and ``stop()`` (the
    ingest workers) run for the app's lifetime; ``sign_in_policy`` is the sign-in throttle's
    rules (:class:`throttle.SignInPolicy`'s defaults when left out)."""
    inbox_state = InboxApp(
        settings=settings,
        store=store,
        record_format=record_format,
        outbound=outbound,
        teams=tuple(teams),
        codec=SessionCodec(store.secret_key(), settings.inbox_session_max_age_s),
        secure_cookies=secure_cookies,
        clock=clock or (lambda: datetime.now(UTC)),
        templates=_environment(),
        background=tuple(background),
        sign_in_policy=sign_in_policy or SignInPolicy(),
    )
    decline_show, decline_submit = reason_endpoints("decline")
    info_show, info_submit = reason_endpoints("request-information")
    received_show, received_submit = text_endpoints("record-information")
    note_show, note_submit = text_endpoints("notes")
    rid = "/referrals/{referral_id}"
    routes: list[Route | Mount] = [
        Route("/", home),
        Route("/healthz", health),
        Route("/sign-in", sign_in_form, methods=["GET"]),
        Route("/sign-in", sign_in, methods=["POST"]),
        Route("/sign-out", sign_out, methods=["POST"]),
        Route("/inbox", inbox, methods=["GET"]),
        Route("/inbox/export.csv", export_csv, methods=["GET"]),
        Route(rid, referral_page, methods=["GET"]),
        Route(rid + "/acknowledge", acknowledge, methods=["POST"]),
        Route(rid + "/accept", accept, methods=["POST"]),
        Route(rid + "/close", close, methods=["POST"]),
        Route(rid + "/allocate", allocate, methods=["POST"]),
        Route(rid + "/decline", decline_show, methods=["GET"]),
        Route(rid + "/decline", decline_submit, methods=["POST"]),
        Route(rid + "/request-information", info_show, methods=["GET"]),
        Route(rid + "/request-information", info_submit, methods=["POST"]),
        Route(rid + "/record-information", received_show, methods=["GET"]),
        Route(rid + "/record-information", received_submit, methods=["POST"]),
        Route(rid + "/notes", note_show, methods=["GET"]),
        Route(rid + "/notes", note_submit, methods=["POST"]),
        Route(rid + "/research-objection", research_objection, methods=["POST"]),
    ]
    if assets_dir is not None:
        routes.append(Mount("/assets", StaticFiles(directory=assets_dir), name="assets"))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for worker in inbox_state.background:
            worker.start()
        try:
            yield
        finally:
            for worker in inbox_state.background:
                worker.stop()

    # Prometheus metrics (no identifier in a label); served apart by app.state.metrics.serve(port)
    metrics = InboxMetrics(store, inbox_state.teams, inbox_state.clock)
    app = Starlette(
        routes=routes,
        middleware=[Middleware(MetricsMiddleware, metrics=metrics), Middleware(SecurityHeaders)],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.inbox = inbox_state
    app.state.metrics = metrics
    return app
