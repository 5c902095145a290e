"""The tamper-evident audit trail: hash chains per (audit partition, writer), checkpoints,
heads, and the verifier behind ``referral-broker audit verify``.

Several routers write one audit partition at once, so one chain per partition cannot be kept
without a lock across processes. Instead each *writer* keeps its own chain in each partition:
its name (``chain``: a router's transactional id, an inbox's id, ``retention``), a sequence
number per chain and partition from 0 (``seq``) and the chain hash of its previous record there
(``prev``). They travel in the record's signed headers (``rb-chain``, ``rb-chain-seq``,
``rb-chain-prev``), so every audit writer, whatever its value format, chains the same way,
and the hub's (or team's) signature covers them. A record's chain hash is SHA-256 over its key,
value and those three fields (:func:`record_hash`).

A writer learns its heads at start from the compacted topic ``audit.heads`` (key =
``chain/partition``, value = seq and hash, hub-signed), which it writes in the same Kafka
transaction as the records. At the end of every batch it also writes a signed checkpoint
record (``audit_checkpoint`` schema) into each partition it wrote, naming every head it wrote
in the batch: records cut from a chain's end are then named by the heads topic, or by a
checkpoint in another partition, even when the heads topic was tampered with too.

A transactional id is held by one live router at a time (a restart fences its predecessor),
so a chain has one writer. An aborted batch drops its pending heads; a batch whose commit
outcome is unknown makes the writer read its heads again (after its new producer fenced the
old one, the outcome is settled).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from referral_broker.cluster.clients import Producer, Record
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, ReferralBrokerError
from referral_broker.sealing import OutgoingMessage

H_CHAIN = "rb-chain"
H_CHAIN_SEQ = "rb-chain-seq"
H_CHAIN_PREV = "rb-chain-prev"
H_KIND = "rb-kind"
CHECKPOINT_KIND = "audit.checkpoint"
HEAD_KIND = "audit.head"
GENESIS = "0" * 64
_DOMAIN = b"rb-audit-chain/1\n"

# (topic, key, value, kind, extra headers) -> a signed message
Signer = Callable[..., OutgoingMessage]


def record_hash(key: bytes, value: bytes, chain: str, seq: int, prev: str) -> str:
    """The chain hash of one audit record: SHA-256 over its key, value and chain fields, each
    length-prefixed (no two different records frame to the same bytes)."""
    digest = hashlib.sha256(_DOMAIN)
    for part in (key, value, chain.encode()):
        digest.update(struct.pack(">Q", len(part)))
        digest.update(part)
    digest.update(struct.pack(">Q", seq))
    digest.update(bytes.fromhex(prev))
    return digest.hexdigest()


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner would pick for ``key`` (murmur2)."""
    from kafka.partitioner.default import murmur2

    return (int(murmur2(key)) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str


@dataclass(frozen=True)
class ChainedMessage(OutgoingMessage):
    """A signed audit record bound to the partition its chain position was computed for."""

    partition: int = 0

    def send(self, producer: Producer) -> None:
        # Producer.send has no partition argument; the chain must land where it was computed
        self.check_signed()
        sent = producer._producer.send(
            self.topic, value=self.value, key=self.key, headers=self.headers, partition=self.partition
        )
        producer._pending.append((self.topic, sent))


def chain_headers(headers: Sequence[tuple[str, bytes]]) -> tuple[str, int, str] | None:
    """(chain, seq, prev) from a record's headers; None for an unchained (older) record;
    ValueError when they are malformed."""
    found = {n: bytes(v) for n, v in headers if n in (H_CHAIN, H_CHAIN_SEQ, H_CHAIN_PREV)}
    if not found:
        return None
    chain = found[H_CHAIN].decode("utf-8")
    seq = int(found[H_CHAIN_SEQ].decode("ascii"))
    prev = found[H_CHAIN_PREV].decode("ascii")
    if seq < 0 or len(prev) != 64:
        raise ValueError("malformed chain headers")
    bytes.fromhex(prev)
    return chain, seq, prev


def _kind(headers: Sequence[tuple[str, bytes]]) -> str:
    return next((bytes(v).decode("utf-8", "replace") for n, v in headers if n == H_KIND), "")


class AuditChain:
    """One writer's chains on the audit topic. :meth:`append` returns each record to send in
    the writer's transaction; :meth:`checkpoint` the checkpoint and head records closing a
    batch; then :meth:`commit`, :meth:`abort` (the batch was aborted) or :meth:`lost` (the
    outcome is unknown: heads are read again before the next record)."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        chain: str,
        sign: Signer,
        *,
        verify: Callable[[Record], dict[str, bytes]] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        timeout_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.chain = chain
        self.sign = sign
        self.verify = verify
        self.clock = clock
        self.timeout_s = timeout_s
        self.partitions = 0
        self.refused_heads = 0
        self._committed: dict[int, Head] | None = None
        self._pending: dict[int, Head] = {}

    @property
    def topic(self) -> str:
        from referral_broker.cluster.topics import topic_name

        return topic_name(self.settings, "audit")

    @property
    def heads_topic(self) -> str:
        from referral_broker.cluster.topics import topic_name

        return topic_name(self.settings, "audit_heads")

    def heads(self) -> dict[int, Head]:
        """Committed heads merged with this batch's."""
        self._ensure_loaded()
        assert self._committed is not None
        return {**self._committed, **self._pending}

    def _ensure_loaded(self) -> None:
        if self._committed is not None:
            return
        self.partitions = audit_partition_count(self.settings, self.bootstrap)
        found: dict[int, Head] = {}
        for (chain, partition), head in read_heads(
            self.settings, self.bootstrap, verify=self.verify, timeout_s=self.timeout_s, on_refused=self._refused
        ).items():
            if chain == self.chain:
                found[partition] = head
        self._committed = found
        self._pending = {}

    def _refused(self) -> None:
        self.refused_heads += 1

    def append(self, key: bytes, value: bytes, kind: str, extra_headers: Sequence[tuple[str, bytes]] = ()) -> ChainedMessage:
        """The next record of this writer's chain in ``key``'s partition, signed (or awaiting
        its batch signature, when the writer's ``sign`` makes it so)."""
        self._ensure_loaded()
        return self._append(partition_for(key, self.partitions), key, value, kind, extra_headers)

    def _append(
        self, partition: int, key: bytes, value: bytes, kind: str, extra_headers: Sequence[tuple[str, bytes]] = ()
    ) -> ChainedMessage:
        head = self.heads().get(partition)
        seq, prev = (head.seq + 1, head.hash) if head else (0, GENESIS)
        headers = [
            *extra_headers,
            (H_CHAIN, self.chain.encode()),
            (H_CHAIN_SEQ, str(seq).encode()),
            (H_CHAIN_PREV, prev.encode()),
        ]
        signed = self.sign(topic=self.topic, key=key, value=value, kind=kind, extra_headers=headers)
        self._pending[partition] = Head(seq, record_hash(key, value, self.chain, seq, prev))
        return ChainedMessage(
            signed.topic, signed.key, signed.value, signed.headers, signed.awaiting_signature, partition=partition
        )

    def checkpoint(self, *, records: bool = True) -> list[OutgoingMessage]:
        """A signed checkpoint into each partition written since the last commit (naming every
        head written; into a second partition too when only one was written), then the
        heads-topic entries; nothing when nothing was written. A one-record writer (retention)
        passes ``records=False``: its head entry is enough."""
        from referral_broker.schemas import codec
        from referral_broker.schemas.registry import shared_schema

        if not self._pending:
            return []
        written = dict(sorted(self._pending.items()))
        value = codec.encode(
            {
                "chain": self.chain,
                "written_at": self.clock(),
                "heads": [{"partition": p, "seq": h.seq, "hash": h.hash} for p, h in written.items()],
            },
            shared_schema("audit_checkpoint"),  # once a batch: a fresh copy was 0.38 ms
        )
        out: list[OutgoingMessage] = []
        into = list(written) if records else []
        if len(into) == 1 and self.partitions > 1:
            # a checkpoint outside the chains it names too: cutting a chain's end then takes
            # this partition's records as well as the heads topic (a batch of one referral, or
            # the router's transaction of urgent ones, often writes one partition)
            into.append((into[0] + 1) % self.partitions)
        for partition in into:
            key = f"{self.chain}/{partition}".encode()
            out.append(self._append(partition, key, value, CHECKPOINT_KIND))
        for partition, head in sorted(self._pending.items()):
            key = f"{self.chain}/{partition}".encode()
            doc = {"chain": self.chain, "partition": partition, "seq": head.seq, "hash": head.hash}
            out.append(
                self.sign(
                    topic=self.heads_topic,
                    key=key,
                    value=json.dumps(doc, sort_keys=True).encode(),
                    kind=HEAD_KIND,
                    extra_headers=(),
                )
            )
        return out

    def write_one(self, producer: Producer, key: bytes, value: bytes, kind: str) -> None:
        """One record and its head in one transaction of ``producer`` (transactional, this
        chain's alone); returns once committed. On any failure the outcome is unknown: the
        heads are read again before the next record, and the caller should drop the producer
        (a new one fences it)."""
        try:
            producer.begin()
            self.append(key, value, kind).send(producer)
            for message in self.checkpoint(records=False):
                message.send(producer)
            producer.flush()
            producer.commit()
        except BaseException:
            self.lost()
            raise
        self.commit()

    def mark(self) -> dict[int, Head]:
        """This batch's heads now, for :meth:`rollback` (records built after it are dropped)."""
        return dict(self._pending)

    def rollback(self, mark: dict[int, Head]) -> None:
        self._pending = dict(mark)

    def commit(self) -> None:
        if self._committed is not None:
            self._committed.update(self._pending)
        self._pending = {}

    def abort(self) -> None:
        self._pending = {}

    def lost(self) -> None:
        """The batch's outcome is unknown: read the heads again before the next record."""
        self._committed = None
        self._pending = {}


# -- reading ------------------------------------------------------------------------------------
def audit_partition_count(settings: Settings, bootstrap: str) -> int:
    from kafka.errors import KafkaError

    from referral_broker.cluster.clients import build_consumer
    from referral_broker.cluster.topics import topic_name

    topic = topic_name(settings, "audit")
    consumer = build_consumer(settings, bootstrap, [topic], group_id=None)
    try:
        count = len(consumer.assignment())
    except KafkaError as exc:
        raise BrokerError(f"reading the audit topic's partitions failed: {type(exc).__name__}") from exc
    finally:
        consumer.close()
    if not count:
        raise BrokerError(f"the audit topic {topic} does not exist; run 'referral-broker topics ensure'")
    return count


def read_topic(
    settings: Settings, bootstrap: str, role: str, *, party: str | None = None, idle_s: float = 1.0
) -> list[Record]:
    """Every committed record of a topic (``party``'s, for a per-party role), from the
    beginning, by partition and offset."""
    from kafka.errors import KafkaError

    from referral_broker.cluster.clients import build_consumer, read_to_end
    from referral_broker.cluster.topics import topic_name

    topic = topic_name(settings, role, party)
    consumer = build_consumer(settings, bootstrap, [topic], group_id=None)
    records: list[Record] = []
    try:
        partitions = list(consumer.assignment())
        if not partitions:
            raise BrokerError(f"the topic {topic} does not exist; run 'referral-broker topics ensure'")
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        stall_s = max(30.0, idle_s)
        for batch in read_to_end(consumer, partitions, end, what=topic, timeout_s=stall_s, stall=True):
            records.extend(batch)
    except KafkaError as exc:
        raise BrokerError(f"reading {topic} failed: {type(exc).__name__}") from exc
    finally:
        consumer.close()
    records.sort(key=lambda r: (r.partition, r.offset))
    return records


def read_heads(
    settings: Settings,
    bootstrap: str,
    *,
    verify: Callable[[Record], dict[str, bytes]] | None,
    timeout_s: float = 30.0,
    on_refused: Callable[[], None] | None = None,
) -> dict[tuple[str, int], Head]:
    """The latest head entry per (chain, partition) on ``audit.heads``. With ``verify``, an
    entry that is not hub-signed is ignored (and counted through ``on_refused``)."""
    heads: dict[tuple[str, int], Head] = {}
    for record in read_topic(settings, bootstrap, "audit_heads"):
        parsed = parse_head(record, verify)
        if parsed is None:
            if on_refused is not None:
                on_refused()
            continue
        heads[parsed[0]] = parsed[1]
    return heads


def chain_owner(chain: str, hub: str) -> str:
    """The party whose signature a chain's records, checkpoints and heads must carry: a district
    team's inbox for ``inbox-<team>``, the hub for every other writer (routers, retention,
    exports)."""
    return chain.removeprefix("inbox-") if chain.startswith("inbox-") else hub


def parse_head(record: Record, verify: Callable[[Record], dict[str, bytes]] | None) -> tuple[tuple[str, int], Head] | None:
    from referral_broker.parties import HUB

    try:
        if record.value is None:
            return None
        doc = json.loads(record.value)
        if verify is not None:
            headers = verify(record)
            owner = chain_owner(str(doc["chain"]), HUB)
            if headers.get("rb-sender", b"").decode() != owner or headers.get(H_KIND, b"").decode() != HEAD_KIND:
                return None
        key = (str(doc["chain"]), int(doc["partition"]))
        head = Head(int(doc["seq"]), str(doc["hash"]))
        if record.key != f"{key[0]}/{key[1]}".encode() or len(head.hash) != 64:
            return None
        return key, head
    except (ReferralBrokerError, ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None


# -- verifying ----------------------------------------------------------------------------------
@dataclass
class Problem:
    problem: str  # missing | edited | reordered | duplicate | truncated | bad-signature | malformed
    partition: int
    offset: int | None
    chain: str | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    partitions: dict[int, dict[str, Any]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "intact": self.intact,
            "partitions": {str(p): v for p, v in sorted(self.partitions.items())},
            "problems": [p.as_dict() for p in self.problems],
        }


@dataclass
class _Link:
    offset: int
    seq: int
    prev: str
    hash: str


def verify_records(
    records: Iterable[Record],
    *,
    heads: dict[tuple[str, int], Head] | None = None,
    verify: Callable[[Record], dict[str, bytes]] | None = None,
) -> VerifyReport:
    """Check every chain of every partition of the audit records given (in offset order per
    partition) from seq 0: a deleted record (a seq gap), an edited one (its hash no longer what
    the next record, a checkpoint or a head names; or a signature that fails), a reordered one
    (a seq after a higher seq), a chain whose last records were cut (behind the highest head a
    signed checkpoint or the heads topic names). Each is named with partition, offset, chain.
    Records written before chaining (no chain headers) are counted as ``unchained``."""
    from referral_broker.parties import HUB
    from referral_broker.schemas import codec

    report = VerifyReport()
    chains: dict[tuple[int, str], list[_Link]] = {}
    claimed: dict[tuple[str, int], tuple[Head, str]] = {}  # (chain, partition) -> highest head, source
    for (chain, partition), head in (heads or {}).items():
        claimed[(chain, partition)] = (head, "the audit.heads entry")
    by_partition: dict[int, list[Record]] = {}
    for record in records:
        by_partition.setdefault(record.partition, []).append(record)
    for partition, rows in sorted(by_partition.items()):
        stats = {"records": 0, "chained": 0, "unchained": 0, "chains": 0, "checkpoints": 0}
        report.partitions[partition] = stats
        for record in sorted(rows, key=lambda r: r.offset):
            stats["records"] += 1
            headers = list(record.headers or [])
            try:
                fields = chain_headers(headers)
            except (ValueError, KeyError, UnicodeDecodeError):
                report.problems.append(Problem("malformed", partition, record.offset, None, "chain headers malformed"))
                continue
            if fields is None:
                stats["unchained"] += 1
                continue
            chain, seq, prev = fields
            stats["chained"] += 1
            signed_by = None
            owner = chain_owner(chain, HUB)
            if verify is not None:
                try:
                    signed_by = verify(record).get("rb-sender", b"").decode()
                except ReferralBrokerError as exc:
                    report.problems.append(
                        Problem("bad-signature", partition, record.offset, chain, f"seq {seq}: {type(exc).__name__}; the record was altered or forged")
                    )
                else:
                    if signed_by != owner:
                        report.problems.append(
                            Problem("bad-signature", partition, record.offset, chain, f"seq {seq} is signed by {signed_by}, not by the chain's writer {owner}")
                        )
            key, value = record.key or b"", record.value or b""
            chains.setdefault((partition, chain), []).append(
                _Link(record.offset, seq, prev, record_hash(key, value, chain, seq, prev))
            )
            if _kind(headers) == CHECKPOINT_KIND and (verify is None or signed_by == owner):
                stats["checkpoints"] += 1
                try:
                    doc = codec.decode(value)
                    for h in doc["heads"]:
                        where = (str(doc["chain"]), int(h["partition"]))
                        head = Head(int(h["seq"]), str(h["hash"]))
                        if where not in claimed or claimed[where][0].seq < head.seq:
                            claimed[where] = (head, f"the checkpoint at partition {partition} offset {record.offset}")
                except (ReferralBrokerError, KeyError, TypeError, ValueError):
                    report.problems.append(Problem("malformed", partition, record.offset, chain, "checkpoint unreadable"))
        stats["chains"] = sum(1 for (p, _c) in chains if p == partition)
    for (partition, chain), links in sorted(chains.items()):
        _check_chain(report, partition, chain, links, claimed.get((chain, partition)))
    for (chain, partition), (head, source) in sorted(claimed.items()):
        if (partition, chain) not in chains:
            report.problems.append(
                Problem("truncated", partition, None, chain, f"{source} names seq {head.seq}, but no record of the chain is left in the partition")
            )
    return report


def _check_chain(report: VerifyReport, partition: int, chain: str, links: list[_Link], claim: tuple[Head, str] | None) -> None:
    add = report.problems.append
    highest = -1
    for link in links:  # offset order
        if link.seq < highest:
            add(Problem("reordered", partition, link.offset, chain, f"seq {link.seq} comes after seq {highest}"))
        highest = max(highest, link.seq)
    by_seq: dict[int, _Link] = {}
    for link in links:
        if link.seq in by_seq:
            add(Problem("duplicate", partition, link.offset, chain, f"seq {link.seq} appears again (first at offset {by_seq[link.seq].offset})"))
        else:
            by_seq[link.seq] = link
    expected = 0
    for seq in sorted(by_seq):
        link = by_seq[seq]
        if seq > expected:
            add(
                Problem(
                    "missing", partition, link.offset, chain,
                    f"seq {expected}..{seq - 1} missing before seq {seq}" if seq - 1 > expected else f"seq {expected} missing before seq {seq}",
                )
            )
        elif seq == 0 and link.prev != GENESIS:
            add(Problem("edited", partition, link.offset, chain, "seq 0 does not start the chain"))
        before = by_seq.get(seq - 1)
        if before is not None and link.prev != before.hash:
            add(Problem("edited", partition, before.offset, chain, f"seq {seq - 1} does not hash to what seq {seq} names"))
        expected = seq + 1
    if claim is not None:
        head, source = claim
        last = by_seq[max(by_seq)]
        if last.seq < head.seq:
            add(Problem("truncated", partition, last.offset, chain, f"the chain ends at seq {last.seq}, but {source} names seq {head.seq}"))
        elif head.seq in by_seq and by_seq[head.seq].hash != head.hash:
            add(Problem("edited", partition, by_seq[head.seq].offset, chain, f"seq {head.seq} does not hash to what {source} names"))


def verify_audit(settings: Settings, bootstrap: str, *, verify: Callable[[Record], dict[str, bytes]] | None) -> VerifyReport:
    """Read the audit topic and its heads, and verify every chain."""
    records = read_topic(settings, bootstrap, "audit")
    heads = read_heads(settings, bootstrap, verify=verify)
    return verify_records(records, heads=heads, verify=verify)


def write_chained(
    settings: Settings,
    bootstrap: str,
    chain: str,
    sign: Signer,
    *,
    key: bytes,
    value: bytes,
    kind: str,
) -> None:
    """Write one audit record as the next of ``chain``, with its head, in one transaction under
    the transactional id ``<prefix>audit-writer-<chain>``: a second writer of the same chain
    fences the first (whose write then fails, so nothing is forked), and the heads are read
    only after this producer has settled any predecessor's transaction. Returns once durable."""
    from referral_broker.cluster.clients import build_producer

    producer = build_producer(
        settings, bootstrap, transactional_id=f"{settings.kafka_topic_prefix}audit-writer-{chain}"
    )
    try:
        AuditChain(settings, bootstrap, chain, sign).write_one(producer, key, value, kind)
    except BaseException:
        producer.abandon()  # a failed write's transaction is given up: nothing it held is sent
        raise
    producer.close()
