"""Reading the audit trail (``audit.decisions``): every sharing decision the router made, as
the Avro records it wrote (paths, reasons and organisations; never a value from a referral)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from referral_broker.cluster.clients import build_consumer, drain
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.errors import BrokerError
from referral_broker.schemas import codec
from referral_broker.schemas.registry import audit_decision_schema


def decisions(settings: Settings, bootstrap: str, *, idle_s: float = 2.0) -> Iterator[dict[str, Any]]:
    """Every decision on the audit topic, oldest first, in today's audit schema (older
    versions resolved into it: fields they lack read as their defaults)."""
    from kafka.errors import KafkaError

    schema = audit_decision_schema()
    topic = topic_name(settings, "audit")
    consumer = build_consumer(settings, bootstrap, [topic], group_id=None)
    try:
        if not consumer.assignment():
            raise BrokerError(f"the audit topic {topic} does not exist; run 'referral-broker topics ensure'")
        for batch in drain(consumer, idle_s=idle_s):
            for record in batch:
                if record.value is not None:  # the audit topic is never compacted; be safe anyway
                    yield codec.decode(record.value, schema)
    except KafkaError as exc:
        raise BrokerError(f"reading the audit trail failed: {type(exc).__name__}") from exc
    finally:
        consumer.close()


def unresolved(settings: Settings, bootstrap: str) -> list[dict[str, Any]]:
    """Decisions whose recipient rule found no organisation, for follow-up: the referral,
    the rule, the reason, when. A later version of the same referral that resolved the rule
    does not hide the earlier one: each is a decision that was made."""
    return [
        {
            "referral_id": str(d["referral_id"]),
            "version": d["version"],
            "rule": d["recipient"],
            "reason": d["unresolved_reason"],
            "purposes": (d.get("purpose") or "").split(",") if d.get("purpose") else [],
            "decided_at": d["decided_at"].isoformat() if hasattr(d["decided_at"], "isoformat") else d["decided_at"],
        }
        for d in decisions(settings, bootstrap)
        if d.get("unresolved_reason")
    ]
