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

This module must never put a case key, a referral value or any plaintext into an audit event,
a log line or an exception; reasons are the operator's words about the hold, not case content.
"""

from __future__ import annotations

import getpass
import json
import time
from dataclasses import dataclass
from typing import Any

from referral_broker.config import Settings
from referral_broker.errors import LegalHoldError, SealingError
from referral_broker.parties import HUB
from referral_broker.sealing.case_keys import CaseKeyStore, check_case_id
from referral_broker.sealing.envelope import sign_plain
from referral_broker.sealing.keystore import KeyStore
from referral_broker.sealing.timefmt import to_iso
from referral_broker.structured_log import get_logger

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


def _actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers: still audit, as unknown
        return "unknown"


def audit(settings: Settings, bootstrap: str, event: dict[str, Any], *, now: float) -> None:
    """Sign ``event`` as the hub and produce it to the audit topic as the next record of the
    ``retention`` audit chain (``audit_chain.write_chained``); returns once durable."""
    from referral_broker.audit_chain import write_chained

    hub = KeyStore.open(settings.keys_dir, HUB)
    doc = {**event, "at": to_iso(now), "actor": event.get("actor") or _actor(), "party": HUB}
    write_chained(
        settings,
        bootstrap,
        "retention",
        lambda **signing: sign_plain(hub, now=now, **signing),
        key=str(event["case_id"]).encode("utf-8"),
        value=json.dumps(doc, sort_keys=True).encode("utf-8"),
        kind=AUDIT_KIND,
    )


def shred(settings: Settings, bootstrap: str, case_id: str, *, now: float | None = None) -> dict[str, Any]:
    """Destroy the case key of ``case_id`` (audited). Refuses a held, unknown or shredded case."""
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
    actor = _actor()
    audit(
        settings,
        bootstrap,
        {"type": "retention.case_shredded", "case_id": case_id, "case_key_id": case_key_id, "actor": actor},
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
