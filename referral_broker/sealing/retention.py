"""Retention actions on a case, each one audited: shred the case key, place or lift a legal hold.

Every action writes an event to the ``audit`` topic, signed by the hub, holding ids, times and
reasons only (``retention.case_shredded``, ``retention.shred_refused``,
``retention.hold_placed``, ``retention.hold_released``). A shred is audited BEFORE the key is
destroyed: if the audit cannot be written the key is kept (no unaudited shred), and if the
destruction then fails a ``retention.shred_failed`` event follows.

This module must never put a case key, a referral value or any plaintext into an audit event,
a log line or an exception; reasons are the operator's words about the hold, not case content.
"""

from __future__ import annotations

import getpass
import json
import time
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


def _actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers: still audit, as unknown
        return "unknown"


def audit(settings: Settings, bootstrap: str, event: dict[str, Any], *, now: float) -> None:
    """Sign ``event`` as the hub and produce it to the audit topic; returns once durable."""
    from referral_broker.cluster.clients import build_producer
    from referral_broker.cluster.topics import topic_name

    hub = KeyStore.open(settings.keys_dir, HUB)
    doc = {**event, "at": to_iso(now), "actor": event.get("actor") or _actor(), "party": HUB}
    message = sign_plain(
        hub,
        topic=topic_name(settings, "audit"),
        key=str(event["case_id"]).encode("utf-8"),
        value=json.dumps(doc, sort_keys=True).encode("utf-8"),
        kind=AUDIT_KIND,
        now=now,
    )
    producer = build_producer(settings, bootstrap)
    try:
        message.send(producer)
        producer.flush()
    finally:
        producer.close()


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
    audit(
        settings,
        bootstrap,
        {"type": "retention.case_shredded", "case_id": case_id, "case_key_id": case_key_id},
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
    return {"case_id": case_id, "case_key_id": done.case_key_id, "shredded_at": done.shredded_at}


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
