"""The tamper-evident audit (issue 16, Build 1) on the real broker: the router chains every
audit record per (partition, router), checkpoints each batch and keeps its heads on
``audit.heads``; ``audit verify`` proves the chains intact, and names a deleted, edited,
reordered or cut record with its partition, offset and chain."""

from __future__ import annotations

import copy
import json
import uuid
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from county import cli, in_county

from referral_broker.audit_chain import (
    CHECKPOINT_KIND,
    GENESIS,
    chain_headers,
    read_heads,
    read_topic,
    record_hash,
    verify_records,
)
from referral_broker.audit_log import read_event_value
from referral_broker.cluster.clients import Record
from referral_broker.config import Settings
from referral_broker.consumers.router import SIGN_EVERY, Router
from referral_broker.identity import load_identity
from referral_broker.producers.intake import IntakeSender
from referral_broker.schemas.synth import synthetic_referrals

POLICE = "police-35"
SCHOOL_URN = "110123"
HUB = "council"




def encompass(seed: int) -> dict[str, Any]:
    """A police referral (Operation Encompass) about a child at a county school."""
    for record in synthetic_referrals(50, seed=seed):
        if record.get("school"):
            break
    record = in_county(copy.deepcopy(record))
    now = datetime.now(UTC).replace(microsecond=0)
    record.update(
        district="fenland",
        concern_types=["domestic_abuse"],
        concerns=[{"type": "domestic_abuse", "detail": "Synthetic incident for a test", "since": None}],
        services_requested=["family_support"],
        service_providers=[],
        sharing_override={
            "override_id": uuid.uuid4(),
            "ground": "risk_of_significant_harm",
            "reason": "Synthetic reason for a test",
            "approved_by": {"role": "Early Help duty manager", "name": "Test Approver"},
            "approved_at": now,
        },
        consent={"state": "refused", "recorded_at": record["created_at"], "recorded_by": "Synthetic Officer"},
        flags={"safeguarding_concern": False, "crime_prevention": False, "early_support_pathway": False},
    )
    record["referrer"] = {**record["referrer"], "partner": "police"}
    record["school"]["urn"] = SCHOOL_URN
    return record


def send(settings: Settings, bootstrap: str, records: list[dict[str, Any]]) -> list[str]:
    with IntakeSender(settings, bootstrap, POLICE) as sender:
        return [s.referral_id for s in sender.send_referrals(records)]


def routed(settings: Settings, bootstrap: str, count: int, *, seed: int = 1, instance: str = "audit-a") -> Router:
    send(settings, bootstrap, [encompass(seed + i) for i in range(count)])
    router = Router(settings, bootstrap, instance=instance)
    stats = router.run(stop_when_idle=3)
    assert stats.routed >= count and stats.dead_lettered == 0
    return router


def longest_chain(records: list[Record]) -> tuple[int, str, list[Record]]:
    """(partition, chain, its records in offset order) of the chain with most records."""
    chains: dict[tuple[int, str], list[Record]] = {}
    for r in records:
        fields = chain_headers(r.headers)
        if fields is not None:
            chains.setdefault((r.partition, fields[0]), []).append(r)
    (partition, chain), rows = max(chains.items(), key=lambda kv: len(kv[1]))
    return partition, chain, rows


def problems(report: Any) -> list[tuple[str, int, int | None, str | None]]:
    return [(p.problem, p.partition, p.offset, p.chain) for p in report.problems]


def test_router_chains_every_audit_record_and_verify_says_intact(county: Settings, kafka_bootstrap: str) -> None:
    router = routed(county, kafka_bootstrap, SIGN_EVERY + 5)  # a batch signed in two groups
    records = read_topic(county, kafka_bootstrap, "audit")
    decisions = [r for r in records if dict(r.headers).get("rb-kind") == b"audit.decision"]
    assert len(decisions) == router.stats.audited > 0
    # every record chained under the router's transactional id, seq from 0, linked by hash
    by_chain: dict[int, list[Record]] = {}
    for r in records:
        chain, seq, prev = chain_headers(r.headers) or ("", -1, "")
        assert chain == router.member_name
        by_chain.setdefault(r.partition, []).append(r)
    for rows in by_chain.values():
        prev_hash = GENESIS
        for i, r in enumerate(rows):
            _, seq, prev = chain_headers(r.headers)  # type: ignore[misc]
            assert (seq, prev) == (i, prev_hash)
            prev_hash = record_hash(r.key or b"", r.value or b"", router.member_name, seq, prev)
        assert dict(rows[-1].headers)["rb-kind"] == CHECKPOINT_KIND.encode()  # each batch ends with one
    hub = load_identity(county, kafka_bootstrap, HUB)
    heads = read_heads(county, kafka_bootstrap, verify=hub.opener.verify)
    assert {p for (_c, p) in heads} == set(by_chain)
    assert all(h.seq == len(by_chain[p]) - 1 for (_c, p), h in heads.items())
    # the messages to one topic of a batch (of each SIGN_EVERY records of it) share one
    # signature, each with its proof: the audit records, the archive, the ledger and every
    # recipient's copies, each topic its own tree
    signatures = Counter(dict(r.headers)["rb-signature"] for r in records)
    assert all("rb-batch-proof" in dict(r.headers) for r in records)
    groups = router.stats.consumed // SIGN_EVERY + router.stats.batches  # the last of each with its checkpoint
    assert 1 <= len(signatures) <= groups < len(records) and max(signatures.values()) > 1
    assert len(signatures) * SIGN_EVERY > router.stats.consumed  # not one group a batch
    recipients = {read_event_value(r.value or b"")["recipient"] for r in decisions}
    copies = [r for party in sorted(recipients) for r in read_topic(county, kafka_bootstrap, "out", party=party)]
    assert len(copies) == router.stats.delivered > 0
    for rows in (read_topic(county, kafka_bootstrap, "archive"), read_topic(county, kafka_bootstrap, "deliveries"), copies):
        own = {dict(r.headers)["rb-signature"] for r in rows}
        assert rows and all("rb-batch-proof" in dict(r.headers) for r in rows)
        assert own and not own & set(signatures)  # a tree of its own topic

    result = cli(county, kafka_bootstrap, "audit", "verify", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["intact"] and report["problems"] == []
    assert sum(p["chained"] for p in report["partitions"].values()) == len(records)
    assert sum(p["checkpoints"] for p in report["partitions"].values()) >= 1


def test_a_restarted_router_continues_its_chains_and_another_router_keeps_its_own(
    county: Settings, kafka_bootstrap: str
) -> None:
    first = routed(county, kafka_bootstrap, 2, seed=10)
    before = read_topic(county, kafka_bootstrap, "audit")
    routed(county, kafka_bootstrap, 2, seed=20)  # same instance: same chain, read from audit.heads
    other = routed(county, kafka_bootstrap, 2, seed=30, instance="audit-b")
    records = read_topic(county, kafka_bootstrap, "audit")
    chains = {(chain_headers(r.headers) or ("",))[0] for r in records}
    assert chains == {first.member_name, other.member_name}
    seqs: dict[tuple[int, str], list[int]] = {}
    for r in records:
        chain, seq, _ = chain_headers(r.headers)  # type: ignore[misc]
        seqs.setdefault((r.partition, chain), []).append(seq)
    assert all(s == list(range(len(s))) for s in seqs.values()), seqs  # no restart from 0, no gap
    assert len(records) > len(before)
    hub = load_identity(county, kafka_bootstrap, HUB)
    report = verify_records(
        records, heads=read_heads(county, kafka_bootstrap, verify=hub.opener.verify), verify=hub.opener.verify
    )
    assert report.intact, problems(report)


def test_verify_names_a_deleted_edited_reordered_or_cut_record(county: Settings, kafka_bootstrap: str) -> None:
    routed(county, kafka_bootstrap, 6, seed=40)
    hub = load_identity(county, kafka_bootstrap, HUB)
    records = read_topic(county, kafka_bootstrap, "audit")
    heads = read_heads(county, kafka_bootstrap, verify=hub.opener.verify)
    partition, chain, rows = longest_chain(records)
    assert len(rows) >= 4, "the test needs a chain of at least 4 records"

    def check(changed: list[Record]) -> list[tuple[str, int, int | None, str | None]]:
        return problems(verify_records(changed, heads=heads, verify=hub.opener.verify))

    assert check(records) == []
    # deleted: the record after the gap is named
    gone = rows[1]
    left = [r for r in records if r is not gone]
    assert ("missing", partition, rows[2].offset, chain) in check(left)
    # edited: one byte of a decision's value (its signature and its hash both break)
    target = rows[1]
    edited_value = bytearray(target.value or b"")
    edited_value[-1] ^= 0x01
    edited = [replace(r, value=bytes(edited_value)) if r is target else r for r in records]
    found = check(edited)
    assert ("bad-signature", partition, target.offset, chain) in found
    assert ("edited", partition, target.offset, chain) in found
    # reordered: two neighbours swap places (each keeps its own signature and content)
    a, b = rows[1], rows[2]
    swapped = [
        replace(b, offset=a.offset) if r is b else replace(a, offset=b.offset) if r is a else r for r in records
    ]
    found = check(swapped)
    assert ("reordered", partition, b.offset, chain) in found
    assert not [p for p in found if p[0] in ("missing", "edited", "bad-signature")]
    # cut: the chain's last two records removed; the signed head names where it ended
    cut = [r for r in records if r not in rows[-2:]]
    found = check(cut)
    assert ("truncated", partition, rows[-3].offset, chain) in found
    # the heads topic lost too: a checkpoint of the same batch in another partition still names it
    others = {r.partition for r in records if r.partition != partition}
    if others:
        found = problems(verify_records(cut, heads={}, verify=hub.opener.verify))
        assert ("truncated", partition, rows[-3].offset, chain) in found
    # a forged record (not signed by anyone known) in the chain's place
    forged = [
        replace(r, headers=[(n, v) for n, v in r.headers if n != "rb-signature"] + [("rb-signature", b"x" * 64)])
        if r is rows[0]
        else r
        for r in records
    ]
    assert ("bad-signature", partition, rows[0].offset, chain) in check(forged)


def test_a_batch_that_wrote_one_partition_is_named_when_cut_without_the_heads_topic(
    county: Settings, kafka_bootstrap: str
) -> None:
    """One referral's decisions all go to one audit partition (they are keyed by its id), so
    its batch also puts a checkpoint into a second partition: cutting the chain's end there
    and losing the heads topic too is still named."""
    routed(county, kafka_bootstrap, 1, seed=60)
    hub = load_identity(county, kafka_bootstrap, HUB)
    records = read_topic(county, kafka_bootstrap, "audit")
    decisions = [r for r in records if dict(r.headers).get("rb-kind") == b"audit.decision"]
    assert len({r.partition for r in decisions}) == 1
    [partition] = {r.partition for r in decisions}
    checkpoints = [r for r in records if dict(r.headers).get("rb-kind") == b"audit.checkpoint"]
    assert len(checkpoints) == 2 and {r.partition for r in checkpoints} > {partition}  # and another
    rows = [r for r in records if r.partition == partition]
    chain = chain_headers(rows[0].headers)[0]
    cut = [r for r in records if r not in rows[-2:]]  # the last decision and its checkpoint
    found = problems(verify_records(cut, heads={}, verify=hub.opener.verify))
    assert ("truncated", partition, rows[-3].offset, chain) in found


def test_verify_cli_exits_non_zero_and_names_the_record(county: Settings, kafka_bootstrap: str) -> None:
    """The CLI on a broken trail: an audit record the hub signed, but written again out of its
    chain (a replayed copy of a real decision) is named, and the command exits 1."""
    from referral_broker.cluster.clients import build_producer
    from referral_broker.cluster.topics import topic_name

    routed(county, kafka_bootstrap, 2, seed=60)
    records = read_topic(county, kafka_bootstrap, "audit")
    decision = next(r for r in records if dict(r.headers).get("rb-kind") == b"audit.decision")
    producer = build_producer(county, kafka_bootstrap)
    try:
        # the same signed record again, in its own partition: a duplicate of its chain position
        producer._producer.send(
            topic_name(county, "audit"),
            value=decision.value,
            key=decision.key,
            headers=decision.headers,
            partition=decision.partition,
        )
        producer._producer.flush()
    finally:
        producer.close()
    result = cli(county, kafka_bootstrap, "audit", "verify", "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    chain = (chain_headers(decision.headers) or ("",))[0]
    assert not report["intact"]
    named = [(p["problem"], p["partition"], p["chain"]) for p in report["problems"]]
    assert ("duplicate", decision.partition, chain) in named or ("reordered", decision.partition, chain) in named
    human = cli(county, kafka_bootstrap, "audit", "verify")
    assert human.exit_code == 1 and "NOT intact" in human.output and chain in human.output


def test_retention_events_are_chained_and_a_deleted_one_is_named(county: Settings, kafka_bootstrap: str) -> None:
    """Retention's events (signed JSON) are the 'retention' chain: one writer at a time (its
    transactional id), seq from 0, each head on audit.heads."""
    from referral_broker.sealing import retention

    case = str(uuid.uuid4())
    retention.hold(county, kafka_bootstrap, case, "synthetic legal query")
    retention.release(county, kafka_bootstrap, case)
    retention.hold(county, kafka_bootstrap, case, "synthetic second query")
    records = read_topic(county, kafka_bootstrap, "audit")
    chained = [(chain_headers(r.headers), read_event_value(r.value or b"")["type"]) for r in records]
    assert [(c[0], c[1], t) for c, t in chained if c] == [
        ("retention", 0, "retention.hold_placed"),
        ("retention", 1, "retention.hold_released"),
        ("retention", 2, "retention.hold_placed"),
    ]
    hub = load_identity(county, kafka_bootstrap, HUB)
    heads = read_heads(county, kafka_bootstrap, verify=hub.opener.verify)
    [(where, head)] = heads.items()
    assert where == ("retention", records[0].partition) and head.seq == 2
    assert verify_records(records, heads=heads, verify=hub.opener.verify).intact
    found = problems(verify_records(records[1:], heads=heads, verify=hub.opener.verify))
    assert found == [("missing", records[1].partition, records[1].offset, "retention")]
    found = problems(verify_records(records[:-1], heads=heads, verify=hub.opener.verify))
    assert found == [("truncated", records[1].partition, records[1].offset, "retention")]
