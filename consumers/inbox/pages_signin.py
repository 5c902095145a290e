"""The sign-in and sign-out pages.

Sign-in is the one form posted before there is a session, so its CSRF token rides on its own
short-lived cookie (scoped to ``/sign-in``); a refused sign-in says the same whatever the cause
and is audited; ``next`` only ever leads to a local path.
"""

from __future__ import annotations

from datetime import timedelta

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from referral_broker.consumers.inbox.auth import authenticate, csrf_ok
from referral_broker.consumers.inbox.outbound import AccessEvent, AccessKind
from referral_broker.consumers.inbox.pages_errors import forbidden
from referral_broker.consumers.inbox.rendering import inbox_app, render
from referral_broker.consumers.inbox.security import SESSION_COOKIE, audit, signed_in_member
from referral_broker.errors import AuthError

SIGN_IN_COOKIE = "rb_sign_in"


def _safe_next(target: str | None) -> str:
    """Only local paths, so sign-in cannot be used to redirect to another site."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/inbox"


def _sign_in_page(
    request: Request,
    *,
    status_code: int = 200,
    next_url: str = "/inbox",
    username: str = "",
    errors: list[dict[str, str]] | None = None,
    field_errors: dict[str, str] | None = None,
    expired: bool = False,
    signed_out: bool = False,
) -> HTMLResponse:
    app = inbox_app(request)
    cookie, token = app.codec.sign_in_token()
    response = render(
        request,
        "sign_in.html",
        status_code=status_code,
        title="Sign in",
        sign_in_token=token,
        next=next_url,
        username=username,
        errors=errors or [],
        field_errors=field_errors or {},
        expired=expired,
        signed_out=signed_out,
    )
    response.set_cookie(
        SIGN_IN_COOKIE,
        cookie,
        max_age=3600,
        path="/sign-in",
        httponly=True,
        secure=app.secure_cookies,
        samesite="strict",
    )
    return response


async def sign_in_form(request: Request) -> Response:
    q = request.query_params
    return _sign_in_page(
        request,
        next_url=_safe_next(q.get("next")),
        expired=q.get("expired") == "1",
        signed_out=q.get("signed_out") == "1",
    )


async def sign_in(request: Request) -> Response:
    app = inbox_app(request)
    form = await request.form()
    if not app.codec.check_sign_in_token(
        request.cookies.get(SIGN_IN_COOKIE), str(form.get("csrf_token", ""))
    ):
        return forbidden(request, None)
    username = str(form.get("username", "")).strip().lower()
    password = str(form.get("password", ""))
    next_url = _safe_next(str(form.get("next", "")))
    field_errors: dict[str, str] = {}
    if not username:
        field_errors["username"] = "Enter your username"
    if not password:
        field_errors["password"] = "Enter your password"
    if field_errors:
        errors = [{"text": text, "href": f"#{name}"} for name, text in field_errors.items()]
        return _sign_in_page(
            request,
            status_code=400,
            next_url=next_url,
            username=username,
            errors=errors,
            field_errors=field_errors,
        )
    try:
        user = await run_in_threadpool(authenticate, app.store, username, password)
        if user.team not in app.teams:
            raise AuthError("this server does not serve the member's team")
    except AuthError:
        known = await run_in_threadpool(app.store.get_user, username)
        await audit(
            request,
            AccessEvent(
                AccessKind.SIGN_IN_REFUSED,
                app.clock(),
                known.username if known else None,
                known.team if known else None,
            ),
        )
        message = "Enter a correct username and password"
        return _sign_in_page(
            request,
            status_code=401,
            next_url=next_url,
            username=username,
            errors=[{"text": message, "href": "#username"}],
            field_errors={"username": message, "password": message},
        )
    now = app.clock()
    session = await run_in_threadpool(app.store.create_session, user.username, at=now)
    # Sessions past their age can never be used again; sign-ins are a good moment to drop them.
    await run_in_threadpool(app.store.purge_sessions, now - timedelta(seconds=app.codec.max_age_s))
    await audit(request, AccessEvent(AccessKind.SIGNED_IN, app.clock(), user.username, user.team))
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        app.codec.dump(session.id),
        max_age=app.codec.max_age_s,
        path="/",
        httponly=True,
        secure=app.secure_cookies,
        samesite="lax",
    )
    response.delete_cookie(SIGN_IN_COOKIE, path="/sign-in")
    return response


async def sign_out(request: Request) -> Response:
    member = await signed_in_member(request)
    if isinstance(member, Response):
        return member
    form = await request.form()
    if not csrf_ok(member, str(form.get("csrf_token", ""))):
        return forbidden(request, member)
    await run_in_threadpool(inbox_app(request).store.delete_session, member.session.id)
    response = RedirectResponse("/sign-in?signed_out=1", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
