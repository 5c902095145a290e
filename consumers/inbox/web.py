"""The inbox web app: Starlette, server-rendered Jinja2 with the GOV.UK Frontend macros.

Pages: sign in/out, the team's inbox (tabs new / in progress / closed; filter and sort), one
referral (the granted fields opened for this view only, the withheld fields named with the
reason, the actions its state allows, its history), and the decline / more-information forms.

Every request is answered as the signed-in member of one team: another team's referral is a
plain 404, exactly like an unknown id, and the attempt is audited. Every view of a referral is
audited before the page is built; if the audit cannot be written the referral is not shown.
Forms carry a per-session CSRF token; a forged post is a plain 403. Responses carry a strict
Content-Security-Policy (scripts and styles only from this origin or with the request's nonce)
and ``Cache-Control: no-store``, so opened values do not linger in caches.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from referral_broker.config import Settings
from referral_broker.consumers.inbox import presentation
from referral_broker.consumers.inbox.auth import (
    AuthError,
    SessionCodec,
    SignedIn,
    authenticate,
    csrf_ok,
    resolve_session,
)
from referral_broker.consumers.inbox.outbound import AccessEvent, AccessKind, Outbound, status_record
from referral_broker.consumers.inbox.records import OutboundRecord, RecordFormat
from referral_broker.consumers.inbox.states import (
    TABS,
    Action,
    InvalidTransitionError,
    ReferralState,
    Transition,
    allowed_actions,
)
from referral_broker.consumers.inbox.store import InboxStore, ReferralRow, StatusEncoder, UnknownUserError
from referral_broker.errors import BrokerError, ReferralBrokerError, ShreddedError
from referral_broker.parties import all_parties
from referral_broker.structured_log import get_logger

log = get_logger(__name__)

SERVICE_NAME = "Early Help referrals"
SESSION_COOKIE = "rb_session"
SIGN_IN_COOKIE = "rb_sign_in"
_REFERRAL_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MAX_DETAILS = 1200

TAB_LABELS = {"new": "New", "in-progress": "In progress", "closed": "Closed"}
SORTS = {
    "age": ("Oldest first", "age", False),
    "newest": ("Newest first", "age", True),
    "priority": ("Priority, most urgent first", "priority", False),
    "referrer": ("Referrer", "referrer", False),
}


@dataclass(frozen=True)
class ReasonForm:
    """A form that needs a reason: a closed list of codes (stored) and details in words
    (only ever sent sealed inside the status message)."""

    action: Action
    slug: str
    question: str
    reasons: Mapping[str, str]
    details_label: str
    details_hint: str
    button: str
    button_classes: str = ""


REASON_FORMS = {
    "decline": ReasonForm(
        Action.DECLINE,
        "decline",
        "Why are you declining this referral?",
        {
            "threshold_not_met": "It does not meet the threshold for Early Help",
            "statutory_service_needed": "It needs children’s social care instead",
            "wrong_district": "The family lives in another district",
            "already_supported": "The family is already being supported",
            "consent_not_given": "The family did not agree to the service",
            "other": "Another reason",
        },
        "Explain your decision to the referrer",
        "This is sent to the referrer, sealed so only the council and the referrer can read it. "
        f"Up to {MAX_DETAILS} characters.",
        "Decline referral",
        "govuk-button--warning",
    ),
    "request-information": ReasonForm(
        Action.REQUEST_INFORMATION,
        "request-information",
        "What information do you need?",
        {
            "consent": "Consent to the service",
            "contact_details": "How to contact the family",
            "concern_details": "More detail about the concerns",
            "household": "Who lives in the household",
            "other": "Something else",
        },
        "Tell the referrer what you need",
        "This is sent to the referrer, sealed so only the council and the referrer can read it. "
        f"Up to {MAX_DETAILS} characters.",
        "Send request",
    ),
}
_REASONS_BY_ACTION = {f.action: f.reasons for f in REASON_FORMS.values()}

DONE_MESSAGES = {
    Action.ACCEPT: "Referral accepted.",
    Action.DECLINE: "Referral declined.",
    Action.REQUEST_INFORMATION: "Request for more information sent.",
    Action.ALLOCATE: "Referral allocated.",
    Action.CLOSE: "Referral closed.",
}


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


# --- helpers ----------------------------------------------------------------------------------


def _team_label(team: str) -> str:
    party = all_parties().get(team)
    return party.description.split(": ", 1)[-1] if party and ": " in party.description else team


def _referrer_label(referrer: str) -> str:
    return presentation.humanise(referrer)


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
        state_tag=lambda s: presentation.STATE_TAG_CLASSES.get(ReferralState(s), ""),
        priority_tag=lambda p: presentation.PRIORITY_TAG_CLASSES.get(p, "govuk-tag--grey"),
        tab_labels=TAB_LABELS,
        reason_label=lambda action, code: _REASONS_BY_ACTION.get(Action(action), {}).get(code, code),
    )
    return env


def _app(request: Request) -> InboxApp:
    return request.app.state.inbox  # type: ignore[no-any-return]


def render(
    request: Request, template: str, *, status_code: int = 200, signed_in: SignedIn | None = None, **ctx: Any
) -> HTMLResponse:
    app = _app(request)
    now = app.clock()
    html = app.templates.get_template(template).render(
        cspNonce=request.state.csp_nonce,
        signed_in=signed_in,
        csrf_token=signed_in.session.csrf_token if signed_in else "",
        age=lambda since: presentation.age(since, now),
        **ctx,
    )
    return HTMLResponse(html, status_code=status_code)


def plain_page(
    request: Request,
    status_code: int,
    title: str,
    *paragraphs: str,
    signed_in: SignedIn | None = None,
    link: dict[str, str] | None = None,
) -> HTMLResponse:
    """A plain error page: the status, a title, what to do; nothing about the data."""
    return render(
        request,
        "error.html",
        status_code=status_code,
        signed_in=signed_in,
        title=title,
        paragraphs=paragraphs,
        link=link,
    )


def _not_found(request: Request, signed_in: SignedIn | None) -> HTMLResponse:
    return plain_page(
        request,
        404,
        "Page not found",
        "If you typed the web address, check it is correct. If you followed a link to a referral, "
        "it may belong to another team’s inbox.",
        signed_in=signed_in,
        link={"href": "/inbox", "text": "Go to your team’s referrals"},
    )


def _forbidden(request: Request, signed_in: SignedIn | None) -> HTMLResponse:
    return plain_page(
        request,
        403,
        "This form has expired or was not sent from the inbox",
        "Nothing was changed. Go back to the page, reload it and try again.",
        signed_in=signed_in,
        link={"href": "/inbox", "text": "Go to your team’s referrals"},
    )


def _safe_next(target: str | None) -> str:
    """Only local paths, so sign-in cannot be used to redirect to another site."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/inbox"


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


async def _member(request: Request) -> SignedIn | Response:
    """The signed-in member of a served team, or the redirect to sign in."""
    app = _app(request)
    signed_in, expired = await run_in_threadpool(
        resolve_session, app.store, app.codec, request.cookies.get(SESSION_COOKIE), now=app.clock()
    )
    if signed_in is None or signed_in.user.team not in app.teams:
        return _sign_in_redirect(request, expired=expired)
    return signed_in


async def _audit(request: Request, event: AccessEvent) -> bool:
    try:
        await run_in_threadpool(_app(request).outbound.audit, event)
    except BrokerError as exc:
        log.error("access audit failed", team=event.team, member=event.member, error=str(exc))
        return False
    return True


async def _find_referral(
    request: Request, signed_in: SignedIn, referral_id: str
) -> ReferralRow | HTMLResponse:
    """The referral in the member's own team, or a 404 page (the attempt audited)."""
    app = _app(request)
    team, member, now = signed_in.user.team, signed_in.user.username, app.clock()
    if not _REFERRAL_ID.match(referral_id):
        await _audit(request, AccessEvent(AccessKind.NOT_FOUND, now, member, team, None))
        return _not_found(request, signed_in)
    referral = await run_in_threadpool(app.store.get_referral, team, referral_id)
    if referral is not None:
        return referral
    holders = await run_in_threadpool(app.store.teams_holding, referral_id)
    kind = AccessKind.DENIED_OTHER_TEAM if holders else AccessKind.NOT_FOUND
    await _audit(request, AccessEvent(kind, now, member, team, referral_id))
    log.warning("referral refused", team=team, member=member, referral_id=referral_id, reason=kind.value)
    return _not_found(request, signed_in)


def _status_encoder(app: InboxApp, signed_in: SignedIn, reason: str | None) -> StatusEncoder:
    def encode(decided: Transition, referral: ReferralRow) -> OutboundRecord:
        record = status_record(decided, referral, actor_role=signed_in.user.role, reason=reason)
        return app.record_format.seal_status(record, referral.team)

    return encode


def _publish(app: InboxApp, team: str) -> bool:
    """Send the team's outbox now; a failure leaves it for the background retry."""
    try:
        app.outbound.publish_pending(app.store, now=app.clock(), team=team)
    except BrokerError as exc:
        log.error("status publish deferred", team=team, error=str(exc))
        return False
    return True


# --- pages ------------------------------------------------------------------------------------


async def home(request: Request) -> Response:
    return RedirectResponse("/inbox", status_code=303)


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


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
    app = _app(request)
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
    app = _app(request)
    form = await request.form()
    if not app.codec.check_sign_in_token(
        request.cookies.get(SIGN_IN_COOKIE), str(form.get("csrf_token", ""))
    ):
        return _forbidden(request, None)
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
        await _audit(
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
    await _audit(request, AccessEvent(AccessKind.SIGNED_IN, app.clock(), user.username, user.team))
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
    member = await _member(request)
    if isinstance(member, Response):
        return member
    form = await request.form()
    if not csrf_ok(member, str(form.get("csrf_token", ""))):
        return _forbidden(request, member)
    await run_in_threadpool(_app(request).store.delete_session, member.session.id)
    response = RedirectResponse("/sign-in?signed_out=1", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def inbox(request: Request) -> Response:
    member = await _member(request)
    if isinstance(member, Response):
        return member
    app = _app(request)
    team = member.user.team
    q = request.query_params
    choices = await run_in_threadpool(app.store.filter_choices, team)
    filters = {
        "priority": q.get("priority") if q.get("priority") in choices["priority"] else "",
        "concern": q.get("concern") if q.get("concern") in choices["concern_type"] else "",
        "referrer": q.get("referrer") if q.get("referrer") in choices["referrer"] else "",
    }
    sort_key = q.get("sort") if q.get("sort") in SORTS else "age"
    label, sort, newest_first = SORTS[sort_key]
    rows = await run_in_threadpool(
        lambda: app.store.list_referrals(
            team,
            priority=filters["priority"] or None,
            concern_type=filters["concern"] or None,
            referrer=filters["referrer"] or None,
            sort=sort,
            newest_first=newest_first,
        )
    )
    tabs = {tab: [r for r in rows if r.state in states] for tab, states in TABS.items()}

    def choice_items(values: list[str], selected: str, label: Callable[[str], str] = presentation.humanise):
        return [{"value": v, "text": label(v), "selected": v == selected} for v in values]

    return render(
        request,
        "inbox.html",
        signed_in=member,
        title="Referrals",
        nav="inbox",
        tabs=tabs,
        tab_order=list(TABS),
        choices=choices,
        filters=filters,
        filtering=any(filters.values()),
        choice_items=choice_items,
        sort_items=[{"value": k, "text": v[0], "selected": k == sort_key} for k, v in SORTS.items()],
        sort_label=label.lower(),
    )


async def referral_page(request: Request) -> Response:
    member = await _member(request)
    if isinstance(member, Response):
        return member
    app = _app(request)
    referral_id = request.path_params["referral_id"]
    found = await _find_referral(request, member, referral_id)
    if isinstance(found, Response):
        return found
    referral = found
    team, now = member.user.team, app.clock()
    viewed = AccessEvent(AccessKind.VIEWED, now, member.user.username, team, referral_id, referral.version)
    if not await _audit(request, viewed):
        return plain_page(
            request,
            503,
            "Sorry, the referral cannot be shown right now",
            "Every view of a referral is recorded, and the record could not be written. Try again in a "
            "few minutes.",
            signed_in=member,
        )
    if referral.state is ReferralState.NEW:
        # Another member may have opened it a moment ago: then there is nothing to record.
        with suppress(InvalidTransitionError):
            await run_in_threadpool(
                lambda: app.store.apply(
                    team,
                    referral_id,
                    Action.OPEN,
                    actor=member.user.username,
                    at=now,
                    encode_status=_status_encoder(app, member, None),
                )
            )
        await run_in_threadpool(_publish, app, team)
        referral = await run_in_threadpool(app.store.get_referral, team, referral_id) or referral
    try:
        record = await run_in_threadpool(app.store.record_of, team, referral_id)
        opened = await run_in_threadpool(app.record_format.open, record, team)
    except ShreddedError:
        return plain_page(
            request,
            410,
            "This referral’s information has been deleted",
            "Its retention period ended and its key was destroyed, so it can no longer be read.",
            signed_in=member,
        )
    except ReferralBrokerError as exc:
        log.error(
            "referral could not be opened", team=team, referral_id=referral_id, error=type(exc).__name__
        )
        return plain_page(
            request,
            500,
            "Sorry, this referral cannot be opened",
            "It could not be verified or decrypted with your team’s key. The problem has been logged; "
            "tell your inbox administrator, quoting the referral reference.",
            signed_in=member,
        )
    granted = presentation.sections(opened.granted)
    events = await run_in_threadpool(app.store.events, team, referral_id)
    members = await run_in_threadpool(app.store.list_users, team)
    done = request.query_params.get("done")
    done_action = Action(done) if done in {a.value for a in DONE_MESSAGES} else None
    done_html = ""
    if done_action is not None:
        told = (
            "The referrer will be told."
            if request.query_params.get("sent") == "1"
            else "The status message will be sent to the referrer as soon as Kafka is reachable."
        )
        done_html = f'<h3 class="govuk-notification-banner__heading">{DONE_MESSAGES[done_action]}</h3><p class="govuk-body">{told}</p>'
    response = render(
        request,
        "referral.html",
        signed_in=member,
        title=f"Referral {referral_id[:8]}",
        referral=referral,
        granted=granted,
        events=events,
        actions=[a.value for a in allowed_actions(referral.state)],
        worker_items=[
            {
                "value": u.username,
                "text": f"{u.username} ({u.role})",
                "selected": u.username == referral.allocated_to,
            }
            for u in members
            if not u.disabled
        ],
        done=done_action is not None,
        done_html=done_html,
    )
    return response


async def _act(
    request: Request,
    member: SignedIn,
    referral: ReferralRow,
    action: Action,
    *,
    reason_code: str | None = None,
    reason_text: str | None = None,
    allocated_to: str | None = None,
) -> Response:
    app = _app(request)
    team = member.user.team
    try:
        await run_in_threadpool(
            lambda: app.store.apply(
                team,
                referral.referral_id,
                action,
                actor=member.user.username,
                at=app.clock(),
                encode_status=_status_encoder(app, member, reason_text),
                reason_code=reason_code,
                allocated_to=allocated_to,
            )
        )
    except InvalidTransitionError:
        return plain_page(
            request,
            409,
            f"You cannot do that: this referral is {referral.state.label.lower()}",
            "Someone may have acted on it since you opened the page. Nothing was changed.",
            signed_in=member,
            link={"href": f"/referrals/{referral.referral_id}", "text": "Go back to the referral"},
        )
    sent = await run_in_threadpool(_publish, app, team)
    query = urlencode({"done": action.value, "sent": "1" if sent else "0"})
    return RedirectResponse(f"/referrals/{quote(referral.referral_id)}?{query}", status_code=303)


async def _action_preamble(request: Request) -> tuple[SignedIn, ReferralRow, Any] | Response:
    """Signed in, CSRF token right, referral in the member's team: in that order."""
    member = await _member(request)
    if isinstance(member, Response):
        return member
    form = await request.form()
    if not csrf_ok(member, str(form.get("csrf_token", ""))):
        log.warning("forged or stale form refused", team=member.user.team, member=member.user.username)
        return _forbidden(request, member)
    found = await _find_referral(request, member, request.path_params["referral_id"])
    if isinstance(found, Response):
        return found
    return member, found, form


async def accept(request: Request) -> Response:
    pre = await _action_preamble(request)
    if isinstance(pre, Response):
        return pre
    member, referral, _ = pre
    return await _act(request, member, referral, Action.ACCEPT)


async def close(request: Request) -> Response:
    pre = await _action_preamble(request)
    if isinstance(pre, Response):
        return pre
    member, referral, _ = pre
    return await _act(request, member, referral, Action.CLOSE)


async def allocate(request: Request) -> Response:
    pre = await _action_preamble(request)
    if isinstance(pre, Response):
        return pre
    member, referral, form = pre
    worker = str(form.get("worker", "")).strip()
    try:
        return await _act(request, member, referral, Action.ALLOCATE, allocated_to=worker)
    except (UnknownUserError, ValueError):
        return plain_page(
            request,
            400,
            "Choose a worker from your team",
            "The worker you chose is not an active member of your team. Nothing was changed.",
            signed_in=member,
            link={"href": f"/referrals/{referral.referral_id}", "text": "Go back to the referral"},
        )


def _reason_page(
    request: Request,
    member: SignedIn,
    referral: ReferralRow,
    form_spec: ReasonForm,
    *,
    status_code: int = 200,
    chosen: str = "",
    details: str = "",
    field_errors: dict[str, str] | None = None,
) -> HTMLResponse:
    field_errors = field_errors or {}
    errors = [
        {"text": text, "href": "#reason" if name == "reason" else "#details"}
        for name, text in field_errors.items()
    ]
    return render(
        request,
        "reason.html",
        status_code=status_code,
        signed_in=member,
        title=form_spec.question,
        referral=referral,
        form=form_spec,
        reason_items=[{"value": k, "text": v, "checked": k == chosen} for k, v in form_spec.reasons.items()],
        details=details,
        errors=errors,
        field_errors=field_errors,
    )


def _reason_endpoints(slug: str) -> tuple[Callable[[Request], Awaitable[Response]], ...]:
    spec = REASON_FORMS[slug]

    async def show(request: Request) -> Response:
        member = await _member(request)
        if isinstance(member, Response):
            return member
        found = await _find_referral(request, member, request.path_params["referral_id"])
        if isinstance(found, Response):
            return found
        return _reason_page(request, member, found, spec)

    async def submit(request: Request) -> Response:
        pre = await _action_preamble(request)
        if isinstance(pre, Response):
            return pre
        member, referral, form = pre
        chosen = str(form.get("reason", ""))
        details = str(form.get("details", "")).strip()
        field_errors: dict[str, str] = {}
        if chosen not in spec.reasons:
            field_errors["reason"] = (
                "Select a reason" if spec.action is Action.DECLINE else "Select what you need"
            )
        if not details:
            field_errors["details"] = "Enter an explanation for the referrer"
        elif len(details) > MAX_DETAILS:
            field_errors["details"] = f"Explanation must be {MAX_DETAILS} characters or fewer"
        if field_errors:
            return _reason_page(
                request,
                member,
                referral,
                spec,
                status_code=400,
                chosen=chosen,
                details=details,
                field_errors=field_errors,
            )
        return await _act(
            request,
            member,
            referral,
            spec.action,
            reason_code=chosen,
            reason_text=f"{spec.reasons[chosen]}. {details}",
        )

    return show, submit


# --- middleware and errors --------------------------------------------------------------------


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


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        return _not_found(request, None)
    if status == 405:
        return plain_page(request, 405, "That is not how this page is used", "Go back and try again.")
    return plain_page(request, status, "Sorry, there is a problem with the service", "Try again later.")


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", path=request.url.path, error=type(exc).__name__)
    return plain_page(
        request,
        500,
        "Sorry, there is a problem with the service",
        "Try again later. Nothing you were doing has been lost.",
    )


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
) -> Starlette:
    """The inbox app for ``teams``. ``background`` objects with ``start()`` and ``stop()`` (the
    ingest workers) run for the app's lifetime."""
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
    )
    decline_show, decline_submit = _reason_endpoints("decline")
    info_show, info_submit = _reason_endpoints("request-information")
    rid = "/referrals/{referral_id}"
    routes: list[Route | Mount] = [
        Route("/", home),
        Route("/healthz", health),
        Route("/sign-in", sign_in_form, methods=["GET"]),
        Route("/sign-in", sign_in, methods=["POST"]),
        Route("/sign-out", sign_out, methods=["POST"]),
        Route("/inbox", inbox, methods=["GET"]),
        Route(rid, referral_page, methods=["GET"]),
        Route(rid + "/accept", accept, methods=["POST"]),
        Route(rid + "/close", close, methods=["POST"]),
        Route(rid + "/allocate", allocate, methods=["POST"]),
        Route(rid + "/decline", decline_show, methods=["GET"]),
        Route(rid + "/decline", decline_submit, methods=["POST"]),
        Route(rid + "/request-information", info_show, methods=["GET"]),
        Route(rid + "/request-information", info_submit, methods=["POST"]),
    ]
    if assets_dir is not None:
        routes.append(Mount("/assets", StaticFiles(directory=assets_dir), name="assets"))

    @asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        for worker in inbox_state.background:
            worker.start()
        try:
            yield
        finally:
            for worker in inbox_state.background:
                worker.stop()

    app = Starlette(
        routes=routes,
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.inbox = inbox_state
    return app
