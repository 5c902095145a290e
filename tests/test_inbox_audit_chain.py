"""The inbox's access events are Avro (``audit_access``) and chained like the router's decisions:
``audit verify`` proves a team's chain intact and names an event deleted, edited or forged."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from county import cli
from test_inbox_fixtures import OTHER_TEAM, TEAM, make_pipeline

from referral_broker.audit_chain import (
    GENESIS,
    H_CHAIN,
    chain_headers,
    read_heads,
    read_topic,
    record_hash,
    verify_records,
)
from referral_broker.audit_log import read_event_value
from referral_broker.cluster.clients import Record
from referral_broker.config import Settings
from referral_broker.consumers.inbox.outbound import AccessEvent, AccessKind, Outbound, inbox_chain
from referral_broker.schemas.registry import SINGLE_OBJECT_MAGIC


def write_events(settings: Settings, outbound: Outbound, team: str, count: int) -> None:
    for i in range(count):
        outbound.audit(AccessEvent(AccessKind.VIEWED, datetime.now(UTC), "fen.worker", team, f"rid-{i}", 1))


def problems(report: object) -> list[tuple[str, str | None]]:
    return [(p.problem, p.chain) for p in report.problems]  # type: ignore[attr-defined]


def test_access_events_are_avro_chained_per_team_and_verify_intact(topics: Settings) -> None:
    pipeline = make_pipeline(topics)
    outbound = Outbound(topics, pipeline.format([TEAM, OTHER_TEAM]))
    try:
        write_events(topics, outbound, TEAM, 3)
        write_events(topics, outbound, OTHER_TEAM, 1)
        # an event with no team (a refused sign-in by nobody known) goes on the first team's chain
        outbound.audit(AccessEvent(AccessKind.SIGN_IN_REFUSED, datetime.now(UTC), None, None))
    finally:
        outbound.close()
    bootstrap = topics.bootstrap_servers
    records = read_topic(topics, bootstrap, "audit")
    assert len(records) == 5
    assert all((r.value or b"")[:2] == SINGLE_OBJECT_MAGIC for r in records)
    kinds = sorted(read_event_value(r.value or b"")["kind"] for r in records)
    assert kinds == ["referral_viewed"] * 4 + ["sign_in_refused"]

    by_chain: dict[str, list[Record]] = {}
    for r in records:
        fields = chain_headers(r.headers)
        assert fields is not None
        by_chain.setdefault(fields[0], []).append(r)
    assert {c: len(rs) for c, rs in by_chain.items()} == {inbox_chain(TEAM): 4, inbox_chain(OTHER_TEAM): 1}
    # each partition's part of a chain links from the genesis by hash
    for chain, rows in by_chain.items():
        last: dict[int, tuple[int, str]] = {}
        for r in sorted(rows, key=lambda r: (r.partition, r.offset)):
            _c, seq, prev = chain_headers(r.headers)  # type: ignore[misc]
            want_seq, want_prev = last.get(r.partition, (-1, GENESIS))
            assert (seq, prev) == (want_seq + 1, want_prev)
            last[r.partition] = (seq, record_hash(r.key or b"", r.value or b"", chain, seq, prev))

    hub = pipeline.hub
    heads = read_heads(topics, bootstrap, verify=hub.opener.verify)  # team-signed heads accepted for its chain
    assert {c for (c, _p) in heads} == {inbox_chain(TEAM), inbox_chain(OTHER_TEAM)}
    assert verify_records(records, heads=heads, verify=hub.opener.verify).intact

    result = cli(topics, bootstrap, "audit", "verify", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["intact"]

    # one of the team's events deleted: named as missing (in the middle) or truncated (at the end)
    mine = sorted(by_chain[inbox_chain(TEAM)], key=lambda r: (r.partition, r.offset))
    for gone in mine:
        left = [r for r in records if r is not gone]
        found = problems(verify_records(left, heads=heads, verify=hub.opener.verify))
        assert found and all(chain == inbox_chain(TEAM) for _p, chain in found), found
        assert {p for p, _c in found} <= {"missing", "truncated"}
    # one edited: its signature fails
    victim = mine[0]
    edited = Record(victim.topic, victim.partition, victim.offset, victim.key, (victim.value or b"") + b"x", victim.headers, victim.timestamp_ms)
    found = problems(verify_records([edited if r is victim else r for r in records], heads=heads, verify=hub.opener.verify))
    assert ("bad-signature", inbox_chain(TEAM)) in found


def test_a_team_cannot_write_into_the_hubs_chains(topics: Settings) -> None:
    """A record signed by a team but claiming a hub writer's chain is named as forged, and a
    team-signed head for a hub chain is ignored."""
    from referral_broker.audit_chain import AuditChain

    pipeline = make_pipeline(topics)
    fmt = pipeline.format([TEAM])
    bootstrap = topics.bootstrap_servers

    def as_team(**signing: object) -> object:
        return fmt.sign_event(TEAM, signing["topic"], signing["key"], signing["value"], signing["kind"],  # type: ignore[arg-type]
                              extra_headers=signing.get("extra_headers", ()))  # type: ignore[arg-type]

    from referral_broker.cluster.clients import build_producer

    forger = AuditChain(topics, bootstrap, "retention", as_team)
    producer = build_producer(topics, bootstrap)
    try:
        forger.append(b"case-1", b'{"type": "case_shredded"}', "audit.retention").send(producer)
        for message in forger.checkpoint(records=False):
            message.send(producer)
        producer.flush()
    finally:
        producer.close()
    hub = pipeline.hub
    records = read_topic(topics, bootstrap, "audit")
    assert [dict(r.headers)[H_CHAIN] for r in records] == [b"retention"]
    assert read_heads(topics, bootstrap, verify=hub.opener.verify) == {}  # the team's head for it: ignored
    found = problems(verify_records(records, heads={}, verify=hub.opener.verify))
    assert found == [("bad-signature", "retention")]


def test_access_events_and_checkpoints_prepare_each_schema_once(topics: Settings) -> None:
    """Every page view writes an access event and its chain's checkpoint: each encoded with a
    fresh copy of its schema from the registry, which the codec prepared again (0.38 ms each)
    and kept. A router's batch checkpoints the same way."""
    from referral_broker.schemas import codec

    pipeline = make_pipeline(topics)
    outbound = Outbound(topics, pipeline.format([TEAM]))
    try:
        write_events(topics, outbound, TEAM, 1)  # the chain's heads are read, the producer made
        codec._prepared_by_id.clear()
        write_events(topics, outbound, TEAM, 4)
    finally:
        outbound.close()
    prepared = [p.fingerprint for p in codec._prepared_by_id.values()]
    assert len(prepared) == len(set(prepared)) == 2  # the access event's, the checkpoint's
    events = [read_event_value(r.value or b"") for r in read_topic(topics, topics.bootstrap_servers, "audit")]
    assert [e["kind"] for e in events] == ["referral_viewed"] * 5
