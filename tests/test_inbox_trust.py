"""Trust II for the inbox (issue 15): attack 11 (password guessing; a database readable by
others), attack 12 (a GET that changes state) and copies of records the inbox already has.

Real HTTP against uvicorn on loopback (the ``inbox`` fixture of test_inbox_web), the real
SQLite files (their modes by ``stat``), the real broker (audit and status topics, a replayed
record on the team's out topic) and the real ``referral-broker inbox`` commands.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_inbox_cli import run as run_inbox_cli
from test_inbox_fixtures import PASSWORD, TEAM, make_pipeline, make_store, read_topic
from test_inbox_web import Inbox
from test_inbox_web import inbox as web_inbox  # noqa: F401  (a fixture: registered as web_inbox)

from referral_broker.cluster.clients import Record, build_producer
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.inbox.app import create_app
from referral_broker.consumers.inbox.ingest import TeamIngest
from referral_broker.consumers.inbox.pages_signin import SIGN_IN_COOKIE
from referral_broker.consumers.inbox.records import ReferralSummary
from referral_broker.consumers.inbox.security import SESSION_COOKIE
from referral_broker.consumers.inbox.states import ReferralState
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.consumers.inbox.store_referrals import VIEWS
from referral_broker.consumers.inbox.throttle import SignInPolicy, ThrottleRule

MEMBER = "fen.worker"  # a member of TEAM (test_inbox_fixtures.make_store)
WRONG = "not-the-right-password"
OTHER_ADDRESS = "127.0.0.2"  # loopback too: a second client machine for the address throttle


@pytest.fixture
def inbox(request: pytest.FixtureRequest) -> Inbox:
    """test_inbox_web's inbox: the app on loopback, the store, the real broker, a movable clock."""
    shared: Inbox = request.getfixturevalue("web_inbox")
    return shared


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def side_files(path: Path) -> list[Path]:
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm")]


# --- attack 11: the database files ------------------------------------------------------------


def test_database_folder_0700_and_files_0600_whatever_the_umask(tmp_path: Path) -> None:
    """SQLite creates files 0644 less the umask and gives -wal/-shm the database's mode; with a
    umask of 0 only files made private before the first connection come out 0600."""
    path = tmp_path / "new" / "inbox" / "inbox.sqlite3"
    old = os.umask(0)
    try:
        store = InboxStore(path)
    finally:
        os.umask(old)
    try:
        secret = store.secret_key()  # the cookie secret: written through the -wal
        assert mode(path.parent) == 0o700
        for f in side_files(path):
            assert f.exists() and mode(f) == 0o600, f"{f.name} is {oct(mode(f))}"
        raw = b"".join(f.read_bytes() for f in side_files(path))
        assert secret.encode() in raw  # what the modes protect
    finally:
        store.close()


def test_an_existing_readable_database_is_made_private_before_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    path = folder / "inbox.sqlite3"
    old = os.umask(0o022)
    try:
        loose = sqlite3.connect(path)  # an older inbox's files, left 0644 and still open
        loose.execute("PRAGMA journal_mode=WAL")
        loose.execute("CREATE TABLE t (x)")
        loose.execute("INSERT INTO t VALUES (1)")
        loose.commit()
    finally:
        os.umask(old)
    try:
        assert [mode(f) for f in side_files(path)] == [0o644] * 3
        with caplog.at_level(logging.WARNING), InboxStore(path) as store:
            store.secret_key()
            assert [mode(f) for f in side_files(path)] == [0o600] * 3
    finally:
        loose.close()
    # a folder it did not create is not changed (it may hold more), but it is reported
    assert mode(folder) == 0o755
    assert any(r.getMessage() == "inbox database folder is open to others" for r in caplog.records)


# --- attack 11: sign-in throttling ------------------------------------------------------------


def test_delays_grow_after_the_free_failures_up_to_a_minute() -> None:
    rule = ThrottleRule(free_failures=3, lock_after=10)
    assert [rule.delay(n).total_seconds() for n in range(1, 12)] == [0, 0, 0, 1, 2, 4, 8, 16, 32, 60, 60]
    with pytest.raises(ValueError):
        ThrottleRule(free_failures=10, lock_after=10)
    policy = SignInPolicy()
    assert (policy.account.lock_after, policy.address.lock_after) == (10, 50)


def sign_in_token(client: httpx.Client) -> tuple[str, str]:
    """(the sign-in cookie, the form token) from the sign-in page."""
    page = client.get("/sign-in")
    form = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    return page.cookies[SIGN_IN_COOKIE], form


def attempt(client: httpx.Client, username: str, password: str) -> httpx.Response:
    cookie, token = sign_in_token(client)
    client.cookies.set(SIGN_IN_COOKIE, cookie)
    return client.post(
        "/sign-in",
        data={"csrf_token": token, "username": username, "password": password, "next": "/inbox"},
        follow_redirects=False,
    )


def kinds(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["kind"] for e in events)


def test_attack_11_forty_parallel_guesses_then_the_right_password_is_refused_until_unlocked(
    inbox: Inbox, caplog: pytest.LogCaptureFixture
) -> None:
    base = str(inbox.client.base_url)
    cookie, token = sign_in_token(inbox.client)

    def guess(n: int) -> int:
        with httpx.Client(base_url=base, timeout=60.0, cookies={SIGN_IN_COOKIE: cookie}) as c:
            form = {"csrf_token": token, "username": MEMBER, "password": f"{WRONG}-{n}", "next": "/inbox"}
            return c.post("/sign-in", data=form, follow_redirects=False).status_code

    # The attack as tried: 40 wrong passwords at once (the clock does not move), then the right one.
    with ThreadPoolExecutor(max_workers=40) as pool:
        codes = Counter(pool.map(guess, range(40)))
    # 3 free failures, the 4th starts the delays: every other attempt is refused unchecked
    assert codes == {401: 4, 429: 36}
    right = attempt(inbox.client, MEMBER, PASSWORD)
    assert right.status_code == 429 and SESSION_COOKIE not in right.cookies
    assert right.headers["retry-after"] == "1"
    assert "Wait 1 seconds" in right.text

    # Waiting as told and guessing again: each delay doubles, and the 10th failure locks.
    waits = []
    for _ in range(6):
        inbox.clock.now += timedelta(seconds=int(attempt(inbox.client, MEMBER, WRONG).headers["retry-after"]))
        assert attempt(inbox.client, MEMBER, WRONG).status_code == 401
        waits.append(int(attempt(inbox.client, MEMBER, WRONG).headers["retry-after"]))
    assert waits[:5] == [2, 4, 8, 16, 32]
    assert waits[5] == 15 * 60  # locked: the lockout, not a delay
    inbox.clock.now += timedelta(minutes=5)
    locked = attempt(inbox.client, MEMBER, PASSWORD)
    assert locked.status_code == 429 and "locked" in locked.text and SESSION_COOKIE not in locked.cookies

    # Audited: the lock names the account (a staff identifier) and the count, never a password.
    events = inbox.audit(expect=4 + 36 + 1 + 6 * 3 + 1 + 1)
    counted = kinds(events)
    assert counted["sign_in_refused"] == 10 and counted["sign_in_locked"] == 1
    [lock] = [e for e in events if e["kind"] == "sign_in_locked"]
    assert (lock["member"], lock["team"], lock["count"], lock["scope"]) == (MEMBER, TEAM, 10, "account")
    assert WRONG not in json.dumps(events) and PASSWORD not in json.dumps(events)
    # Logged without the username or the address: scope, a short keyed hash and the count.
    [line] = [r for r in caplog.records if r.getMessage() == "sign-in locked"]
    context = line.context  # type: ignore[attr-defined]
    assert context["scope"] == "account" and context["count"] == 10 and len(context["subject_ref"]) == 12
    assert MEMBER not in json.dumps(context) and "127.0.0.1" not in json.dumps(context)
    [recorded] = inbox.store.sign_in_locks()
    assert (recorded.username, recorded.failures, recorded.released_at) == (MEMBER, 10, None)

    # An administrator releases it; the right password then works at once.
    status = json.loads(run_inbox_cli(inbox.settings, "status", "--json").stdout)
    assert [(lk["scope"], lk["username"]) for lk in status["locked"]] == [("account", MEMBER)]
    unlocked = run_inbox_cli(inbox.settings, "unlock", MEMBER)
    assert unlocked.returncode == 0, unlocked.stderr
    assert f"Unlocked {MEMBER}" in unlocked.stdout
    assert MEMBER not in unlocked.stderr  # its log line names the lock by its hash only
    assert attempt(inbox.client, MEMBER, PASSWORD).status_code == 303
    [released] = inbox.store.sign_in_locks()
    assert released.released_by is not None and released.released_by.startswith("administrator")
    assert json.loads(run_inbox_cli(inbox.settings, "status", "--json").stdout)["locked"] == []


def test_a_lockout_ends_by_itself_after_its_time(inbox: Inbox) -> None:
    for n in range(10):
        inbox.clock.now += timedelta(seconds=61)  # past any delay: only the count grows
        assert attempt(inbox.client, MEMBER, f"{WRONG}-{n}").status_code == 401
    inbox.clock.now += timedelta(seconds=61)
    assert attempt(inbox.client, MEMBER, PASSWORD).status_code == 429
    inbox.clock.now += timedelta(minutes=15)
    assert attempt(inbox.client, MEMBER, PASSWORD).status_code == 303
    [lock] = inbox.store.sign_in_locks()
    assert lock.released_by == "time" and lock.released_at == lock.locked_until


def test_an_address_guessing_at_many_accounts_is_locked_out_of_every_account(inbox: Inbox) -> None:
    base = str(inbox.client.base_url)
    transport = httpx.HTTPTransport(local_address=OTHER_ADDRESS)
    with httpx.Client(base_url=base, timeout=60.0, transport=transport) as other:
        for n in range(50):  # one guess at each of 50 names: no single account is locked
            inbox.clock.now += timedelta(seconds=61)
            assert attempt(other, f"guess{n}", WRONG).status_code == 401
        inbox.clock.now += timedelta(seconds=61)
        assert attempt(other, MEMBER, PASSWORD).status_code == 429  # the address is locked
        assert attempt(inbox.client, MEMBER, PASSWORD).status_code == 303  # another machine is not
        [lock] = inbox.store.sign_in_locks(active_at=inbox.clock.now)
        assert (lock.scope, lock.username, lock.failures) == ("address", None, 50)
        events = inbox.audit(expect=50 + 1 + 1 + 1)
        [audited] = [e for e in events if e["kind"] == "sign_in_locked"]
        assert (audited["scope"], audited["member"], audited["count"]) == ("address", None, 50)
        assert OTHER_ADDRESS not in json.dumps(events) and "guess1" not in json.dumps(events)
        unlocked = run_inbox_cli(inbox.settings, "unlock", "--address", OTHER_ADDRESS, "--json")
        assert unlocked.returncode == 0 and json.loads(unlocked.stdout)["was_locked"] is True
        assert attempt(other, MEMBER, PASSWORD).status_code == 303


# --- attack 12: no state change on GET --------------------------------------------------------


def snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read through its own read-only connection."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(map(tuple, db.execute(f'SELECT * FROM "{t}"')), key=repr) for t in tables}
    finally:
        db.close()


def get_routes(inbox: Inbox) -> list[str]:
    """Every route the app answers GET on (built as the fixture builds it)."""
    app = create_app(
        inbox.settings,
        store=inbox.store,
        record_format=inbox.fmt,
        outbound=None,  # type: ignore[arg-type]  (only the route table is read)
        teams=[TEAM],
    )
    return [r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or ())]


def test_attack_12_no_get_anywhere_changes_state_or_tells_the_referrer(inbox: Inbox) -> None:
    record = inbox.referral(12)
    rid = record["referral_id"]
    assert inbox.sign_in().status_code == 303
    before = snapshot(inbox.store.path)
    paths = {p.replace("{referral_id}", rid) for p in get_routes(inbox)}
    views = [
        f"/inbox?view={v}" for v in VIEWS
    ]
    for path in (
        sorted(paths) + views + [f"/inbox?q={record['child']['family_name']}", "/inbox/export.csv?view=all"]
    ):
        assert inbox.client.get(path, follow_redirects=False).status_code in (200, 303), path
    # the actions are POST only: a GET (a link, a prefetch, an image tag) is not an action
    for action in ("acknowledge", "accept", "close", "allocate"):
        assert inbox.client.get(f"/referrals/{rid}/{action}").status_code == 405
    assert inbox.client.get("/sign-out").status_code == 405
    assert snapshot(inbox.store.path) == before
    row = inbox.store.get_referral(TEAM, rid)
    assert row is not None and row.state is ReferralState.NEW and inbox.store.events(TEAM, rid) == []
    status_topic = topic_name(inbox.settings, "status", TEAM)
    assert read_topic(inbox.settings, status_topic, expect=1, timeout_s=5) == []

    # "Mark as opened" is a POST with the session's CSRF token: without it, nothing happens.
    forged = inbox.client.post(f"/referrals/{rid}/acknowledge", data={}, follow_redirects=False)
    assert forged.status_code == 403 and snapshot(inbox.store.path) == before
    token = inbox.csrf(f"/referrals/{rid}")
    done = inbox.client.post(
        f"/referrals/{rid}/acknowledge", data={"csrf_token": token}, follow_redirects=False
    )
    assert done.status_code == 303
    row = inbox.store.get_referral(TEAM, rid)
    assert row is not None and row.state is ReferralState.OPENED
    [status] = inbox.statuses(expect=1)
    assert (status["status"], str(status["referral_id"])) == ("opened", rid)
    # even an expired session is only refused by a GET, not deleted (the next sign-in purges it)
    after = snapshot(inbox.store.path)
    inbox.clock.now += timedelta(seconds=inbox.settings.inbox_session_max_age_s + 1)
    assert inbox.client.get("/inbox", follow_redirects=False).status_code == 303
    assert snapshot(inbox.store.path) == after


# --- copies of records the inbox already has -------------------------------------------------


def routed_copy(rid: str, offset: int, decision: str) -> Record:
    return Record(
        topic="t.referrals.out.district-fenland",
        partition=0,
        offset=offset,
        key=rid.encode(),
        value=b"\x00sealed",
        headers=[("rb-decision", decision.encode())],
        timestamp_ms=int(datetime(2026, 11, 20, 9, tzinfo=UTC).timestamp() * 1000),
    )


def test_copies_are_told_apart_counted_and_never_stored_twice(tmp_path: Path) -> None:
    rid = str(uuid.uuid4())
    first, other = str(uuid.uuid4()), str(uuid.uuid4())
    summary = ReferralSummary(rid, 1, "school-110123", ("attendance",), "routine", district="fenland")
    with InboxStore(tmp_path / "inbox.sqlite3") as store:
        assert (
            store.ingest(TEAM, replace(summary, decision_id=first), routed_copy(rid, 5, first)).outcome
            == "new"
        )
        outcomes = [
            store.ingest(TEAM, replace(summary, decision_id=decision), copy)
            for decision, copy in (
                (first, routed_copy(rid, 5, first)),  # the same offset again: a consumer restart
                (first, routed_copy(rid, 9, first)),  # the same message at another offset: a replay
                (other, routed_copy(rid, 11, other)),  # the same version under another decision
            )
        ]
        assert [(o.outcome, o.copy) for o in outcomes] == [
            ("duplicate", "redelivered"),
            ("duplicate", "replayed"),
            ("duplicate", "conflicting"),
        ]
        assert store.duplicate_counts() == {TEAM: {"redelivered": 1, "replayed": 1, "conflicting": 1}}
        assert store.record_count(TEAM) == 1 and store.record_of(TEAM, rid).offset == 5
        assert [r.referral_id for r in store.list_referrals(TEAM)] == [rid]


def test_a_replayed_copy_on_the_out_topic_is_reported_and_not_shown_twice(
    topics: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = make_pipeline(topics)
    store = make_store(topics)
    fmt = pipeline.format([TEAM])
    try:
        record = pipeline.referral(TEAM, 21)
        pipeline.produce(pipeline.routed(record, TEAM))
        first = TeamIngest(topics, TEAM, store, fmt).run(stop_when_idle=3.0)
        assert (first.new, first.duplicate) == (1, 0)

        # The attacker's replay: the router's own signed record, byte for byte, produced again.
        kept = store.record_of(TEAM, record["referral_id"])
        producer = build_producer(topics, topics.bootstrap_servers)
        try:
            producer.send(kept.topic, kept.value, kept.key, kept.headers)
            producer.flush()
        finally:
            producer.close()
        with caplog.at_level(logging.INFO, logger="referral_broker.consumers.inbox.ingest"):
            again = TeamIngest(topics, TEAM, store, fmt).run(stop_when_idle=3.0)
        assert (again.new, again.updated, again.duplicate, again.copies) == (0, 0, 1, {"replayed": 1})
        assert [r.referral_id for r in store.list_referrals(TEAM)] == [record["referral_id"]]
        assert store.record_count(TEAM) == 1
        [line] = [r for r in caplog.records if r.getMessage().startswith("copy of a stored record")]
        context = line.context  # type: ignore[attr-defined]
        assert line.levelno == logging.WARNING
        assert (context["reason"], context["referral_id"], context["team"]) == (
            "replayed",
            record["referral_id"],
            TEAM,
        )
        assert record["child"]["family_name"] not in json.dumps(context)
    finally:
        store.close()
    shown = run_inbox_cli(topics, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    team = json.loads(shown.stdout)["teams"][TEAM]
    assert team["referrals"] == {"new": 1}
    assert team["copies_not_stored"] == {"redelivered": 0, "replayed": 1, "conflicting": 0}
    human = run_inbox_cli(topics, "status").stdout
    assert "replayed 1" in human and "No sign-in lockouts in force." in human
