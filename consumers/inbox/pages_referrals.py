"""One referral's page and its actions: the granted fields opened for this view only, in the
order a worker reads them (the concerns, risk flags, priority, consent and override, why the
team has it, then the child, household, circumstances, health, school; "do not pass on" beside
each such field; the withheld fields named with the reason; technical ids last), the actions its
state allows, case notes and the history (with the exact words sent to the referrer), and the
decline / more-information / information-received forms. The list is :mod:`pages_list`.

Reading changes nothing and tells no one: a member acknowledges a referral explicitly, or
decides it. The banner after an action comes from the referral's recorded history, not from the
URL. Every request is answered as the signed-in member of one team: another team's referral is
a plain 404, exactly like an unknown id, and the attempt is audited. Every view of a referral is
audited before the page is built; if the audit cannot be written the referral is not shown.
Case notes, information recorded and the words sent to the referrer are sealed for the team
before they are stored (:meth:`RecordFormat.seal_text`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from referral_broker.consumers.inbox import presentation
from referral_broker.consumers.inbox.auth import SignedIn, csrf_ok
from referral_broker.consumers.inbox.deadlines import local_date
from referral_broker.consumers.inbox.outbound import AccessEvent, AccessKind, status_record
from referral_broker.consumers.inbox.pages_errors import forbidden, not_found, plain_page
from referral_broker.consumers.inbox.rendering import InboxApp, inbox_app, render
from referral_broker.consumers.inbox.security import audit, signed_in_member
from referral_broker.consumers.inbox.states import Action, Transition, allowed_actions, transition
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
MAX_NOTE = 2000
BANNER_FOR = timedelta(minutes=15)  # how long a member's own action is confirmed on the page


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
        "This is sent to the referrer, sealed so only the council and the referrer can read it.",
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
        "This is sent to the referrer, sealed so only the council and the referrer can read it.",
        "Send request",
    ),
}
# How information asked for reached the team (recorded with it; the words are sealed).
INFORMATION_SOURCES = {
    "phone": "By phone",
    "email": "By e-mail",
    "meeting": "In a meeting",
    "new_version": "In the referrer’s new version of the referral",
    "other": "Another way",
}
_REASONS_BY_ACTION = {f.action: f.reasons for f in REASON_FORMS.values()} | {
    Action.RECORD_INFORMATION: INFORMATION_SOURCES
}


def reason_label(action: str, code: str) -> str:
    """The words for a stored reason code (the referral's history shows them)."""
    return _REASONS_BY_ACTION.get(Action(action), {}).get(code, code)


DONE_MESSAGES = {
    Action.OPEN: "Referral acknowledged.",
    Action.RECORD_INFORMATION: "Information recorded. The referral is open for a decision again.",
    Action.NOTE: "Case note added.",
    Action.RESEARCH_OBJECTION: "The family’s objection to research use is recorded. The council leaves this child out of every research export from now on.",
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
    shredded = await run_in_threadpool(app.store.tombstone, team, referral_id)
    if shredded is not None:  # the team's tombstone: that it was shredded, when, by whom; nothing else
        await audit(request, AccessEvent(AccessKind.NOT_FOUND, now, member, team, referral_id))
        return plain_page(
            request,
            410,
            "This referral was shredded",
            f"Its case was shredded on {shredded.shredded_at:%d %B %Y at %H:%M} UTC by "
            f"{shredded.shredded_by}. Nothing about it can be opened any more.",
            signed_in=signed_in,
            link={"href": "/inbox", "text": "Go to your team’s referrals"},
        )
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
    team_text: str | None = None,
) -> Transition:
    """Record ``member``'s ``action`` with its sealed status message in the outbox (``reason_text``
    travels only inside it, and is kept sealed for the team so the history can show it word for
    word; ``team_text``, a note or information recorded, is kept sealed for the team only);
    raises as :meth:`InboxStore.apply` does, storing nothing."""

    status_id = uuid.uuid4()

    def encode(decided: Transition, referral: ReferralRow) -> OutgoingMessage:
        record = status_record(
            decided, referral, actor_role=member.user.role, reason=reason_text, status_id=status_id
        )
        return app.record_format.seal_status(record, referral.team)

    kept = reason_text if reason_text is not None else team_text
    sealed = app.record_format.seal_text(member.user.team, referral_id, kept) if kept else None
    return app.store.apply(
        member.user.team,
        referral_id,
        action,
        actor=member.user.username,
        at=at,
        encode_status=encode,
        reason_code=reason_code,
        allocated_to=allocated_to,
        sealed_text=sealed,
        status_id=str(status_id),
    )


def _publish(app: InboxApp, team: str) -> bool:
    """Send the team's outbox now; a failure leaves it for the background retry."""
    try:
        app.outbound.publish_pending(app.store, now=app.clock(), team=team)
    except BrokerError as exc:
        log.error("status publish deferred", team=team, error=str(exc))
        return False
    return True


@cache
def _policy() -> Any:
    """The council's sharing policy as shipped with this inbox (for the purpose and ground)."""
    from referral_broker.policy import load_policy

    return load_policy()


def purposes_for(team: str) -> list[dict[str, str]]:
    """Why the team has the referral: each purpose of the sharing policy that applies to it,
    with its legal ground (and special category condition) in words."""
    from referral_broker.policy.model import GROUNDS, SPECIAL_CATEGORY_CONDITIONS

    try:
        policy = _policy()
        found = policy.purposes_for(team)
    except ReferralBrokerError as exc:
        log.error("sharing policy not readable", team=team, error=type(exc).__name__)
        return []
    return [
        {
            "code": p.name,
            "name": presentation.humanise(p.name),
            "description": p.description,
            "ground": GROUNDS.get(p.ground, p.ground),
            "condition": SPECIAL_CATEGORY_CONDITIONS.get(p.special_category_condition or "", ""),
            "consent": "Consent needed" if p.consent == "required" else "Consent not needed for this purpose",
            "policy_version": str(policy.version),
        }
        for p in found
    ]


BASIS_WORDS = {
    "consent": "The family’s consent to a service this purpose provides",
    "override": "Shared without consent under a recorded override",
    "not_required": "Consent is not needed for this purpose (the council’s own service)",
    "none": "Not shared",
}


def decision_for(app: InboxApp, team: str, referral: ReferralRow) -> dict[str, Any] | None:
    """The router's audited decision to share this referral with the team, in words, once the
    inbox has read it from the audit topic."""
    from referral_broker.policy.model import GROUNDS, SPECIAL_CATEGORY_CONDITIONS

    if not referral.decision_id:
        return None
    found = app.store.decision(team, referral.decision_id)
    if found is None:
        return None
    words = GROUNDS | SPECIAL_CATEGORY_CONDITIONS
    described = {p["code"]: p for p in purposes_for(team)}
    return {
        "purposes": [
            described[name]["name"] + ": " + described[name]["description"] if name in described else name
            for name in (found["purpose"] or "").split(",")
            if name
        ],
        "grounds": [words.get(g.strip(), g.strip()) for g in found["ground"].split(";") if g.strip()],
        "basis": BASIS_WORDS.get(found["basis"] or "", found["basis"] or "Not recorded"),
        "override_reference": found["override_reference"],
        "policy_version": found["policy_version"],
        "decided_at": found["decided_at"],
        "decision_id": found["decision_id"],
    }


@dataclass(frozen=True)
class HistoryItem:
    when: datetime
    what: str
    who: str
    text: str | None  # the sealed words, opened for this view: sent to the referrer, or a note
    text_label: str
    status: str  # the status message: "", "Waiting to send", "Sent for delivery"


def _history(app: InboxApp, referral: ReferralRow, events: list[Any]) -> list[HistoryItem]:
    team = referral.team
    items = [HistoryItem(referral.received_at, "Received", referrer_name(referral), None, "", "")]
    for e in events:
        text = None
        if e.sealed_text:
            try:
                text = app.record_format.open_text(team, referral.referral_id, e.sealed_text)
            except ReferralBrokerError as exc:
                log.warning(
                    "history text not opened",
                    team=team,
                    referral_id=referral.referral_id,
                    error=type(exc).__name__,
                )
                text = "(This text can no longer be opened.)"
        what = e.action.label
        if e.allocated_to:
            what += f" to {e.allocated_to}"
        if e.reason_code:
            what += f": {reason_label(e.action, e.reason_code)}"
        label = {
            Action.DECLINE: "Sent to the referrer, word for word",
            Action.REQUEST_INFORMATION: "Sent to the referrer, word for word",
            Action.RECORD_INFORMATION: "Information received",
            Action.NOTE: "Note",
        }.get(e.action, "")
        status = ""
        if e.notify:
            status = _told(e)
        who = e.actor if e.actor != "referrer" else referrer_name(referral)
        items.append(HistoryItem(e.at, what, who, text, label, status))
    return items


def _told(event: Any) -> str:
    """Where the status message stands, honestly: the referrer is told only once the inbox has
    seen the router deliver it."""
    if event.delivered_at:
        return "Referrer told"
    if event.published_at:
        return "Sending: waiting for the router to deliver it"
    return "Sending: waiting for Kafka"


def referrer_name(referral: ReferralRow) -> str:
    """The referring organisation's registered name (the signer the hub verified), else the
    name the referral gives."""
    registered = presentation.organisation_name(referral.referrer)
    return registered if registered != presentation.humanise(referral.referrer) else (
        referral.referrer_organisation or registered
    )


def _banner(member: SignedIn, events: list[Any], now: datetime) -> dict[str, str] | None:
    """A success banner for the member's own latest action, from the recorded history: shown
    while it is recent, whatever the URL says."""
    mine = [e for e in events if e.actor != "referrer"]
    if not mine:
        return None
    last = mine[-1]
    if last.actor != member.user.username or now - last.at > BANNER_FOR or last.action not in DONE_MESSAGES:
        return None
    if not last.notify:
        told = "Nothing was sent to the referrer."
    elif last.delivered_at:
        told = "The referrer has been told."
    elif last.published_at:
        told = "The status message is on its way to the referrer (the page says when it arrived)."
    else:
        told = "The status message will be sent to the referrer as soon as Kafka is reachable."
    return {"heading": DONE_MESSAGES[last.action], "text": told}


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
    # Reading changes nothing: no state, no status message (triage is separate from working).
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
    withheld = [(w.path, w.reason) for w in referral.withheld]
    sections = presentation.reading_sections(opened.granted, referral.no_onward, withheld, today=local_date(now))
    summary = presentation.list_summary(opened.granted, referral.concern_types)
    events = await run_in_threadpool(app.store.events, team, referral_id)
    history = await run_in_threadpool(_history, app, referral, events)
    members = await run_in_threadpool(app.store.list_users, team)
    banner = _banner(member, events, now)
    # the sections before "why your team has this" are the ones a worker reads first
    split = next((i for i, s in enumerate(sections) if s.slug == "the-child"), len(sections))
    return render(
        request,
        "referral.html",
        signed_in=member,
        title=summary.name or f"Referral {referral_id[:8]}",
        referral=referral,
        summary=summary,
        first_sections=sections[:split],
        later_sections=sections[split:],
        purposes=purposes_for(team),
        decision=await run_in_threadpool(decision_for, app, team, referral),
        history=history,
        objection=next((e for e in events if e.action == Action.RESEARCH_OBJECTION), None),
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
        banner=banner,
        overdue=referral.overdue(now),
        due_today=referral.undecided and referral.due_date == local_date(now),
        short_date=presentation.short_date,
        referrer_name=referrer_name(referral),
        no_onward_reason=presentation.NO_ONWARD_REASON,
        max_note=MAX_NOTE,
    )


def _refused(request: Request, member: SignedIn, referral: ReferralRow) -> HTMLResponse:
    return plain_page(
        request,
        409,
        f"You cannot do that: this referral is {referral.state.label.lower()}",
        "Someone may have acted on it since you opened the page. Nothing was changed.",
        signed_in=member,
        link={"href": f"/referrals/{referral.referral_id}", "text": "Go back to the referral"},
    )


async def _act(
    request: Request,
    member: SignedIn,
    referral: ReferralRow,
    action: Action,
    *,
    reason_code: str | None = None,
    reason_text: str | None = None,
    allocated_to: str | None = None,
    team_text: str | None = None,
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
            team_text=team_text,
        )
    except InvalidTransitionError:
        return _refused(request, member, referral)
    await run_in_threadpool(_publish, app, team)
    # no "done" in the URL: the page confirms the action from the referral's recorded history
    return RedirectResponse(f"/referrals/{quote(referral.referral_id)}", status_code=303)


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


acknowledge = _plain_action(Action.OPEN)
accept = _plain_action(Action.ACCEPT)
close = _plain_action(Action.CLOSE)


async def research_objection(request: Request) -> Response:
    """The family objects to their data going to the national evaluation: audited first (the
    hub takes it in from the audit, ``objections.sync_inbox``), then kept in the history."""
    pre = await _action_preamble(request)
    if isinstance(pre, Response):
        return pre
    member, referral, _ = pre
    app = inbox_app(request)
    event = AccessEvent(
        AccessKind.RESEARCH_OBJECTION, app.clock(), member.user.username, member.user.team,
        referral.referral_id, referral.version,
    )
    if not await audit(request, event):
        return plain_page(
            request,
            503,
            "Sorry, this cannot be saved right now",
            "An objection reaches the council through the audit, and the record could not be written. Nothing was saved.",
            signed_in=member,
        )
    return await _act(request, member, referral, Action.RESEARCH_OBJECTION)


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
        max_details=MAX_DETAILS,
        errors=errors,
        field_errors=field_errors,
    )


def _form_page(page: Callable[[Request, SignedIn, ReferralRow], Response]) -> Endpoint:
    """The GET of a form about one referral: shown to a signed-in member of its team, else the
    sign-in redirect or the not-found page (an attempt on another team's referral is audited)."""

    async def show(request: Request) -> Response:
        member = await signed_in_member(request)
        if isinstance(member, Response):
            return member
        found = await _find_referral(request, member, request.path_params["referral_id"])
        if isinstance(found, Response):
            return found
        return page(request, member, found)

    return show


def reason_endpoints(slug: str) -> tuple[Endpoint, Endpoint]:
    """The page (GET) and the submit (POST) of the reason form ``slug`` in :data:`REASON_FORMS`."""
    spec = REASON_FORMS[slug]

    show = _form_page(lambda request, member, found: _reason_page(request, member, found, spec))

    async def submit(request: Request) -> Response:
        pre = await _action_preamble(request)
        if isinstance(pre, Response):
            return pre
        member, referral, form = pre
        chosen = str(form.get("reason", ""))
        details = str(form.get("details", "")).strip()
        field_errors: dict[str, str] = {}
        if chosen not in spec.reasons and spec.reasons:
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


# --- the team's own text: information received, case notes -----------------------------------


@dataclass(frozen=True)
class TextForm:
    """A form whose words stay in the team, sealed: information received, a case note."""

    action: Action
    slug: str
    question: str
    sources: Mapping[str, str]  # how it came (a closed list), or none
    text_label: str
    text_hint: str
    empty_error: str
    button: str
    audit_kind: AccessKind


TEXT_FORMS = {
    "record-information": TextForm(
        Action.RECORD_INFORMATION,
        "record-information",
        "Record the information you received",
        INFORMATION_SOURCES,
        "What did you find out?",
        "Write what you were told. It stays with your team, sealed, and shows in the referral’s "
        "history. Nothing is sent to the referrer. The referral is then open for a decision again.",
        "Enter the information you received",
        "Record information and re-open",
        AccessKind.INFORMATION_RECORDED,
    ),
    "notes": TextForm(
        Action.NOTE,
        "notes",
        "Add a case note",
        {},
        "Case note",
        "Only your team can read case notes. They are sealed when they are saved.",
        "Enter a case note",
        "Add case note",
        AccessKind.NOTE_ADDED,
    ),
}


def _text_page(
    request: Request,
    member: SignedIn,
    referral: ReferralRow,
    spec: TextForm,
    *,
    status_code: int = 200,
    chosen: str = "",
    text: str = "",
    field_errors: dict[str, str] | None = None,
) -> HTMLResponse:
    field_errors = field_errors or {}
    errors = [
        {"text": t, "href": "#source" if name == "source" else "#text"} for name, t in field_errors.items()
    ]
    return render(
        request,
        "text_form.html",
        status_code=status_code,
        signed_in=member,
        title=spec.question,
        referral=referral,
        form=spec,
        source_items=[{"value": k, "text": v, "checked": k == chosen} for k, v in spec.sources.items()],
        text=text,
        max_text=MAX_NOTE,
        errors=errors,
        field_errors=field_errors,
    )


def text_endpoints(slug: str) -> tuple[Endpoint, Endpoint]:
    """The page (GET) and the submit (POST) of the text form ``slug`` in :data:`TEXT_FORMS`."""
    spec = TEXT_FORMS[slug]

    show = _form_page(lambda request, member, found: _text_page(request, member, found, spec))

    async def submit(request: Request) -> Response:
        pre = await _action_preamble(request)
        if isinstance(pre, Response):
            return pre
        member, referral, form = pre
        chosen = str(form.get("source", ""))
        text = str(form.get("text", "")).strip()
        field_errors: dict[str, str] = {}
        if spec.sources and chosen not in spec.sources:
            field_errors["source"] = "Select how the information reached you"
        if not text:
            field_errors["text"] = spec.empty_error
        elif len(text) > MAX_NOTE:
            field_errors["text"] = f"The text must be {MAX_NOTE} characters or fewer"
        if field_errors:
            return _text_page(
                request,
                member,
                referral,
                spec,
                status_code=400,
                chosen=chosen,
                text=text,
                field_errors=field_errors,
            )
        app = inbox_app(request)
        try:  # refused before anything is audited or sealed (the store decides again, atomically)
            transition(referral.state, spec.action, at=app.clock())
        except InvalidTransitionError:
            return _refused(request, member, referral)
        event = AccessEvent(
            spec.audit_kind,
            app.clock(),
            member.user.username,
            member.user.team,
            referral.referral_id,
            referral.version,
        )
        if not await audit(request, event):
            return plain_page(
                request,
                503,
                "Sorry, this cannot be saved right now",
                "Every note is recorded in the audit, and the record could not be written. Nothing was saved.",
                signed_in=member,
            )
        return await _act(request, member, referral, spec.action, reason_code=chosen or None, team_text=text)

    return show, submit
