"""The referral side of the inbox store: routed records, the referral list, and the events
(every decided transition, and the outbox of sealed status messages).

Apart from the users and sessions (:mod:`store_users`) because this is the half that ingest,
the referral pages and the outbound publisher work on. It never holds an opened (decrypted)
value: the sealed record is opened in memory by the web view. Every state change goes through
:func:`consumers.inbox.states.transition` inside one ``BEGIN IMMEDIATE`` transaction, so two
members acting at once cannot both win.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from referral_broker.consumers.inbox.deadlines import DuePolicy, local_date
from referral_broker.consumers.inbox.records import (
    OutgoingMessage,
    Record,
    ReferralSummary,
    WithheldField,
    headers_from_json,
    headers_to_json,
)
from referral_broker.consumers.inbox.states import (
    FINISHED,
    LIVE,
    UNDECIDED,
    Action,
    ReferralState,
    Transition,
    transition,
)
from referral_broker.consumers.inbox.store_database import StoreDatabase, parse_time, utc
from referral_broker.errors import UnknownReferralError, UnknownUserError

# Priorities sort most urgent first; unknown values after the known ones, alphabetically.
PRIORITY_ORDER = ("immediate", "urgent", "high", "medium", "normal", "routine", "low")

# (the decided transition, the referral as it was) -> the sealed status message for it.
StatusEncoder = Callable[["Transition", "ReferralRow"], OutgoingMessage]


@dataclass(frozen=True)
class ReferralRow:
    team: str
    referral_id: str
    version: int
    received_at: datetime
    updated_at: datetime
    referrer: str
    referrer_organisation: str | None
    concern_types: tuple[str, ...]
    priority: str
    district: str | None
    withheld: tuple[WithheldField, ...]
    no_onward: tuple[str, ...]
    state: ReferralState
    allocated_to: str | None
    created_at: datetime | None = None
    due_date: date | None = None
    flags: tuple[str, ...] = ()
    decision_id: str | None = None

    @property
    def made_at(self) -> datetime:
        """When the referrer made the referral (its ``created_at``; receipt for old rows)."""
        return self.created_at or self.received_at

    @property
    def undecided(self) -> bool:
        return self.state in UNDECIDED

    def overdue(self, now: datetime) -> bool:
        return self.undecided and self.due_date is not None and self.due_date < local_date(now)


# The inbox's views: which referrals each holds ("mine" also needs the member).
VIEWS = ("decision", "mine", "unallocated", "waiting", "closed", "all")

# Sortable columns -> the SQL that orders by them (ascending); every order ends with the id.
_RANK = "CASE priority WHEN 'immediate' THEN 0 WHEN 'urgent' THEN 1 WHEN 'high' THEN 2 WHEN 'medium' THEN 3 WHEN 'normal' THEN 4 WHEN 'routine' THEN 5 WHEN 'low' THEN 6 ELSE 7 END"
_MADE = "COALESCE(created_at, received_at)"
_UNDECIDED_SQL = "state IN ('new', 'opened')"
_OVERDUE_SQL = f"({_UNDECIDED_SQL} AND due_date IS NOT NULL AND due_date < :today)"
SORT_COLUMNS = {
    # overdue first (the most urgent of them first), then the undecided by due date, then the rest
    "due": [
        f"CASE WHEN {_OVERDUE_SQL} THEN 0 WHEN {_UNDECIDED_SQL} THEN 1 ELSE 2 END",
        f"CASE WHEN {_OVERDUE_SQL} THEN {_RANK} ELSE 0 END",
        "due_date IS NULL",
        "due_date",
        _RANK,
        _MADE,
    ],
    "made": [_MADE],
    "priority": [_RANK, _MADE],
    "referrer": ["COALESCE(referrer_organisation, referrer)", _MADE],
    "status": ["state", _MADE],
    "allocated": ["allocated_to IS NULL", "allocated_to", _MADE],
}


@dataclass(frozen=True)
class ListQuery:
    """One page of one view of a team's referrals, as the URL asks for it."""

    team: str
    view: str = "decision"
    member: str | None = None
    priority: str | None = None
    concern_type: str | None = None
    referrer: str | None = None
    id_prefix: str | None = None
    sort: str = "due"
    descending: bool = False


@dataclass(frozen=True)
class EventRow:
    id: int
    team: str
    referral_id: str
    version: int
    at: datetime
    actor: str
    action: Action
    state_before: ReferralState
    state_after: ReferralState
    reason_code: str | None
    allocated_to: str | None
    notify: bool
    status_record: OutgoingMessage | None
    published_at: datetime | None
    sealed_text: bytes | None = None
    status_id: str | None = None
    delivered_at: datetime | None = None


# What a copy of a record the inbox already has is (the ``duplicates`` table counts each kind):
REDELIVERED = "redelivered"  # the same topic, partition and offset again (a consumer restart)
REPLAYED = "replayed"  # the same referral id, version and decision id at another offset
CONFLICTING = "conflicting"  # the same referral id and version under another decision id
COPY_KINDS = (REDELIVERED, REPLAYED, CONFLICTING)
DECISION_HEADER = "rb-decision"  # identity.H_DECISION: the router's audit decision id


SHREDDED = "shredded"  # a copy of a referral whose case was shredded: never stored again


@dataclass(frozen=True)
class Tombstone:
    """What the inbox keeps of a shredded case: that it was shredded, when, by whom."""

    team: str
    referral_id: str
    shredded_at: datetime
    shredded_by: str
    case_key_id: str | None


@dataclass(frozen=True)
class IngestResult:
    """What storing one record did: ``new`` referral, ``updated`` (a newer version),
    ``older`` (an older version arriving late: kept, not shown) or ``duplicate`` (a copy of
    one the inbox has: ``copy`` says which kind, nothing is stored or shown again; ``shredded``
    when the case was shredded here)."""

    outcome: str
    referral_id: str
    version: int
    transition: Transition | None = None
    copy: str | None = None


class ReferralTables(StoreDatabase):
    """The records, referrals and events tables (see :class:`consumers.inbox.store.InboxStore`).

    ``due_policy`` sets each referral's due date at receipt; the inbox sets it from settings.
    """

    due_policy: DuePolicy = DuePolicy()

    def ingest(self, team: str, summary: ReferralSummary, record: Record) -> IngestResult:
        """Store one routed record. A copy of one already stored (the same referral id and
        version) changes nothing but the ``duplicates`` count of its kind: re-delivered (same
        offset), replayed (same decision id, another offset) or conflicting (another decision
        id: not the router's message for this version, whatever its signature)."""
        received = utc(datetime.fromtimestamp(record.timestamp_ms / 1000, UTC))
        with self._write() as db:
            if db.execute(
                "SELECT 1 FROM shredded WHERE team = ? AND referral_id = ?", (team, summary.referral_id)
            ).fetchone():
                # a shredded case stays shredded: a late or replayed copy is not stored again
                return IngestResult("duplicate", summary.referral_id, summary.version, copy=SHREDDED)
            cur = db.execute(
                'INSERT INTO records (team, referral_id, version, received_at, topic, partition, "offset",'
                " key, headers, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (
                    team,
                    summary.referral_id,
                    summary.version,
                    received,
                    record.topic,
                    record.partition,
                    record.offset,
                    record.key,
                    headers_to_json(record.headers),
                    record.value,
                ),
            )
            if cur.rowcount == 0:
                kind = self._count_copy(db, team, summary, record)
                return IngestResult("duplicate", summary.referral_id, summary.version, copy=kind)
            current = db.execute(
                "SELECT version, state, received_at FROM referrals WHERE team = ? AND referral_id = ?",
                (team, summary.referral_id),
            ).fetchone()
            first_received = parse_time(current["received_at"]) if current else parse_time(received)
            due = self.due_policy.due_date(first_received, summary.priority).isoformat()
            fields = (
                summary.referrer,
                summary.referrer_organisation,
                json.dumps(list(summary.concern_types)),
                summary.priority,
                summary.district,
                json.dumps([[w.path, w.reason] for w in summary.withheld]),
                json.dumps(list(summary.no_onward)),
                utc(summary.created_at) if summary.created_at else None,
                due,
                json.dumps(list(summary.flags)),
                summary.decision_id,
            )
            if current is None:
                db.execute(
                    "INSERT INTO referrals (team, referral_id, version, received_at, updated_at, referrer,"
                    " referrer_organisation, concern_types, priority, district, withheld, no_onward,"
                    " created_at, due_date, flags, decision_id, state, allocated_to)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                    (team, summary.referral_id, summary.version, received, received, *fields, "new"),
                )
                return IngestResult("new", summary.referral_id, summary.version)
            if summary.version < current["version"]:
                return IngestResult("older", summary.referral_id, summary.version)
            decided = transition(
                ReferralState(current["state"]), Action.RECEIVE_UPDATE, at=parse_time(received)
            )
            db.execute(
                "UPDATE referrals SET version = ?, updated_at = ?, referrer = ?, referrer_organisation = ?,"
                " concern_types = ?, priority = ?, district = ?, withheld = ?, no_onward = ?,"
                " created_at = ?, due_date = ?, flags = ?, decision_id = ?, state = ?"
                " WHERE team = ? AND referral_id = ?",
                (summary.version, received, *fields, decided.after.value, team, summary.referral_id),
            )
            self._insert_event(db, team, summary.referral_id, summary.version, "referrer", decided)
            return IngestResult("updated", summary.referral_id, summary.version, decided)

    @staticmethod
    def _count_copy(db: sqlite3.Connection, team: str, summary: ReferralSummary, record: Record) -> str:
        kept = db.execute(
            'SELECT topic, partition, "offset", headers FROM records'
            " WHERE team = ? AND referral_id = ? AND version = ?",
            (team, summary.referral_id, summary.version),
        ).fetchone()
        decisions = [
            v.decode("utf-8", "replace")
            for k, v in headers_from_json(kept["headers"])
            if k == DECISION_HEADER
        ]
        if (decisions[0] if decisions else None) != summary.decision_id:
            kind = CONFLICTING
        elif (kept["topic"], kept["partition"], kept["offset"]) == (
            record.topic,
            record.partition,
            record.offset,
        ):
            kind = REDELIVERED
        else:
            kind = REPLAYED
        db.execute(
            "INSERT INTO duplicates (team, kind, count, last_seen_at, last_referral_id, last_version)"
            " VALUES (?, ?, 1, ?, ?, ?) ON CONFLICT (team, kind) DO UPDATE SET count = count + 1,"
            " last_seen_at = excluded.last_seen_at, last_referral_id = excluded.last_referral_id,"
            " last_version = excluded.last_version",
            (team, kind, utc(datetime.now(UTC)), summary.referral_id, summary.version),
        )
        return kind

    def duplicate_counts(self, team: str | None = None) -> dict[str, dict[str, int]]:
        """Team -> copy kind -> how many copies were recognised and not stored (every kind named)."""
        if team is None:
            rows = self._read("SELECT team, kind, count FROM duplicates")
        else:
            rows = self._read("SELECT team, kind, count FROM duplicates WHERE team = ?", [team])
        counts: dict[str, dict[str, int]] = {}
        for r in rows:
            counts.setdefault(r["team"], dict.fromkeys(COPY_KINDS, 0))[r["kind"]] = int(r["count"])
        return counts

    # --- reading ----------------------------------------------------------------------------

    @staticmethod
    def _referral(row: sqlite3.Row) -> ReferralRow:
        return ReferralRow(
            team=row["team"],
            referral_id=row["referral_id"],
            version=row["version"],
            received_at=parse_time(row["received_at"]),
            updated_at=parse_time(row["updated_at"]),
            referrer=row["referrer"],
            referrer_organisation=row["referrer_organisation"],
            concern_types=tuple(json.loads(row["concern_types"])),
            priority=row["priority"],
            district=row["district"],
            withheld=tuple(WithheldField(p, r) for p, r in json.loads(row["withheld"])),
            no_onward=tuple(json.loads(row["no_onward"])),
            state=ReferralState(row["state"]),
            allocated_to=row["allocated_to"],
            created_at=parse_time(row["created_at"]) if row["created_at"] else None,
            due_date=date.fromisoformat(row["due_date"]) if row["due_date"] else None,
            flags=tuple(json.loads(row["flags"] or "[]")),
            decision_id=row["decision_id"],
        )

    @staticmethod
    def _where(q: ListQuery) -> tuple[list[str], dict[str, Any]]:
        where, params = ["team = :team"], {"team": q.team}
        states = {
            "decision": UNDECIDED,
            "mine": LIVE,
            "unallocated": LIVE,
            "waiting": (ReferralState.MORE_INFORMATION_NEEDED,),
            "closed": FINISHED,
            "all": (),
        }.get(q.view)
        if states is None:
            raise ValueError(f"unknown view '{q.view}'")
        if states:
            where.append(f"state IN ({', '.join(repr(s.value) for s in states)})")
        if q.view == "mine":
            where.append("allocated_to = :member")
            params["member"] = q.member or ""
        if q.view == "unallocated":
            where.append("allocated_to IS NULL")
        for column in ("priority", "referrer"):
            if getattr(q, column):
                where.append(f"{column} = :{column}")
                params[column] = getattr(q, column)
        if q.concern_type:
            where.append("EXISTS (SELECT 1 FROM json_each(concern_types) WHERE value = :concern)")
            params["concern"] = q.concern_type
        if q.id_prefix:
            where.append("referral_id LIKE :id_prefix")
            params["id_prefix"] = "".join(c for c in q.id_prefix.lower() if c in "0123456789abcdef-") + "%"
        return where, params

    def query_referrals(
        self, q: ListQuery, *, today: date, limit: int | None = None, offset: int = 0
    ) -> list[ReferralRow]:
        """The referrals of ``q``'s view and filters in its order: one page (``limit``,
        ``offset``), or all of them; ``today`` (the council's date) decides what is overdue."""
        if q.sort not in SORT_COLUMNS:
            raise ValueError(f"unknown sort '{q.sort}'")
        where, params = self._where(q)
        params["today"] = today.isoformat()
        direction = " DESC" if q.descending else ""
        order = ", ".join(f"{c}{direction}" for c in SORT_COLUMNS[q.sort])
        sql = f"SELECT * FROM referrals WHERE {' AND '.join(where)} ORDER BY {order}, referral_id"
        if limit is not None:
            sql += " LIMIT :limit OFFSET :offset"
            params.update(limit=limit, offset=offset)
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [self._referral(r) for r in rows]

    def count_referrals(self, q: ListQuery) -> int:
        where, params = self._where(q)
        with self._lock:
            return int(
                self._db.execute(
                    f"SELECT count(*) FROM referrals WHERE {' AND '.join(where)}", params
                ).fetchone()[0]
            )

    def view_counts(self, team: str, member: str, today: date) -> dict[str, int]:
        """How many referrals each view holds, and how many undecided ones are overdue."""
        live = "state IN ('new', 'opened', 'accepted', 'more_information_needed')"
        sql = (
            f"SELECT sum({_UNDECIDED_SQL}) AS decision,"
            f" sum({live} AND allocated_to = :member) AS mine,"
            f" sum({live} AND allocated_to IS NULL) AS unallocated,"
            " sum(state = 'more_information_needed') AS waiting,"
            " sum(state IN ('declined', 'closed')) AS closed, count(*) AS \"all\","
            f" sum({_OVERDUE_SQL}) AS overdue,"
            f" sum({_UNDECIDED_SQL} AND priority = 'urgent' AND state = 'new') AS new_urgent"
            " FROM referrals WHERE team = :team"
        )
        with self._lock:
            row = self._db.execute(
                sql, {"team": team, "member": member, "today": today.isoformat()}
            ).fetchone()
        return {k: int(row[k] or 0) for k in row.keys()}  # noqa: SIM118 (a Row iterates values)

    def list_referrals(
        self,
        team: str,
        *,
        states: Sequence[ReferralState] | None = None,
        priority: str | None = None,
        concern_type: str | None = None,
        referrer: str | None = None,
        allocated_to: str | None = None,
        sort: str = "age",
        newest_first: bool = False,
    ) -> list[ReferralRow]:
        """The team's referrals, filtered; ``sort`` is ``age``, ``priority`` or ``referrer``."""
        where, params = ["team = ?"], [team]
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params += [ReferralState(s).value for s in states]
        for column, value in (("priority", priority), ("referrer", referrer), ("allocated_to", allocated_to)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        if concern_type:
            where.append("EXISTS (SELECT 1 FROM json_each(concern_types) WHERE value = ?)")
            params.append(concern_type)
        rank = "CASE priority " + " ".join(f"WHEN '{p}' THEN {i}" for i, p in enumerate(PRIORITY_ORDER))
        rank += f" ELSE {len(PRIORITY_ORDER)} END"
        age = "received_at DESC" if newest_first else "received_at ASC"
        order = {
            "age": age,
            "priority": f"{rank}, priority, received_at ASC",
            "referrer": f"referrer, {age}",
        }.get(sort)
        if order is None:
            raise ValueError(f"unknown sort '{sort}'")
        sql = f"SELECT * FROM referrals WHERE {' AND '.join(where)} ORDER BY {order}, referral_id"
        return [self._referral(r) for r in self._read(sql, params)]

    def counts_by_state(self, team: str) -> dict[ReferralState, int]:
        rows = self._read("SELECT state, count(*) AS n FROM referrals WHERE team = ? GROUP BY state", [team])
        counts = dict.fromkeys(ReferralState, 0)
        counts.update({ReferralState(r["state"]): r["n"] for r in rows})
        return counts

    def state_counts(self) -> dict[str, dict[str, int]]:
        """Team -> state -> referrals, for every team the database holds (``inbox status``)."""
        rows = self._read(
            "SELECT team, state, count(*) AS n FROM referrals GROUP BY team, state ORDER BY team"
        )
        counts: dict[str, dict[str, int]] = {}
        for r in rows:
            counts.setdefault(r["team"], {})[r["state"]] = int(r["n"])
        return counts

    def filter_choices(self, team: str) -> dict[str, list[str]]:
        """The values present in a team's inbox, for the filter drop-downs."""
        pick = lambda sql: [r[0] for r in self._read(sql, [team])]
        return {
            "priority": pick("SELECT DISTINCT priority FROM referrals WHERE team = ? ORDER BY 1"),
            "referrer": pick("SELECT DISTINCT referrer FROM referrals WHERE team = ? ORDER BY 1"),
            "concern_type": pick(
                "SELECT DISTINCT j.value FROM referrals, json_each(referrals.concern_types) AS j"
                " WHERE team = ? ORDER BY 1"
            ),
        }

    def get_referral(self, team: str, referral_id: str) -> ReferralRow | None:
        rows = self._read("SELECT * FROM referrals WHERE team = ? AND referral_id = ?", [team, referral_id])
        return self._referral(rows[0]) if rows else None

    def teams_holding(self, referral_id: str) -> list[str]:
        """Which teams' inboxes hold this id (to audit a cross-team attempt, never to show it)."""
        return [r[0] for r in self._read("SELECT team FROM referrals WHERE referral_id = ?", [referral_id])]

    def record_of(self, team: str, referral_id: str, version: int | None = None) -> Record:
        """The raw sealed record of the given (or current) version."""
        if version is None:
            row = self.get_referral(team, referral_id)
            if row is None:
                raise UnknownReferralError(f"no referral {referral_id} in the inbox of {team}")
            version = row.version
        rows = self._read(
            'SELECT topic, partition, "offset", key, headers, value, received_at FROM records'
            " WHERE team = ? AND referral_id = ? AND version = ?",
            [team, referral_id, version],
        )
        if not rows:
            raise UnknownReferralError(f"no version {version} of referral {referral_id} in {team}")
        r = rows[0]
        return Record(
            topic=r["topic"],
            partition=r["partition"],
            offset=r["offset"],
            key=r["key"],
            value=r["value"],
            headers=headers_from_json(r["headers"]),
            timestamp_ms=int(parse_time(r["received_at"]).timestamp() * 1000),
        )

    def record_count(self, team: str | None = None) -> int:
        if team is None:
            return int(self._read("SELECT count(*) FROM records")[0][0])
        return int(self._read("SELECT count(*) FROM records WHERE team = ?", [team])[0][0])

    # --- transitions ------------------------------------------------------------------------

    @staticmethod
    def _insert_event(
        db: sqlite3.Connection,
        team: str,
        referral_id: str,
        version: int,
        actor: str,
        decided: Transition,
        reason_code: str | None = None,
        allocated_to: str | None = None,
        status: OutgoingMessage | None = None,
        sealed_text: bytes | None = None,
        status_id: str | None = None,
    ) -> int:
        cur = db.execute(
            "INSERT INTO events (team, referral_id, version, at, actor, action, state_before, state_after,"
            " reason_code, allocated_to, notify, status_key, status_headers, status_value, published_at,"
            " status_topic, sealed_text, status_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?)",
            (
                team,
                referral_id,
                version,
                utc(decided.at),
                actor,
                decided.action.value,
                decided.before.value,
                decided.after.value,
                reason_code,
                allocated_to,
                int(status is not None),
                status.key if status else None,
                headers_to_json(status.headers) if status else None,
                status.value if status else None,
                status.topic if status else None,
                sealed_text,
                status_id if status else None,
            ),
        )
        return int(cur.lastrowid or 0)

    def apply(
        self,
        team: str,
        referral_id: str,
        action: Action,
        *,
        actor: str,
        at: datetime,
        encode_status: StatusEncoder,
        reason_code: str | None = None,
        allocated_to: str | None = None,
        sealed_text: bytes | None = None,
        status_id: str | None = None,
    ) -> Transition:
        """Decide and record ``action`` atomically, with its sealed status message in the outbox;
        raise (storing nothing) when it is refused. ``sealed_text`` (a case note, the information
        recorded, or the words sent to the referrer) is already sealed for the team.

        ``reason_code`` is a code from a closed list (free text travels only sealed, inside the
        status message ``encode_status`` builds); ``allocated_to`` names an active member of the
        same team for ``allocate``.
        """
        with self._write() as db:
            row = db.execute(
                "SELECT * FROM referrals WHERE team = ? AND referral_id = ?", (team, referral_id)
            ).fetchone()
            if row is None:
                raise UnknownReferralError(f"no referral {referral_id} in the inbox of {team}")
            referral = self._referral(row)
            decided = transition(referral.state, action, at=at)
            if decided.action is Action.ALLOCATE:
                if not allocated_to:
                    raise ValueError("allocate needs a worker")
                member = db.execute(
                    "SELECT 1 FROM users WHERE username = ? AND team = ? AND disabled = 0",
                    (allocated_to, team),
                ).fetchone()
                if member is None:
                    raise UnknownUserError(f"no active member '{allocated_to}' in {team}")
                db.execute(
                    "UPDATE referrals SET allocated_to = ? WHERE team = ? AND referral_id = ?",
                    (allocated_to, team, referral_id),
                )
            db.execute(
                "UPDATE referrals SET state = ? WHERE team = ? AND referral_id = ?",
                (decided.after.value, team, referral_id),
            )
            status = encode_status(decided, referral) if decided.notifies_referrer else None
            self._insert_event(
                db,
                team,
                referral_id,
                referral.version,
                actor,
                decided,
                reason_code,
                allocated_to if decided.action is Action.ALLOCATE else None,
                status,
                sealed_text,
                status_id,
            )
            return decided

    @staticmethod
    def _event(r: sqlite3.Row) -> EventRow:
        status = None
        if r["status_value"] is not None:
            status = OutgoingMessage(
                r["status_topic"] or "",
                r["status_key"],
                r["status_value"],
                headers_from_json(r["status_headers"]),
            )
        return EventRow(
            id=r["id"],
            team=r["team"],
            referral_id=r["referral_id"],
            version=r["version"],
            at=parse_time(r["at"]),
            actor=r["actor"],
            action=Action(r["action"]),
            state_before=ReferralState(r["state_before"]),
            state_after=ReferralState(r["state_after"]),
            reason_code=r["reason_code"],
            allocated_to=r["allocated_to"],
            notify=bool(r["notify"]),
            status_record=status,
            published_at=parse_time(r["published_at"]) if r["published_at"] else None,
            sealed_text=r["sealed_text"],
            status_id=r["status_id"],
            delivered_at=parse_time(r["delivered_at"]) if r["delivered_at"] else None,
        )

    def events(self, team: str, referral_id: str) -> list[EventRow]:
        rows = self._read(
            "SELECT * FROM events WHERE team = ? AND referral_id = ? ORDER BY id", [team, referral_id]
        )
        return [self._event(r) for r in rows]

    def pending_status(self, team: str | None = None, limit: int = 500) -> list[EventRow]:
        """The outbox: status messages Kafka has not confirmed yet, oldest first."""
        sql = "SELECT * FROM events WHERE notify = 1 AND published_at IS NULL"
        params: list[Any] = []
        if team is not None:
            sql += " AND team = ?"
            params.append(team)
        rows = self._read(sql + " ORDER BY id LIMIT ?", [*params, limit])
        return [self._event(r) for r in rows]

    def mark_published(self, event_ids: Sequence[int], at: datetime) -> None:
        with self._write() as db:
            db.executemany(
                "UPDATE events SET published_at = ? WHERE id = ? AND published_at IS NULL",
                [(utc(at), i) for i in event_ids],
            )

    def mark_delivered(self, teams: Sequence[str], status_id: str, at: datetime) -> bool:
        """The router delivered the status message ``status_id`` (sent by one of ``teams``) to
        the referrer; False when no such undelivered message is known."""
        with self._write() as db:
            cur = db.execute(
                f"UPDATE events SET delivered_at = ? WHERE status_id = ? AND delivered_at IS NULL"
                f" AND team IN ({', '.join('?' for _ in teams)})",
                (utc(at), status_id, *teams),
            )
            return cur.rowcount > 0

    def record_decision(self, team: str, decision: dict[str, Any]) -> bool:
        """Keep the router's audited decision to share a referral with ``team`` (idempotent)."""
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO decisions (decision_id, team, referral_id, version, purpose, ground, basis,"
                " override_reference, policy_version, decided_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (
                    str(decision["decision_id"]),
                    team,
                    str(decision["referral_id"]),
                    int(decision["version"]),
                    decision.get("purpose"),
                    str(decision.get("ground") or ""),
                    decision.get("basis"),
                    decision.get("override_reference"),
                    decision.get("policy_version"),
                    utc(decision["decided_at"]),
                ),
            )
            return cur.rowcount > 0

    # --- shredding ---------------------------------------------------------------------------

    def shred_case(
        self,
        referral_id: str,
        *,
        at: datetime,
        by: str,
        case_key_id: str | None = None,
        also_for: Sequence[str] = (),
    ) -> list[str]:
        """The case ``referral_id`` was shredded (``retention shred``): in one transaction, for
        every team holding it, delete its records, its list row, its events (their sealed texts
        and the status messages in the outbox, sealed for the hub: a decline's words) and its
        decisions, and keep a tombstone (when, by whom, the destroyed case key's id). Returns
        the teams that hold its tombstone; shredding again changes nothing (the first tombstone
        stays). ``also_for`` names teams the case was sent to that may not have stored it yet:
        they get a tombstone too, so a copy arriving later is not stored.

        Deleted content is overwritten in the file (``secure_delete``) and the write-ahead log
        is checkpointed and truncated, so no old page of the case is left behind in either."""
        with self._lock:
            self._db.execute("PRAGMA secure_delete = ON")
            try:
                teams = self._shred_rows(referral_id, at=at, by=by, case_key_id=case_key_id, also_for=also_for)
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.execute("PRAGMA secure_delete = OFF")
        return teams

    def _shred_rows(
        self, referral_id: str, *, at: datetime, by: str, case_key_id: str | None, also_for: Sequence[str]
    ) -> list[str]:
        with self._write() as db:
            teams = sorted(
                {
                    r[0]
                    for table in ("referrals", "records", "events", "decisions", "shredded")
                    for r in db.execute(f"SELECT DISTINCT team FROM {table} WHERE referral_id = ?", (referral_id,))
                }
                | set(also_for)
            )
            for table in ("records", "referrals", "events", "decisions"):
                db.execute(f"DELETE FROM {table} WHERE referral_id = ?", (referral_id,))
            db.executemany(
                "INSERT INTO shredded (team, referral_id, shredded_at, shredded_by, case_key_id)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(team, referral_id, utc(at), by, case_key_id) for team in teams],
            )
        return teams

    def tombstone(self, team: str, referral_id: str) -> Tombstone | None:
        rows = self._read("SELECT * FROM shredded WHERE team = ? AND referral_id = ?", [team, referral_id])
        return self._tombstone(rows[0]) if rows else None

    def tombstones(self, team: str) -> list[Tombstone]:
        rows = self._read("SELECT * FROM shredded WHERE team = ? ORDER BY shredded_at, referral_id", [team])
        return [self._tombstone(r) for r in rows]

    @staticmethod
    def _tombstone(r: sqlite3.Row) -> Tombstone:
        return Tombstone(
            team=r["team"],
            referral_id=r["referral_id"],
            shredded_at=parse_time(r["shredded_at"]),
            shredded_by=r["shredded_by"],
            case_key_id=r["case_key_id"],
        )

    def decision(self, team: str, decision_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM decisions WHERE team = ? AND decision_id = ?", [team, decision_id])
        if not rows:
            return None
        found = dict(rows[0])
        found["decided_at"] = parse_time(found["decided_at"])
        return found
