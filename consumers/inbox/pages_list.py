"""The team's referral list: views, search, filters, sortable columns, pages, and the CSV export
of the current view.

The list shows what a worker recognises a family by (name, date of birth, postcode, a short
concern summary). Those are personal values, sealed in the store: they are opened in memory for
the rows of the page being shown, and only those. The store orders, filters, counts and pages
on the clear operational columns first (so a page of 25 opens 25 records, however many the team
holds). A search by name, date of birth, postcode or NHS number cannot be answered from clear
columns, so it opens the view's referrals in memory, in the view's order, up to
``settings.inbox_search_max_records`` (the page says when the bound was reached), and matches
there; a referral reference is matched in SQL. Nothing opened is stored, cached or logged.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from math import ceil
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from referral_broker.consumers.inbox import presentation
from referral_broker.consumers.inbox.deadlines import local_date
from referral_broker.consumers.inbox.outbound import AccessEvent, AccessKind
from referral_broker.consumers.inbox.pages_errors import plain_page
from referral_broker.consumers.inbox.presentation import ListSummary, Search
from referral_broker.consumers.inbox.rendering import InboxApp, inbox_app, render
from referral_broker.consumers.inbox.security import audit, signed_in_member
from referral_broker.consumers.inbox.store_referrals import SORT_COLUMNS, VIEWS, ListQuery, ReferralRow
from referral_broker.errors import ReferralBrokerError
from referral_broker.structured_log import get_logger

log = get_logger(__name__)

VIEW_LABELS = {
    "decision": "Needs a decision",
    "mine": "Mine",
    "unallocated": "Unallocated",
    "waiting": "Waiting for information",
    "closed": "Closed",
    "all": "All referrals",
}
COLUMN_LABELS = {
    "due": "Decision due",
    "made": "Made",
    "priority": "Priority",
    "referrer": "Referrer",
    "status": "Status",
    "allocated": "Allocated to",
}
# A reference typed into search: hex digits (and dashes), at least 6, with a digit in them.
_REFERENCE = re.compile(r"^(?=.*\d)[0-9a-f-]{6,36}$")


@dataclass(frozen=True)
class ListParams:
    """What the URL asks the list for; anything unknown falls back to the default."""

    view: str = "decision"
    q: str = ""
    priority: str = ""
    concern: str = ""
    referrer: str = ""
    sort: str = "due"
    descending: bool = False
    page: int = 1

    def url(self, path: str = "/inbox", **changes: Any) -> str:
        p = replace(self, **changes)
        query = {
            "view": p.view,
            "q": p.q,
            "priority": p.priority,
            "concern": p.concern,
            "referrer": p.referrer,
            "sort": p.sort if p.sort != "due" else "",
            "dir": "desc" if p.descending else "",
            "page": str(p.page) if p.page > 1 else "",
        }
        kept = {k: v for k, v in query.items() if v}
        return path + ("?" + urlencode(kept) if kept else "")

    @property
    def filtering(self) -> bool:
        return bool(self.q or self.priority or self.concern or self.referrer)


def list_params(query: Mapping[str, str], choices: Mapping[str, list[str]]) -> ListParams:
    def pick(name: str, allowed: list[str]) -> str:
        value = query.get(name, "")
        return value if value in allowed else ""

    view, sort = query.get("view", ""), query.get("sort", "")
    try:
        page = max(1, min(int(query.get("page", "1")), 100_000))
    except ValueError:
        page = 1
    return ListParams(
        view=view if view in VIEWS else "decision",
        q=" ".join(query.get("q", "").split())[:100],
        priority=pick("priority", choices["priority"]),
        concern=pick("concern", choices["concern_type"]),
        referrer=pick("referrer", choices["referrer"]),
        sort=sort if sort in SORT_COLUMNS else "due",
        descending=query.get("dir") == "desc",
        page=page,
    )


@dataclass
class ListResult:
    rows: list[tuple[ReferralRow, ListSummary]] = field(default_factory=list)
    total: int = 0
    page: int = 1
    pages: int = 1
    searched: int = 0  # referrals opened to answer a search
    bounded: bool = False  # the search stopped at the bound


def summary_of(app: InboxApp, team: str, row: ReferralRow) -> ListSummary:
    """The list's opened values for one referral, for this response only."""
    try:
        record = app.store.record_of(team, row.referral_id, row.version)
        opened = app.record_format.open(record, team)
    except ReferralBrokerError as exc:  # shredded, or it does not open: say so, show the rest
        log.warning("list row not opened", team=team, referral_id=row.referral_id, error=type(exc).__name__)
        return ListSummary(unreadable=True)
    return presentation.list_summary(opened.granted, row.concern_types)


def _query(team: str, member: str, params: ListParams) -> ListQuery:
    typed = Search.parse(params.q)
    # a reference has a hex letter or a dash; digits alone are an NHS number, a date is a date
    # (an all-digit reference prefix is still found by the in-memory search)
    looks_like_reference = (
        _REFERENCE.match(params.q.lower()) and typed.day is None and not params.q.replace(" ", "").isdigit()
    )
    reference = params.q.lower() if looks_like_reference else None
    return ListQuery(
        team=team,
        view=params.view,
        member=member,
        priority=params.priority or None,
        concern_type=params.concern or None,
        referrer=params.referrer or None,
        id_prefix=reference,
        sort=params.sort,
        descending=params.descending,
    )


def find(
    app: InboxApp, team: str, member: str, params: ListParams, *, everything: bool = False
) -> ListResult:
    """One page of the list (``everything``: every row, for the export), opened for the rows
    it returns. See the module doc for what a search costs."""
    size = app.settings.inbox_page_size
    today = local_date(app.clock())
    query = _query(team, member, params)
    search = Search.parse(params.q) if params.q and query.id_prefix is None else None
    if search is None:
        total = app.store.count_referrals(query)
        pages = max(1, ceil(total / size))
        page = min(params.page, pages)
        if everything:  # the export: the whole view, however long, never silently cut
            rows = app.store.query_referrals(query, today=today)
        else:
            rows = app.store.query_referrals(query, today=today, limit=size, offset=(page - 1) * size)
        return ListResult([(r, summary_of(app, team, r)) for r in rows], total, page, pages)
    bound = app.settings.inbox_search_max_records
    candidates = app.store.query_referrals(query, today=today, limit=bound + 1)
    bounded = len(candidates) > bound
    matched = []
    for row in candidates[:bound]:
        found = summary_of(app, team, row)
        if search.matches(row.referral_id, found):
            matched.append((row, found))
    total = len(matched)
    pages = max(1, ceil(total / size))
    page = min(params.page, pages)
    shown = matched if everything else matched[(page - 1) * size : page * size]
    return ListResult(shown, total, page, pages, searched=min(len(candidates), bound), bounded=bounded)


def _choice_items(values: list[str], selected: str, label=presentation.humanise) -> list[dict[str, object]]:
    return [{"value": v, "text": label(v), "selected": v == selected} for v in values]


def _pagination(params: ListParams, result: ListResult) -> dict[str, object]:
    """GOV.UK pagination: previous / next and the page numbers around this one."""
    if result.pages <= 1:
        return {}
    wanted = sorted({1, result.pages, result.page - 1, result.page, result.page + 1})
    items: list[dict[str, object]] = []
    last = 0
    for n in (n for n in wanted if 1 <= n <= result.pages):
        if n - last > 1:
            items.append({"ellipsis": True})
        items.append({"number": n, "href": params.url(page=n), "current": n == result.page})
        last = n
    out: dict[str, object] = {"items": items, "landmarkLabel": "Pages of referrals"}
    if result.page > 1:
        out["previous"] = {"href": params.url(page=result.page - 1)}
    if result.page < result.pages:
        out["next"] = {"href": params.url(page=result.page + 1)}
    return out


async def inbox(request: Request) -> Response:
    member = await signed_in_member(request)
    if isinstance(member, Response):
        return member
    app = inbox_app(request)
    team, username = member.user.team, member.user.username
    choices = await run_in_threadpool(app.store.filter_choices, team)
    params = list_params(request.query_params, choices)
    result = await run_in_threadpool(find, app, team, username, params)
    now = app.clock()
    counts = await run_in_threadpool(app.store.view_counts, team, username, local_date(now))
    columns = []
    for key, label in COLUMN_LABELS.items():
        active = params.sort == key
        descending = not params.descending if active else False
        columns.append(
            {
                "key": key,
                "label": label,
                "href": params.url(sort=key, descending=descending, page=1),
                "aria_sort": ("descending" if params.descending else "ascending") if active else "none",
            }
        )
    return render(
        request,
        "inbox.html",
        signed_in=member,
        title=VIEW_LABELS[params.view] + (f" (page {result.page})" if result.page > 1 else ""),
        nav="inbox",
        params=params,
        result=result,
        first=(result.page - 1) * app.settings.inbox_page_size + 1,
        header_counts=counts,
        now=now,
        counts=counts,
        views=[
            {
                "key": k,
                "label": v,
                "count": counts.get(k, 0),
                "href": ListParams(view=k).url(),
                "current": k == params.view,
            }
            for k, v in VIEW_LABELS.items()
        ],
        view_label=VIEW_LABELS[params.view],
        columns=columns,
        choices=choices,
        choice_items=_choice_items,
        pagination=_pagination(params, result),
        export_href=params.url("/inbox/export.csv", page=1),
        short_date=presentation.short_date,
    )


_CSV_COLUMNS = (
    "Reference",
    "Child",
    "Date of birth",
    "Postcode",
    "Concern",
    "Priority",
    "Decision due",
    "Overdue",
    "Status",
    "Allocated to",
    "Made",
    "Received",
    "Referrer",
)


def _cell(value: object) -> str:
    """A CSV cell a spreadsheet will not run as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


async def export_csv(request: Request) -> Response:
    """The current view (its filters and search, every page) as CSV; audited before it is sent."""
    member = await signed_in_member(request)
    if isinstance(member, Response):
        return member
    app = inbox_app(request)
    team, username = member.user.team, member.user.username
    choices = await run_in_threadpool(app.store.filter_choices, team)
    params = list_params(request.query_params, choices)
    result = await run_in_threadpool(lambda: find(app, team, username, params, everything=True))
    if result.bounded:
        return plain_page(
            request,
            400,
            "This search is too wide to download",
            f"The search looked at only the first {result.searched} referrals of this view, so a download "
            "would leave some out. Choose a view or a filter that holds fewer referrals, then search again.",
            signed_in=member,
        )
    now = app.clock()
    event = AccessEvent(AccessKind.EXPORTED, now, username, team, None, None, count=len(result.rows))
    if not await audit(request, event):
        return plain_page(
            request,
            503,
            "Sorry, the list cannot be downloaded right now",
            "Every download is recorded, and the record could not be written. Try again in a few minutes.",
            signed_in=member,
        )
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(_CSV_COLUMNS)
    for row, found in result.rows:
        writer.writerow(
            [
                _cell(v)
                for v in (
                    row.referral_id,
                    found.name,
                    found.date_of_birth.isoformat() if found.date_of_birth else "",
                    found.postcode,
                    found.concern,
                    presentation.humanise(row.priority),
                    row.due_date.isoformat() if row.due_date else "",
                    "yes" if row.overdue(now) else "",
                    row.state.label,
                    row.allocated_to or "",
                    row.made_at.isoformat(timespec="minutes"),
                    row.received_at.isoformat(timespec="minutes"),
                    row.referrer_organisation or presentation.humanise(row.referrer),
                )
            ]
        )
    name = f"referrals-{params.view}-{local_date(now).isoformat()}.csv"
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )
