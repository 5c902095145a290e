"""Timestamps in key files and the key directory: UTC ISO 8601 text for people, epoch seconds
for code. Kept apart so every file that stores a time writes it the same way."""

from __future__ import annotations

from datetime import UTC, datetime


def to_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_iso(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
