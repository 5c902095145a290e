"""The sign-in and sign-out pages.

Sign-in is the one form posted before there is a session, so its CSRF token rides on its own
short-lived cookie (scoped to ``/sign-in``); a refused sign-in says the same whatever the cause
and is audited; ``next`` only ever leads to a local path. Attempts are throttled per account and
per client address (:mod:`throttle`): one made while either must wait, or is locked, is refused
with 429 before the password is looked at; a lockout is audited and logged without a name.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from referral_broker.consumers.inbox.auth import authenticate, csrf_ok
from referral_broker.consumers.inbox.outbound import AccessEvent, AccessKind
from referral_broker.consumers.inbox.pages_errors import forbidden
from referral_broker.consumers.inbox.presentation import when
from referral_broker.consumers.inbox.rendering import inbox_app, render
from referral_broker.consumers.inbox.security import SESSION_COOKIE, audit, signed_in_member
from referral_broker.consumers.inbox.store_signin import Subject, Verdict
from referral_broker.consumers.inbox.throttle import account_subject, address_subject, wait_seconds
from referral_broker.errors import AuthError
from referral_broker.structured_log import get_logger

log = get_logger(__name__)

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
    now = app.clock()
    secret = app.codec.secret
    account = await run_in_threadpool(account_subject, app.store, secret, username)
    address = address_subject(secret, request.client.host if request.client else None)
    policy = app.sign_in_policy
    subjects = [(account, policy.account), (address, policy.address)]
    verdict = await run_in_threadpool(app.store.begin_sign_in, subjects, now)
    if not verdict.allowed:
        return await _throttled(request, verdict, account, address, next_url, username)
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
        for lock in await run_in_threadpool(app.store.sign_in_failed, subjects, app.clock()):
            await _audit_lock(request, lock.subject, lock.failures, lock.until, known.team if known else None)
        message = "Enter a correct username and password"
        return _sign_in_page(
            request,
            status_code=401,
            next_url=next_url,
            username=username,
            errors=[{"text": message, "href": "#username"}],
            field_errors={"username": message, "password": message},
        )
    await run_in_threadpool(app.store.sign_in_succeeded, account, address, policy.address)
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


async def _audit_lock(
    request: Request, subject: Subject, failures: int, until: datetime, team: str | None
) -> None:
    """A lockout: into the access audit (the account's name only when it is an account) and the
    log (scope, short keyed hash, counts: no username, no address)."""
    app = inbox_app(request)
    log.warning(
        "sign-in locked",
        scope=subject.scope,
        subject_ref=subject.ref,
        count=failures,
        until=until.isoformat(timespec="seconds"),
    )
    await audit(
        request,
        AccessEvent(
            AccessKind.SIGN_IN_LOCKED,
            app.clock(),
            subject.username,
            team if subject.username else None,
            count=failures,
            scope=subject.scope,
            subject_ref=subject.ref,
        ),
    )


async def _throttled(
    request: Request, verdict: Verdict, account: Subject, address: Subject, next_url: str, username: str
) -> Response:
    """The answer to an attempt the throttle refused: 429, how long to wait, nothing checked."""
    app = inbox_app(request)
    now = app.clock()
    assert verdict.until is not None
    subject = account if verdict.scope == account.scope else address
    known = await run_in_threadpool(app.store.get_user, account.username) if account.username else None
    await audit(
        request,
        AccessEvent(
            AccessKind.SIGN_IN_THROTTLED,
            now,
            account.username,
            known.team if known else None,
            scope=subject.scope,
            subject_ref=subject.ref,
        ),
    )
    seconds = wait_seconds(verdict.until, now)
    if verdict.locked:
        message = (
            "Sign-in is locked after too many attempts that were not right. Try again after "
            f"{when(verdict.until)} (UTC), or ask your team’s inbox administrator to unlock it"
        )
    else:
        message = f"Too many attempts that were not right. Wait {seconds} seconds, then try again"
    response = _sign_in_page(
        request,
        status_code=429,
        next_url=next_url,
        username=username,
        errors=[{"text": message, "href": "#username"}],
    )
    response.headers["Retry-After"] = str(seconds)
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
