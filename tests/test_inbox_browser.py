"""The inbox in real headless Chromium (Debian's ``chromium`` driven by Playwright; nothing is
downloaded), end to end on the real broker:

schools' adapter sends a referral -> the router routes it to the Fenland district team -> the
inbox (uvicorn on a loopback port, ingesting while it serves) shows it -> a Fenland member signs
in, opens and accepts it -> the status goes out on the team's status topic -> the router carries
it back -> the schools adapter receives it. A Cambridge member asking for the same referral by
URL gets a plain 404 and the attempt is audited. Screenshots of the inbox and the referral page
are saved under ``test-artifacts/screenshots/`` for review.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_inbox_fixtures import (
    CHROMIUM,
    OTHER_TEAM,
    PASSWORD,
    REFERRER,
    TEAM,
    Pipeline,
    make_pipeline,
    make_store,
    read_topic,
)

from referral_broker.audit_log import read_event_value
from referral_broker.cluster.clients import build_consumer, poll_records
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.inbox.outbound import ACCESS_EVENT_KIND
from referral_broker.consumers.inbox.server import ServerThread, build_inbox
from referral_broker.parties import get_party

try:  # a missing playwright or browser fails the run: these tests are the inbox's only browser check
    import playwright.sync_api as playwright_api
except ImportError:
    pytest.fail("playwright is missing: install the test extras (bash scripts/setup.sh)", pytrace=False)
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"

if not Path(CHROMIUM).exists():
    pytest.fail(
        f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium); "
        "the browser tests never download a browser",
        pytrace=False,
    )


@dataclass
class Running:
    settings: Settings
    pipeline: Pipeline
    url: str


@pytest.fixture
def running(topics: Settings) -> Iterator[Running]:
    """Keys, accounts, and the inbox served with its ingest workers for both teams."""
    pipeline = make_pipeline(topics)
    make_store(topics).close()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    inbox = build_inbox(topics, teams=[TEAM, OTHER_TEAM], secure_cookies=False)
    try:
        with ServerThread(inbox.app) as server:
            yield Running(topics, pipeline, server.url)
    finally:
        inbox.close()
    assert not [w.team for w in inbox.workers if w.error is not None]


@pytest.fixture
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def new_page(browser: Any, url: str, problems: list[str]) -> Any:
    context = browser.new_context(base_url=url, viewport={"width": 1366, "height": 900})
    page = context.new_page()
    # Console errors (a CSP refusal, a script error) and failed requests are problems, except
    # the 4xx a test asks for on purpose (recorded by URL and checked by the test).
    page.on(
        "console",
        lambda m: (
            problems.append(f"console: {m.text}")
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return page


def sign_in(page: Any, username: str) -> None:
    """With the keyboard only: the GOV.UK skip link first, then the form."""
    page.goto("/inbox")
    assert "/sign-in" in page.url
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Skip to main content"
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password", exact=True).press("Enter")
    page.wait_for_url("**/inbox")


def wait_for_row(page: Any, referral_id: str, timeout_s: float = 60.0) -> Any:
    """The inbox ingests in the background: reload until the referral is listed."""
    deadline = time.monotonic() + timeout_s
    row = page.locator(f'tr[data-referral-id="{referral_id}"]')
    while row.count() == 0:
        assert time.monotonic() < deadline, "the routed referral never reached the inbox"
        time.sleep(0.5)
        page.reload()
    return row


def access_events(settings: Settings, until: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """The inbox's access events on the audit topic (which also carries the router's Avro
    decision records, told apart by the signed ``rb-kind`` header), read until ``until`` holds."""
    consumer = build_consumer(
        settings, settings.bootstrap_servers, [topic_name(settings, "audit")], group_id=None
    )
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    try:
        while not until(events) and time.monotonic() < deadline:
            for r in poll_records(consumer, 500):
                if dict(r.headers).get("rb-kind") == ACCESS_EVENT_KIND.encode():
                    events.append(read_event_value(r.value))
    finally:
        consumer.close()
    return events


def test_a_routed_referral_is_triaged_in_the_browser(running: Running, browser: Any) -> None:
    pipeline = running.pipeline
    record = pipeline.referral(TEAM, 101)
    rid = record["referral_id"]
    pipeline.send_referrals([record, pipeline.referral(TEAM, 102), pipeline.referral(TEAM, 103)])
    assert pipeline.route(routed=3) == (3, 0)
    problems: list[str] = []

    # A Fenland member sees it arrive in the New tab.
    page = new_page(browser, running.url, problems)
    sign_in(page, "fen.worker")
    assert page.locator("h1").count() == 1
    row = wait_for_row(page, rid)
    assert record["referrer"]["organisation"] in row.inner_text()
    assert "Needs a decision (3)" in page.locator("nav .inbox-views").inner_text()
    # GOV.UK Frontend's CSS and JS are served and running under the CSP.
    assert page.locator("body.govuk-frontend-supported").count() == 1
    assert (
        page.evaluate("getComputedStyle(document.querySelector('.govuk-visually-hidden')).position")
        == "absolute"
    )
    page.screenshot(path=str(SCREENSHOTS / "inbox.png"), full_page=True)

    # Open it: the granted fields, opened for this view only.
    row.get_by_role("link").click()
    page.wait_for_url(f"**/referrals/{rid}")
    child = record["child"]
    assert page.locator("h1").inner_text().endswith(f"{child['given_name']} {child['family_name']}")
    # The referrer by the name the registry gives the signer, not the name the referral claims.
    assert get_party(REFERRER).description in page.locator("h1 .govuk-caption-l").inner_text()
    assert record["referrer"]["organisation"] not in page.locator("h1 .govuk-caption-l").inner_text()
    assert child["given_name"] in page.locator('[data-section="the-child"]').inner_text()
    page.screenshot(path=str(SCREENSHOTS / "referral.png"), full_page=True)
    page.screenshot(path=str(SCREENSHOTS / "referral-top.png"))  # what a laptop screen shows first

    # Accept it with the keyboard.
    page.get_by_role("button", name="Accept referral").focus()
    page.keyboard.press("Enter")
    page.wait_for_selector(".govuk-notification-banner")
    assert page.url.endswith(f"/referrals/{rid}")
    assert "Referral accepted." in page.locator(".govuk-notification-banner").inner_text()
    assert "Accepted" in page.locator(".govuk-summary-list").first.inner_text()
    page.screenshot(path=str(SCREENSHOTS / "referral-accepted.png"), full_page=True)

    # The status messages are on the team's status topic, opened as the router opens them.
    status_topic = topic_name(running.settings, "status", TEAM)
    statuses = [pipeline.hub.open(r).record for r in read_topic(running.settings, status_topic, expect=1)]
    assert [s["status"] for s in statuses] == ["accepted"]  # reading it sent nothing
    assert all(str(s["referral_id"]) == rid and s["from_party"] == TEAM for s in statuses)

    # The router carries them back, and the referrer's adapter receives them.
    assert pipeline.route(statuses=1) == (0, 1)
    received = pipeline.statuses_received(REFERRER, expect=1)
    assert [(r.referral_id, r.record["status"]) for r in received] == [(rid, "accepted")]

    # A Cambridge member asking for it by URL gets a plain 404; the attempt is audited.
    other = new_page(browser, running.url, problems)
    sign_in(other, "cam.worker")
    assert rid not in other.content()
    response = other.goto(f"/referrals/{rid}")
    assert response is not None and response.status == 404
    assert other.locator("h1").inner_text() == "Page not found"
    text = other.content()
    assert record["referrer"]["organisation"] not in text and record["child"]["given_name"] not in text
    other.screenshot(path=str(SCREENSHOTS / "other-team-404.png"), full_page=True)
    access = access_events(
        running.settings, until=lambda es: any(e["kind"] == "referral_access_denied" for e in es)
    )
    denied = [e for e in access if e["kind"] == "referral_access_denied"]
    assert [(e["member"], e["team"], e["referral_id"]) for e in denied] == [("cam.worker", OTHER_TEAM, rid)]
    viewed = [e for e in access if e["kind"] == "referral_viewed"]
    assert [(e["member"], e["referral_id"]) for e in viewed] == [("fen.worker", rid), ("fen.worker", rid)]
    assert record["child"]["given_name"] not in json.dumps(access)

    assert problems == [f"404 {running.url}/referrals/{rid}"]


def test_wrong_password_shows_the_error_summary_focused(running: Running, browser: Any) -> None:
    problems: list[str] = []
    page = new_page(browser, running.url, problems)
    page.goto("/sign-in")
    page.get_by_label("Username").fill("fen.worker")
    page.get_by_label("Password", exact=True).fill("not the password")
    with page.expect_response("**/sign-in") as answer:
        page.get_by_role("button", name="Sign in").click()
    assert answer.value.status == 401
    summary = page.locator(".govuk-error-summary")
    assert summary.is_visible() and "Enter a correct username and password" in summary.inner_text()
    # GOV.UK Frontend moves focus to the error summary (its JS runs under the nonce CSP).
    page.wait_for_function("document.activeElement.classList.contains('govuk-error-summary')")
    page.screenshot(path=str(SCREENSHOTS / "sign-in-error.png"), full_page=True)
    assert problems == [f"401 {running.url}/sign-in"]
