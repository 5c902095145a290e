"""A district-team worker's day in real headless Chromium, with 320 referrals in the inbox.

The referrals are routed by the real router and stored as ingest stores them (``fill_inbox``,
a few seconds for all of them), a mix already acknowledged, decided, allocated and closed; two are overdue.
The worker finds a family by name and by postcode, checks that "Needs a decision" holds exactly
the undecided referrals, reads one (nothing is sent), acknowledges it, asks for information,
records the answer given by phone, adds a case note, accepts it, and reads the history (each
step, and the exact words sent). The referrer's adapter receives each status through the
router. axe-core (WCAG 2.2 A/AA and best practice, ``region`` included) finds nothing on any
page at 1366 px and at 375 px, where no page scrolls sideways. Screenshots for the README are
written to ``docs/screenshots/``.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_inbox_browser import new_page, sign_in
from test_inbox_fixtures import (
    OTHER_TEAM,
    REFERRER,
    TEAM,
    Day,
    Pipeline,
    axe_source,
    axe_violations,
    fill_inbox,
    make_pipeline,
    make_store,
    read_topic,
)

from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.inbox.server import ServerThread, build_inbox
from referral_broker.consumers.inbox.states import ReferralState

DOCS_SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
REFERRALS = 320


@dataclass
class Running:
    settings: Settings
    pipeline: Pipeline
    url: str
    day: Day
    inbox: Any


@pytest.fixture
def running(topics: Settings) -> Iterator[Running]:
    pipeline = make_pipeline(topics)
    make_store(topics).close()
    fmt = pipeline.format([TEAM, OTHER_TEAM])
    inbox = build_inbox(
        topics,
        teams=[TEAM, OTHER_TEAM],
        record_format=fmt,
        ingest=False,
        watch_delivery=True,
        secure_cookies=False,
    )
    started = time.monotonic()
    day = fill_inbox(pipeline, inbox.store, fmt, REFERRALS)
    assert time.monotonic() - started < 60, "filling the inbox must stay quick"
    DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with ServerThread(inbox.app) as server:
            yield Running(topics, pipeline, server.url, day, inbox)
    finally:
        inbox.close()
    assert inbox.watcher is not None and inbox.watcher.error is None


@pytest.fixture(scope="module")
def axe() -> str:
    return axe_source()


@pytest.fixture
def browser() -> Iterator[Any]:
    import playwright.sync_api as playwright_api
    from test_inbox_fixtures import CHROMIUM

    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def accessible(page: Any, axe: str, where: str, *, width: int | None = None) -> None:
    """No axe-core violation; at a narrow width, nothing wider than the screen."""
    violations = axe_violations(page, axe)
    assert violations == [], f"{where}: {violations}"
    if width is not None:
        scroll = page.evaluate("document.documentElement.scrollWidth")
        assert scroll <= width, f"{where} scrolls sideways at {width} px ({scroll} px wide)"


def listed_ids(page: Any) -> list[str]:
    return page.eval_on_selector_all("tr[data-referral-id]", "rows => rows.map(r => r.dataset.referralId)")


def test_a_workers_day_with_320_referrals(running: Running, browser: Any, axe: str) -> None:
    day, store = running.day, running.inbox.store
    problems: list[str] = []
    page = new_page(browser, running.url, problems)
    page.goto("/sign-in")
    accessible(page, axe, "sign-in")
    sign_in(page, "fen.worker")

    # The list: "Needs a decision" by default, overdue first, the urgent one before the routine.
    undecided = day.ids_with("new", "open")
    views = page.locator("nav .inbox-views").inner_text()
    assert f"Needs a decision ({len(undecided)})" in views
    assert f"All referrals ({REFERRALS})" in views
    first = listed_ids(page)
    assert first[:2] == [day.overdue_urgent, day.overdue_routine]
    assert "Overdue" in page.locator(f'tr[data-referral-id="{day.overdue_urgent}"]').inner_text()
    assert page.locator("tr[data-overdue]").count() == 2
    assert len(first) == 25 and page.locator(".govuk-pagination").count() == 1
    html_size = len(page.content())
    assert html_size < 150_000, f"one page of the list is {html_size} bytes"
    accessible(page, axe, "list")
    page.screenshot(path=str(DOCS_SCREENSHOTS / "inbox-list.png"), full_page=True)

    # "Needs a decision" holds exactly the undecided referrals, page after page.
    seen: list[str] = []
    pages = -(-len(undecided) // 25)
    for n in range(1, pages + 1):
        page.goto(f"/inbox?view=decision&page={n}")
        seen += listed_ids(page)
    assert len(seen) == len(set(seen)) and set(seen) == undecided

    # Search finds a family by name, and by postcode.
    target = day.records[12]  # planned "new": undecided and unallocated
    rid, child = target["referral_id"], target["child"]
    assert day.plan[rid] == "new"
    page.goto("/inbox?view=all")
    page.get_by_label("Search by name, date of birth, postcode, reference or NHS number").fill(
        f"{child['given_name']} {child['family_name']}"
    )
    page.get_by_role("button", name="Search").click()
    page.wait_for_url("**q=**")
    assert rid in listed_ids(page)
    assert "view=all" in page.url  # the view and the search stay in the URL
    page.goto("/inbox?view=all&q=" + child["address"]["postcode"].replace(" ", "+"))
    by_postcode = listed_ids(page)
    assert rid in by_postcode and len(by_postcode) < 25

    # Reading it sends nothing and changes nothing.
    page.locator(f'tr[data-referral-id="{rid}"] a').click()
    page.wait_for_url(f"**/referrals/{rid}")
    assert page.locator("h1").inner_text().endswith(f"{child['given_name']} {child['family_name']}")
    headings = page.eval_on_selector_all("main h2", "hs => hs.map(h => h.textContent.trim())")
    order = [
        "The concerns",
        "Risk flags",
        "Consent and override",
        "Why your team has this information",
        "The child",
        "The household",
    ]
    assert [h for h in headings if h in order] == order
    row = store.get_referral(TEAM, rid)
    assert row is not None and row.state is ReferralState.NEW and store.events(TEAM, rid) == []
    # why the team has it, as the router decided it (read from the audit topic)
    deadline = time.monotonic() + 30
    while page.locator(f'[data-decision="{row.decision_id}"]').count() == 0:
        assert time.monotonic() < deadline, "the router's decision never reached the inbox"
        time.sleep(0.5)
        page.reload()
    why = page.locator('[data-section="why"]').inner_text()
    assert "UK GDPR Art 6(1)(e): public task" in why and "Early help casework" in why
    assert "UK GDPR Art 9(2)(h)" in why and "The router decided this on" in why
    accessible(page, axe, "referral")
    page.screenshot(path=str(DOCS_SCREENSHOTS / "inbox-referral.png"), full_page=True)

    # Acknowledge; ask for information; record the answer given by phone; note; accept.
    page.get_by_role("button", name="Acknowledge").click()
    page.wait_for_selector(".govuk-notification-banner")
    assert "Referral acknowledged." in page.locator(".govuk-notification-banner").inner_text()
    asked = "Synthetic: please confirm the family agreed to Early Help."
    page.get_by_role("button", name="Ask for more information").click()
    page.get_by_label("Consent to the service").check()
    page.get_by_label("Tell the referrer what you need").fill(asked)
    assert "characters" in page.locator(".govuk-character-count__status").first.inner_text()
    accessible(page, axe, "request-information form")
    page.get_by_role("button", name="Send request").click()
    page.wait_for_selector(".govuk-notification-banner")
    assert store.get_referral(TEAM, rid).state is ReferralState.MORE_INFORMATION_NEEDED  # type: ignore[union-attr]
    answer = "Synthetic: the parent confirmed consent by phone."
    page.get_by_role("button", name="Record information received").click()
    page.get_by_label("By phone").check()
    page.get_by_label("What did you find out?").fill(answer)
    accessible(page, axe, "record-information form")
    page.get_by_role("button", name="Record information and re-open").click()
    page.wait_for_selector(".govuk-notification-banner")
    assert "open for a decision again" in page.locator(".govuk-notification-banner").inner_text()
    note = "Synthetic note: school nurse already involved."
    page.get_by_role("textbox", name="Case note").fill(note)
    page.get_by_role("button", name="Add case note").click()
    page.wait_for_selector(".govuk-notification-banner")
    page.get_by_role("button", name="Accept referral").click()
    page.wait_for_selector(".govuk-notification-banner")
    assert "Referral accepted." in page.locator(".govuk-notification-banner").inner_text()

    # The history shows each step, with the exact words sent and recorded.
    history = page.locator('[data-section="history"]').inner_text()
    for step in (
        "Received",
        "Acknowledged",
        "Asked for more information: Consent to the service",
        "Information received, re-opened: By phone",
        "Case note",
        "Accepted",
    ):
        assert step in history, step
    assert f"Consent to the service. {asked}" in history  # word for word, as the referrer got it
    assert answer in history and note in history
    # ... and the store holds those words sealed only
    for event in store.events(TEAM, rid):
        if event.sealed_text is not None:
            for words in (asked, answer, note):
                assert words.encode() not in event.sealed_text
    accessible(page, axe, "referral after the day's work")

    # Nothing has reached the referrer yet (no router has run): the page does not pretend.
    page.reload()
    history = page.locator('[data-section="history"]').inner_text()
    assert "Referrer told" not in history and history.count("Sending: waiting for the router") == 3

    # The referrer receives each status (the bulk decisions' statuses travel too).
    status_topic = topic_name(running.settings, "status", TEAM)
    assert store.pending_status() == []  # the app published the whole outbox
    expected_total = sum(1 for r in day.plan for e in store.events(TEAM, r) if e.notify)
    on_topic = read_topic(running.settings, status_topic, expect=expected_total)
    mine = [running.pipeline.hub.open(r).record for r in on_topic if r.key == rid.encode()]
    assert [s["status"] for s in mine] == ["opened", "more_information_needed", "accepted"]
    assert running.pipeline.route(statuses=expected_total)[1] >= expected_total
    received = [
        r for r in running.pipeline.statuses_received(REFERRER, expect=expected_total) if r.referral_id == rid
    ]
    assert [r.record["status"] for r in received] == ["opened", "more_information_needed", "accepted"]
    assert received[1].record["reason"] == f"Consent to the service. {asked}"
    # ... and only now does the inbox say the referrer was told, for each of the three
    deadline = time.monotonic() + 30
    while page.locator('[data-section="history"] [data-status]', has_text="Referrer told").count() < 3:
        assert time.monotonic() < deadline, "the inbox never learnt that the statuses were delivered"
        time.sleep(0.5)
        page.reload()
    assert "Sending" not in page.locator('[data-section="history"]').inner_text()

    # The view exported as CSV: every referral of the view, not just the page.
    page.goto("/inbox?view=waiting")
    with page.expect_download() as download:
        page.get_by_text("Download this view as CSV").click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text(encoding="utf-8"))))
    assert {r["Reference"] for r in rows} == day.ids_with("request_information")

    assert problems == []


def test_the_day_at_375_px(running: Running, browser: Any, axe: str) -> None:
    """The phone: the list becomes cards, nothing scrolls sideways, axe finds nothing."""
    problems: list[str] = []
    context = browser.new_context(base_url=running.url, viewport={"width": 375, "height": 812})
    page = context.new_page()
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto("/sign-in")
    accessible(page, axe, "sign-in at 375", width=375)
    sign_in(page, "fen.worker")
    assert page.locator("table.inbox-list").is_hidden()
    cards = page.locator("[data-card-id]")
    assert cards.count() == 25 and cards.first.is_visible()
    assert cards.first.get_attribute("data-card-id") == running.day.overdue_urgent
    accessible(page, axe, "list at 375", width=375)
    page.screenshot(path=str(DOCS_SCREENSHOTS / "inbox-list-mobile.png"))  # what the phone shows first
    page.locator("h2#results").scroll_into_view_if_needed()
    page.screenshot(path=str(DOCS_SCREENSHOTS / "inbox-list-mobile-cards.png"))
    cards.first.get_by_role("link").click()
    page.wait_for_url("**/referrals/**")
    accessible(page, axe, "referral at 375", width=375)
    rid = running.day.overdue_urgent
    for path in (
        f"/referrals/{rid}/decline",
        f"/referrals/{rid}/request-information",
        f"/referrals/{rid}/notes",
        "/inbox?view=closed",
        "/inbox?view=all&page=13",
    ):
        page.goto(path)
        accessible(page, axe, f"{path} at 375", width=375)
    response = page.goto("/referrals/00000000-0000-4000-8000-000000000000")
    assert response is not None and response.status == 404
    accessible(page, axe, "not found at 375", width=375)
    assert re.search(r"Page not found", page.locator("h1").inner_text())
    assert problems == []
    # axe itself is live: a page with a nameless image and no landmark fails it
    page.set_content('<html lang="en"><head><title>t</title></head><body><img src="data:,"></body></html>')
    assert {v["id"] for v in axe_violations(page, axe)} >= {"image-alt", "region"}
    context.close()
