"""Logs carry events and allow-listed ids, never payloads."""

from __future__ import annotations

import json
import logging

import pytest

from referral_broker.structured_log import _JsonFormatter, get_logger


@pytest.fixture
def captured():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("rb-test")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)


def test_context_outside_the_allow_list_is_dropped_and_named(captured) -> None:
    get_logger("rb-test").info("routed", topic="t", offset=3, value={"child": "Synthetic Name"}, record="x")
    line = json.loads(_JsonFormatter().format(captured[0]))
    assert line["event"] == "routed" and line["topic"] == "t" and line["offset"] == 3
    assert line["dropped_context"] == ["record", "value"]
    assert "Synthetic Name" not in json.dumps(line)


def test_bytes_and_structures_are_never_printed(captured) -> None:
    get_logger("rb-test").warning("odd", reason=b"secret-bytes", fields={"a": 1})
    line = json.loads(_JsonFormatter().format(captured[0]))
    assert line["reason"] == "<12 bytes>" and line["fields"] == "<dict>"
