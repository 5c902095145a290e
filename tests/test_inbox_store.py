"""The inbox store on a real SQLite file: idempotent ingest, versions, filters and sorting,
transitions recorded only when the state machine allows them, the status outbox, accounts and
sessions. Record bytes here are opaque to the store (it never interprets them); the sealed
format itself is exercised in test_inbox_ingest.py."""

from __future__ import annotations

import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from referral_broker.cluster.clients import Record
from referral_broker.consumers.inbox.auth import add_user
from referral_broker.consumers.inbox.records import (
    ReferralSummary,
    WithheldField,
)
from referral_broker.consumers.inbox.states import Action, InvalidTransitionError, ReferralState, Transition
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.consumers.inbox.store_database import SCHEMA_VERSION
from referral_broker.consumers.inbox.store_referrals import ReferralRow
from referral_broker.errors import UnknownUserError
from referral_broker.sealing import OutgoingMessage

TEAM = "district-fenland"
OTHER = "district-cambridge"
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def summary(rid: str, version: int = 1, **kw: object) -> ReferralSummary:
    base: dict[str, object] = {
        "referral_id": rid,
        "version": version,
        "referrer": "schools",
        "referrer_organisation": "Fenland Primary",
        "concern_types": ("attendance",),
        "priority": "routine",
        "district": "fenland",
    }
    base.update(kw)
    return ReferralSummary(**base)  # type: ignore[arg-type]


def record(rid: str, at: datetime, offset: int = 0, value: bytes = b"\x00sealed\xff") -> Record:
    return Record(
        topic="t.referrals.out.district-fenland",
        partition=0,
        offset=offset,
        key=rid.encode(),
        value=value,
        headers=[("rb-format", b"1"), ("rb-dek", bytes(range(40)))],
        timestamp_ms=int(at.timestamp() * 1000),
    )


def opaque_status(decided: Transition, referral: ReferralRow) -> OutgoingMessage:
    """The store keeps whatever the encoder returns; it never looks inside."""
    return OutgoingMessage(
        "referrals.status.district-fenland",
        referral.referral_id.encode(),
        f"{decided.action}".encode(),
        [("rb-kind", b"status")],
    )


@pytest.fixture
def store(tmp_path: Path) -> InboxStore:
    s = InboxStore(tmp_path / "inbox.sqlite3")
    yield s
    s.close()


def test_database_is_wal_and_private(store: InboxStore) -> None:
    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert store.path.stat().st_mode & 0o077 == 0


def test_redelivered_version_is_recognised_and_shown_once(store: InboxStore) -> None:
    rid = str(uuid.uuid4())
    first = store.ingest(TEAM, summary(rid), record(rid, T0, offset=5))
    again = store.ingest(TEAM, summary(rid), record(rid, T0, offset=9))
    assert (first.outcome, again.outcome) == ("new", "duplicate")
    assert [r.referral_id for r in store.list_referrals(TEAM)] == [rid]
    assert store.record_count(TEAM) == 1
    assert store.record_of(TEAM, rid).offset == 5  # the first delivery is the one kept


def test_raw_record_is_kept_byte_for_byte(store: InboxStore) -> None:
    rid = str(uuid.uuid4())
    raw = record(rid, T0, value=bytes(range(256)))
    store.ingest(TEAM, summary(rid), raw)
    kept = store.record_of(TEAM, rid)
    assert (kept.key, kept.value, kept.headers) == (raw.key, raw.value, raw.headers)
    assert kept.timestamp_ms == raw.timestamp_ms


def test_same_id_in_two_teams_is_two_inbox_entries(store: InboxStore) -> None:
    rid = str(uuid.uuid4())
    store.ingest(TEAM, summary(rid), record(rid, T0))
    store.ingest(OTHER, summary(rid), record(rid, T0))
    assert store.get_referral(TEAM, rid) is not None and store.get_referral(OTHER, rid) is not None
    assert sorted(store.teams_holding(rid)) == sorted([TEAM, OTHER])
    assert store.get_referral(TEAM, str(uuid.uuid4())) is None


def test_newer_version_updates_and_answers_a_request(store: InboxStore) -> None:
    rid = str(uuid.uuid4())
    store.ingest(TEAM, summary(rid, 1), record(rid, T0))
    store.apply(TEAM, rid, Action.OPEN, actor="amy", at=T0, encode_status=opaque_status)
    store.apply(TEAM, rid, Action.REQUEST_INFORMATION, actor="amy", at=T0, encode_status=opaque_status)
    later = T0 + timedelta(days=2)
    result = store.ingest(TEAM, summary(rid, 2, priority="urgent"), record(rid, later, offset=1))
    assert result.outcome == "updated" and result.transition is not None
    row = store.get_referral(TEAM, rid)
    assert row is not None
    assert (row.version, row.state, row.priority) == (2, ReferralState.NEW, "urgent")
    assert row.received_at == T0 and row.updated_at == later  # age counts from the first arrival
    assert store.record_of(TEAM, rid, 1).value == store.record_of(TEAM, rid, 2).value
    assert store.events(TEAM, rid)[-1].action is Action.RECEIVE_UPDATE
    assert not store.events(TEAM, rid)[-1].notify


def test_older_version_arriving_late_is_kept_but_not_current(store: InboxStore) -> None:
    rid = str(uuid.uuid4())
    store.ingest(TEAM, summary(rid, 3), record(rid, T0))
    assert store.ingest(TEAM, summary(rid, 2), record(rid, T0, offset=1)).outcome == "older"
    row = store.get_referral(TEAM, rid)
    assert row is not None and row.version == 3
    assert store.record_count(TEAM) == 2


def test_filters_and_sorting(store: InboxStore) -> None:
    ids = [str(uuid.uuid4()) for _ in range(4)]
    specs = [
        (ids[0], "routine", "schools", ("attendance",), T0),
        (ids[1], "urgent", "police", ("domestic_abuse", "attendance"), T0 + timedelta(hours=1)),
        (ids[2], "high", "health", ("mental_health",), T0 + timedelta(hours=2)),
        (ids[3], "urgent", "schools", ("mental_health",), T0 + timedelta(hours=3)),
    ]
    for rid, priority, referrer, concerns, at in specs:
        store.ingest(
            TEAM,
            summary(rid, priority=priority, referrer=referrer, concern_types=concerns),
            record(rid, at),
        )
    ids_of = lambda rows: [r.referral_id for r in rows]
    assert ids_of(store.list_referrals(TEAM)) == ids
    assert ids_of(store.list_referrals(TEAM, newest_first=True)) == ids[::-1]
    assert ids_of(store.list_referrals(TEAM, sort="priority")) == [ids[1], ids[3], ids[2], ids[0]]
    assert ids_of(store.list_referrals(TEAM, sort="referrer")) == [ids[2], ids[1], ids[0], ids[3]]
    assert ids_of(store.list_referrals(TEAM, priority="urgent")) == [ids[1], ids[3]]
    assert ids_of(store.list_referrals(TEAM, concern_type="attendance")) == [ids[0], ids[1]]
    assert ids_of(store.list_referrals(TEAM, referrer="schools", concern_type="mental_health")) == [ids[3]]
    assert store.list_referrals(OTHER) == []
    choices = store.filter_choices(TEAM)
    assert choices["concern_type"] == ["attendance", "domestic_abuse", "mental_health"]
    assert choices["priority"] == ["high", "routine", "urgent"]
    with pytest.raises(ValueError):
        store.list_referrals(TEAM, sort="value; DROP TABLE referrals")


def test_withheld_fields_travel_with_the_summary(store: InboxStore) -> None:
    rid = str(uuid.uuid4())
    withheld = (WithheldField("identifiers.nhs_number", "not granted to this recipient (default deny)"),)
    store.ingest(TEAM, summary(rid, withheld=withheld), record(rid, T0))
    row = store.get_referral(TEAM, rid)
    assert row is not None and row.withheld == withheld


def test_refused_transition_stores_nothing(store: InboxStore) -> None:
    rid = str(uuid.uuid4())
    store.ingest(TEAM, summary(rid), record(rid, T0))
    with pytest.raises(InvalidTransitionError):
        store.apply(TEAM, rid, Action.CLOSE, actor="amy", at=T0, encode_status=opaque_status)
    row = store.get_referral(TEAM, rid)
    assert row is not None and row.state is ReferralState.NEW
    assert store.events(TEAM, rid) == [] and store.pending_status() == []


def test_status_outbox_holds_the_encoded_message_until_published(store: InboxStore) -> None:
    rid = str(uuid.uuid4())
    store.ingest(TEAM, summary(rid), record(rid, T0))
    store.apply(TEAM, rid, Action.OPEN, actor="amy", at=T0, encode_status=opaque_status)
    store.apply(TEAM, rid, Action.ACCEPT, actor="amy", at=T0, encode_status=opaque_status)
    pending = store.pending_status(TEAM)
    assert [e.action for e in pending] == [Action.OPEN, Action.ACCEPT]
    assert pending[1].status_record == OutgoingMessage(
        "referrals.status.district-fenland", rid.encode(), b"accept", [("rb-kind", b"status")]
    )
    store.mark_published([pending[0].id], T0)
    assert [e.action for e in store.pending_status()] == [Action.ACCEPT]
    assert store.pending_status(OTHER) == []


def test_allocation_needs_an_active_member_of_the_same_team(store: InboxStore) -> None:
    rid = str(uuid.uuid4())
    store.ingest(TEAM, summary(rid), record(rid, T0))
    store.apply(TEAM, rid, Action.OPEN, actor="amy", at=T0, encode_status=opaque_status)
    add_user(store, "bob", TEAM, "a long enough password", at=T0)
    add_user(store, "cat", OTHER, "a long enough password", at=T0)
    with pytest.raises(UnknownUserError):
        store.apply(
            TEAM, rid, Action.ALLOCATE, actor="amy", at=T0, encode_status=opaque_status, allocated_to="cat"
        )
    store.set_disabled("bob")
    with pytest.raises(UnknownUserError):
        store.apply(
            TEAM, rid, Action.ALLOCATE, actor="amy", at=T0, encode_status=opaque_status, allocated_to="bob"
        )
    store.set_disabled("bob", False)
    decided = store.apply(
        TEAM, rid, Action.ALLOCATE, actor="amy", at=T0, encode_status=opaque_status, allocated_to="bob"
    )
    assert decided.after is ReferralState.OPENED
    row = store.get_referral(TEAM, rid)
    assert row is not None and row.allocated_to == "bob"


def test_users_and_sessions(store: InboxStore) -> None:
    user = add_user(store, "dee", TEAM, "correct horse battery", at=T0, role="Family worker")
    assert user.password_hash.startswith("$argon2id$") and "correct" not in user.password_hash
    assert [u.username for u in store.list_users(TEAM)] == ["dee"]
    session = store.create_session("dee", at=T0)
    assert store.get_session(session.id) == session
    store.set_disabled("dee")
    assert store.get_session(session.id) is None  # disabling ends sessions
    other = store.create_session("dee", at=T0)
    assert store.purge_sessions(T0 + timedelta(seconds=1)) == 1
    assert store.get_session(other.id) is None


def test_secret_is_made_once_and_kept(tmp_path: Path) -> None:
    with InboxStore(tmp_path / "a.sqlite3") as first:
        secret = first.secret_key()
        assert secret == first.secret_key() and len(secret) >= 48
    with InboxStore(tmp_path / "a.sqlite3") as again:
        assert again.secret_key() == secret


def test_a_version_1_database_gains_the_status_topic(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    InboxStore(path).close()
    db = sqlite3.connect(path)
    # what a version 1 inbox left: no status_topic column, schema_version 1
    db.executescript(
        "ALTER TABLE events DROP COLUMN status_topic; UPDATE meta SET value = '1' WHERE key = 'schema_version';"
    )
    db.commit()
    db.close()
    with InboxStore(path):
        pass
    db = sqlite3.connect(path)
    columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
    version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    db.close()
    assert "status_topic" in columns
    assert version == str(SCHEMA_VERSION)


def test_a_version_2_database_gains_creation_time_due_date_and_sealed_text(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite3"
    InboxStore(path).close()
    db = sqlite3.connect(path)
    db.executescript(
        "DROP INDEX referrals_by_due; DROP INDEX referrals_by_allocation;"
        " ALTER TABLE referrals DROP COLUMN created_at; ALTER TABLE referrals DROP COLUMN due_date;"
        " ALTER TABLE referrals DROP COLUMN flags; ALTER TABLE referrals DROP COLUMN decision_id;"
        " ALTER TABLE events DROP COLUMN sealed_text; UPDATE meta SET value = '2' WHERE key = 'schema_version';"
    )
    db.commit()
    db.close()
    with InboxStore(path) as store:
        rid = str(uuid.uuid4())
        store.ingest(TEAM, summary(rid), record(rid, T0))
        row = store.get_referral(TEAM, rid)
        assert row is not None and row.due_date is not None
    db = sqlite3.connect(path)
    columns = {row[1] for row in db.execute("PRAGMA table_info(referrals)")}
    version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    db.close()
    assert {"created_at", "due_date", "flags", "decision_id"} <= columns and version == str(SCHEMA_VERSION)


def test_due_dates_count_working_days_by_priority_from_config(tmp_path: Path) -> None:
    from datetime import date

    from referral_broker.config import load_settings
    from referral_broker.consumers.inbox.deadlines import DuePolicy, is_overdue

    policy = DuePolicy()  # urgent 0, high 3, routine 10 working days
    friday = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)
    saturday = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    assert policy.due_date(friday, "urgent") == date(2026, 11, 27)  # the same working day
    assert policy.due_date(saturday, "urgent") == date(2026, 11, 30)  # the next working day
    assert policy.due_date(friday, "high") == date(2026, 12, 2)  # Mon, Tue, Wed
    assert policy.due_date(friday, "routine") == date(2026, 12, 11)
    assert policy.due_date(friday, "not_given") == policy.due_date(friday, "routine")
    # late evening UTC in summer is the next day in the council's calendar
    assert policy.due_date(datetime(2026, 6, 30, 23, 30, tzinfo=UTC), "urgent") == date(2026, 7, 1)
    assert is_overdue(date(2026, 11, 27), saturday) and not is_overdue(date(2026, 11, 28), saturday)
    config = tmp_path / "rb.toml"
    config.write_text("[inbox]\ndue_urgent_working_days = 1\ndue_high_working_days = 5\n", encoding="utf-8")
    settings = load_settings(config, environ={})
    custom = DuePolicy.from_settings(settings)
    assert custom.due_date(friday, "urgent") == date(2026, 11, 30)
    assert custom.due_date(friday, "high") == date(2026, 12, 4)
    assert custom.due_date(friday, "routine") == date(2026, 12, 11)  # the default kept
    # the store dates a referral at receipt with the policy it is given
    with InboxStore(tmp_path / "due.sqlite3") as store:
        store.due_policy = custom
        rid = str(uuid.uuid4())
        store.ingest(TEAM, summary(rid, priority="urgent"), record(rid, friday))
        row = store.get_referral(TEAM, rid)
        assert row is not None and row.due_date == date(2026, 11, 30)
        assert row.overdue(datetime(2026, 12, 1, 9, 0, tzinfo=UTC)) and not row.overdue(friday)
