"""``bench router``: the router's throughput on the real broker, beside what bounds it.

In one run, on fresh topics under a private prefix:

(a) the primitive floor: the per-referral Avro and crypto work the router cannot avoid
    (verify one signature, open the sealed fields, decode, then per recipient project,
    seal, sign), timed in-process with no Kafka;
(b) a raw kafka-python pass-through (consume -> produce the same bytes, no processing);
(c) the router at 1 and 3 recipients per referral;
(d) the same router given :class:`PlainSealer` instead of the hub's keys (defined here and
    passed only by this module: no configuration can switch it on), to show what the crypto
    costs.

Figures are printed, never asserted: they depend on the machine and what else runs on it.
"""

from __future__ import annotations

import contextlib
import copy
import resource
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from referral_broker.cluster.clients import build_consumer, build_producer, poll_records
from referral_broker.cluster.topics import admin_client, ensure_with_county, plan, topic_name
from referral_broker.config import Settings
from referral_broker.consumers.receiving import Received
from referral_broker.consumers.router import Router
from referral_broker.errors import BrokerError
from referral_broker.parties import HUB, all_parties
from referral_broker.policy import decide, load_policy
from referral_broker.producers.intake import IntakeSender
from referral_broker.schemas import codec
from referral_broker.schemas.registry import referral_schema
from referral_broker.schemas.synth import synthetic_referrals
from referral_broker.sealing import OutgoingMessage
from referral_broker.sealing.key_admin import init_parties

SENDER = "school-110123"  # a school of the shipped county


class PlainSealer:
    """Benchmark only: the router's projection and encoding with no cryptography. Its input
    is a plain single-object referral (as this module produces it, claimed to come from
    ``sender``); what it "seals" and "signs" goes out as plain Avro without signatures."""

    def __init__(self, sender: str) -> None:
        self.sender = sender
        self.canonical = referral_schema()
        self.fingerprint = codec.prepare(self.canonical).fingerprint

    def open(self, record: Any, *, sender: str | None, kind: str) -> Received:
        referral = codec.decode(record.value or b"", self.canonical)
        return Received(
            referral_id=str(referral["referral_id"]),
            version=referral["version"],
            kind=kind,
            sender=self.sender,
            referrer=None,
            record=referral,
            schema_fingerprint=self.fingerprint,
        )

    def seal(
        self,
        record: dict[str, Any],
        schema: dict[str, Any],
        *,
        topic: str,
        recipient: str,
        referral_id: str,
        referral_version: int,
        kind: str,
        case_id: str | None,
        extra_headers: list[tuple[str, bytes]],
    ) -> OutgoingMessage:
        return OutgoingMessage(topic, referral_id.encode(), codec.encode(record, schema), list(extra_headers))

    def sign(self, *, topic: str, key: bytes, value: bytes, kind: str, extra_headers: Any = ()) -> OutgoingMessage:
        return OutgoingMessage(topic, key, value, list(extra_headers))


def _shaped(count: int, recipients: int, seed: int) -> list[dict[str, Any]]:
    """Referrals the shipped policy sends to exactly 1 (the district team) or 3 recipients
    (the district team, the school nursing service and the charity named for the parenting
    programme, in Cambridge)."""
    out = []
    services = (
        ["family_support"] if recipients == 1 else ["family_support", "school_nurse", "parenting_programme"]
    )
    for record in synthetic_referrals(count, seed=seed):
        r = copy.deepcopy(record)
        r["referrer"]["partner"] = "schools"
        r["district"] = "cambridge"
        r["service_providers"] = (
            [{"service": "parenting_programme", "provider": "1190003"}] if recipients == 3 else []
        )
        if r.get("health_and_development"):
            r["health_and_development"]["gp_practice_ods"] = None
        r["services_requested"] = services
        r["consent"] = {"state": "given", "recorded_at": r["created_at"], "recorded_by": "Synthetic Worker"}
        r["sharing_override"] = None
        r["flags"] = {
            "safeguarding_concern": False,
            "crime_prevention": False,
            "early_support_pathway": False,
        }
        r["concern_types"] = ["parenting"]
        r["concerns"] = [{"type": "parenting", "detail": "Synthetic detail", "since": None}]
        out.append(r)
    return out


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _floor_us(settings: Settings, bootstrap: str, referrals: list[dict[str, Any]], n: int) -> float:
    """Per-referral cost of the primitives the router cannot avoid, in-process, on the same
    data: verify the intake signature, unwrap its data key, decrypt every sealed field, decode
    the referral; then for each of the recipients and the archive copy encode its view,
    encrypt each of its sealed fields, wrap a data key and sign; encode and sign each audit."""
    import io
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from fastavro import parse_schema, schemaless_reader, schemaless_writer

    from referral_broker.schemas.registry import field_schema, sealing_units
    from referral_broker.sealing import DataKey
    from referral_broker.sealing.wrapping import unwrap_data_key, wrap_data_key

    policy = load_policy()
    canonical = referral_schema()
    parsed = parse_schema(canonical)
    units = sealing_units(canonical)
    unit_parsed = {u: parse_schema(field_schema(canonical, u), named_schemas={}) for u in units}
    signer = Ed25519PrivateKey.generate()
    public = signer.public_key()
    hub_key = X25519PrivateKey.generate()
    aead = AESGCM(os.urandom(32))
    nonce, aad = os.urandom(12), os.urandom(120)
    now = referrals[0]["created_at"]

    def unit_bytes(record: dict[str, Any]) -> list[bytes]:
        out = []
        for u in units:
            value: Any = record
            for part in u.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            buf = io.BytesIO()
            with contextlib.suppress(Exception):
                schemaless_writer(buf, unit_parsed[u], value)
            out.append(buf.getvalue())
        return out

    prepared = []
    for r in referrals[:n]:
        body = io.BytesIO()
        schemaless_writer(body, parsed, r)
        shares = [d for d in decide(policy, r, referrer_party=SENDER, at=now) if d.delivered]
        fields = unit_bytes(r)
        sealed = [aead.encrypt(nonce, f, aad) for f in fields]
        message = body.getvalue()
        prepared.append((message, signer.sign(message), sealed, fields, len(shares) + 1, len(shares)))
    wrapped = wrap_data_key(
        DataKey.generate(),
        recipient=HUB,
        recipient_key_id="council.000000000000",
        recipient_public=hub_key.public_key(),
    )
    start = time.perf_counter()
    for message, signature, sealed, fields, copies, audits in prepared:
        public.verify(signature, message)
        unwrap_data_key(wrapped, recipient=HUB, private_key=hub_key)
        for c in sealed:
            aead.decrypt(nonce, c, aad)
        record = schemaless_reader(io.BytesIO(message), parsed, None)
        for _ in range(copies):  # each recipient's view (bounded above by the whole record) + archive
            schemaless_writer(io.BytesIO(), parsed, record)
            for f in fields:
                aead.encrypt(nonce, f, aad)
            wrap_data_key(
                DataKey.generate(),
                recipient=HUB,
                recipient_key_id="council.000000000000",
                recipient_public=hub_key.public_key(),
            )
            signer.sign(message)
        for _ in range(audits):
            signer.sign(message[:512])
    return (time.perf_counter() - start) / len(prepared) * 1e6


def _pass_through(settings: Settings, bootstrap: str, source: str, target: str, count: int) -> float:
    consumer = build_consumer(settings, bootstrap, [source], group_id=f"{settings.kafka_topic_prefix}raw")
    producer = build_producer(settings, bootstrap)
    done = 0
    start = None
    try:
        while done < count:
            for r in poll_records(consumer, 500):
                start = start or time.perf_counter()
                producer.send(target, r.value or b"", key=r.key, headers=list(r.headers))
                done += 1
        producer.flush()
    finally:
        producer.close()
        consumer.close()
    return count / (time.perf_counter() - (start or 0.0))


def _timed_router(settings: Settings, bootstrap: str, count: int, **kwargs: Any) -> float:
    """Referrals/s from the first record read to the last batch committed (group joining,
    a one-off cost of a few seconds, is left out)."""
    router = Router(settings, bootstrap, instance=uuid.uuid4().hex[:6], **kwargs)
    router.run(max_records=count, stop_when_idle=30)
    stats = router.stats
    if stats.dead_lettered or stats.first_record_at is None or stats.last_commit_at is None:
        raise BrokerError(f"benchmark run dead-lettered or read nothing: {stats.by_reason}")
    return stats.consumed / (stats.last_commit_at - stats.first_record_at)


def run(
    base: Settings, bootstrap: str, *, count: int = 2000, progress: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    results: dict[str, Any] = {"count": count}
    with tempfile.TemporaryDirectory(prefix="rb-bench-router-") as tmp:
        figures: dict[str, float] = {}
        for recipients in (1, 3):
            for sealed in (True, False):
                label = f"router_{recipients}_recipient{'s' if recipients > 1 else ''}{'' if sealed else '_unsealed'}"
                progress(label)
                settings = base.replace(
                    kafka_topic_prefix=f"bench{uuid.uuid4().hex[:6]}.", paths_data_dir=Path(tmp) / label
                )
                ensure_with_county(settings, bootstrap)
                try:
                    init_parties(
                        settings,
                        [HUB, SENDER, *[p for p in all_parties() if p != SENDER and p != HUB]],
                        bootstrap=bootstrap,
                    )
                    referrals = _shaped(count, recipients, seed=recipients)
                    if sealed:
                        with IntakeSender(settings, bootstrap, SENDER) as sender:
                            sender.send_referrals(referrals)
                        figures[label] = _timed_router(settings, bootstrap, count)
                        if recipients == 3:
                            progress("floor")
                            figures["floor_us_per_referral"] = _floor_us(
                                settings, bootstrap, referrals, min(count, 300)
                            )
                            progress("raw")
                            intake = topic_name(settings, "intake", SENDER)
                            figures["raw_pass_through"] = _pass_through(
                                settings, bootstrap, intake, topic_name(settings, "dlq"), count
                            )
                    else:
                        producer = build_producer(settings, bootstrap)
                        topic = topic_name(settings, "intake", SENDER)
                        for r in referrals:
                            producer.send(topic, codec.encode(r), key=str(r["referral_id"]).encode())
                        producer.flush()
                        producer.close()
                        figures[label] = _timed_router(settings, bootstrap, count, sealer=PlainSealer(SENDER))
                finally:
                    admin = admin_client(settings, bootstrap)
                    try:
                        admin.delete_topics(
                            [s.name for s in plan(settings.kafka_topic_profile, settings.kafka_topic_prefix)]
                        )
                    finally:
                        admin.close()
        floor_rate = 1e6 / figures["floor_us_per_referral"]
        results.update(
            {
                "referrals_per_second": {
                    "floor_3_recipients": round(floor_rate, 1),
                    "raw_pass_through": round(figures["raw_pass_through"], 1),
                    "router_1_recipient": round(figures["router_1_recipient"], 1),
                    "router_3_recipients": round(figures["router_3_recipients"], 1),
                    "router_1_recipient_unsealed": round(figures["router_1_recipient_unsealed"], 1),
                    "router_3_recipients_unsealed": round(figures["router_3_recipients_unsealed"], 1),
                },
                "floor_us_per_referral_3_recipients": round(figures["floor_us_per_referral"], 1),
                "ratios": {
                    "router_over_floor_3": round(figures["router_3_recipients"] / floor_rate, 3),
                    "router_over_raw_3": round(
                        figures["router_3_recipients"] / figures["raw_pass_through"], 3
                    ),
                    "sealed_over_unsealed_1": round(
                        figures["router_1_recipient"] / figures["router_1_recipient_unsealed"], 3
                    ),
                    "sealed_over_unsealed_3": round(
                        figures["router_3_recipients"] / figures["router_3_recipients_unsealed"], 3
                    ),
                },
                "peak_rss_mb": _rss_mb(),
            }
        )
    return results
