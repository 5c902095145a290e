"""Dead letters: what could not be processed, kept with the reason and nothing lost.

A dead letter is the original record byte for byte (key, value and headers, so a replay after
a fix verifies exactly as the original would have) plus ``rb-dlq-*`` headers naming the
reason, the stage, and the source topic, partition and offset. Reasons come from our own
errors, which never carry values; an unexpected exception contributes only its type name.

The router signs every dead letter it writes with the hub's signing key (``rb-dlq-signer``,
``rb-dlq-signer-key``, ``rb-dlq-signature`` over the dead-letter topic, key, value and every
other header in order), so the source topic a replay goes back to is one the router recorded,
not one anybody who can write the dead-letter topic planted (issue 15, attack 9). ``replay``
sends a letter back only when that signature verifies against the key directory and the source
topic is an intake or status topic of a known party; everything else is refused with the
reason.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature

from referral_broker.cluster.clients import Record, build_consumer, build_producer, drain
from referral_broker.cluster.topics import party_of_topic, topic_name
from referral_broker.config import Settings
from referral_broker.errors import ReferralBrokerError, SignatureError
from referral_broker.identity import load_directory
from referral_broker.parties import HUB, all_parties
from referral_broker.sealing import KeyDirectory, KeyStore, OutgoingMessage
from referral_broker.sealing.framing import frame

H_REASON = "rb-dlq-reason"
H_STAGE = "rb-dlq-stage"
H_SOURCE_TOPIC = "rb-dlq-source-topic"
H_SOURCE_PARTITION = "rb-dlq-source-partition"
H_SOURCE_OFFSET = "rb-dlq-source-offset"
H_AT = "rb-dlq-at"
H_SIGNER = "rb-dlq-signer"
H_SIGNER_KEY = "rb-dlq-signer-key"
H_SIGNATURE = "rb-dlq-signature"
DLQ_HEADERS = (H_REASON, H_STAGE, H_SOURCE_TOPIC, H_SOURCE_PARTITION, H_SOURCE_OFFSET, H_AT)
SIGNATURE_HEADERS = (H_SIGNER, H_SIGNER_KEY, H_SIGNATURE)
_LABEL = b"referral-broker/dead-letter/v1"
_SIGNATURE_SIZE = 64
_DIGITS = re.compile(rb"^(0|[1-9][0-9]{0,18})$")
# Roles a dead letter may be replayed to: what the router reads. Never keys, out, audit, orgs.
REPLAYABLE_ROLES = ("intake", "status")


def reason_for(exc: BaseException) -> str:
    """A dead-letter reason: our errors' own value-free text; for anything else, its type."""
    if isinstance(exc, ReferralBrokerError):
        return f"{type(exc).__name__}: {exc}"[:2000]
    return f"internal error ({type(exc).__name__}); see the router log"


def dead_letter(
    settings: Settings,
    record: Record,
    exc: BaseException,
    stage: str,
    *,
    signer: KeyStore | None = None,
    now: float | None = None,
) -> OutgoingMessage:
    """The dead letter for ``record``; signed with ``signer``'s active key when given (the
    router passes the hub's key store: only a signed letter can be replayed)."""
    now = time.time() if now is None else now
    headers = [(k, v) for k, v in record.headers if not k.startswith("rb-dlq-")]
    headers += [
        (H_REASON, reason_for(exc).encode("utf-8")),
        (H_STAGE, stage.encode()),
        (H_SOURCE_TOPIC, record.topic.encode()),
        (H_SOURCE_PARTITION, str(record.partition).encode()),
        (H_SOURCE_OFFSET, str(record.offset).encode()),
        (H_AT, str(int(now * 1000)).encode()),
    ]
    topic, key, value = topic_name(settings, "dlq"), record.key or b"", record.value or b""
    if signer is not None:
        pair = signer.active(now)
        headers += [(H_SIGNER, signer.party.encode()), (H_SIGNER_KEY, pair.key_id.encode())]
        headers.append((H_SIGNATURE, pair.signing.sign(_signing_input(topic, key, headers, value))))
    return OutgoingMessage(topic, key, value, headers)


def _signing_input(
    topic: str, key: bytes | None, headers: Sequence[tuple[str, bytes]], value: bytes | None
) -> bytes:
    """What a dead letter's signature covers: the dead-letter topic, key, value and every
    header in wire order except the signature itself, each length-prefixed."""
    parts: list[bytes | str] = [_LABEL, topic, b"\x00" if key is None else b"\x01" + key]
    parts.append(b"\x00" if value is None else b"\x01" + value)
    signed = [(n, v) for n, v in headers if n != H_SIGNATURE]
    parts.append(str(len(signed)))
    for name, val in signed:
        parts += [name, val]
    return frame(*parts)


def verify_dead_letter(directory: KeyDirectory, record: Record, *, now: float | None = None) -> None:
    """Return only if the hub's router signed this dead letter, as it is, with a key of the
    directory that is not revoked and was valid when it signed; else a SealingError naming why."""
    now = time.time() if now is None else now
    seen: dict[str, bytes] = {}
    for name, val in record.headers:
        if name.startswith("rb-dlq-"):
            if name in seen:
                raise SignatureError(f"dead letter carries header {name} more than once; refused")
            seen[name] = val
    signature = seen.get(H_SIGNATURE)
    if signature is None:
        raise SignatureError("dead letter is not signed by the router (no rb-dlq-signature); refused")
    if len(signature) != _SIGNATURE_SIZE:
        raise SignatureError(
            f"dead letter's rb-dlq-signature is {len(signature)} bytes, not {_SIGNATURE_SIZE}"
        )
    if seen.get(H_SIGNER) != HUB.encode():
        raise SignatureError(f"dead letter is not signed by {HUB}'s router; refused")
    key_id = seen.get(H_SIGNER_KEY, b"")
    at = seen.get(H_AT, b"")
    if not key_id or len(key_id) > 128 or not key_id.isascii() or not _DIGITS.match(at):
        raise SignatureError("dead letter's signing headers are malformed; refused")
    public = directory.signer(key_id.decode("ascii"), HUB, int(at) / 1000, now)
    try:
        public.verify(signature, _signing_input(record.topic, record.key, record.headers, record.value))
    except InvalidSignature:
        raise SignatureError(
            "the router's signature of this dead letter does not verify: it was altered, moved, or forged"
        ) from None


def replay_target(settings: Settings, source_topic: str) -> str:
    """``source_topic`` if a dead letter may go back there (an intake or status topic of a
    known party), else a SealingError saying why not."""
    for role in REPLAYABLE_ROLES:
        party = party_of_topic(settings, role, source_topic)
        if party is not None and party in all_parties() and topic_name(settings, role, party) == source_topic:
            return source_topic
    raise SignatureError(
        "source topic is not an intake or status topic of a known party; a dead letter is only ever "
        "replayed to the topic the router read it from"
    )


@dataclass(frozen=True)
class DeadLetter:
    offset: int
    partition: int
    key: str | None
    reason: str
    stage: str
    source_topic: str
    source_partition: int
    source_offset: int
    at_ms: int
    size: int
    signed_by: str | None = None  # the rb-dlq-signer header as written (not a verification)

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _parse(record: Record) -> DeadLetter:
    h = {k: v for k, v in record.headers if k in DLQ_HEADERS}
    text = lambda name: h.get(name, b"").decode("utf-8", "replace")
    number = lambda name: int(text(name)) if text(name).isdigit() else -1
    key = record.key.decode("utf-8", "replace")[:64] if record.key else None
    return DeadLetter(
        offset=record.offset,
        partition=record.partition,
        key=key,
        reason=text(H_REASON),
        stage=text(H_STAGE),
        source_topic=text(H_SOURCE_TOPIC),
        source_partition=number(H_SOURCE_PARTITION),
        source_offset=number(H_SOURCE_OFFSET),
        at_ms=number(H_AT),
        size=len(record.value or b""),
        signed_by=next((v.decode("ascii", "replace")[:64] for k, v in record.headers if k == H_SIGNER), None),
    )


def read_dead_letters(
    settings: Settings, bootstrap: str, *, idle_s: float = 2.0
) -> Iterator[tuple[Record, DeadLetter]]:
    """Every dead letter currently on the topic (read without a group: listing changes nothing)."""
    consumer = build_consumer(settings, bootstrap, [topic_name(settings, "dlq")], group_id=None)
    try:
        for batch in drain(consumer, idle_s=idle_s):
            for record in batch:
                yield record, _parse(record)
    finally:
        consumer.close()


@dataclass(frozen=True)
class ReplayRefusal:
    partition: int
    offset: int
    source_topic: str
    reason: str


@dataclass
class ReplayReport:
    replayed: int = 0
    refused: list[ReplayRefusal] = field(default_factory=list)


def replay(
    settings: Settings,
    bootstrap: str,
    *,
    select: Callable[[DeadLetter], bool] = lambda d: True,
    progress: Callable[[int], object] = lambda n: None,
    directory: KeyDirectory | None = None,
) -> ReplayReport:
    """Send selected dead letters back to their source topic exactly as they first arrived.

    Only a letter whose router signature verifies (:func:`verify_dead_letter`, against
    ``directory``, by default the key directory loaded now) and whose source topic is an intake
    or status topic (:func:`replay_target`) is sent; every other selected letter is refused in
    the report, with the reason, and sent nowhere.

    A replayed record is processed afresh: if the cause is fixed it is routed, otherwise it
    lands in dead letters again with its reason. Listing is not consuming, so replaying the
    same letter twice sends it twice; the referral id + version makes that visible downstream
    (``receive`` reports the second copy as a duplicate).
    """
    directory = directory if directory is not None else load_directory(settings, bootstrap)
    report = ReplayReport()
    producer = build_producer(settings, bootstrap)
    try:
        for record, letter in read_dead_letters(settings, bootstrap):
            if not select(letter):
                continue
            try:
                verify_dead_letter(directory, record)
                target = replay_target(settings, letter.source_topic)
            except ReferralBrokerError as exc:
                report.refused.append(
                    ReplayRefusal(
                        record.partition,
                        record.offset,
                        letter.source_topic[:200],
                        f"{type(exc).__name__}: {exc}",
                    )
                )
                continue
            headers = [
                (k, v) for k, v in record.headers if k not in DLQ_HEADERS and k not in SIGNATURE_HEADERS
            ]
            producer.send(target, record.value or b"", key=record.key, headers=headers)
            report.replayed += 1
            progress(1)
        producer.flush()
    finally:
        producer.close()
    return report
