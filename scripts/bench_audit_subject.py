"""Benchmark (not CI): how long ``audit subject`` takes on a large audit trail.

Writes N synthetic referrals' audit decisions (``--per-referral`` decisions each, audit_decision
v4 with three subject keys per referral, as the router writes them; no personal data: the keys
are HMACs of synthetic identifiers under a throw-away secret) to an audit topic under a fresh
topic prefix, then times the lookup of one subject (five of the referrals are about it) the way
the CLI runs it: through the hub's local audit index (``referral_broker.audit_index``) built cold
from the whole topic, then warm (nothing new), then after ``--more`` referrals were added (the
incremental catch-up), and, unless --no-scan, the full scan the CLI's ``--no-index`` does (one
pass, a byte pre-filter on the hex key, decode only the matches). Every run must find exactly
the target's events. Prints a table, or JSON with --json; deletes its topic and index unless
--keep.

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
    parser.add_argument("--more", type=int, default=1000, help="referrals added before the incremental lookup")
    parser.add_argument("--no-scan", action="store_true", help="skip the full-scan lookup (the slow one)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print where the lookup spends its time")
    args = parser.parse_args()

    import shutil
    import tempfile
    from pathlib import Path

    from kafka.admin import NewTopic

    from referral_broker.audit_index import indexed_records
    from referral_broker.audit_log import subject_history, subject_key
    from referral_broker.cluster.clients import build_producer
    from referral_broker.cluster.topics import admin_client, topic_name
    from referral_broker.config import load_settings
    from referral_broker.schemas import codec
    from referral_broker.schemas.registry import audit_decision_schema

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19192")
    data_dir = Path(tempfile.mkdtemp(prefix="bench-audit-index-"))
    settings = load_settings().replace(kafka_topic_prefix=f"bench{secrets.token_hex(3)}.", paths_data_dir=data_dir)
    topic = topic_name(settings, "audit")
    admin = admin_client(settings, bootstrap)
    admin.create_topics([NewTopic(topic, args.partitions, 1)])
    secret = secrets.token_bytes(32)
    target = subject_key(secret, "nhs_number", "9434765919")
    schema = audit_decision_schema()
    prepared = codec.prepare(schema)
    recipients = ["district-fenland", "school-110123", "nhs-zhv01", "charity-1190001", "police-35"]
    about_target = set(range(0, args.referrals, max(1, args.referrals // 5)))
    def produce(first: int, count: int) -> int:
        producer = build_producer(settings, bootstrap)
        written = 0
        try:
            now = datetime.now(UTC)
            for i in range(first, first + count):
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
        return written

    started = time.monotonic()
    written = produce(0, args.referrals)
    produced_s = time.monotonic() - started
    want = len(about_target) * args.per_referral

    def indexed() -> tuple[float, dict, dict]:
        began = time.monotonic()
        records, info = indexed_records(settings, bootstrap, secret, key=target, note=lambda m: None)
        report = subject_history(settings, bootstrap, key=target, records=records)
        took = time.monotonic() - began
        assert report["count"] == want, f"the indexed lookup found {report['count']} events, not {want}"
        return took, info, report

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cold_s, cold_info, _ = indexed()
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    warm_s, _, warm = indexed()
    warm_again_s, _, _ = indexed()
    produce(args.referrals, args.more)
    more_s, more_info, _ = indexed()
    index_file = Path(cold_info["path"])
    result = {
        "referrals": args.referrals,
        "audit_records": written,
        "partitions": args.partitions,
        "produce_seconds": round(produced_s, 1),
        "cold_build_and_lookup_seconds": round(cold_s, 2),
        "cold_records_per_second": round(cold_info["new_records_read"] / cold_s),
        "warm_lookup_seconds": round(min(warm_s, warm_again_s), 2),
        "warm_records_read": warm["scanned"],
        "index_bytes": index_file.stat().st_size,
        "more_referrals": args.more,
        "incremental_lookup_seconds": round(more_s, 2),
        "incremental_records_caught_up": more_info["new_records_read"],
        "matched_referrals": len(warm["referrals"]),
        "matched_events": warm["count"],
    }
    if not args.no_scan:
        began = time.monotonic()
        scan = subject_history(settings, bootstrap, key=target)
        lookup_s = time.monotonic() - began
        assert scan["count"] == want, "the scan missed events"
        result |= {"scan_lookup_seconds": round(lookup_s, 2), "scan_records_per_second": round(scan["scanned"] / lookup_s)}
    result |= {"cpus": os.cpu_count(), "load_average": os.getloadavg()[0]}
    if not args.keep:
        admin.delete_topics([topic])
        shutil.rmtree(data_dir, ignore_errors=True)
    admin.close()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:32} {v}")


if __name__ == "__main__":
    main()
