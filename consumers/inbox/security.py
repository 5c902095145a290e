"""Who is asking, and what every response carries: the session cookie resolved to a signed-in
member of a served team (or the redirect to sign in), the access audit every page writes, and
the middleware that gives each request a CSP nonce and the security headers.

Apart from the pages so the rules every page relies on (a strict Content-Security-Policy,
``Cache-Control: no-store`` so opened values do not linger in caches, only served teams'
members, every access audited) are in one place to review.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from referral_broker.consumers.inbox.auth import SignedIn, resolve_session
from referral_broker.consumers.inbox.outbound import AccessEvent
from referral_broker.consumers.inbox.rendering import inbox_app
from referral_broker.errors import BrokerError
from referral_broker.structured_log import get_logger

log = get_logger(__name__)

SESSION_COOKIE = "rb_session"


def _sign_in_redirect(request: Request, *, expired: bool) -> RedirectResponse:
    target = request.url.path if request.method == "GET" else "/inbox"
    if request.method == "GET" and request.url.query:
        target += "?" + request.url.query
    query = {"next": target}
    if expired:
        query["expired"] = "1"
    response = RedirectResponse("/sign-in?" + urlencode(query), status_code=303)
    if expired:
        response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def signed_in_member(request: Request) -> SignedIn | Response:
    """The signed-in member of a served team, or the redirect to sign in."""
    app = inbox_app(request)
    signed_in, expired = await run_in_threadpool(
        resolve_session, app.store, app.codec, request.cookies.get(SESSION_COOKIE), now=app.clock()
    )
    if signed_in is None or signed_in.user.team not in app.teams:
        return _sign_in_redirect(request, expired=expired)
    return signed_in


async def audit(request: Request, event: AccessEvent) -> bool:
    """Write one access audit event; False (logged) when Kafka did not take it."""
    try:
        await run_in_threadpool(inbox_app(request).outbound.audit, event)
    except BrokerError as exc:
        log.error("access audit failed", team=event.team, member=event.member, error=str(exc))
        return False
    return True


class SecurityHeaders:
    """A CSP nonce per request, and the headers every page carries."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(16)
        scope.setdefault("state", {})["csp_nonce"] = nonce
        static = scope["path"].startswith("/assets/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (b"content-security-policy", self._csp(nonce).encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                ]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = list(message.get("headers", [])) + headers
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    def _csp(nonce: str) -> str:
        return (
            "default-src 'self'; "
            f"script-src 'self' 'nonce-{nonce}'; "
            f"style-src 'self' 'nonce-{nonce}'; "
            "img-src 'self' data:; font-src 'self'; connect-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
        )
