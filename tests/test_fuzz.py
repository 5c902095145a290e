"""Fuzzing the three entry points (issue 19, Build 4), on the real broker with real keys.

10,000 generated inputs, made by hypothesis from real signed messages (random bytes, flipped,
truncated or extended Avro, wrong, missing, duplicated or reordered headers, wrong schema
fingerprints, oversized values and headers, odd keys, tombstones, and mutated referrals sealed
and signed properly), go to the router (``Router._outputs``: the per-record step of every
batch), to ``receive`` (``open_record``) and to the inbox's ingest (``TeamIngest._handle``).
Half of the byte-level mutations are signed again with the real sender's key, so they get past
the signature and reach the header, key-wrapping, Avro and binding parsers behind it.

Every input must end as a dead letter with a stage and a reason, or a refusal with a reason
(or, for a re-signed or re-sealed input that is still a valid message, be accepted as one); no
exception leaves the entry point, and none is an unexpected one (the router's ``internal``
stage, ``receive``'s "malformed message (<exception type> ...)"): each such input is a bug.
A few hundred go through the real broker end to end: the router, ``receive`` and the ingest
consumer each read them to idle, account for every one (dead letters matched by source
offset) and keep consuming: the valid messages sent after the garbage are delivered.
Counts by outcome are printed (``pytest -s``; ``scripts/faults.sh`` shows them).
"""

from __future__ import annotations

import copy
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import deletion_failures
from county import CHARITY, POLICE, SCHOOL
from hypothesis import HealthCheck, given, note
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from test_inbox_fixtures import TEAM, Pipeline, as_record, make_pipeline, make_store

from referral_broker.cluster.clients import Record, build_consumer, build_producer, drain
from referral_broker.cluster.topics import admin_client, ensure_topics, topic_name
from referral_broker.config import Settings, load_settings
from referral_broker.consumers.dead_letters import (
    H_REASON,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
    H_STAGE,
)
from referral_broker.consumers.inbox.ingest import DLQ_STAGE, TeamIngest
from referral_broker.consumers.receiving import Received, Refused, open_record, receive
from referral_broker.consumers.router import Router
from referral_broker.organisations import load_file
from referral_broker.organisations import publish as publish_orgs
from referral_broker.parties import HUB
from referral_broker.producers.hub_seal import seal_status
from referral_broker.schemas.registry import referral_schema
from referral_broker.sealing.signing import BATCH_PROOF_HEADER, SIGNATURE_HEADER, sign_message

pytestmark = pytest.mark.fuzz

REFERRER = SCHOOL  # the partner whose intake topic the router fuzz inputs arrive on
RECIPIENT = CHARITY  # a non-team recipient of routed police referrals: the receive fuzz inputs
# In-process inputs per entry point (10,000 in all with the end-to-end ones below).
SCALE = float(os.environ.get("REFERRAL_BROKER_FUZZ_SCALE", "1"))  # a quick look: 0.05
ROUTER_CASES = int(3_600 * SCALE)
RECEIVE_CASES = int(3_000 * SCALE)
INGEST_CASES = int(3_000 * SCALE)
E2E_CASES = 400  # through the real broker: 150 router, 125 receive, 125 ingest
E2E_VALID = 3  # valid messages after the garbage on each topic: the consumer kept going
OVERSIZED = 600_000  # bytes: well past any real message, within the broker's 1 MB limit
HSET = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
ROUTER_STAGES = {"validate", "verify-open", "policy", "config"}  # "internal" is a bug

TOTALS: dict[str, Counter[str]] = {}  # entry point -> outcome -> count (printed at the end)


# -- the world: one topic namespace, every party's keys, the shipped county --------------------
@pytest.fixture(scope="module")
def world(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    data: Path = tmp_path_factory.mktemp("fuzz") / "data"
    settings = load_settings(
        environ={},
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        kafka_topic_profile="test",
        paths_data_dir=data,
        keys_dek_cache_max_age_s=300.0,
    )
    ensure_topics(settings, kafka_bootstrap, read_registry=False)
    publish_orgs(settings, kafka_bootstrap, load_file())
    try:
        yield make_pipeline(settings)
    finally:
        admin = admin_client(settings, kafka_bootstrap)
        try:
            names = [t for t in admin.list_topics() if t.startswith(settings.kafka_topic_prefix)]
            failed = deletion_failures(admin.delete_topics(names, raise_errors=False))
        finally:
            admin.close()
        assert not failed, f"deleting the fuzz topics failed: {failed}"
        summary = "\n".join(
            f"  {entry:<16} {sum(c.values()):>6}  " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
            for entry, c in TOTALS.items()
        )
        print(f"\nfuzz outcomes ({sum(sum(c.values()) for c in TOTALS.values())} inputs):\n{summary}")


@dataclass
class Bases:
    """Real signed messages to mutate, and the keys that signed them."""

    intake: list[Record]  # partner -> hub referrals and a status, on REFERRER's topics
    referrals: list[dict[str, Any]]  # the referrals those intake messages carry
    to_recipient: list[Record]  # router -> RECIPIENT
    to_team: list[Record]  # router -> TEAM (case-sealed)
    fingerprints: list[bytes]  # real schema fingerprints (hex) of other schemas


@pytest.fixture(scope="module")
def bases(world: Pipeline) -> Bases:
    s = world.settings
    intake, referrals, to_recipient, to_team = [], [], [], []
    seen: set[str] = set()
    router = world.router()
    for seed in range(4):
        record = world.referral(TEAM, 9000 + seed)
        message = world.partner(REFERRER).sealer.seal(
            record,
            referral_schema(),
            topic=topic_name(s, "intake", REFERRER),
            recipient=HUB,
            referral_id=record["referral_id"],
            referral_version=record["version"],
            kind="referral",
        )
        intake.append(as_record(message, offset=seed))
        referrals.append(record)
        to_team += [as_record(m) for m in router.process(intake[-1]) if m.topic == topic_name(s, "out", TEAM)]
        police = police_referral(world, 9100 + seed)
        sent = world.partner(POLICE).sealer.seal(
            police, referral_schema(), topic=topic_name(s, "intake", POLICE), recipient=HUB,
            referral_id=police["referral_id"], referral_version=police["version"], kind="referral",
        )  # fmt: skip
        out = topic_name(s, "out", RECIPIENT)
        outputs = router.process(as_record(sent))
        seen.update(m.topic for m in outputs)
        to_recipient += [as_record(m) for m in outputs if m.topic == out]
    status = {
        "status_id": uuid.uuid4(),
        "referral_id": uuid.UUID(str(referrals[0]["referral_id"])),
        "version": 1,
        "from_party": REFERRER,
        "to_party": POLICE,
        "status": "accepted",
        "reason": None,
        "at": datetime.now(UTC).replace(microsecond=0),
        "actor_role": "Synthetic role",
    }
    intake.append(as_record(seal_status(world.partner(REFERRER).sealer, s, status, party=REFERRER)))
    router.ledger.abort()
    router.audit_chain.abort()
    fps = sorted({dict(r.headers)["rb-schema"] for r in intake + to_recipient + to_team})
    assert to_team and to_recipient, f"the base referrals must reach the team and {RECIPIENT}: {seen}"
    return Bases(intake, referrals, to_recipient, to_team, fps)


def police_referral(world: Pipeline, seed: int) -> dict[str, Any]:
    """A police referral about a family in TEAM's district (its copies: the receive bases)."""
    return world.referral(TEAM, seed, partner=POLICE)


# -- mutations --------------------------------------------------------------------------------
HEADER_NAMES = [
    "rb-format", "rb-kind", "rb-sender", "rb-sender-key", "rb-recipient", "rb-recipient-key",
    "rb-schema", "rb-referral-version", "rb-sealed-at", "rb-case", "rb-dek", "rb-binding",
    "rb-view", "rb-withheld", "rb-no-onward", "rb-referrer", "rb-decision", "rb-signature",
    "rb-dlq-stage", "x-other", "",
]  # fmt: skip

ODD_VALUES = [
    b"", b"\x00", b"\xff\xfe", b"2", b"1", b"3", b"-1", b"99999999999999999999", b"referral",
    b"status", b"council", b"[]", b"{}", b"null", b'["a"]', b"\x80" * 40, "é".encode(), b"A" * 129,
    b"0" * 64, b"zz", b"\n\t", b"\x00" * 64, b"ab" * 32,
]  # fmt: skip

MUTATIONS = [
    "random_value", "random_all", "flip", "truncate", "extend", "splice", "drop_header",
    "dup_header", "change_header", "add_header", "shuffle_headers", "swap_header_values",
    "fingerprint", "oversized_value", "oversized_header", "key", "tombstone", "no_headers",
    "other_base_value", "deep_header", "deep_header",
]  # fmt: skip
# Headers parsed only after the signature verifies: changed in place (flipped, cut, extended,
# replaced) and signed again, so their own parsers meet the garbage.
DEEP_HEADERS = [
    "rb-dek", "rb-binding", "rb-schema", "rb-view", "rb-withheld", "rb-no-onward", "rb-case",
    "rb-referral-version", "rb-sealed-at", "rb-recipient-key", "rb-decision", "rb-referrer",
]  # fmt: skip


@dataclass(frozen=True)
class Case:
    kind: str
    base: int
    resign: bool
    changed: bool  # the input differs from the base message


@st.composite
def mutated(draw: st.DrawFn, pool: list[Record], fingerprints: list[bytes]) -> tuple[Record, Case]:
    """A real message from ``pool``, changed by one mutation, maybe signed again (the caller
    re-signs when ``Case.resign``)."""
    index = draw(st.integers(0, len(pool) - 1))
    base = pool[index]
    kind = draw(st.sampled_from(MUTATIONS))
    resign = draw(st.booleans())
    key, value, headers = base.key, base.value, list(base.headers)
    assert value is not None
    some_bytes = st.binary(min_size=0, max_size=256)
    if kind == "random_value":
        value = draw(st.binary(min_size=0, max_size=2048))
    elif kind == "random_all":
        value = draw(st.binary(max_size=2048))
        key = draw(st.none() | some_bytes)
        names = st.sampled_from(HEADER_NAMES) | st.text(max_size=20)
        headers = draw(st.lists(st.tuples(names, some_bytes), max_size=16))
    elif kind == "flip":
        data = bytearray(value)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        value = bytes(data)
    elif kind == "truncate":
        value = value[: draw(st.integers(0, len(value) - 1))]
    elif kind == "extend":
        value = value + draw(st.binary(min_size=1, max_size=64))
    elif kind == "splice":
        at = draw(st.integers(0, len(value)))
        cut = draw(st.integers(0, 32))
        value = value[:at] + draw(st.binary(max_size=32)) + value[at + cut :]
    elif kind == "drop_header":
        del headers[draw(st.integers(0, len(headers) - 1))]
    elif kind == "dup_header":
        at = draw(st.integers(0, len(headers) - 1))
        name, val = headers[at]
        headers.insert(draw(st.integers(0, len(headers))), (name, draw(st.just(val) | some_bytes)))
    elif kind == "change_header":
        at = draw(st.integers(0, len(headers) - 1))
        headers[at] = (headers[at][0], draw(st.sampled_from(ODD_VALUES) | some_bytes))
    elif kind == "add_header":
        name = draw(st.sampled_from(HEADER_NAMES) | st.text(max_size=20))
        headers.insert(draw(st.integers(0, len(headers))), (name, draw(st.sampled_from(ODD_VALUES) | some_bytes)))
    elif kind == "shuffle_headers":
        headers = draw(st.permutations(headers))
    elif kind == "swap_header_values":
        a, b = draw(st.integers(0, len(headers) - 1)), draw(st.integers(0, len(headers) - 1))
        headers[a], headers[b] = (headers[a][0], headers[b][1]), (headers[b][0], headers[a][1])
    elif kind == "fingerprint":
        choice = st.sampled_from(fingerprints) | st.sampled_from([b"", b"zz", b"00" * 8, b"ab" * 32, b"0"])
        headers = [(n, draw(choice) if n == "rb-schema" else v) for n, v in headers]
    elif kind == "oversized_value":  # mostly 64 kB past the message; one in ten OVERSIZED
        size = OVERSIZED if draw(st.integers(0, 9)) == 0 else 65_536
        value = value + bytes([draw(st.integers(0, 255))]) * size
    elif kind == "oversized_header":
        at = draw(st.integers(0, len(headers) - 1))
        headers[at] = (headers[at][0], b"\x01" * draw(st.sampled_from([129, 4096, 100_000])))
    elif kind == "key":
        key = draw(st.sampled_from([None, b"", b"\xff\xfe", b"not-a-uuid", str(uuid.uuid4()).encode()]) | some_bytes)
    elif kind == "tombstone":
        value = None
    elif kind == "no_headers":
        headers = []
    elif kind == "deep_header":
        present = [i for i, (n, _) in enumerate(headers) if n in DEEP_HEADERS]
        at = draw(st.sampled_from(present))
        old = headers[at][1]
        how = draw(st.sampled_from(["flip", "cut", "extend", "random"]))
        if how == "flip" and old:
            data = bytearray(old)
            data[draw(st.integers(0, len(old) - 1))] ^= draw(st.integers(1, 255))
            new = bytes(data)
        elif how == "cut" and old:
            new = old[: draw(st.integers(0, len(old) - 1))]
        elif how == "extend":
            new = old + draw(st.binary(min_size=1, max_size=64))
        else:
            new = draw(st.sampled_from(ODD_VALUES) | st.binary(max_size=300))
        headers[at] = (headers[at][0], new)
        resign = True
    elif kind == "other_base_value":
        other = draw(st.sampled_from(pool)).value
        value = other if other != value else value[:-1]
    changed = (key, value, headers) != (base.key, base.value, list(base.headers))
    note(f"mutation {kind} of base {index}, resign={resign}")
    return replace(base, key=key, value=value, headers=headers), Case(kind, index, resign, changed)


def resigned(record: Record, signer: Any) -> Record:
    """``record`` signed again by ``signer`` (an Ed25519 private key) as it now is: every
    signature header gets the new signature, so only the content is wrong."""
    if record.value is None or not any(n == SIGNATURE_HEADER for n, _ in record.headers):
        return record
    own = [(n, v) for n, v in record.headers if n != BATCH_PROOF_HEADER]  # signed alone now
    signature = sign_message(signer, record.topic, record.key, own, record.value)
    headers = [(n, signature if n == SIGNATURE_HEADER else v) for n, v in own]
    return replace(record, headers=headers)


def fuzz_input(draw: st.DrawFn, pool: list[Record], fps: list[bytes], signer: Any) -> tuple[Record, Case]:
    record, case = draw(mutated(pool, fps))
    return (resigned(record, signer) if case.resign else record), case


def may_be_accepted(case: Case) -> bool:
    """A mutation that leaves a valid message (unchanged, or re-signed after a harmless change
    such as a reordered header or an added unknown one) may be accepted as that message."""
    return not case.changed or case.resign


def signing_key(world: Pipeline, party: str) -> Any:
    return world.partner(party).keystore.active(time.time()).signing if party != HUB else world.hub.keystore.active(time.time()).signing


# -- referral-level mutations, sealed and signed properly -------------------------------------
def semantic(draw: st.DrawFn, referral: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A referral changed within its schema's types: what a buggy or hostile partner system
    could seal and sign itself. Validation, the key check or the policy must refuse the bad."""
    r = copy.deepcopy(referral)
    kind = draw(st.sampled_from(["version", "id", "partner", "text", "created", "district", "concerns", "none"]))
    if kind == "version":
        r["version"] = draw(st.integers(-(2**31), 2**31 - 1))
    elif kind == "id":
        r["referral_id"] = uuid.UUID(int=draw(st.integers(0, 2**128 - 1)))
    elif kind == "partner":
        r["referrer"]["partner"] = draw(st.sampled_from(["schools", "health", "police", "dwp", "charities"]))
    elif kind == "text":
        r["child"]["given_name"] = draw(st.text(max_size=300) | st.just("x" * 70_000))
    elif kind == "created":
        r["created_at"] = datetime.now(UTC) + timedelta(days=draw(st.integers(-40_000, 40_000)))
    elif kind == "district":
        r["district"] = draw(st.sampled_from(["cambridge", "east_cambs", "fenland", "huntingdonshire", "south_cambs"]))
    elif kind == "concerns":
        r["concern_types"] = draw(st.lists(st.sampled_from(["neglect", "domestic_abuse", "school_attendance"]), max_size=4))
    return r, f"referral_{kind}"


def table_row(test: str, scenario: str, **figures: Any) -> None:
    """A row for ``scripts/faults.sh``'s table (when it runs this suite)."""
    path = os.environ.get("REFERRAL_BROKER_FAULTS_TABLE")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"scenario": scenario, "test": f"test_fuzz::{test}", **figures}) + "\n")


# -- outcomes ---------------------------------------------------------------------------------
def header(record: Any, name: str) -> bytes | None:
    return next((v for n, v in record.headers if n == name), None)


def router_outcome(world: Pipeline, router: Router, record: Record) -> str:
    """Route one record in-process; its outcome: 'dead:<stage>' or 'routed'."""
    router.audit_chain.abort()
    router.ledger.abort()
    outputs = router._outputs(record)  # raising would stop a real router's batch: a failure
    dlq = topic_name(world.settings, "dlq")
    if any(m.topic == dlq for m in outputs):
        [letter] = outputs
        stage = (header(letter, H_STAGE) or b"").decode()
        assert stage in ROUTER_STAGES, f"unexpected error in the router (stage {stage}): {header(letter, H_REASON)!r}"
        reason = (header(letter, H_REASON) or b"").decode()
        assert reason.strip(), "a dead letter without a reason"
        assert reason.isprintable() and len(reason) <= 2000, "a reason quoting what it refused"
        assert letter.value == (record.value or b"") and letter.key == (record.key or b"")
        return f"dead:{stage}"
    assert any(m.topic == topic_name(world.settings, "archive") for m in outputs)
    return "routed"


def refusal_outcome(item: Received | Refused) -> str:
    if isinstance(item, Received):
        return "received"
    assert item.reason.strip(), "a refusal without a reason"
    assert item.reason.isprintable() and len(item.reason) <= 2000, "a reason quoting what it refused"
    assert not item.reason.startswith("malformed message ("), f"unexpected error in receive: {item.reason}"
    return "refused:" + item.reason.split(":", 1)[0]


# -- in-process fuzzing -----------------------------------------------------------------------
def test_router_refuses_every_mutated_intake_with_a_reason(
    world: Pipeline, bases: Bases, request: pytest.FixtureRequest
) -> None:
    router = world.router()
    router.catch_up()
    counts: Counter[str] = Counter()
    signer = signing_key(world, REFERRER)
    partner = world.partner(REFERRER).sealer
    intake_topic = topic_name(world.settings, "intake", REFERRER)

    @hsettings(max_examples=ROUTER_CASES, **HSET)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        if data.draw(st.integers(0, 9)) == 0:  # one in ten: a referral mutated, then sealed properly
            referral, label = semantic(data.draw, data.draw(st.sampled_from(bases.referrals)))
            try:
                message = partner.seal(
                    referral, referral_schema(), topic=intake_topic, recipient=HUB,
                    referral_id=str(bases.referrals[0]["referral_id"]) if label == "referral_id" else referral["referral_id"],
                    referral_version=1 if label == "referral_version" else referral["version"], kind="referral",
                )  # fmt: skip
            except Exception as exc:  # the partner's own sealer refuses what the schema cannot hold
                counts[f"unsealable:{type(exc).__name__}"] += 1
                return
            outcome = router_outcome(world, router, as_record(message))
            counts[f"{label}->{outcome}"] += 1
            return
        record, case = fuzz_input(data.draw, bases.intake, bases.fingerprints, signer)
        outcome = router_outcome(world, router, record)
        if outcome == "routed":
            assert may_be_accepted(case), f"a changed, unsigned-again message was routed: {case}"
        counts[outcome] += 1

    run()
    TOTALS["router"] = counts
    print("router:", dict(sorted(counts.items())))
    assert sum(counts.values()) == ROUTER_CASES
    routed = sum(v for k, v in counts.items() if k.endswith("routed"))
    unsealable = sum(v for k, v in counts.items() if k.startswith("unsealable"))
    table_row(
        request.node.name, "fuzz: router, in-process", sent=ROUTER_CASES, delivered=routed,
        refused=ROUTER_CASES - routed - unsealable, lost=0,
    )  # fmt: skip
    assert counts["dead:verify-open"] > ROUTER_CASES // 2
    assert sum(v for k, v in counts.items() if k.endswith("dead:validate")) > 0


def test_receive_refuses_every_mutated_delivery_with_a_reason(
    world: Pipeline, bases: Bases, request: pytest.FixtureRequest
) -> None:
    identity = world.partner(RECIPIENT)
    out = topic_name(world.settings, "out", RECIPIENT)
    signer = signing_key(world, HUB)
    counts: Counter[str] = Counter()

    @hsettings(max_examples=RECEIVE_CASES, **HSET)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        record, case = fuzz_input(data.draw, bases.to_recipient, bases.fingerprints, signer)
        if data.draw(st.integers(0, 19)) == 0:
            record = replace(record, topic=topic_name(world.settings, "out", SCHOOL))  # read elsewhere
            case = replace(case, changed=True, resign=False)
        item = open_record(identity, record, topic=out)
        outcome = refusal_outcome(item)
        if outcome == "received":
            assert may_be_accepted(case), f"a changed, unsigned-again message was received: {case}"
        counts[outcome] += 1

    run()
    TOTALS["receive"] = counts
    print("receive:", dict(sorted(counts.items())))
    assert sum(counts.values()) == RECEIVE_CASES and counts["received"] < RECEIVE_CASES // 2
    table_row(
        request.node.name, "fuzz: receive, in-process", sent=RECEIVE_CASES, delivered=counts["received"],
        refused=RECEIVE_CASES - counts["received"], lost=0,
    )  # fmt: skip


def test_ingest_dead_letters_every_mutated_delivery_with_a_reason(
    world: Pipeline, bases: Bases, request: pytest.FixtureRequest
) -> None:
    store = make_store(world.settings)
    worker = TeamIngest(world.settings, TEAM, store, world.format([TEAM]))
    signer = signing_key(world, HUB)
    producer = build_producer(world.settings, world.bootstrap)
    counts: Counter[str] = Counter()
    try:

        @hsettings(max_examples=INGEST_CASES, **HSET)
        @given(st.data())
        def run(data: st.DataObject) -> None:
            record, case = fuzz_input(data.draw, bases.to_team, bases.fingerprints, signer)
            before = worker.stats.as_dict()
            worker._handle(record, producer)  # raising would stop the team's ingest thread
            after = worker.stats.as_dict()
            moved = [k for k in ("new", "updated", "older", "duplicate", "dead_lettered") if after[k] != before[k]]
            assert len(moved) == 1, moved
            if moved[0] != "dead_lettered":
                assert may_be_accepted(case), f"a changed, unsigned-again message was stored: {case}"
            counts[moved[0]] += 1

        run()
        producer.flush()
    finally:
        producer.close()
        store.close()
    TOTALS["ingest"] = counts
    print("ingest:", dict(sorted(counts.items())), "reasons:", dict(sorted(worker.stats.reasons.items())))
    assert sum(counts.values()) == INGEST_CASES
    # every dead letter reached the dead-letter topic, with the ingest stage
    letters = [r for r in read_all(world.settings, topic_name(world.settings, "dlq")) if header(r, H_STAGE) == DLQ_STAGE.encode()]
    assert len(letters) == counts["dead_lettered"] > INGEST_CASES // 2
    assert all((header(r, H_REASON) or b"").decode().isprintable() for r in letters)
    table_row(
        request.node.name, "fuzz: inbox ingest, in-process", sent=INGEST_CASES,
        delivered=counts["new"] + counts["updated"], refused=counts["dead_lettered"], lost=0,
        duplicated=counts["duplicate"],
    )  # fmt: skip


# -- end to end on the real broker ------------------------------------------------------------
def read_all(settings: Settings, topic: str) -> list[Record]:
    consumer = build_consumer(settings, settings.bootstrap_servers, [topic], group_id=None)
    try:
        return [r for batch in drain(consumer, idle_s=2.0) for r in batch]
    finally:
        consumer.close()


def garbage(pool: list[Record], fps: list[bytes], n: int) -> list[tuple[Record, Case]]:
    """``n`` changed copies of ``pool``'s messages, not signed again (so every one must be
    refused), that a broker takes (no header past its limits)."""
    made: list[tuple[Record, Case]] = []

    @hsettings(max_examples=n * 4, **HSET)
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        record, case = data.draw(mutated(pool, fps))
        if len(made) < n and case.changed and case.kind != "oversized_header":
            made.append((record, replace(case, resign=False)))

    collect()
    assert len(made) == n, len(made)
    return made


def produce(settings: Settings, records: list[Record], topic: str) -> list[tuple[int, int]]:
    """Send ``records`` as they are (a tombstone too); where each landed (partition, offset)."""
    producer = build_producer(settings, settings.bootstrap_servers)
    try:
        raw = producer._producer  # the wrapper does not hand back where a record landed
        sent = [raw.send(topic, value=r.value, key=r.key, headers=list(r.headers)) for r in records]
        raw.flush(timeout=60)
        return [(m.partition, m.offset) for m in (f.get(timeout=60) for f in sent)]
    finally:
        producer.close()


def source(letter: Record) -> tuple[int, int]:
    return int(header(letter, H_SOURCE_PARTITION) or b"-1"), int(header(letter, H_SOURCE_OFFSET) or b"-1")


def test_end_to_end_every_input_is_accounted_for_and_consumers_keep_going(
    world: Pipeline, bases: Bases, request: pytest.FixtureRequest
) -> None:
    s = world.settings
    dlq = topic_name(s, "dlq")
    counts: dict[str, Counter[str]] = {"router e2e": Counter(), "receive e2e": Counter(), "ingest e2e": Counter()}
    n_router, n_receive = 150, 125
    n_ingest = E2E_CASES - n_router - n_receive

    # the router: garbage, then valid referrals, on the partner's intake topic
    intake = topic_name(s, "intake", REFERRER)
    bad = garbage(bases.intake[:-1], bases.fingerprints, n_router)
    where = produce(s, [r for r, _ in bad], intake)
    world.send_referrals([world.referral(TEAM, 9500 + i) for i in range(E2E_VALID)])
    started = time.monotonic()
    stats = Router(s, world.bootstrap, policy=world.policy, identity=world.hub).run(stop_when_idle=4)
    took = time.monotonic() - started
    assert stats.consumed == n_router + E2E_VALID, stats
    assert stats.routed == E2E_VALID and stats.dead_lettered == n_router, stats
    assert "internal" not in stats.by_reason, stats.by_reason
    letters = [r for r in read_all(s, dlq) if header(r, H_SOURCE_TOPIC) == intake.encode()]
    assert sorted(source(r) for r in letters) == sorted(where)
    assert all((header(r, H_REASON) or b"").strip() for r in letters)
    counts["router e2e"].update({f"dead:{k}": v for k, v in stats.by_reason.items()} | {"routed": stats.routed})
    print(f"router e2e: {n_router} garbage + {E2E_VALID} valid in {took:.1f} s: {stats.by_reason}")
    node = request.node.name
    table_row(
        node, "fuzz: router on the broker", sent=n_router + E2E_VALID, delivered=stats.routed,
        refused=stats.dead_lettered, lost=0,
    )  # fmt: skip

    # receive: garbage, then what the router really sent, on the recipient's out topic
    out = topic_name(s, "out", RECIPIENT)
    before = {(r.partition, r.offset) for r in read_all(s, out)}
    bad = garbage(bases.to_recipient, bases.fingerprints, n_receive)
    where = produce(s, [r for r, _ in bad] + bases.to_recipient, out)
    garbage_at, real_at = set(where[:n_receive]), set(where[n_receive:])
    identity = world.partner(RECIPIENT)
    items = list(receive(s, world.bootstrap, RECIPIENT, stop_when_idle=3, group_id="fuzz", identity=identity))
    by_place = {(i.partition, i.offset): i for i in items}
    assert len(by_place) == len(items) and set(by_place) == before | garbage_at | real_at
    for place in garbage_at:
        counts["receive e2e"][refusal_outcome(by_place[place])] += 1
    assert counts["receive e2e"]["received"] == 0
    assert all(isinstance(by_place[p], Received) for p in real_at)  # it kept going
    counts["receive e2e"]["received"] += len(real_at)
    table_row(
        node, "fuzz: receive on the broker", sent=len(where), delivered=len(real_at), refused=n_receive, lost=0,
        duplicated=0,
    )  # fmt: skip

    # ingest: garbage, then the router's real copies for the team, on the team's out topic
    team_out = topic_name(s, "out", TEAM)
    bad = garbage(bases.to_team, bases.fingerprints, n_ingest)
    where = produce(s, [r for r, _ in bad] + bases.to_team, team_out)
    earlier = {(r.partition, r.offset) for r in read_all(s, dlq)}  # the in-process test's letters
    store = make_store(s.replace(inbox_database=s.paths_data_dir / "inbox-e2e.sqlite3"))
    try:
        result = TeamIngest(s, TEAM, store, world.format([TEAM])).run(stop_when_idle=3)
    finally:
        store.close()
    seen = result.new + result.updated + result.older + result.duplicate + result.dead_lettered
    assert seen == len(read_all(s, team_out)), result.as_dict()
    letters = [
        r for r in read_all(s, dlq)
        if header(r, H_SOURCE_TOPIC) == team_out.encode() and (r.partition, r.offset) not in earlier
    ]  # fmt: skip
    assert result.dead_lettered == n_ingest, result.as_dict()
    assert {source(r) for r in letters} == set(where[:n_ingest]), "a garbage record left no dead letter"
    assert result.new >= len({r.key for r in bases.to_team}), result.as_dict()  # the real ones, after it
    counts["ingest e2e"].update({"dead_lettered": result.dead_lettered, "stored": result.new + result.updated})
    table_row(
        node, "fuzz: inbox ingest on the broker", sent=seen, delivered=result.new + result.updated,
        refused=result.dead_lettered, lost=0, duplicated=result.duplicate,
    )  # fmt: skip
    TOTALS.update(counts)
