"""Benchmark (not CI): how long ``audit subject`` takes on a large audit trail.

Writes N synthetic referrals' audit decisions (``--per-referral`` decisions each, audit_decision
v4 with three subject keys per referral, as the router writes them; no personal data: the keys
are HMACs of synthetic identifiers under a throw-away secret) to an audit topic under a fresh
topic prefix, then times the lookup of one subject (five of the referrals are about it) the way
the CLI runs it: one pass over the topic, a byte pre-filter on the hex key, decode only the
matches. Prints a table, or JSON with --json; deletes its topic unless --keep.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19192 .venv/bin/python scripts/bench_audit_subject.py --referrals 100000
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
import uuid
from datetime import UTC, datetime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--referrals", type=int, default=100_000)
    parser.add_argument("--per-referral", type=int, default=4, help="audit decisions per referral")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print where the lookup spends its time")
    args = parser.parse_args()

    from kafka.admin import NewTopic

    from referral_broker.audit_log import subject_history, subject_key
    from referral_broker.cluster.clients import build_producer
    from referral_broker.cluster.topics import admin_client, topic_name
    from referral_broker.config import load_settings
    from referral_broker.schemas import codec
    from referral_broker.schemas.registry import audit_decision_schema

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19192")
    settings = load_settings().replace(kafka_topic_prefix=f"bench{secrets.token_hex(3)}.")
    topic = topic_name(settings, "audit")
    admin = admin_client(settings, bootstrap)
    admin.create_topics([NewTopic(topic, args.partitions, 1)])
    secret = secrets.token_bytes(32)
    target = subject_key(secret, "nhs_number", "9434765919")
    schema = audit_decision_schema()
    prepared = codec.prepare(schema)
    recipients = ["district-fenland", "school-110123", "nhs-zhv01", "charity-1190001", "police-35"]
    about_target = set(range(0, args.referrals, max(1, args.referrals // 5)))
    producer = build_producer(settings, bootstrap)
    started = time.monotonic()
    written = 0
    try:
        now = datetime.now(UTC)
        for i in range(args.referrals):
            rid = str(uuid.uuid4())
            keys = [subject_key(secret, "upn", f"synthetic-{i}"), subject_key(secret, "ni_number", f"synthetic-{i}")]
            keys.append(target if i in about_target else subject_key(secret, "nhs_number", f"synthetic-{i}"))
            for r in range(args.per_referral):
                decision = {
                    "decision_id": str(uuid.uuid4()),
                    "referral_id": rid,
                    "version": 1,
                    "recipient": recipients[r % len(recipients)],
                    "purpose": "family-support",
                    "fields_shared": ["child.given_name", "child.date_of_birth", "concerns.type"],
                    "fields_withheld": [{"path": "health_and_development", "reason": "not granted"}],
                    "ground": "UK GDPR Art 6(1)(e)",
                    "conditions_met": ["basis:consent"],
                    "decided_at": now,
                    "delivered": True,
                    "basis": "consent",
                    "policy_version": 1,
                    "referrer": "police-35",
                    "subject_keys": sorted(keys),
                }
                value = codec.encode(decision, prepared)
                producer.send(topic, value=value, key=rid.encode(), headers=[("rb-kind", b"audit.decision")])
                written += 1
            if i % 5000 == 4999:
                producer.flush()
        producer.flush()
    finally:
        producer.close()
    produced_s = time.monotonic() - started
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.monotonic()
    report = subject_history(settings, bootstrap, key=target)
    lookup_s = time.monotonic() - started
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    result = {
        "referrals": args.referrals,
        "audit_records": written,
        "partitions": args.partitions,
        "produce_seconds": round(produced_s, 1),
        "lookup_seconds": round(lookup_s, 2),
        "records_per_second": round(report["scanned"] / lookup_s),
        "scanned": report["scanned"],
        "matched_referrals": len(report["referrals"]),
        "matched_events": report["count"],
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
    }
    if not args.keep:
        admin.delete_topics([topic])
    admin.close()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:20} {v}")
    assert report["count"] == len(about_target) * args.per_referral, "the lookup missed events"


if __name__ == "__main__":
    main()
