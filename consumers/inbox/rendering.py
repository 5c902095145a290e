"""What every inbox page answers with: the app's state and the one way a page is rendered.

Kept below the page modules (sign-in, referrals, errors) and the app assembly (:mod:`app`), so
a page reads the state :func:`app.create_app` built without importing the assembly, and every
page carries the request's CSP nonce, the signed-in member and their CSRF token the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from referral_broker.config import Settings
from referral_broker.consumers.inbox import presentation
from referral_broker.consumers.inbox.auth import SessionCodec, SignedIn
from referral_broker.consumers.inbox.deadlines import local_date
from referral_broker.consumers.inbox.outbound import Outbound
from referral_broker.consumers.inbox.records import RecordFormat
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.consumers.inbox.throttle import SignInPolicy


@dataclass
class InboxApp:
    """Everything a request needs; built once by :func:`create_app`."""

    settings: Settings
    store: InboxStore
    record_format: RecordFormat
    outbound: Outbound
    teams: tuple[str, ...]
    codec: SessionCodec
    secure_cookies: bool
    clock: Callable[[], datetime]
    templates: jinja2.Environment
    background: Sequence[Any] = field(default_factory=tuple)
    sign_in_policy: SignInPolicy = field(default_factory=SignInPolicy)


def inbox_app(request: Request) -> InboxApp:
    """The state :func:`app.create_app` put on the Starlette app."""
    inbox: InboxApp = request.app.state.inbox
    return inbox


def render(
    request: Request, template: str, *, status_code: int = 200, signed_in: SignedIn | None = None, **ctx: Any
) -> HTMLResponse:
    app = inbox_app(request)
    now = app.clock()
    header_counts = None
    if signed_in is not None and "header_counts" not in ctx:
        # the header's count of new urgent referrals (a cheap count over clear columns)
        header_counts = app.store.view_counts(signed_in.user.team, signed_in.user.username, local_date(now))
    html = app.templates.get_template(template).render(
        cspNonce=request.state.csp_nonce,
        signed_in=signed_in,
        csrf_token=signed_in.session.csrf_token if signed_in else "",
        age=lambda since: presentation.age(since, now),
        header_counts=ctx.pop("header_counts", header_counts),
        **ctx,
    )
    return HTMLResponse(html, status_code=status_code)
