"""The referral pages: the team's inbox (tabs new / in progress / closed; filter and sort), one
referral (the granted fields opened for this view only, the withheld fields named with the
reason, the actions its state allows, its history), the actions, and the decline /
more-information forms.

Every request is answered as the signed-in member of one team: another team's referral is a
plain 404, exactly like an unknown id, and the attempt is audited. Every view of a referral is
audited before the page is built; if the audit cannot be written the referral is not shown.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from referral_broker.consumers.inbox import presentation
from referral_broker.consumers.inbox.auth import SignedIn, csrf_ok
from referral_broker.consumers.inbox.outbound import AccessEvent, AccessKind, status_record
from referral_broker.consumers.inbox.pages_errors import forbidden, not_found, plain_page
from referral_broker.consumers.inbox.rendering import InboxApp, inbox_app, render
from referral_broker.consumers.inbox.security import audit, signed_in_member
from referral_broker.consumers.inbox.states import TABS, Action, ReferralState, Transition, allowed_actions
from referral_broker.consumers.inbox.store_referrals import ReferralRow
from referral_broker.errors import (
    BrokerError,
    InvalidTransitionError,
    ReferralBrokerError,
    ShreddedError,
    UnknownUserError,
)
from referral_broker.sealing import OutgoingMessage
from referral_broker.structured_log import get_logger

log = get_logger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]

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


def reason_label(action: str, code: str) -> str:
    """The words for a stored reason code (the referral's history shows them)."""
    return _REASONS_BY_ACTION.get(Action(action), {}).get(code, code)


DONE_MESSAGES = {
    Action.ACCEPT: "Referral accepted.",
    Action.DECLINE: "Referral declined.",
    Action.REQUEST_INFORMATION: "Request for more information sent.",
    Action.ALLOCATE: "Referral allocated.",
    Action.CLOSE: "Referral closed.",
}


async def _find_referral(
    request: Request, signed_in: SignedIn, referral_id: str
) -> ReferralRow | HTMLResponse:
    """The referral in the member's own team, or a 404 page (the attempt audited)."""
    app = inbox_app(request)
    team, member, now = signed_in.user.team, signed_in.user.username, app.clock()
    if not _REFERRAL_ID.match(referral_id):
        await audit(request, AccessEvent(AccessKind.NOT_FOUND, now, member, team, None))
        return not_found(request, signed_in)
    referral = await run_in_threadpool(app.store.get_referral, team, referral_id)
    if referral is not None:
        return referral
    holders = await run_in_threadpool(app.store.teams_holding, referral_id)
    kind = AccessKind.DENIED_OTHER_TEAM if holders else AccessKind.NOT_FOUND
    await audit(request, AccessEvent(kind, now, member, team, referral_id))
    log.warning("referral refused", team=team, member=member, referral_id=referral_id, reason=kind.value)
    return not_found(request, signed_in)


def _decide(
    app: InboxApp,
    member: SignedIn,
    referral_id: str,
    action: Action,
    *,
    at: datetime,
    reason_code: str | None = None,
    reason_text: str | None = None,
    allocated_to: str | None = None,
) -> Transition:
    """Record ``member``'s ``action`` with its sealed status message in the outbox (``reason_text``
    travels only inside it); raises as :meth:`InboxStore.apply` does, storing nothing."""

    def encode(decided: Transition, referral: ReferralRow) -> OutgoingMessage:
        record = status_record(decided, referral, actor_role=member.user.role, reason=reason_text)
        return app.record_format.seal_status(record, referral.team)

    return app.store.apply(
        member.user.team,
        referral_id,
        action,
        actor=member.user.username,
        at=at,
        encode_status=encode,
        reason_code=reason_code,
        allocated_to=allocated_to,
    )


def _publish(app: InboxApp, team: str) -> bool:
    """Send the team's outbox now; a failure leaves it for the background retry."""
    try:
        app.outbound.publish_pending(app.store, now=app.clock(), team=team)
    except BrokerError as exc:
        log.error("status publish deferred", team=team, error=str(exc))
        return False
    return True


async def inbox(request: Request) -> Response:
    member = await signed_in_member(request)
    if isinstance(member, Response):
        return member
    app = inbox_app(request)
    team = member.user.team
    q = request.query_params
    choices = await run_in_threadpool(app.store.filter_choices, team)
    filters = {
        "priority": q.get("priority") if q.get("priority") in choices["priority"] else "",
        "concern": q.get("concern") if q.get("concern") in choices["concern_type"] else "",
        "referrer": q.get("referrer") if q.get("referrer") in choices["referrer"] else "",
    }
    sort_key = q.get("sort") or "age"
    if sort_key not in SORTS:
        sort_key = "age"
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
    member = await signed_in_member(request)
    if isinstance(member, Response):
        return member
    app = inbox_app(request)
    referral_id = request.path_params["referral_id"]
    found = await _find_referral(request, member, referral_id)
    if isinstance(found, Response):
        return found
    referral = found
    team, now = member.user.team, app.clock()
    viewed = AccessEvent(AccessKind.VIEWED, now, member.user.username, team, referral_id, referral.version)
    if not await audit(request, viewed):
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
            await run_in_threadpool(_decide, app, member, referral_id, Action.OPEN, at=now)
        await run_in_threadpool(_publish, app, team)
        reloaded = await run_in_threadpool(app.store.get_referral, team, referral_id)
        referral = reloaded or referral
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
    app = inbox_app(request)
    team = member.user.team
    try:
        await run_in_threadpool(
            _decide,
            app,
            member,
            referral.referral_id,
            action,
            at=app.clock(),
            reason_code=reason_code,
            reason_text=reason_text,
            allocated_to=allocated_to,
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


async def _action_preamble(request: Request) -> tuple[SignedIn, ReferralRow, FormData] | Response:
    """Signed in, CSRF token right, referral in the member's team: in that order."""
    member = await signed_in_member(request)
    if isinstance(member, Response):
        return member
    form = await request.form()
    if not csrf_ok(member, str(form.get("csrf_token", ""))):
        log.warning("forged or stale form refused", team=member.user.team, member=member.user.username)
        return forbidden(request, member)
    found = await _find_referral(request, member, request.path_params["referral_id"])
    if isinstance(found, Response):
        return found
    return member, found, form


def _plain_action(action: Action) -> Endpoint:
    """An action whose form carries nothing but the CSRF token (accept, close)."""

    async def endpoint(request: Request) -> Response:
        pre = await _action_preamble(request)
        if isinstance(pre, Response):
            return pre
        member, referral, _ = pre
        return await _act(request, member, referral, action)

    return endpoint


accept = _plain_action(Action.ACCEPT)
close = _plain_action(Action.CLOSE)


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


def reason_endpoints(slug: str) -> tuple[Endpoint, Endpoint]:
    """The page (GET) and the submit (POST) of the reason form ``slug`` in :data:`REASON_FORMS`."""
    spec = REASON_FORMS[slug]

    async def show(request: Request) -> Response:
        member = await signed_in_member(request)
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
