"""``referral-broker tail TOPIC``: the envelopes on a topic, never their contents.

Each record is shown by its partition and offset, time, key (the referral id, key id or party
name the topic is keyed by), size, and the envelope headers that say who and what: kind,
sender, recipient, schema fingerprint, referral version, sealed-at, case, and for dead letters
their stage, reason and source. The value is never decoded, and no other header is printed
(the wrapped data key, the binding and the signatures are not shown). A key or header that is
not a plain identifier (a stray record with text in it) is shown only by its length, so what
anybody wrote into a topic cannot come out through ``tail``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import click

from referral_broker.cli.context import CliContext, json_option, pass_cli, table

# envelope header -> column name; nothing else is ever shown
SHOWN = {
    "rb-kind": "kind",
    "rb-sender": "sender",
    "rb-recipient": "recipient",
    "rb-schema": "schema",
    "rb-referral-version": "version",
    "rb-sealed-at": "sealed_at",
    "rb-format": "format",
    "rb-case": "case",
    "rb-referrer": "referrer",
    "rb-dlq-stage": "dlq_stage",
    "rb-dlq-source-topic": "dlq_source_topic",
    "rb-dlq-source-offset": "dlq_source_offset",
    "rb-dlq-reason": "dlq_reason",
}
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}$")
# a dead letter's reason is the router's own value-free sentence: printable ASCII, bounded
_SENTENCE = re.compile(r"^[ -~]{1,300}$")


def _plain(raw: bytes | None, pattern: re.Pattern[str] = _IDENTIFIER) -> str | None:
    if raw is None:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return f"<{len(raw)} bytes>"
    return text if pattern.match(text) else f"<{len(raw)} bytes>"


def envelope(record: Any) -> dict[str, Any]:
    """What ``tail`` shows of a record (a ``cluster.clients.Record``)."""
    out: dict[str, Any] = {
        "partition": record.partition,
        "offset": record.offset,
        "time": datetime.fromtimestamp(record.timestamp_ms / 1000, UTC).isoformat(timespec="milliseconds"),
        "key": _plain(record.key),
        "size": len(record.value or b""),
    }
    for name, value in record.headers:
        column = SHOWN.get(name)
        if column is not None and column not in out:
            out[column] = _plain(value, _SENTENCE if name == "rb-dlq-reason" else _IDENTIFIER)
    if "sealed_at" in out and (out["sealed_at"] or "").isdigit():
        out["sealed_at"] = datetime.fromtimestamp(int(out["sealed_at"]) / 1000, UTC).isoformat(
            timespec="milliseconds"
        )
    return out


def _resolve(settings: Any, bootstrap: str, topic: str) -> str:
    """``topic`` as given when it exists, else under the configured prefix."""
    from referral_broker.cluster.topics import admin_client
    from referral_broker.errors import TopicPlanError

    admin = admin_client(settings, bootstrap)
    try:
        existing = set(admin.list_topics())
    finally:
        admin.close()
    for candidate in (topic, settings.kafka_topic_prefix + topic):
        if candidate in existing:
            return candidate
    raise TopicPlanError(f"no topic named {topic} (nor {settings.kafka_topic_prefix + topic})")


def _row(e: dict[str, Any]) -> list[str]:
    schema = e.get("schema") or "-"
    return [
        f"{e['partition']}@{e['offset']}",
        e["time"],
        str(e["key"] or "-"),
        str(e.get("kind") or "-"),
        str(e.get("sender") or "-"),
        str(e.get("recipient") or "-"),
        schema[:16],
        str(e.get("version") or "-"),
        str(e["size"]),
        str(e.get("dlq_stage") or e.get("case") or "-"),
    ]


HEADERS = ["at", "time", "key", "kind", "sender", "recipient", "schema", "version", "size", "case/stage"]


@click.command()
@click.argument("topic")
@click.option("--last", "last", type=int, default=20, show_default=True, help="Records per partition from the end.")
@click.option("--from-beginning", is_flag=True, help="Every record still on the topic.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new records until Ctrl-C.")
@json_option
@pass_cli
def tail(obj: CliContext, topic: str, last: int, from_beginning: bool, follow: bool, as_json: bool) -> None:
    """The envelopes on TOPIC (a full name, or one under the configured prefix): ids, sender,
    recipient, schema, size and time. Nothing is opened or decoded."""
    import json

    from kafka.errors import KafkaError

    from referral_broker.cluster.clients import build_consumer, poll_records, read_to_end
    from referral_broker.errors import BrokerError

    settings = obj.settings
    bootstrap = obj.bootstrap()
    name = _resolve(settings, bootstrap, topic)
    consumer = build_consumer(settings, bootstrap, [name], group_id=None)
    try:
        partitions = list(consumer.assignment())
        try:
            ends = consumer.end_offsets(partitions)
            begins = consumer.beginning_offsets(partitions)
        except KafkaError as exc:
            raise BrokerError(f"reading offsets of {name} failed: {type(exc).__name__}") from exc
        for tp in partitions:
            start = begins[tp] if from_beginning else max(begins[tp], ends[tp] - max(0, last))
            consumer.seek(tp, start)
        shown: list[dict[str, Any]] = []
        printed_header = False

        def flush(batch: list[dict[str, Any]]) -> None:
            nonlocal printed_header
            if as_json and not follow:
                shown.extend(batch)
            elif as_json:
                for e in batch:
                    click.echo(json.dumps(e))
            elif batch:
                rows = [_row(e) for e in batch]
                text = table(rows, HEADERS)
                lines = text.splitlines()
                click.echo("\n".join(lines if not printed_header else lines[2:]))
                printed_header = True

        stall_s = max(30.0, settings.kafka_request_timeout_ms / 1000)
        for batch in read_to_end(consumer, partitions, ends, what=name, timeout_s=stall_s, stall=True):
            flush(sorted((envelope(r) for r in batch), key=lambda e: (e["time"], e["partition"], e["offset"])))
        if as_json and not follow:
            click.echo(json.dumps(shown, indent=2))
        elif not printed_header and not follow:
            click.echo(f"No records on {name}.")
        while follow:
            batch = poll_records(consumer, 1000)
            flush(sorted((envelope(r) for r in batch), key=lambda e: (e["time"], e["partition"], e["offset"])))
    finally:
        consumer.close()
