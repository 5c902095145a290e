"""Shared set-up for the sealing tests (no tests here): synthetic parties with real key stores,
a small tagged schema, synthetic referrals with distinctive values, and raw topic reading.

Every value is synthetic; the distinctive names ("Zephyrine", "Quillfeather") exist so that a
search of raw Kafka bytes for them cannot match by accident.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from county import HEALTH_VISITING, POLICE, SCHOOL

from referral_broker.cluster.clients import Record, build_consumer, read_to_end
from referral_broker.config import Settings
from referral_broker.sealing import (
    CaseKeyStore,
    DekCache,
    KeyDirectory,
    KeyStore,
    MessageOpener,
    MessageSealer,
    OutgoingMessage,
    schema_book,
)

SCHEMA: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "sealing_referral.avsc").read_text())
HUB = "council"
HEALTH = HEALTH_VISITING  # a partner organisation receiving referrals
TEAM = "district-fenland"  # a district team (opens case-key messages)
PARTIES = (HUB, HEALTH, SCHOOL, POLICE, TEAM)


def person(given: str, family: str, *, nhs: str | None = None, address: bool = True) -> dict[str, Any]:
    return {
        "given_name": given,
        "family_name": family,
        "date_of_birth": dt.date(2019, 5, 4),
        "ethnicity": "mixed",
        "nhs_number": nhs,
        "role": "child",
        "address": {"line1": f"{given} House, 7 Synthetic Row", "postcode": "ZZ9 9ZZ"} if address else None,
    }


def sample_referral(n: int = 1) -> dict[str, Any]:
    """A referral of the test schema whose sensitive values are unmistakable strings."""
    return {
        "referral_id": f"ref-{n:04d}",
        "version": 1,
        "priority": "urgent",
        "flags": {"safeguarding_concern": True},
        "child": person(f"Zephyrine{n}", f"Quillfeather{n}", nhs="9990001112"),
        "household": [person(f"Bartholomew{n}", f"Quillfeather{n}", address=False)],
        "carer": person(f"Marisol{n}", f"Ottoline{n}"),
        "attendance_percent": 87.25,
        "exclusions": 3,
        "scores": {f"phonics-check-{n}": 31.5},
        "photo": f"SYNTHETIC-PHOTO-BYTES-{n}".encode(),
        "upn_check": b"QX",
        "concern_summary": f"Synthetic concern narrative number {n} about sleeping rough",
        "receiving_team": "fenland",
    }


def needles(record: dict[str, Any]) -> list[bytes]:
    """The plaintext strings and bytes of a test referral's sealed fields (Avro writes a
    string's UTF-8 bytes as they are, so a leak in any encoding would contain these)."""
    found: list[bytes] = []

    def walk(value: Any) -> None:
        if isinstance(value, str) and len(value) >= 6:
            found.append(value.encode())
        elif isinstance(value, bytes) and len(value) >= 6:
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for name in ("child", "household", "carer", "scores", "photo", "concern_summary"):
        walk(record[name])
    found.append(b"9990001112")
    return found


@dataclass
class World:
    """Real key stores for a few parties in one folder, and the directory of their public keys."""

    keys_dir: Path
    stores: dict[str, KeyStore]
    directory: KeyDirectory

    def sealer(self, party: str = HUB, *, cache: DekCache | None = None) -> MessageSealer:
        case_keys = CaseKeyStore.open(self.keys_dir) if party == HUB else None
        return MessageSealer(self.stores[party], self.directory, cache=cache, case_keys=case_keys)

    def opener(self, party: str, *, cache: DekCache | None = None, schemas: Any = None) -> MessageOpener:
        case_keys = (
            CaseKeyStore.open(self.keys_dir).lookup if party in (HUB, TEAM) else None
        )
        return MessageOpener(
            self.stores[party],
            self.directory,
            schemas or schema_book(SCHEMA),
            cache=cache,
            case_keys=case_keys,
        )

    def refresh(self) -> None:
        """Re-read every store and rebuild the directory (after a rotation or revocation)."""
        self.stores = {p: KeyStore.open(self.keys_dir, p) for p in self.stores}
        for store in self.stores.values():
            for entry in store.public_entries():
                self.directory.merge(entry)


def make_world(keys_dir: Path, parties: Iterable[str] = PARTIES) -> World:
    stores = {p: KeyStore.create(keys_dir, p) for p in parties}
    return World(keys_dir, stores, KeyDirectory(e for s in stores.values() for e in s.public_entries()))


def as_record(msg: OutgoingMessage, **changes: Any) -> Record:
    """An outgoing message as a receiver would consume it, optionally altered."""
    fields = {"topic": msg.topic, "key": msg.key, "value": msg.value, "headers": list(msg.headers)}
    fields.update(changes)
    return Record(fields["topic"], 0, 0, fields["key"], fields["value"], fields["headers"], 0)


def send_all(settings: Settings, bootstrap: str, messages: Iterable[OutgoingMessage]) -> None:
    from referral_broker.cluster.clients import build_producer

    producer = build_producer(settings, bootstrap)
    try:
        for m in messages:
            m.send(producer)
        producer.flush()
    finally:
        producer.close()


def read_all(
    settings: Settings, bootstrap: str, topics: Iterable[str], *, timeout_s: float = 30
) -> list[Record]:
    """Every record currently in ``topics``, read raw from the beginning to the end offsets."""
    topics = list(topics)
    consumer = build_consumer(settings, bootstrap, topics, group_id=None)
    try:
        parts = list(consumer.assignment())
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        reading = read_to_end(consumer, parts, end, what=" ".join(topics), timeout_s=timeout_s)
        return [r for batch in reading for r in batch]
    finally:
        consumer.close()


class FakeClock:
    """A clock the test moves by hand (for the DEK cache's age bound)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
