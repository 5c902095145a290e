"""Retention actions on a case, each one audited: shred the case key, place or lift a legal hold.

Every action writes an event to the ``audit`` topic, signed by the hub, holding ids, times and
reasons only (``retention.case_shredded``, ``retention.shred_refused``,
``retention.hold_placed``, ``retention.hold_released``). A shred is audited BEFORE the key is
destroyed: if the audit cannot be written the key is kept (no unaudited shred), and if the
destruction then fails a ``retention.shred_failed`` event follows.

After the key is gone, every copy the council sealed under it (archive, district-team copies,
statuses relayed to a district team, the inbox's records and texts) no longer opens. Some
copies were sealed by their senders for the hub alone and cannot be re-keyed: the intake copy,
the status messages on the status topics, and dead letters (the original sealed record). The
hub's own key opens those until Kafka deletes them, so :func:`shred` reports, for each, the
latest moment it can still be read (:func:`readable_windows`): shred time + the topic's
retention + its segment roll (a segment is deleted only when its newest record expires) + the
broker's retention check. The topic plan keeps these windows short and names them.

Retention that runs itself (below :func:`release`): :func:`catch_up` learns closures from the
router's hub-signed status audits and gives each closed case its due date under the rules
(:mod:`referral_broker.retention_rules`); :func:`sweep` shreds every case past it, skipping held
ones; :func:`check_plan` holds the topic plan's retention against the rules.

This module must never put a case key, a referral value or any plaintext into an audit event,
a log line or an exception; reasons are the operator's words about the hold, not case content.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from referral_broker.admin_audit import actor as admin_actor
from referral_broker.cluster.clients import Record
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, LegalHoldError, ReferralBrokerError, SealingError
from referral_broker.parties import HUB
from referral_broker.sealing.case_keys import CaseKeyStore, check_case_id
from referral_broker.sealing.timefmt import to_iso
from referral_broker.structured_log import get_logger

if TYPE_CHECKING:
    from referral_broker.retention_rules import Rules

log = get_logger(__name__)
AUDIT_KIND = "audit.retention"

# Copies of a case the council cannot re-key: (topic role, the window's name in the topic plan).
UNKEYABLE = (
    ("intake", "intake window"),
    ("status", "status window"),
    ("dlq", "dead-letter window"),
)
# Kafka deletes expired segments when it next checks (log.retention.check.interval.ms, 5 min).
RETENTION_CHECK_MS = 300_000
# A topic without segment.ms rolls its segments after log.roll.ms: 7 days by default.
DEFAULT_SEGMENT_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True)
class ReadableWindow:
    """How long copies of a shredded case on one kind of topic can still be opened by the hub."""

    role: str
    window: str
    topics: str
    retention_ms: int
    segment_ms: int
    until: str | None  # None: the topic keeps records indefinitely (retention drifted to -1)
    drift: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "window": self.window,
            "topics": self.topics,
            "retention_ms": self.retention_ms,
            "segment_ms": self.segment_ms,
            "readable_until": self.until,
            "drift": list(self.drift),
        }


def _plan_entry(role: str) -> dict[str, Any]:
    from referral_broker.cluster.topics import _load_plan_doc

    for entry in _load_plan_doc()["topic"]:
        if entry["role"] == role:
            return dict(entry)
    raise SealingError(f"the topic plan has no {role} topic")


def _live_configs(settings: Settings, bootstrap: str, names: list[str]) -> dict[str, dict[str, int]]:
    """retention.ms and segment.ms of the existing topics among ``names``, as the cluster has them."""
    from kafka.admin import ConfigResource, ConfigResourceType

    from referral_broker.cluster.topics import admin_client

    admin = admin_client(settings, bootstrap)
    try:
        existing = set(admin.list_topics())
        present = [n for n in names if n in existing]
        if not present:
            return {}
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, n) for n in present], config_filter="all"
        )
    finally:
        admin.close()
    found: dict[str, dict[str, int]] = {}
    for name, entries in described.get("topic", {}).items():
        values: dict[str, int] = {}
        for key in ("retention.ms", "segment.ms"):
            have = entries.get(key, {})
            value = have.get("value") if isinstance(have, dict) else have
            if value is not None:
                values[key] = int(value)
        found[name] = values
    return found


def readable_windows(settings: Settings, bootstrap: str, *, now: float) -> list[ReadableWindow]:
    """Until when the hub can still open copies of a case shredded at ``now`` that it cannot
    re-key: per topic role, the longest of the plan's and the cluster's retention and segment
    roll (a topic that drifted from the plan is named, and its real values count)."""
    from referral_broker.cluster.topics import plan

    specs = plan(settings.kafka_topic_profile, settings.kafka_topic_prefix)
    live = _live_configs(settings, bootstrap, [s.name for s in specs if s.role in dict(UNKEYABLE)])
    windows = []
    for role, window in UNKEYABLE:
        entry = _plan_entry(role)
        planned = (int(entry["retention_ms"]), int(entry.get("segment_ms", DEFAULT_SEGMENT_MS)))
        retention, segment = planned
        drift: list[str] = []
        for spec in (s for s in specs if s.role == role):
            have = live.get(spec.name, {})
            got = (have.get("retention.ms", planned[0]), have.get("segment.ms", planned[1]))
            if got != planned:
                drift.append(f"{spec.name}: retention.ms {got[0]}, segment.ms {got[1]}")
            retention = -1 if min(retention, got[0]) < 0 else max(retention, got[0])
            segment = max(segment, got[1])
        until = None if retention < 0 else to_iso(now + (retention + segment + RETENTION_CHECK_MS) / 1000)
        topics = settings.kafka_topic_prefix + str(entry["name"]).replace("{party}", "<organisation>")
        windows.append(ReadableWindow(role, window, topics, retention, segment, until, tuple(drift)))
    return windows


def audit(settings: Settings, bootstrap: str, event: dict[str, Any], *, now: float) -> None:
    """Sign ``event`` as the hub and append it to the ``retention`` audit chain on the audit
    topic (``audit_admin`` Avro, ``admin_audit.write_event``); returns once durable."""
    from referral_broker.admin_audit import write_event

    write_event(
        settings, bootstrap, event,
        key=str(event["case_id"]), chain="retention", kind=AUDIT_KIND, now=now,
    )


def shred(
    settings: Settings,
    bootstrap: str,
    case_id: str,
    *,
    now: float | None = None,
    rule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Destroy the case key of ``case_id`` (audited). Refuses a held, unknown or shredded case.
    ``rule``: the retention record that made a sweep shred it (its record types, due date and
    basis go into the audit event; operator shreds carry none)."""
    now = time.time() if now is None else now
    store = CaseKeyStore.open(settings.keys_dir)
    check_case_id(case_id)
    try:
        case_key_id = store.check_shreddable(case_id)
    except LegalHoldError as exc:
        audit(
            settings,
            bootstrap,
            {"type": "retention.shred_refused", "case_id": case_id, "reason": "legal hold"},
            now=now,
        )
        log.warning("shred refused", case_id=case_id, reason="legal hold")
        raise exc
    actor = admin_actor()
    audit(
        settings,
        bootstrap,
        {"type": "retention.case_shredded", "case_id": case_id, "case_key_id": case_key_id, "actor": actor}
        | (
            {
                "by_rule": {
                    k: rule.get(k) for k in ("record_types", "due", "basis", "closed_at", "rules_version")
                }
            }
            if rule is not None
            else {}
        ),
        now=now,
    )
    try:
        done = store.shred(case_id, now=now)
    except SealingError as exc:
        audit(
            settings,
            bootstrap,
            {"type": "retention.shred_failed", "case_id": case_id, "reason": type(exc).__name__},
            now=now,
        )
        raise
    log.info("case shredded", case_id=case_id, key_id=done.case_key_id)
    return {
        "case_id": case_id,
        "case_key_id": done.case_key_id,
        "shredded_at": done.shredded_at,
        "shredded_by": actor,
        "readable_until": [w.as_dict() for w in readable_windows(settings, bootstrap, now=now)],
    }


def hold(
    settings: Settings, bootstrap: str, case_id: str, reason: str, *, now: float | None = None
) -> dict[str, Any]:
    """Place a legal hold on ``case_id`` (audited with its reason)."""
    now = time.time() if now is None else now
    store = CaseKeyStore.open(settings.keys_dir)
    placed = store.hold(case_id, reason, now=now)
    audit(
        settings,
        bootstrap,
        {"type": "retention.hold_placed", "case_id": case_id, "reason": placed.reason},
        now=now,
    )
    log.info("legal hold placed", case_id=case_id)
    return {"case_id": case_id, "reason": placed.reason, "placed_at": placed.placed_at}


def release(settings: Settings, bootstrap: str, case_id: str, *, now: float | None = None) -> dict[str, Any]:
    """Lift the legal hold on ``case_id`` (audited)."""
    now = time.time() if now is None else now
    store = CaseKeyStore.open(settings.keys_dir)
    held = store.hold_of(case_id)
    if held is None:
        raise SealingError(f"case {case_id} is not under legal hold")
    # Audit first: a hold must never disappear without a trace.
    audit(
        settings,
        bootstrap,
        {"type": "retention.hold_released", "case_id": case_id, "reason": held.reason},
        now=now,
    )
    lifted = store.release(case_id)
    log.info("legal hold released", case_id=case_id)
    return {
        "case_id": case_id,
        "released_at": to_iso(now),
        "hold_reason": lifted.reason,
        "placed_at": lifted.placed_at,
    }


# -- retention that runs itself (issue 16, Build 3) ---------------------------------------------
# The hub's retention records: per case, when a district team ended it, what the schedule makes
# of it and the date it is due; and how far the audit topic has been read for closures. A file
# in the case-key store (0600, under its lock), backed up with the hub's keys. Ids, codes and
# dates only: never a date of birth (a birthday clock is stored rounded up to the month).
RECORDS_FILE = "retention.json"
RECORDS_FORMAT = 1


def _records_path(settings: Settings) -> Path:
    return CaseKeyStore.open(settings.keys_dir).root / RECORDS_FILE


def load_records(settings: Settings) -> dict[str, Any]:
    """The hub's retention records (an empty book when there are none yet)."""
    from referral_broker.sealing.keystore import read_private

    path = _records_path(settings)
    if not path.exists():
        return {"format": RECORDS_FORMAT, "positions": {}, "cases": {}}
    try:
        doc: dict[str, Any] = json.loads(read_private(path))
        if doc.get("format") != RECORDS_FORMAT or not isinstance(doc.get("cases"), dict):
            raise ValueError
    except ValueError:
        raise SealingError(
            f"retention records {path} are malformed; restore them from the hub's key backup"
        ) from None
    doc.setdefault("positions", {})
    return doc


def _save_records(settings: Settings, update: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``update`` to the records under the store's lock and write them back (atomic)."""
    from referral_broker.sealing.keystore import locked, write_private

    store = CaseKeyStore.open(settings.keys_dir)
    with locked(store.root):
        doc = load_records(settings)
        update(doc)
        write_private(store.root / RECORDS_FILE, json.dumps(doc, indent=2, sort_keys=True).encode("utf-8"))
    return doc


def _read_topic_from(
    settings: Settings,
    bootstrap: str,
    role: str,
    positions: dict[str, int],
    wanted: Callable[[Record], bool],
) -> tuple[list[Record], dict[str, int]]:
    """The committed records of a (non per-party) topic after ``positions`` (partition ->
    next offset; a partition not named is read from its start) that ``wanted`` keeps, and the
    positions reached (its end, as it was when the read began)."""
    from kafka.errors import KafkaError

    from referral_broker.cluster.clients import build_consumer, read_to_end
    from referral_broker.cluster.topics import topic_name

    topic = topic_name(settings, role)
    consumer = build_consumer(settings, bootstrap, [topic], group_id=None)
    kept: list[Record] = []
    try:
        partitions = list(consumer.assignment())
        if not partitions:
            raise BrokerError(f"the topic {topic} does not exist; run 'referral-broker topics ensure'")
        end = consumer.end_offsets(partitions)
        for tp in partitions:
            start = positions.get(str(tp.partition))
            if start is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, min(int(start), end[tp]))
        for batch in read_to_end(consumer, partitions, end, what=topic, timeout_s=30.0, stall=True):
            kept.extend(r for r in batch if r.value is not None and wanted(r))
        reached = {str(tp.partition): int(consumer.position(tp)) for tp in partitions}
    except KafkaError as exc:
        raise BrokerError(f"reading {topic} failed: {type(exc).__name__}") from exc
    finally:
        consumer.close()
    return kept, reached


def _closure(record: Record, closing: tuple[str, ...], schema: dict[str, Any]) -> dict[str, Any] | None:
    """A district team ending a case, from the router's audit of the status it relayed: purpose
    ``status-to-referrer``, ``received-by:<district team>``, ``status-code:<a closing code>``."""
    from referral_broker.parties import all_parties
    from referral_broker.schemas import codec

    if record.header("rb-kind") != b"audit.decision" or b"status-to-referrer" not in (record.value or b""):
        return None
    d = codec.decode(record.value or b"", schema)
    if d.get("purpose") != "status-to-referrer":
        return None
    met = dict(c.split(":", 1) for c in d.get("conditions_met") or [] if ":" in c)
    team, code = met.get("received-by"), met.get("status-code")
    if code not in closing or not team:
        return None
    party = all_parties().get(team)
    if party is None or party.kind != "district_team":
        return None
    decided = d["decided_at"]
    at = decided.astimezone(UTC) if isinstance(decided, datetime) else datetime.fromisoformat(str(decided))
    return {
        "case_id": str(d["referral_id"]),
        "closed_at": at.isoformat(timespec="seconds"),
        "closed_by": team,
        "status": code,
    }


@dataclass
class CatchUp:
    """What one read of the audit and the archive learnt: closures (case -> record) and the
    audit positions reached; records refused (not hub-signed) are counted."""

    positions: dict[str, int]
    closures: dict[str, dict[str, Any]]
    refused: int = 0


def read_closures(
    settings: Settings,
    bootstrap: str,
    rules: Rules,
    positions: dict[str, int],
    verify: Callable[[Record], dict[str, bytes]],
) -> CatchUp:
    """Every case a district team ended since ``positions``, from hub-signed audit records
    only: a team may write the audit topic, so an unsigned or team-signed "closure" is refused
    (it would make the sweep shred a live case)."""
    from referral_broker.schemas.registry import audit_decision_schema

    schema = audit_decision_schema()
    records, reached = _read_topic_from(
        settings, bootstrap, "audit", positions, lambda r: r.header("rb-kind") == b"audit.decision"
    )
    out = CatchUp(reached, {})
    for record in records:
        try:
            found = _closure(record, rules.closing_statuses, schema)
            if found is None:
                continue
            if verify(record).get("rb-sender", b"").decode() != HUB:
                raise SealingError("not signed by the hub")
        except (ReferralBrokerError, ValueError, KeyError, TypeError):
            out.refused += 1
            continue
        have = out.closures.get(found["case_id"])
        if have is None or found["closed_at"] > have["closed_at"]:
            out.closures[found["case_id"]] = found  # a later closure (another team) counts
    return out


def _archived(
    settings: Settings, bootstrap: str, hub: Any, cases: set[str]
) -> dict[str, dict[str, Any] | str]:
    """The latest archived referral of each case in ``cases`` (opened in memory, never kept),
    or why it could not be read."""
    records, _ = _read_topic_from(
        settings, bootstrap, "archive", {}, lambda r: (r.key or b"").decode("utf-8", "replace") in cases
    )
    latest: dict[str, tuple[int, dict[str, Any]]] = {}
    problems: dict[str, str] = {}
    for record in records:
        case = (record.key or b"").decode()
        try:
            opened = hub.open(record)
        except ReferralBrokerError as exc:
            problems[case] = type(exc).__name__
            continue
        if case not in latest or opened.referral_version > latest[case][0]:
            latest[case] = (opened.referral_version, opened.record)
    found: dict[str, dict[str, Any] | str] = {c: r for c, (_, r) in latest.items()}
    for case in cases - set(found):
        found[case] = problems.get(case, "no archive copy")
    return found


def catch_up(
    settings: Settings, bootstrap: str, rules: Rules, *, write: bool = True, hub: Any = None
) -> dict[str, Any]:
    """Learn every closure since the last read and give each newly closed (or re-closed) case
    its due date under ``rules`` (from its latest archived referral, opened in memory). Returns
    the records as they now are; ``write=False`` (a dry run) changes nothing on disk. A case
    whose archive copy cannot be opened is recorded without a due date (``problem``) and tried
    again next time."""
    from referral_broker.cluster.topics import topic_name
    from referral_broker.identity import load_identity
    from referral_broker.retention_rules import assess

    hub = hub or load_identity(settings, bootstrap, HUB)
    book = load_records(settings)
    audit_topic = topic_name(settings, "audit")
    positions = book["positions"].get(audit_topic, {})
    learnt = read_closures(settings, bootstrap, rules, positions, hub.opener.verify)
    cases: dict[str, dict[str, Any]] = {c: dict(v) for c, v in book["cases"].items()}
    changed: set[str] = set()
    for case, found in learnt.closures.items():
        have = cases.get(case)
        if have is None or found["closed_at"] > have["closed_at"]:
            cases[case] = {**found, "due": None}
            changed.add(case)
    todo = {c for c, v in cases.items() if v.get("due") is None and not v.get("shredded_at")}
    store = CaseKeyStore.open(settings.keys_dir)
    for case in sorted(todo):
        done = store.shredded(case)
        if done is not None:
            cases[case] |= {"shredded_at": done.shredded_at}
            todo.discard(case)
    opened = _archived(settings, bootstrap, hub, todo) if todo else {}
    for case in sorted(todo):
        referral = opened.get(case)
        if isinstance(referral, str):
            cases[case] |= {
                "problem": f"archive copy not readable ({referral}); tried again at the next sweep"
            }
            continue
        closed = datetime.fromisoformat(cases[case]["closed_at"])
        assessed = assess(rules, referral, closed)
        cases[case] = (
            {k: v for k, v in cases[case].items() if k != "problem"}
            | assessed.as_dict()
            | {"rules_version": rules.version}
        )
        changed.add(case)

    def update(doc: dict[str, Any]) -> None:
        doc["positions"][audit_topic] = learnt.positions
        for case in changed | todo:
            doc["cases"][case] = cases[case]

    if write:
        _save_records(settings, update)
    return {"cases": cases, "learnt": sorted(learnt.closures), "refused": learnt.refused}


def sweep(
    settings: Settings,
    bootstrap: str,
    rules: Rules,
    *,
    today: date,
    dry_run: bool,
    shred_case: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
    progress: Callable[[list[str]], Iterable[str]] | None = None,
) -> dict[str, Any]:
    """Shred every case past its due date on ``today``: learn closures first (the whole read
    happens before any shred, so a cluster that does not answer stops the sweep before it
    starts), skip held ones with their hold, and shred the rest one by one through
    ``shred_case`` (the CLI's shred: :func:`shred`, audited first, plus the inbox's tombstone).
    Each shred is all or nothing. A case whose shred fails is listed (``failed``) and the
    others go on; Kafka failing stops the sweep there (``stopped``); ``exit_code`` is then the
    first error's code. ``dry_run`` changes nothing and lists what it would do."""
    book = catch_up(settings, bootstrap, rules, write=not dry_run)
    store = CaseKeyStore.open(settings.keys_dir)
    due: list[str] = []
    held: list[dict[str, Any]] = []
    waiting: list[dict[str, Any]] = []
    already = 0
    not_due = 0
    for case, record in sorted(book["cases"].items()):
        if record.get("shredded_at") or store.shredded(case) is not None:
            already += 1
            continue
        if record.get("due") is None:
            waiting.append({"case_id": case, "reason": record.get("problem", "due date not known yet")})
            continue
        if date.fromisoformat(record["due"]) > today:
            not_due += 1
            continue
        hold = store.hold_of(case)
        if hold is not None:
            held.append(
                {
                    "case_id": case,
                    "due": record["due"],
                    "reason": f"legal hold since {hold.placed_at}: {hold.reason}",
                }
            )
            continue
        if not store.has_key(case):
            waiting.append({"case_id": case, "reason": "no case key in the hub's store (nothing to shred)"})
            continue
        due.append(case)
    result: dict[str, Any] = {
        "today": today.isoformat(),
        "dry_run": dry_run,
        "rules_version": rules.version,
        "closures_learnt": len(book["learnt"]),
        "refused_audit_records": book["refused"],
        "cases_known": len(book["cases"]),
        "not_yet_due": not_due,
        "already_shredded": already,
        "due": [
            {
                "case_id": c,
                "due": book["cases"][c]["due"],
                "record_types": book["cases"][c]["record_types"],
                "basis": book["cases"][c]["basis"],
            }
            for c in due
        ],
        "held": held,
        "waiting": waiting,
        "shredded": [],
        "failed": [],
        "stopped": None,
        "exit_code": 0,
    }
    if dry_run or not due:
        return result
    if shred_case is None:

        def shred_case(case: str, record: dict[str, Any]) -> dict[str, Any]:
            return shred(settings, bootstrap, case, rule=record)

    for case in progress(due) if progress is not None else due:
        record = book["cases"][case]
        try:
            done = shred_case(case, record)
        except LegalHoldError as exc:  # held since the check: the refusal is audited by shred
            held.append({"case_id": case, "due": record["due"], "reason": str(exc)})
            continue
        except BrokerError as exc:  # Kafka went away: every later shred would fail too
            result["stopped"] = f"{type(exc).__name__}: {exc}"
            result["exit_code"] = result["exit_code"] or exc.exit_code
            log.error("retention sweep stopped", case_id=case, error=type(exc).__name__)
            break
        except ReferralBrokerError as exc:  # this case only (e.g. its key file): the others go on
            result["failed"].append(
                {"case_id": case, "due": record["due"], "reason": f"{type(exc).__name__}: {exc}"}
            )
            result["exit_code"] = result["exit_code"] or exc.exit_code
            log.error("retention shred failed", case_id=case, error=type(exc).__name__)
            continue
        result["shredded"].append(
            {
                "case_id": case,
                "due": record["due"],
                "case_key_id": done["case_key_id"],
                "inbox_teams": done.get("inbox", {}).get("teams", []),
            }
        )
        _save_records(settings, _mark_shredded(case, str(done["shredded_at"])))
    return result


def _mark_shredded(case: str, at: str) -> Callable[[dict[str, Any]], None]:
    def update(doc: dict[str, Any]) -> None:
        if case in doc["cases"]:
            doc["cases"][case]["shredded_at"] = at

    return update


def check_plan(settings: Settings, rules: Rules, *, bootstrap: str | None = None) -> list[dict[str, Any]]:
    """The topic plan's retention (the active profile) held against ``rules``; with
    ``bootstrap``, the cluster's own topics too (a topic that drifted from the plan is judged by
    what it really keeps). A role the rules class but the plan lacks is reported as well."""
    from referral_broker.cluster.topics import _load_plan_doc, plan
    from referral_broker.retention_rules import TopicFinding, check_topics

    roles = {str(e["role"]): e for e in _load_plan_doc()["topic"]}
    planned = [
        (
            role,
            settings.kafka_topic_prefix + str(e["name"]).replace("{party}", "<organisation>"),
            int(e["retention_ms"]),
        )
        for role, e in roles.items()
    ]
    findings = check_topics(rules, planned, source="plan")
    findings += [
        TopicFinding(role, "-", cls, None, f"rules: role '{role}' is not in the topic plan")
        for role, cls in rules.topics.items()
        if role not in roles
    ]
    if bootstrap is not None:
        specs = [
            s for s in plan(settings.kafka_topic_profile, settings.kafka_topic_prefix) if s.role in roles
        ]
        live = _live_configs(settings, bootstrap, [s.name for s in specs])
        findings += check_topics(
            rules,
            [(s.role, s.name, live[s.name].get("retention.ms")) for s in specs if s.name in live],
            source="cluster",
        )
    return [f.as_dict() for f in findings]
