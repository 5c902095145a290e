"""The inbox over plain HTTP (httpx against uvicorn on a loopback port) on the real broker and
real sealed records:
sign-in, sessions, CSRF, team isolation, auditing, the referral page and the actions, and every
bad input the issue names answered with the right status and a plain page."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from test_inbox_fixtures import (
    OTHER_TEAM,
    PASSWORD,
    TEAM,
    Pipeline,
    as_sealed,
    make_pipeline,
    make_store,
    read_topic,
)

from referral_broker.audit_log import read_event_value
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.inbox import presentation
from referral_broker.consumers.inbox.app import create_app
from referral_broker.consumers.inbox.deadlines import local_date
from referral_broker.consumers.inbox.outbound import Outbound
from referral_broker.consumers.inbox.sealed_format import SealedReferralFormat
from referral_broker.consumers.inbox.security import SESSION_COOKIE
from referral_broker.consumers.inbox.server import ServerThread
from referral_broker.consumers.inbox.states import ReferralState
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.sealing import OutgoingMessage, verify_signed


class Clock:
    """The app's clock, moved by the test (sessions expire without sleeping)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Inbox:
    settings: Settings
    pipeline: Pipeline
    store: InboxStore
    fmt: SealedReferralFormat
    client: httpx.Client
    clock: Clock
    offset: int = 0

    def deliver(self, message: OutgoingMessage, team: str = TEAM) -> None:
        """Store what the router sent as ingest does (the consumer path is test_inbox_ingest's)."""
        record = as_sealed(message, self.offset)
        self.offset += 1
        self.store.ingest(team, self.fmt.summarise(record, team), record)

    def referral(self, seed: int, team: str = TEAM, **changes: Any) -> dict[str, Any]:
        record = self.pipeline.referral(team, seed, **changes)
        self.deliver(self.pipeline.routed(record, team), team)
        return record

    def sign_in(self, username: str = "fen.worker", password: str = PASSWORD, *, next_url: str = "/inbox"):
        page = self.client.get("/sign-in")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None
        return self.client.post(
            "/sign-in",
            data={"csrf_token": token.group(1), "username": username, "password": password, "next": next_url},
            follow_redirects=False,
        )

    def csrf(self, path: str) -> str:
        page = self.client.get(path)
        found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert found is not None, f"no form on {path}"
        return found.group(1)

    def audit(self, expect: int) -> list[dict[str, Any]]:
        """Access events, after checking each is signed by a district team (as the router
        checks what it reads)."""
        records = read_topic(self.settings, topic_name(self.settings, "audit"), expect=expect)
        for r in records:
            headers = verify_signed(self.pipeline.hub.directory, r)
            assert headers["rb-kind"] == b"inbox.access"
            assert headers["rb-sender"].decode() in (TEAM, OTHER_TEAM)
        return [read_event_value(r.value) for r in records]

    def statuses(self, expect: int) -> list[dict[str, Any]]:
        records = read_topic(self.settings, topic_name(self.settings, "status", TEAM), expect=expect)
        return [self.pipeline.hub.open(r).record for r in records]  # as the router opens them


@pytest.fixture
def inbox(request: pytest.FixtureRequest, topics: Settings) -> Iterator[Inbox]:
    narrow = getattr(request, "param", "shipped policy") == "narrow policy"
    pipeline = make_pipeline(topics, narrow_policy=narrow)
    store = make_store(topics)
    fmt = pipeline.format([TEAM, OTHER_TEAM])
    outbound = Outbound(topics, fmt)
    clock = Clock()
    app = create_app(
        topics,
        store=store,
        record_format=fmt,
        outbound=outbound,
        teams=[TEAM, OTHER_TEAM],
        secure_cookies=False,
        clock=clock,
    )
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30.0) as client:
        yield Inbox(topics, pipeline, store, fmt, client, clock)
    outbound.close()
    store.close()


def values_of(record: dict[str, Any]) -> list[str]:
    """Personal values that must never appear where they are not granted (pages, audit)."""
    child = record["child"]
    return [
        child["given_name"],
        child["family_name"],
        child["address"]["postcode"],
        child["address"]["line1"],
    ]


# --- signing in ---------------------------------------------------------------------------------


def test_sign_in_page_is_govuk_and_locked_down(inbox: Inbox) -> None:
    page = inbox.client.get("/sign-in")
    assert page.status_code == 200
    assert 'class="govuk-template' in page.text and "govuk-input" in page.text
    assert '<label class="govuk-label" for="username">' in page.text
    assert 'href="/assets/govuk-frontend.min.css"' in page.text
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self' 'nonce-" in csp
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce and f'nonce="{nonce.group(1)}"' in page.text
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"


def test_pages_need_a_session(inbox: Inbox) -> None:
    for path in ("/inbox", f"/referrals/{uuid.uuid4()}"):
        response = inbox.client.get(path, follow_redirects=False)
        assert response.status_code == 303
        assert response.headers["location"].startswith("/sign-in?next=")


def test_wrong_password_is_401_and_audited_without_the_password(inbox: Inbox) -> None:
    response = inbox.sign_in(password="not-the-password-at-all")
    assert response.status_code == 401
    assert "There is a problem" in response.text and "Enter a correct username and password" in response.text
    assert SESSION_COOKIE not in response.cookies
    unknown = inbox.sign_in(username="nobody.here", password="whatever-it-is")
    assert unknown.status_code == 401
    events = inbox.audit(expect=2)
    assert [e["kind"] for e in events] == ["sign_in_refused", "sign_in_refused"]
    assert events[0]["member"] == "fen.worker" and events[1]["member"] is None
    assert "not-the-password-at-all" not in json.dumps(events) and "nobody.here" not in json.dumps(events)


def test_empty_sign_in_form_names_each_field(inbox: Inbox) -> None:
    response = inbox.sign_in(username="", password="")
    assert response.status_code == 400
    assert 'href="#username"' in response.text and "Enter your password" in response.text


def test_sign_in_without_the_form_token_is_forbidden(inbox: Inbox) -> None:
    response = inbox.client.post(
        "/sign-in", data={"username": "fen.worker", "password": PASSWORD}, follow_redirects=False
    )
    assert response.status_code == 403
    assert SESSION_COOKIE not in response.cookies


def test_session_cookie_is_signed_httponly_samesite_with_max_age(inbox: Inbox) -> None:
    response = inbox.sign_in()
    assert response.status_code == 303 and response.headers["location"] == "/inbox"
    cookie = next(
        v for k, v in response.headers.multi_items() if k == "set-cookie" and v.startswith(SESSION_COOKIE)
    )
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert f"Max-Age={inbox.settings.inbox_session_max_age_s}" in cookie
    assert inbox.client.get("/inbox").status_code == 200


def test_sign_in_never_redirects_off_site(inbox: Inbox) -> None:
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        assert inbox.sign_in(next_url=target).headers["location"] == "/inbox"
        inbox.client.cookies.clear()
    assert inbox.sign_in(next_url="/inbox?priority=urgent").headers["location"] == "/inbox?priority=urgent"


def test_expired_session_redirects_to_sign_in(inbox: Inbox) -> None:
    inbox.sign_in()
    assert inbox.client.get("/inbox").status_code == 200
    inbox.clock.now += timedelta(seconds=inbox.settings.inbox_session_max_age_s + 1)
    response = inbox.client.get("/inbox", follow_redirects=False)
    assert response.status_code == 303 and "expired=1" in response.headers["location"]
    page = inbox.client.get(response.headers["location"])
    assert "session ended" in page.text


def test_forged_or_tampered_session_cookie_is_ignored(inbox: Inbox) -> None:
    inbox.sign_in()
    good = inbox.client.cookies[SESSION_COOKIE]
    inbox.client.cookies.clear()
    inbox.client.cookies.set(SESSION_COOKIE, good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1])
    assert inbox.client.get("/inbox", follow_redirects=False).status_code == 303


def test_signing_out_ends_the_session(inbox: Inbox) -> None:
    inbox.sign_in()
    cookie = inbox.client.cookies[SESSION_COOKIE]
    token = inbox.csrf("/inbox")
    response = inbox.client.post("/sign-out", data={"csrf_token": token}, follow_redirects=False)
    assert response.status_code == 303
    inbox.client.cookies.clear()
    inbox.client.cookies.set(SESSION_COOKIE, cookie)  # replaying the old cookie
    assert inbox.client.get("/inbox", follow_redirects=False).status_code == 303


def test_disabled_member_is_signed_out(inbox: Inbox) -> None:
    inbox.sign_in()
    inbox.store.set_disabled("fen.worker")
    assert inbox.client.get("/inbox", follow_redirects=False).status_code == 303
    assert inbox.sign_in().status_code == 401


# --- the inbox and team isolation --------------------------------------------------------------


def test_inbox_lists_the_team_referrals_only(inbox: Inbox) -> None:
    mine = inbox.referral(1)
    theirs = inbox.referral(2, team=OTHER_TEAM)
    inbox.sign_in()
    page = inbox.client.get("/inbox")
    assert page.status_code == 200
    assert mine["referral_id"] in page.text and theirs["referral_id"] not in page.text
    for header in ("Decision due", "Made", "Referrer", "Priority", "Status", "Allocated to"):
        assert re.search(rf'aria-sort="[a-z]+"><a [^>]*data-sort="[a-z]+">{header}</a></th>', page.text), header
    assert "Needs a decision (1)" in page.text and "Waiting for information (0)" in page.text
    # the list shows what a worker knows a family by, opened for this page; never the address
    child = mine["child"]
    assert f"{child['given_name']} {child['family_name']}" in page.text
    assert child["address"]["postcode"] in page.text
    assert child["address"]["line1"] not in page.text
    for value in values_of(theirs):
        assert value not in page.text


def test_inbox_filters(inbox: Inbox) -> None:
    a = inbox.referral(3, priority="urgent")
    b = inbox.referral(4, priority="routine")
    inbox.sign_in()
    row_a = inbox.store.get_referral(TEAM, a["referral_id"])
    assert row_a is not None and row_a.priority == "urgent"
    page = inbox.client.get("/inbox", params={"priority": "urgent", "sort": "priority"})
    assert a["referral_id"] in page.text and b["referral_id"] not in page.text
    page = inbox.client.get("/inbox", params={"priority": "routine"})
    assert b["referral_id"] in page.text and a["referral_id"] not in page.text
    assert inbox.client.get("/inbox", params={"priority": "<script>", "sort": "nonsense"}).status_code == 200


def test_another_teams_referral_is_404_and_audited(inbox: Inbox) -> None:
    theirs = inbox.referral(5, team=OTHER_TEAM)
    inbox.sign_in()
    response = inbox.client.get(f"/referrals/{theirs['referral_id']}")
    assert response.status_code == 404
    assert "Page not found" in response.text
    assert theirs["referrer"]["organisation"] not in response.text
    for value in values_of(theirs):
        assert value not in response.text
    events = inbox.audit(expect=2)  # signed in, then the refused attempt
    attempt = events[-1]
    assert attempt["kind"] == "referral_access_denied"
    assert (attempt["member"], attempt["team"], attempt["referral_id"]) == (
        "fen.worker",
        TEAM,
        theirs["referral_id"],
    )
    # The other team's referral is untouched.
    row = inbox.store.get_referral(OTHER_TEAM, theirs["referral_id"])
    assert row is not None and row.state is ReferralState.NEW


def test_unknown_and_malformed_ids_are_404(inbox: Inbox) -> None:
    inbox.sign_in()
    assert inbox.client.get(f"/referrals/{uuid.uuid4()}").status_code == 404
    assert inbox.client.get("/referrals/not-an-id").status_code == 404
    assert inbox.client.get("/no/such/page").status_code == 404
    kinds = [e["kind"] for e in inbox.audit(expect=3)]
    assert kinds == ["signed_in", "referral_not_found", "referral_not_found"]


# --- the referral page and its actions ---------------------------------------------------------


def test_viewing_audits_it_and_changes_nothing_acknowledging_tells_the_referrer(inbox: Inbox) -> None:
    record = inbox.referral(6)
    rid = record["referral_id"]
    inbox.sign_in()
    page = inbox.client.get(f"/referrals/{rid}")
    assert page.status_code == 200
    assert record["child"]["given_name"] in page.text  # granted and opened for this view
    assert "Withheld from your team" not in page.text
    row = inbox.store.get_referral(TEAM, rid)
    assert row is not None and row.state is ReferralState.NEW  # reading is not acknowledging
    assert inbox.store.events(TEAM, rid) == [] and inbox.store.pending_status() == []
    viewed = inbox.audit(expect=2)[-1]
    assert (viewed["kind"], viewed["member"], viewed["referral_id"], viewed["version"]) == (
        "referral_viewed",
        "fen.worker",
        rid,
        record["version"],
    )
    for value in values_of(record):
        assert value not in json.dumps(viewed)
    token = inbox.csrf(f"/referrals/{rid}")
    done = inbox.client.post(f"/referrals/{rid}/acknowledge", data={"csrf_token": token}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"/referrals/{rid}"
    row = inbox.store.get_referral(TEAM, rid)
    assert row is not None and row.state is ReferralState.OPENED
    [status] = inbox.statuses(expect=1)
    assert (status["status"], str(status["referral_id"]), status["from_party"]) == ("opened", rid, TEAM)
    assert status["actor_role"] == "Family worker"


# The inbox fixture routes with the narrow test policy, so that some fields are withheld.
NARROW = pytest.mark.parametrize("inbox", ["narrow policy"], indirect=True)


@NARROW
def test_page_shows_exactly_the_granted_fields_and_names_the_withheld(inbox: Inbox) -> None:
    record = inbox.referral(7)
    row = inbox.store.get_referral(TEAM, record["referral_id"])
    assert row is not None and row.withheld
    inbox.sign_in()
    page = inbox.client.get(f"/referrals/{record['referral_id']}")
    assert page.status_code == 200
    child_section = page.text.split('data-section="the-child"')[1].split("</section>")[0]
    withheld = child_section.split('data-withheld="the-child"')[1]
    shared = child_section.split('data-withheld="the-child"')[0]
    assert record["child"]["given_name"] in shared and record["child"]["address"]["postcode"] in shared
    # the date of birth with the age on the team's day, and the address lines as words
    born = date.fromisoformat(str(record["child"]["date_of_birth"]))
    today = local_date(inbox.clock())
    age = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    assert f"{born.day} {born:%B %Y} (age {age})" in shared
    assert "Address › Line 1" in shared and "Line1" not in shared
    assert (
        "NHS number" in withheld and "not granted to this recipient by any purpose (default deny)" in withheld
    )
    for path in ("identifiers.nhs_number", "child.ethnicity"):
        assert path in {w.path for w in row.withheld}
    identifiers = record["identifiers"]
    assert identifiers["nhs_number"] and identifiers["upn"]  # seed 7 has both: the check below is real
    for value in (identifiers["nhs_number"], identifiers["upn"]):
        assert value not in page.text
    assert "Identifiers" not in shared
    # "do not pass on" beside each such field (the narrow policy names child.address)
    marked = re.findall(r'data-no-onward="([^"]+)"', page.text)
    assert marked and all(p.startswith("child.address") for p in marked)
    assert "child.address.postcode" in marked


def test_accept_then_close_sends_status_messages(inbox: Inbox) -> None:
    rid = inbox.referral(8)["referral_id"]
    inbox.sign_in()
    token = inbox.csrf(f"/referrals/{rid}")
    response = inbox.client.post(
        f"/referrals/{rid}/accept", data={"csrf_token": token}, follow_redirects=False
    )
    assert response.status_code == 303 and response.headers["location"] == f"/referrals/{rid}"
    page = inbox.client.get(response.headers["location"])
    assert "Referral accepted." in page.text and "on its way to the referrer" in page.text
    # the banner comes from the recorded history: a bookmarked "?done=" URL proves nothing
    assert "Referral declined." not in inbox.client.get(f"/referrals/{rid}?done=decline").text
    response = inbox.client.post(
        f"/referrals/{rid}/close", data={"csrf_token": token}, follow_redirects=False
    )
    assert response.status_code == 303
    assert [s["status"] for s in inbox.statuses(expect=2)] == ["accepted", "closed"]
    assert inbox.store.pending_status() == []
    assert "Referral closed." in inbox.client.get(f"/referrals/{rid}").text
    inbox.clock.now += timedelta(hours=1)  # a confirmation, not a permanent notice
    assert "Referral closed." not in inbox.client.get(f"/referrals/{rid}").text


def test_forged_action_post_is_403_and_changes_nothing(inbox: Inbox) -> None:
    rid = inbox.referral(9)["referral_id"]
    inbox.sign_in()
    inbox.client.get(f"/referrals/{rid}")
    for data in ({}, {"csrf_token": "guessed"}):
        response = inbox.client.post(f"/referrals/{rid}/accept", data=data, follow_redirects=False)
        assert response.status_code == 403
    row = inbox.store.get_referral(TEAM, rid)
    assert row is not None and row.state is ReferralState.NEW


def test_action_on_another_teams_referral_is_404(inbox: Inbox) -> None:
    theirs = inbox.referral(10, team=OTHER_TEAM)["referral_id"]
    inbox.sign_in()
    token = inbox.csrf("/inbox")
    response = inbox.client.post(
        f"/referrals/{theirs}/accept", data={"csrf_token": token}, follow_redirects=False
    )
    assert response.status_code == 404
    row = inbox.store.get_referral(OTHER_TEAM, theirs)
    assert row is not None and row.state is ReferralState.NEW


def test_invalid_transition_is_refused_with_409(inbox: Inbox) -> None:
    rid = inbox.referral(11)["referral_id"]
    inbox.sign_in()
    token = inbox.csrf(f"/referrals/{rid}")
    inbox.client.post(f"/referrals/{rid}/accept", data={"csrf_token": token})
    again = inbox.client.post(f"/referrals/{rid}/accept", data={"csrf_token": token}, follow_redirects=False)
    assert again.status_code == 409 and "this referral is accepted" in again.text
    assert [e.action.value for e in inbox.store.events(TEAM, rid)] == ["accept"]


def test_decline_needs_a_reason_and_sends_it_sealed(inbox: Inbox) -> None:
    rid = inbox.referral(12)["referral_id"]
    inbox.sign_in()
    token = inbox.csrf(f"/referrals/{rid}")
    form = inbox.client.get(f"/referrals/{rid}/decline")
    assert form.status_code == 200 and "Why are you declining this referral?" in form.text
    empty = inbox.client.post(f"/referrals/{rid}/decline", data={"csrf_token": token})
    assert empty.status_code == 400
    assert (
        "There is a problem" in empty.text
        and 'href="#reason"' in empty.text
        and 'href="#details"' in empty.text
    )
    details = "Synthetic explanation for the referrer."
    done = inbox.client.post(
        f"/referrals/{rid}/decline",
        data={"csrf_token": token, "reason": "wrong_district", "details": details},
        follow_redirects=False,
    )
    assert done.status_code == 303
    statuses = inbox.statuses(expect=1)
    assert statuses[-1]["status"] == "declined"
    assert statuses[-1]["reason"] == f"The family lives in another district. {details}"
    # The words exist only sealed inside the status message, not in the database.
    [event] = [e for e in inbox.store.events(TEAM, rid) if e.action.value == "decline"]
    assert event.reason_code == "wrong_district"
    assert event.status_record is not None and details.encode() not in event.status_record.value


def test_request_information_and_allocation(inbox: Inbox) -> None:
    rid = inbox.referral(13)["referral_id"]
    inbox.sign_in()
    token = inbox.csrf(f"/referrals/{rid}")
    bad = inbox.client.post(f"/referrals/{rid}/allocate", data={"csrf_token": token, "worker": "cam.worker"})
    assert bad.status_code == 400  # not a member of this team
    ok = inbox.client.post(
        f"/referrals/{rid}/allocate", data={"csrf_token": token, "worker": "fen.lead"}, follow_redirects=False
    )
    assert ok.status_code == 303
    asked = inbox.client.post(
        f"/referrals/{rid}/request-information",
        data={"csrf_token": token, "reason": "consent", "details": "Synthetic: please confirm consent."},
        follow_redirects=False,
    )
    assert asked.status_code == 303
    row = inbox.store.get_referral(TEAM, rid)
    assert row is not None
    assert (row.state, row.allocated_to) == (ReferralState.MORE_INFORMATION_NEEDED, "fen.lead")
    assert [s["status"] for s in inbox.statuses(expect=2)] == ["allocated", "more_information_needed"]
    page = inbox.client.get(f"/referrals/{rid}")
    assert (
        "Allocated to fen.lead" in page.text
        and "Asked for more information: Consent to the service" in page.text
    )


def test_ages_and_numbered_fields_read_as_words() -> None:
    """Whole years, 18 on the 18th birthday (a leap-day birthday on 1 March in other years); a
    date of birth still to come (a pre-birth referral) shows no age; ``line1`` is "Line 1"."""
    assert presentation.years_old(date(2008, 12, 7), date(2026, 12, 6)) == 17
    assert presentation.years_old(date(2008, 12, 7), date(2026, 12, 7)) == 18
    assert presentation.years_old(date(2008, 2, 29), date(2026, 2, 28)) == 17
    assert presentation.years_old(date(2008, 2, 29), date(2026, 3, 1)) == 18
    assert presentation.field_label("address.line1") == "Address › Line 1"
    assert presentation.humanise("nhs_number") == "NHS number"
    granted = {
        "child": {"given_name": "A", "date_of_birth": date(2027, 1, 2)},
        "household": [{"given_name": "B", "date_of_birth": date(2009, 6, 1)}],
    }
    sections = presentation.reading_sections(granted, (), today=date(2026, 12, 5))
    shown = {row.path: row.value for s in sections for row in s.rows}
    assert shown["child.date_of_birth"] == "2 January 2027"
    parent = {row.path: row.value for s in sections for g in s.groups for row in g.rows}
    assert parent["household.date_of_birth"] == "1 June 2009 (age 17)"
    plain = presentation.reading_sections(granted, ())
    assert {row.path: row.value for s in plain for g in s.groups for row in g.rows}["household.date_of_birth"] == "1 June 2009"
