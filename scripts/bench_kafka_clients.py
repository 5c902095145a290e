"""Benchmark (not CI): what the Kafka client itself costs the router's job, kafka-python (what
the project uses) against librdkafka (through confluent-kafka, installed with the test extra).

Issue 20's goals 2 and 5 are missed on CPU, and `bench router` prints that the router with no
sealing at all already spends more than goal 2 allows. This script measures how much of that a
compiled client would take away, without porting the router: on the real broker
(KAFKA_BOOTSTRAP_SERVERS, or the local one), under a fresh topic prefix, a school's intake holds
COUNT sealed referrals to 3 recipients; then each client does the job's own reads and writes and
nothing else, as `bench router`'s "kafka job writes" does: read a poll of referrals, write 3
copies (the intake's bytes and headers) and 3 audit records of 400 bytes a referral, in one
transaction with the group's offsets, holding records 50 ms as the router does. The two take
turns within each of ROUNDS rounds (kafka-python first in odd rounds), each into a topic of its
own, and the script reads both topics back: each must hold exactly 6 records a referral.

It prints each client's CPU a referral (this process, every thread: kafka-python's I/O thread
and librdkafka's threads are both counted), the medians, and kafka-python's over librdkafka's.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19392 .venv/bin/python scripts/bench_kafka_clients.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

AUDIT_BYTES = 400  # as bench router's job writes
COPIES = 3  # the job's copies a referral to 3 recipients, and an audit record each


def librdkafka_config(settings: Any, bootstrap: str) -> dict[str, Any]:
    """The project's client security (TLS, SCRAM, the local CA) as librdkafka's settings."""
    from referral_broker.cluster.security import client_security

    sec = client_security(settings, bootstrap)
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "security.protocol": sec.protocol}
    if sec.tls:
        if sec.cafile:
            config["ssl.ca.location"] = str(sec.cafile)
        if sec.certfile:
            config["ssl.certificate.location"] = str(sec.certfile)
            config["ssl.key.location"] = str(sec.keyfile)
    if sec.sasl:
        config["sasl.mechanisms"] = sec.mechanism
        config.update({"sasl.username": sec.username, "sasl.password": sec.password})
    return config


def librdkafka_job_writes(settings: Any, bootstrap: str, source: str, target: str, count: int) -> float:
    """CPU ms a referral for the job's reads and writes through confluent-kafka: the same work
    as ``router_bench._kafka_job_writes`` does through kafka-python."""
    from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

    from referral_broker.consumers.router import FETCH_PARTITION_BYTES, LINGER_MS, MAX_POLL_RECORDS

    prefix = settings.kafka_topic_prefix
    config = librdkafka_config(settings, bootstrap)
    consumer = Consumer(
        {
            **config,
            "group.id": f"{prefix}librdkafka",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "max.partition.fetch.bytes": FETCH_PARTITION_BYTES,
        }
    )
    transactional = {"transactional.id": f"{prefix}librdkafka", "enable.idempotence": True}
    producer = Producer({**config, **transactional, "linger.ms": LINGER_MS})
    audit = bytes(AUDIT_BYTES)
    done, cpu = 0, None
    try:
        consumer.subscribe([source])
        producer.init_transactions(30)
        deadline = time.monotonic() + 120
        while done < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"librdkafka read {done} of {count} referrals in 120 s")
            polled = consumer.consume(num_messages=MAX_POLL_RECORDS, timeout=0.5)
            batch = [m for m in polled if m.error() is None]
            if not batch:
                continue
            cpu = time.process_time() if cpu is None else cpu
            producer.begin_transaction()
            after: dict[tuple[str, int], int] = {}
            for r in batch:
                headers = r.headers() or []
                for _ in range(COPIES):
                    producer.produce(target, r.value() or b"", key=r.key(), headers=headers)
                    producer.produce(target, audit, key=r.key(), headers=headers[:6])
                producer.poll(0)  # serve delivery reports, as a producer must
                after[(r.topic(), r.partition())] = r.offset() + 1
            offsets = [TopicPartition(t, p, o) for (t, p), o in after.items()]
            producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
            producer.commit_transaction(30)
            done += len(batch)
        return (time.process_time() - (cpu or 0.0)) * 1000 / done
    except KafkaException as exc:
        raise SystemExit(f"librdkafka failed: {exc.args[0]}") from None
    finally:
        consumer.close()


def run(count: int, rounds: int) -> dict[str, Any]:
    from referral_broker.audit_chain import read_topic
    from referral_broker.cli.context import CliContext
    from referral_broker.cluster.topics import topic_name
    from referral_broker.config import load_settings
    from referral_broker.consumers.router_bench import (
        SENDER,
        _county_namespace,
        _fill_intake,
        _kafka_job_writes,
        _shaped,
    )

    base = load_settings()
    bootstrap = CliContext(base).bootstrap()
    figures: dict[str, list[float]] = {"kafka-python": [], "librdkafka": []}
    for i in range(rounds):
        with _county_namespace(base, bootstrap, "clients") as settings:
            _fill_intake(settings, bootstrap, _shaped(count, 3, seed=3), sealed=True)
            intake = topic_name(settings, "intake", SENDER)
            roles = {"kafka-python": "dlq", "librdkafka": "archive"}  # each writes a topic of its own
            targets = {client: topic_name(settings, role) for client, role in roles.items()}
            jobs = {"kafka-python": _kafka_job_writes, "librdkafka": librdkafka_job_writes}
            for client in sorted(jobs, reverse=i % 2 == 1):
                print(f"  round {i + 1} of {rounds}: {client} ...", file=sys.stderr, flush=True)
                spent = jobs[client](settings, bootstrap, intake, targets[client], count)
                figures[client].append(round(spent, 4))
            for client, role in roles.items():
                wanted = 2 * COPIES * count
                # Committed records only. A commit returns once the coordinator has logged it; its
                # markers reach the partitions just after, so a read at once can stop short of the
                # last transaction (a CI run read 216 of 360): read again for a while first.
                deadline = time.monotonic() + 20
                while (found := len(read_topic(settings, bootstrap, role))) != wanted and time.monotonic() < deadline:
                    time.sleep(0.5)
                if found != wanted:
                    raise SystemExit(f"{client} left {found} records on {targets[client]}, not {wanted}")
    medians = {client: statistics.median(v) for client, v in figures.items()}
    return {
        "count": count,
        "rounds": rounds,
        "messages_per_referral": 2 * COPIES,
        "cpu_ms_per_referral": figures,
        "median_cpu_ms_per_referral": medians,
        "kafka_python_over_librdkafka": round(medians["kafka-python"] / medians["librdkafka"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="Referrals a run (default 2000).")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds, the clients alternating (default 3).")
    parser.add_argument("--json", action="store_true", help="Machine-readable output.")
    args = parser.parse_args(argv)
    if args.count < 10 or args.rounds < 1:
        parser.error("--count must be at least 10 and --rounds at least 1")
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        print("confluent-kafka is not installed: pip install -e '.[test]'", file=sys.stderr)
        return 2
    r = run(args.count, args.rounds)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"The Kafka client's CPU for the job's reads and writes, {r['count']:,} referrals a run "
          f"(1 in; {COPIES} copies and {COPIES} audit records out, transactional), ms a referral:")
    for client, values in r["cpu_ms_per_referral"].items():
        shown = ", ".join(f"{v:.3f}" for v in values)
        print(f"  {client:<13} median {r['median_cpu_ms_per_referral'][client]:.3f}   rounds: {shown}")
    print(f"kafka-python over librdkafka: {r['kafka_python_over_librdkafka']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
