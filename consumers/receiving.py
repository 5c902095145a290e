"""What arrives at a recipient: its out topic, verified and opened with its own key.

Each message yields either a :class:`Received` (the fields granted to this recipient, the
fields withheld and why, what it may not pass on) or a :class:`Refused` naming why it could
not be opened. A refused message is reported, never silently skipped, and never half-shown.
Offsets are committed for the recipient's consumer group only after the caller has the batch.
"""

from __future__ import annotations

import json
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
from referral_broker.errors import BrokerError, ContractError, ReferralBrokerError, SealingError
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
from referral_broker.sealing.envelope import H_KIND, H_RECIPIENT, H_SENDER


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


@dataclass(frozen=True)
class Refused:
    topic: str
    partition: int
    offset: int
    reason: str


KINDS = ("referral", "status")


def _text(headers: Mapping[str, bytes], name: str) -> str:
    return headers.get(name, b"").decode("ascii", "replace")


def verify_arrival(
    identity: Identity, record: Any, *, sender: str | None = None, kinds: Collection[str] = KINDS
) -> dict[str, bytes]:
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
    identity: Identity, record: Any, *, sender: str | None = None, kinds: Collection[str] = KINDS
) -> Received:
    """The one verified receive path: :func:`verify_arrival`, then open every field, parse the
    router's signed headers strictly, and reload the key directory once on an unknown key id.
    Used by ``receive``, the inbox and the router; raises a ReferralBrokerError on refusal."""

    def attempt(ident: Identity) -> Received:
        verify_arrival(ident, record, sender=sender, kinds=kinds)
        opened = ident.open(record)
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
        )

    return identity.retrying(attempt)


def open_record(identity: Identity, record: Record) -> Received | Refused:
    """Verify and open one record from the hub addressed to ``identity``'s party; a refusal
    is reported as a :class:`Refused` naming why, never skipped."""
    try:
        return open_verified(identity, record, sender=HUB)
    except BrokerError:
        raise
    except ReferralBrokerError as exc:
        return Refused(record.topic, record.partition, record.offset, f"{type(exc).__name__}: {exc}")


def receive(
    settings: Settings,
    bootstrap: str,
    party: str,
    *,
    stop_when_idle: float = 5.0,
    group_id: str | None = "default",
    identity: Identity | None = None,
) -> Iterator[Received | Refused]:
    """Everything on ``party``'s out topic not yet received by its group (``group_id=None``:
    everything, committing nothing)."""
    identity = identity or load_identity(settings, bootstrap, party)
    group = None if group_id is None else f"{settings.kafka_topic_prefix}receiver-{party}-{group_id}"
    consumer = build_consumer(settings, bootstrap, [topic_name(settings, "out", party)], group_id=group)
    try:
        for batch in drain(consumer, idle_s=stop_when_idle):
            for record in batch:
                yield open_record(identity, record)
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
    ) -> Iterator[Received | Refused]:
        return receive(
            self.settings, self.bootstrap, self.party, stop_when_idle=stop_when_idle, group_id=group
        )

    def render(self, items: Iterable[Received], out_dir: str | Path) -> list[Path]:
        """Write what was received in the partner's own format (JSON lines where it has none)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        received = list(items)
        referrals = [i.record for i in received if i.kind == "referral"]
        statuses = [i.record for i in received if i.kind == "status"]
        written: list[Path] = []
        if get_party(self.party).kind == "partner":
            rendered: list[Path | None] = []
            if referrals:
                rendered.append(adapters.render_file(self.party, json_records(referrals), out).path)
            if statuses:
                rendered.append(adapters.render_statuses(self.party, json_records(statuses), out).path)
            return [p for p in rendered if p is not None]
        for name, rows in (("referrals.jsonl", referrals), ("statuses.jsonl", statuses)):
            if rows:
                path = out / name
                path.write_text(
                    "".join(json.dumps(r, default=json_default) + "\n" for r in rows), encoding="utf-8"
                )
                written.append(path)
        return written
