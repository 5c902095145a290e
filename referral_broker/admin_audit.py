"""Audit records of the hub's own actions: shreds, holds and releases, research exports and
objections, ACL, organisation and key changes.

Each is Avro (``schemas/audit_admin.v1.avsc``: the common fields, then the action's own ids,
counts and reasons in ``details``), signed by the hub and written as the next record of its
writer's chain on the audit topic (:func:`referral_broker.audit_chain.write_chained`), so
``audit verify`` names one deleted, edited or reordered as it does a routing decision. Readers
get the same flat dictionary the JSON events before this schema held
(:func:`referral_broker.audit_log.read_event_value`).
"""

from __future__ import annotations

import getpass
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from referral_broker.config import Settings
from referral_broker.errors import KeyNotFoundError

FAMILY = "audit_admin"
ADMIN_KIND = "audit.admin"
ADMIN_CHAIN = "admin"
_COMMON = ("event_id", "type", "at", "actor", "party")


def actor() -> str:
    """The login name of whoever runs the command (``unknown`` in a container without one)."""
    try:
        return getpass.getuser()
    except Exception:  # getpass raises whatever the platform's lookup raises
        return "unknown"


def _details(event: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The event's own fields as ``details`` entries: a nested record's fields under dotted
    names (``by_rule.due``), a list that is not of strings as JSON text."""
    out: dict[str, Any] = {}
    for key, value in event.items():
        name = prefix + key
        if value is None or isinstance(value, bool | int | float | str):
            out[name] = value
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            out[name] = list(value)
        elif isinstance(value, dict) and value and all(isinstance(k, str) and type(v) is int for k, v in value.items()):
            out[name] = dict(value)
        elif isinstance(value, dict) and all(isinstance(k, str) and "." not in k for k in value):
            out.update(_details(value, name + "."))
        else:
            out[name] = json.dumps(value, sort_keys=True, default=str)
    return out


def encode_event(event: dict[str, Any], *, now: float) -> bytes:
    """``event`` (a ``type`` and its ids, counts and reasons) as an ``audit_admin`` record."""
    from referral_broker.schemas import codec
    from referral_broker.schemas.registry import shared_schema

    record = {
        "event_id": str(event.get("event_id") or uuid.uuid4()),
        "type": str(event["type"]),
        "at": datetime.fromtimestamp(now, UTC),
        "actor": event.get("actor") or actor(),
        "party": event.get("party"),
        "details": _details({k: v for k, v in event.items() if k not in _COMMON}),
    }
    return codec.encode(record, shared_schema(FAMILY))


def flatten(doc: dict[str, Any]) -> dict[str, Any]:
    """A decoded ``audit_admin`` record as the event it was made from: details beside the common
    fields, dotted names nested again."""
    out: dict[str, Any] = {}
    for name, value in doc.get("details", {}).items():
        *parents, leaf = name.split(".")
        into = out
        for part in parents:
            into = into.setdefault(part, {})
        into[leaf] = value
    return out | {k: v for k, v in doc.items() if k != "details"}


def write_event(
    settings: Settings,
    bootstrap: str,
    event: dict[str, Any],
    *,
    key: str,
    chain: str = ADMIN_CHAIN,
    kind: str = ADMIN_KIND,
    now: float | None = None,
) -> None:
    """Sign ``event`` as the hub and append it to ``chain`` on the audit topic; returns once
    durable. :class:`KeyNotFoundError` when the hub's key store is not on this machine."""
    from referral_broker.audit_chain import write_chained
    from referral_broker.parties import HUB
    from referral_broker.sealing.envelope import sign_plain
    from referral_broker.sealing.keystore import KeyStore

    now = time.time() if now is None else now
    hub = KeyStore.open(settings.keys_dir, HUB)
    write_chained(
        settings,
        bootstrap,
        chain,
        lambda **signing: sign_plain(hub, now=now, **signing),
        key=key.encode("utf-8"),
        value=encode_event({**event, "party": HUB}, now=now),
        kind=kind,
    )


def record_change(settings: Settings, bootstrap: str, event: dict[str, Any], *, key: str) -> dict[str, Any]:
    """Audit an ACL, organisation or key change made from this machine: ``{"audited": True}``,
    or ``{"audited": False, "why": ...}`` where the hub's key store is not here (a partner's
    machine, or a setup that makes the hub's keys later). The change itself has happened."""
    try:
        write_event(settings, bootstrap, event, key=key)
    except KeyNotFoundError as exc:
        return {"audited": False, "why": str(exc)}
    return {"audited": True}
