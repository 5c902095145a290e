"""What arrives at a recipient: its out topic, verified and opened with its own key.

Each message yields either a :class:`Received` (the fields granted to this recipient, the
fields withheld and why, what it may not pass on) or a :class:`Refused` naming why it could
not be opened. A refused message is reported, never silently skipped, and never half-shown.
Offsets are committed for the recipient's consumer group only after the caller has the batch.

What ``receive`` accepts (issue 15, attacks 6 and 8): a message signed by the hub, addressed
to this party (``rb-recipient``) and read from this party's own out topic; the signature is
checked before any header is parsed, and anything that fails, whatever the exception, is a
:class:`Refused` (reported, skipped, its offset committed), never a crash that would stop
every later run at the same record. A message this party already has (same kind, referral id,
version and decision id, or status id for a status) is a :class:`Duplicate`: reported, not
delivered twice (:class:`ReceivedLedger`, a small 0600 SQLite file per party under the data
dir).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from referral_broker import adapters
from referral_broker.cluster.clients import Record, build_consumer, commit_batch, drain
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, ContractError, ReferralBrokerError, SealingError, StoreError
from referral_broker.folders import private_folder
from referral_broker.identity import (
    H_DECISION,
    H_NO_ONWARD,
    H_REFERRER,
    H_WITHHELD,
    Identity,
    load_identity,
    no_onward_from,
    withheld_from,
)
from referral_broker.parties import HUB, get_party
from referral_broker.sealing.classes import ClassBytes
from referral_broker.sealing.envelope import H_KIND, H_RECIPIENT, H_SENDER, VerifiedHeaders


@dataclass(frozen=True)
class Received:
    referral_id: str
    version: int
    kind: str  # referral | status | archive
    sender: str
    referrer: str | None
    record: dict[str, Any] = field(repr=False)
    withheld: dict[str, str] = field(default_factory=dict)
    no_onward_sharing: tuple[str, ...] = ()
    decision_id: str | None = None
    partition: int = -1
    offset: int = -1
    schema_fingerprint: bytes = b""
    # the bytes ``record`` was opened from, when asked for (the router seals them again)
    class_bytes: ClassBytes | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Refused:
    topic: str
    partition: int
    offset: int
    reason: str


@dataclass(frozen=True)
class Duplicate:
    """A verified message this party has already received (a replayed or re-delivered copy):
    reported, not delivered again."""

    topic: str
    partition: int
    offset: int
    referral_id: str
    version: int
    kind: str
    message_id: str
    first_received_ms: int


KINDS = ("referral", "status")


def _text(headers: Mapping[str, bytes], name: str) -> str:
    """A signed id-like header (sender, recipient, kind), for comparing and for a refusal's
    reason: anything but short printable ASCII reads as "(malformed)", so a sender cannot put
    its own text (or control characters) into reasons, logs or dead letters (found by fuzzing)."""
    raw = headers.get(name, b"")
    text = raw.decode("ascii", "replace")
    return text if len(raw) <= 128 and text.isascii() and text.isprintable() else "(malformed)"


def verify_arrival(
    identity: Identity, record: Any, *, sender: str | None = None, kinds: Collection[str] = KINDS
) -> VerifiedHeaders:
    """Check a message before anything in it is believed: the signature and the signer's key
    first, then that ``sender`` sent it (any party when None), that it is addressed to this
    party and is one of ``kinds``. Returns the verified headers by name; nothing is opened."""
    headers = identity.opener.verify(record)
    signer = _text(headers, H_SENDER)
    if sender is not None and signer != sender:
        raise SealingError(f"message is signed by {signer}, not by {sender}; refused")
    recipient = _text(headers, H_RECIPIENT)
    if recipient != identity.party:
        raise SealingError(f"message is addressed to {recipient}, not to {identity.party}; refused")
    kind = _text(headers, H_KIND)
    if kind not in kinds:
        raise ContractError(f"message kind {kind or 'none'} is not {' or '.join(kinds)}; refused")
    return headers


def open_verified(
    identity: Identity,
    record: Any,
    *,
    sender: str | None = None,
    kinds: Collection[str] = KINDS,
    keep_bytes: bool = False,
) -> Received:
    """The one verified receive path: :func:`verify_arrival`, then open every field, parse the
    router's signed headers strictly, and reload the key directory once on an unknown key id.
    Used by ``receive``, the inbox and the router; raises a ReferralBrokerError on refusal.
    ``keep_bytes``: the result keeps the plaintext bytes it was read from (``class_bytes``)."""

    def attempt(ident: Identity) -> Received:
        verified = verify_arrival(ident, record, sender=sender, kinds=kinds)
        opened = ident.open(record, verified=verified)
        extra = dict(opened.extra_headers)
        referrer = extra.get(H_REFERRER)
        decision = extra.get(H_DECISION)
        return Received(
            referral_id=opened.referral_id,
            version=opened.referral_version,
            kind=opened.kind,
            sender=opened.sender,
            referrer=referrer.decode("utf-8", "replace") if referrer else None,
            record=opened.record,
            withheld=withheld_from(extra.get(H_WITHHELD)),
            no_onward_sharing=no_onward_from(extra.get(H_NO_ONWARD)),
            decision_id=decision.decode("utf-8", "replace") if decision else None,
            partition=getattr(record, "partition", -1),
            offset=getattr(record, "offset", -1),
            schema_fingerprint=opened.schema_fingerprint,
            class_bytes=opened.class_bytes if keep_bytes else None,
        )

    return identity.retrying(attempt)


def open_record(identity: Identity, record: Record, *, topic: str | None = None) -> Received | Refused:
    """Verify and open one record from the hub addressed to ``identity``'s party, read from
    ``topic`` (its out topic; not checked when None). A refusal is reported as a
    :class:`Refused` naming why, never skipped; no exception other than a BrokerError (the
    cluster itself failing) leaves this function, so one bad record cannot stop a receiver."""
    try:
        if topic is not None and record.topic != topic:
            raise SealingError(
                f"message was read from another topic than {identity.party}'s out topic; refused"
            )
        return open_verified(identity, record, sender=HUB)
    except BrokerError:
        raise
    except ReferralBrokerError as exc:
        return Refused(record.topic, record.partition, record.offset, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a parser's own: its type only, never its text (it may quote the record)
        reason = f"malformed message ({type(exc).__name__} while verifying or opening it); refused"
        return Refused(record.topic, record.partition, record.offset, reason)


def message_id(item: Received) -> str:
    """What makes a received message the same message again: the router's decision id for a
    referral (a UUIDv5 of referral id, version and recipient, the same on every re-delivery),
    the status id for a status, else a digest of the opened record."""
    if item.decision_id:
        return f"decision:{item.decision_id}"
    status_id = item.record.get("status_id") if item.kind == "status" else None
    if status_id is not None:
        return f"status:{status_id}"
    digest = hashlib.sha256(
        json.dumps(item.record, sort_keys=True, default=json_default).encode()
    ).hexdigest()
    return f"digest:{digest}"


def ledger_path(settings: Settings, party: str) -> Path:
    return settings.paths_data_dir / "received" / f"{get_party(party).name}.sqlite3"


_LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS received (
    kind TEXT NOT NULL,
    referral_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (kind, referral_id, version, message_id)
);
"""


class ReceivedLedger:
    """What one party has received: (kind, referral id, version, message id) and when, no
    content. A 0600 SQLite file in a 0700 folder under the data dir, created before SQLite
    opens it (its journal takes the same mode); kept as long as the data dir."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection

    @classmethod
    def open(cls, settings: Settings, party: str) -> ReceivedLedger:
        path = ledger_path(settings, party)
        private_folder(path.parent)
        os.chmod(path.parent, 0o700)
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
        try:
            db = sqlite3.connect(path, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=DELETE")
            db.executescript(_LEDGER_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(
                f"the received-message record {path} cannot be opened ({type(exc).__name__})"
            ) from None
        return cls(path, db)

    @staticmethod
    def key(item: Received) -> tuple[str, str, int, str]:
        return (item.kind, item.referral_id, item.version, message_id(item))

    def first_received(self, key: tuple[str, str, int, str]) -> int | None:
        """When (epoch ms) this message was first received, or None if never."""
        row = self._db.execute(
            "SELECT received_ms FROM received WHERE kind=? AND referral_id=? AND version=? AND message_id=?",
            key,
        ).fetchone()
        return None if row is None else int(row[0])

    def record(self, keys: Iterable[tuple[str, str, int, str]], at_ms: int | None = None) -> None:
        at_ms = int(time.time() * 1000) if at_ms is None else at_ms
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR IGNORE INTO received VALUES (?,?,?,?,?)", [(*k, at_ms) for k in keys]
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StoreError(
                f"the received-message record {self.path} cannot be written ({type(exc).__name__})"
            ) from None

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM received").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def receive(
    settings: Settings,
    bootstrap: str,
    party: str,
    *,
    stop_when_idle: float = 5.0,
    group_id: str | None = "default",
    identity: Identity | None = None,
    ledger: ReceivedLedger | None = None,
) -> Iterator[Received | Refused | Duplicate]:
    """Everything on ``party``'s out topic not yet received by its group (``group_id=None``:
    everything, committing nothing). With a ``ledger``, a message already received is yielded
    as a :class:`Duplicate` instead; what was delivered is recorded in it once the caller has
    taken the batch (with the group's offsets)."""
    identity = identity or load_identity(settings, bootstrap, party)
    group = None if group_id is None else f"{settings.kafka_topic_prefix}receiver-{party}-{group_id}"
    out = topic_name(settings, "out", party)
    consumer = build_consumer(settings, bootstrap, [out], group_id=group)
    try:
        for batch in drain(consumer, idle_s=stop_when_idle):
            delivered: dict[tuple[str, str, int, str], int] = {}
            for record in batch:
                item = open_record(identity, record, topic=out)
                if ledger is not None and isinstance(item, Received):
                    key = ReceivedLedger.key(item)
                    first = delivered.get(key) or ledger.first_received(key)
                    if first is not None:
                        yield Duplicate(
                            record.topic, record.partition, record.offset, item.referral_id,
                            item.version, item.kind, key[3], first,
                        )  # fmt: skip
                        continue
                    delivered[key] = int(time.time() * 1000)
                yield item
            if ledger is not None and delivered:
                ledger.record(delivered)
            if group is not None:
                commit_batch(consumer, batch)
    finally:
        consumer.close()


def json_default(value: Any) -> Any:
    """``json.dumps`` default for received records: ISO dates, string ids."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def json_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in the JSON form adapters render from (ISO dates, string ids)."""
    return [json.loads(json.dumps(r, default=json_default)) for r in records]


class PartnerReceiver:
    """The receiving half of a partner system's Python API: the same verbs as
    ``referral-broker receive``.

        receiver = PartnerReceiver(settings, bootstrap, "schools")
        items = list(receiver.receive(stop_when_idle=5))   # verified, opened views and statuses
        receiver.render(items, "inbox/")                    # back to the partner's own format
    """

    def __init__(self, settings: Settings, bootstrap: str, party: str) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.party = get_party(party).name

    def receive(
        self, *, stop_when_idle: float = 5.0, group: str | None = "default"
    ) -> Iterator[Received | Refused | Duplicate]:
        """Verified, opened messages; a refused one as :class:`Refused`, one this party already
        received (this party's ledger under the data dir) as :class:`Duplicate`."""
        ledger = ReceivedLedger.open(self.settings, self.party)
        try:
            yield from receive(
                self.settings,
                self.bootstrap,
                self.party,
                stop_when_idle=stop_when_idle,
                group_id=group,
                ledger=ledger,
            )
        finally:
            ledger.close()

    def render(self, items: Iterable[Received], out_dir: str | Path) -> list[Path]:
        """Write what was received in the partner's own format (JSON lines where it has none)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        received = list(items)
        referrals = [i.record for i in received if i.kind == "referral"]
        statuses = [i.record for i in received if i.kind == "status"]
        written: list[Path] = []
        native = get_party(self.party).format
        if native is not None:
            rendered: list[Path | None] = []
            if referrals:
                rendered.append(adapters.render_file(native, json_records(referrals), out).path)
            if statuses:
                rendered.append(adapters.render_statuses(native, json_records(statuses), out).path)
            return [p for p in rendered if p is not None]
        for name, rows in (("referrals.jsonl", referrals), ("statuses.jsonl", statuses)):
            if rows:
                path = out / name
                path.write_text(
                    "".join(json.dumps(r, default=json_default) + "\n" for r in rows), encoding="utf-8"
                )
                written.append(path)
        return written
