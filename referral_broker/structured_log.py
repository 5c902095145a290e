"""Structured logging that cannot carry message payloads.

Every log line is JSON with an event name and a fixed allow-list of context fields (topics,
partitions, offsets, ids, counts, reasons). Anything else passed as context is dropped and
named as dropped, so a careless ``log.info("x", value=referral)`` leaks nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

ALLOWED_CONTEXT = frozenset(
    {
        "topic",
        "partition",
        "offset",
        "referral_id",
        "version",
        "recipient",
        "partner",
        "party",
        "key_id",
        "case_id",
        "count",
        "reason",
        "error",
        "group",
        "bootstrap",
        "elapsed_ms",
        "fields",
        "withheld",
        "port",
        "pid",
        "path",
        "role",
        "status",
        "team",
        "member",
        "decision",
        "ground",
        # the inbox's sign-in throttle: a subject is named only by a short keyed hash
        "scope",
        "subject_ref",
        "until",
        "mode",
        "workers",  # how many processes checked and sealed a file
        # a router's stall (consumers/router_stall.py): counts of partitions and records, and how long
        "seconds",
        "partitions",
        "unpositioned",
        "behind",
        "records",
    }
)

_configured = False


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(getattr(record, "context", {}))
        return json.dumps(doc, default=str, sort_keys=False)


def _safe(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return "<dict>"  # a mapping is a record's shape: never printed
    if isinstance(value, (list, tuple, set, frozenset)) and not all(isinstance(v, str) for v in value):
        return f"<{type(value).__name__}>"
    return value


class EventLogger:
    """A logger whose only inputs are an event name and allow-listed context."""

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(name)

    def _emit(self, level: int, event: str, context: dict[str, Any]) -> None:
        if not self._log.isEnabledFor(level):
            return
        kept = {k: _safe(v) for k, v in context.items() if k in ALLOWED_CONTEXT}
        dropped = sorted(set(context) - ALLOWED_CONTEXT)
        if dropped:
            kept["dropped_context"] = dropped
        self._log.log(level, event, extra={"context": kept})

    def debug(self, event: str, **context: Any) -> None:
        self._emit(logging.DEBUG, event, context)

    def info(self, event: str, **context: Any) -> None:
        self._emit(logging.INFO, event, context)

    def warning(self, event: str, **context: Any) -> None:
        self._emit(logging.WARNING, event, context)

    def error(self, event: str, **context: Any) -> None:
        self._emit(logging.ERROR, event, context)


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


def configure(level: str = "WARNING") -> None:
    """JSON lines on stderr. kafka-python's own reconnect chatter is silenced below DEBUG: its
    failures reach the user as our own one-line errors instead."""
    global _configured
    root = logging.getLogger()
    if not _configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
        root.addHandler(handler)
        _configured = True
    root.setLevel(level.upper())
    logging.getLogger("kafka").setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.CRITICAL)
