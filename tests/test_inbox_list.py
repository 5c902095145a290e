"""The referral list and the team's own text over plain HTTP (httpx against uvicorn on a loopback
port), on the real broker and real sealed records: views hold exactly their referrals, pages
open only their own rows, search by date of birth, NHS number and reference, the search bound,
sorting, the CSV export (audited, formula-safe), case notes and recorded information (sealed at
rest, audited), and what a declined referral still offers."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from test_inbox_fixtures import (
    OTHER_TEAM,
    TEAM,
    Day,
    Pipeline,
    as_sealed,
    fill_inbox,
    make_pipeline,
    make_store,
    read_topic,
)

from referral_broker.audit_log import read_event_value
from referral_broker.cluster.clients import Record
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.inbox.app import create_app
from referral_broker.consumers.inbox.outbound import Outbound
from referral_broker.consumers.inbox.records import OpenedReferral
from referral_broker.consumers.inbox.sealed_format import SealedReferralFormat
from referral_broker.consumers.inbox.server import ServerThread
from referral_broker.consumers.inbox.states import Action, ReferralState
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.errors import ReferralBrokerError

PAGE = 5
BOUND = 30


class CountingFormat(SealedReferralFormat):
    """The real sealed format, counting how many records it opened (the cost of a page)."""

    opened = 0

    def open(self, record: Record, team: str) -> OpenedReferral:
        type(self).opened += 1
        return super().open(record, team)


@dataclass
class Team:
    settings: Settings
    pipeline: Pipeline
    store: InboxStore
    fmt: CountingFormat
    client: httpx.Client
    day: Day

    def sign_in(self, username: str = "fen.worker") -> None:
        page = self.client.get("/sign-in")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None
        done = self.client.post(
            "/sign-in",
            data={"csrf_token": token.group(1), "username": username, "password": "synthetic-password-1"},
            follow_redirects=False,
        )
        assert done.status_code == 303

    def ids(self, path: str, **params: Any) -> list[str]:
        page = self.client.get(path, params=params)
        assert page.status_code == 200
        return re.findall(r'<tr class="govuk-table__row[^"]*" data-referral-id="([^"]+)"', page.text)

    def every_page(self, **params: Any) -> list[str]:
        found: list[str] = []
        for n in range(1, 200):
            got = self.ids("/inbox", page=n, **params)
            if not got or (found and got[0] in found):
                return found
            found += got
        raise AssertionError("more pages than referrals")

    def csrf(self, path: str) -> str:
        found = re.search(r'name="csrf_token" value="([^"]+)"', self.client.get(path).text)
        assert found is not None
        return found.group(1)


def access_events(team: Team, *, expect: int) -> list[dict[str, Any]]:
    """The inbox's access events on the audit topic (beside the router's decisions, one per
    referral of the day, told apart by their signed ``rb-kind``)."""
    records = read_topic(team.settings, topic_name(team.settings, "audit"), expect=len(team.day.plan) + expect)
    return [read_event_value(r.value) for r in records if dict(r.headers).get("rb-kind") == b"inbox.access"]


@pytest.fixture
def team(topics: Settings) -> Iterator[Team]:
    settings = topics.replace(inbox_page_size=PAGE, inbox_search_max_records=BOUND)
    pipeline = make_pipeline(settings)
    store = make_store(settings)
    fmt = CountingFormat.from_settings(settings, (TEAM, OTHER_TEAM))
    assert isinstance(fmt, CountingFormat)
    day = fill_inbox(pipeline, store, fmt, 40)
    outbound = Outbound(settings, fmt)
    app = create_app(
        settings,
        store=store,
        record_format=fmt,
        outbound=outbound,
        teams=[TEAM, OTHER_TEAM],
        secure_cookies=False,
    )
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30.0) as client:
        t = Team(settings, pipeline, store, fmt, client, day)
        t.sign_in()
        yield t
    outbound.close()
    store.close()


def test_each_view_holds_exactly_its_referrals(team: Team) -> None:
    day, plan = team.day, team.day.plan
    allocated = {r.referral_id for r in team.store.list_referrals(TEAM) if r.allocated_to == "fen.worker"}
    assert allocated  # the fixture allocates some: the check below is real
    live = day.ids_with("new", "open", "accept", "request_information")
    assert set(team.every_page(view="decision")) == day.ids_with("new", "open")
    assert set(team.every_page(view="mine")) == allocated & live
    assert set(team.every_page(view="unallocated")) == live - allocated
    assert set(team.every_page(view="waiting")) == day.ids_with("request_information")
    assert set(team.every_page(view="closed")) == day.ids_with("decline", "close")
    assert set(team.every_page(view="all")) == set(plan)
    page = team.client.get("/inbox", params={"view": "mine"})
    assert (
        f"Mine ({len(allocated & live)})" in page.text and 'aria-current="page" data-view="mine"' in page.text
    )
    # the header counts new urgent referrals, on every page
    urgent = [
        r for r in team.store.list_referrals(TEAM) if r.priority == "urgent" and r.state is ReferralState.NEW
    ]
    assert urgent  # the fixture's overdue one at least
    rid = next(iter(plan))
    for path in ("/inbox", f"/referrals/{rid}"):
        assert f"<strong>{len(urgent)} new urgent</strong>" in team.client.get(path).text


def test_a_page_opens_only_its_own_rows(team: Team) -> None:
    CountingFormat.opened = 0
    first = team.ids("/inbox", view="all")
    assert len(first) == PAGE and CountingFormat.opened == PAGE
    second = team.ids("/inbox", view="all", page=2)
    assert len(second) == PAGE and not set(first) & set(second)
    page = team.client.get("/inbox", params={"view": "all", "page": 2})
    assert f"Showing {PAGE + 1} to {2 * PAGE} of 40 referrals, page 2 of 8." in page.text
    assert 'rel="next"' in page.text and 'rel="prev"' in page.text
    # a page past the end shows the last one; nonsense is the first
    assert team.ids("/inbox", view="all", page=999) == team.ids("/inbox", view="all", page=8)
    assert team.ids("/inbox", view="all", page="x") == first


def test_search_by_date_of_birth_nhs_number_and_reference(team: Team) -> None:
    target = team.day.records[20]
    rid, child = target["referral_id"], target["child"]
    born = child["date_of_birth"]
    for written in (born.isoformat(), born.strftime("%d/%m/%Y"), f"{born.day} {born:%B %Y}"):
        found = team.ids("/inbox", view="all", q=written)
        assert rid in found, written
        assert all(r["child"]["date_of_birth"] == born for r in team.day.records if r["referral_id"] in found)
    nhs = target["identifiers"]["nhs_number"]
    assert nhs, "the seed gives this child an NHS number: the check is real"
    assert team.ids("/inbox", view="all", q=f"{nhs[:3]} {nhs[3:6]} {nhs[6:]}") == [rid]
    # a reference (with a digit in it) is matched in SQL, without opening anything
    reference = next(r["referral_id"] for r in team.day.records if re.search(r"\d", r["referral_id"][:8]))
    CountingFormat.opened = 0
    assert team.ids("/inbox", view="all", q=reference[:8]) == [reference]
    assert CountingFormat.opened == 1  # its own row, shown
    # a search matches within the chosen view only
    assert rid not in team.ids("/inbox", view="closed", q=born.isoformat()) or team.day.plan[rid] in (
        "decline",
        "close",
    )


def test_search_opens_at_most_the_bound_and_says_so(team: Team) -> None:
    CountingFormat.opened = 0
    page = team.client.get("/inbox", params={"view": "all", "q": "no such family anywhere"})
    assert "No referrals match your search and filters." in page.text
    assert f"The search looked at the first {BOUND} referrals in this view only." in page.text
    assert CountingFormat.opened == BOUND
    CountingFormat.opened = 0
    page = team.client.get("/inbox", params={"view": "waiting", "q": "no such family anywhere"})
    assert "looked at the first" not in page.text  # the view is smaller than the bound
    assert CountingFormat.opened == len(team.day.ids_with("request_information"))


def test_columns_sort_both_ways_and_say_so(team: Team) -> None:
    rows = team.store.list_referrals(TEAM)
    rank = {"urgent": 0, "high": 1, "routine": 2}
    ids = team.every_page(view="all", sort="priority")
    by_id = {r.referral_id: r for r in rows}
    assert [rank[by_id[i].priority] for i in ids] == sorted(rank[r.priority] for r in rows)
    down = team.every_page(view="all", sort="priority", dir="desc")
    assert [rank[by_id[i].priority] for i in down] == sorted((rank[r.priority] for r in rows), reverse=True)
    page = team.client.get("/inbox", params={"view": "all", "sort": "priority"})
    header = re.search(
        r'<th scope="col" class="govuk-table__header" aria-sort="([a-z]+)"><a [^>]*href="([^"]+)"[^>]*data-sort="priority"',
        page.text,
    )
    assert (
        header is not None
        and header.group(1) == "ascending"
        and "dir=desc" in header.group(2).replace("&amp;", "&")
    )
    assert "view=all" in header.group(2)  # the view stays in the URL


def test_export_is_the_whole_view_audited_and_formula_safe(team: Team) -> None:
    record = team.pipeline.referral(TEAM, 77)
    record["concerns"][0]["detail"] = '=HYPERLINK("http://evil.example","click")'
    routed = team.pipeline.routed(record, TEAM)
    stored = as_sealed(routed, 500)
    team.store.ingest(TEAM, team.fmt.summarise(stored, TEAM), stored)
    response = team.client.get("/inbox/export.csv", params={"view": "decision"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert {r["Reference"] for r in rows} == team.day.ids_with("new", "open") | {record["referral_id"]}
    [evil] = [r for r in rows if r["Reference"] == record["referral_id"]]
    assert evil["Concern"].startswith("'=HYPERLINK")
    assert evil["Child"] == f"{record['child']['given_name']} {record['child']['family_name']}"
    audit = access_events(team, expect=2)
    exported = [e for e in audit if e.get("kind") == "view_exported"]
    assert [(e["member"], e["team"], e["count"]) for e in exported] == [("fen.worker", TEAM, len(rows))]
    assert record["child"]["family_name"] not in json.dumps(audit)


def test_case_notes_are_sealed_audited_and_shown(team: Team) -> None:
    rid = next(iter(team.day.ids_with("decline")))
    token = team.csrf(f"/referrals/{rid}")
    empty = team.client.post(f"/referrals/{rid}/notes", data={"csrf_token": token, "text": "  "})
    assert empty.status_code == 400 and 'href="#text"' in empty.text and "Enter a case note" in empty.text
    too_long = team.client.post(f"/referrals/{rid}/notes", data={"csrf_token": token, "text": "x" * 2001})
    assert too_long.status_code == 400 and "2000 characters or fewer" in too_long.text
    note = "Synthetic note: mother phoned, <b>not</b> bold."
    done = team.client.post(
        f"/referrals/{rid}/notes", data={"csrf_token": token, "text": note}, follow_redirects=False
    )
    assert done.status_code == 303
    [event] = [e for e in team.store.events(TEAM, rid) if e.action is Action.NOTE]
    assert event.sealed_text and note.encode() not in event.sealed_text and not event.notify
    assert team.fmt.open_text(TEAM, rid, event.sealed_text) == note
    page = team.client.get(f"/referrals/{rid}")
    assert "Synthetic note: mother phoned, &lt;b&gt;not&lt;/b&gt; bold." in page.text
    assert "Case note added." in page.text
    # a declined referral is decided: nothing to close, but notes can still be added
    assert "Close referral" not in page.text and "This referral is declined" in page.text
    audit = access_events(team, expect=4)
    assert [(e["kind"], e["referral_id"]) for e in audit if e["kind"] == "case_note_added"] == [
        ("case_note_added", rid)
    ]
    assert "mother phoned" not in json.dumps(audit)
    # another team's text does not open as this team's
    with pytest.raises(ReferralBrokerError):
        team.fmt.open_text(OTHER_TEAM, rid, event.sealed_text)


def test_information_received_reopens_and_is_refused_when_not_waiting(team: Team) -> None:
    waiting = next(iter(team.day.ids_with("request_information")))
    token = team.csrf(f"/referrals/{waiting}")
    form = team.client.get(f"/referrals/{waiting}/record-information")
    assert (
        form.status_code == 200
        and "How did it reach you?" in form.text
        and "govuk-character-count" in form.text
    )
    missing = team.client.post(
        f"/referrals/{waiting}/record-information", data={"csrf_token": token, "text": "x"}
    )
    assert missing.status_code == 400 and 'href="#source"' in missing.text
    answer = "Synthetic: consent confirmed in a meeting."
    done = team.client.post(
        f"/referrals/{waiting}/record-information",
        data={"csrf_token": token, "source": "meeting", "text": answer},
        follow_redirects=False,
    )
    assert done.status_code == 303
    row = team.store.get_referral(TEAM, waiting)
    assert row is not None and row.state is ReferralState.OPENED
    assert waiting in team.every_page(view="decision")
    page = team.client.get(f"/referrals/{waiting}")
    assert "Information received, re-opened: In a meeting" in page.text and answer in page.text
    fresh = next(iter(team.day.ids_with("new")))
    refused = team.client.post(
        f"/referrals/{fresh}/record-information",
        data={"csrf_token": token, "source": "phone", "text": answer},
        follow_redirects=False,
    )
    assert refused.status_code == 409
    assert team.store.events(TEAM, fresh) == [] or all(
        e.action is not Action.RECORD_INFORMATION for e in team.store.events(TEAM, fresh)
    )


def test_export_is_never_cut_short(team: Team) -> None:
    everything = team.client.get("/inbox/export.csv", params={"view": "all"})
    assert everything.status_code == 200
    rows = list(csv.DictReader(io.StringIO(everything.text)))
    assert len(rows) == len(team.day.plan) > BOUND  # longer than the search bound, and whole
    # a search that could look at only part of the view is refused, not downloaded in part
    refused = team.client.get("/inbox/export.csv", params={"view": "all", "q": "no such family anywhere"})
    assert refused.status_code == 400
    assert f"The search looked at only the first {BOUND} referrals of this view" in refused.text
    assert "text/csv" not in refused.headers["content-type"]
