"""The council's router: every intake and status message in, minimised and sealed copies out.

For each referral on an intake topic: verify the signature (the signer must be the partner
whose topic it is), open it with the hub's key, validate it, decide the recipients with the
sharing policy, project each recipient's share onto its view schema, seal it for that
recipient alone (district teams under the case key), sign as the hub and produce it to the
recipient's out topic; write one audit decision per recipient and a case-sealed archive copy.
Status messages from recipients go back to the referrer the same way.

Each poll batch is one Kafka transaction with its consumer offsets
(``send_offsets_to_transaction``): either every output of every input in the batch and the
offsets commit, or none do and the batch is read again. Anything that fails lands in dead
letters inside the same transaction; the router itself never stops on bad input.
Scale out by running more router processes (the group shares the partitions), not threads.

A router never commits for partitions it no longer owns: before each commit it checks that its
group membership is the one the batch was read under and that every partition in the batch is
still assigned; any failure rebuilds the producer under the same transactional id (which
fences the failed one) and reads the batch again. See "Fencing, takeover and outages" in
docs/ARCHITECTURE.md for the sequence this closes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol

from kafka import TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.errors import KafkaError
from kafka.structs import MemberState

from referral_broker.audit_chain import AuditChain
from referral_broker.audit_log import referral_subject_keys, subject_secret
from referral_broker.cluster.clients import (
    IdleTimer,
    Producer,
    Record,
    build_consumer,
    build_producer,
    next_offsets,
    poll_records,
)
from referral_broker.cluster.runtime import metadata_topic_count
from referral_broker.cluster.topics import party_of_topic, topic_name, topic_pattern
from referral_broker.config import Settings
from referral_broker.errors import (
    BrokerAuthenticationError,
    BrokerError,
    BrokerProtocolError,
    BrokerTrustError,
    ConfigError,
    ContractError,
    NotAuthorisedError,
    PolicyError,
    ReferralBrokerError,
    SealingError,
)
from referral_broker.folders import private_folder
from referral_broker.identity import (
    H_DECISION,
    H_NO_ONWARD,
    H_PRIORITY,
    H_REFERRER,
    H_UNRESOLVED,
    H_VIEW,
    H_WITHHELD,
    Identity,
    load_identity,
)
from referral_broker.organisations import RegistryReader
from referral_broker.parties import HUB, Party, all_parties, get_party, use_registry
from referral_broker.policy import Decision, SharingPolicy, decide, load_policy
from referral_broker.schemas import codec
from referral_broker.schemas.registry import (
    audit_decision_schema,
    field_schema,
    referral_schema,
    status_schema,
)
from referral_broker.schemas.validation import ensure_valid
from referral_broker.schemas.views import view_schema
from referral_broker.sealing import OutgoingMessage
from referral_broker.sealing.envelope import sign_awaiting, sign_messages, sign_plain
from referral_broker.structured_log import get_logger

from .dead_letters import dead_letter
from .delivery_ledger import DeliveryLedger
from .receiving import Received, open_verified
from .router_metrics import BatchClock, BatchPhases, RouterMetrics
from .router_stall import STALL_AFTER_S, StallWatch

log = get_logger(__name__)
GROUP = "referral-router"
# A router that stops heartbeating (killed, paused, cut off) loses its partitions after
# SESSION_TIMEOUT_MS; heartbeats every HEARTBEAT_MS keep a live one in. 10 s is above the
# broker's minimum (group.min.session.timeout.ms, 6 s) and rides out a long GC pause.
SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_MS = 3_000
# How long the coordinator keeps a transaction open before aborting it. A restarted router
# (same instance name) fences its predecessor's transaction at once; this bounds the rest: how
# long read_committed readers wait for a router that never comes back, and how long a router
# taking over waits for offsets a paused one had added to its transaction but not committed
# (they stay "unstable" until it ends, KIP-447). A batch (200 records, a few seconds) must
# finish well within it, or its commit fails and it is read again.
TRANSACTION_TIMEOUT_MS = 20_000
MAX_POLL_RECORDS = 200
# A batch stops taking records after this share of the transaction timeout (the rest is read
# again), so a loaded machine at a few referrals per second cannot be fenced mid-commit.
BATCH_TIME_SHARE = 0.4
METADATA_MAX_AGE_MS = 10_000
# A batch's awaiting messages are signed (one tree per topic) and sent after every this many
# input records, not only at its end: the producer ships them while the rest is routed, so the
# commit has little left to flush, and the transaction is open on the broker for most of the
# batch (the fault tests kill and pause a router inside one). Some 9 messages a referral: a
# signature per topic per 250 or so messages, a few microseconds a referral.
SIGN_EVERY = 25
# How long the router's producer holds a partition's records to send more in one request. The
# commit sends whatever is held at once, so a longer wait adds no latency past the batch; it
# takes a referral's 9 messages from about 1 produce request a referral to 1 per 10 or so, and
# the client's network thread from about 1 ms of CPU a referral to 0.2 (`bench router`).
LINGER_MS = 50
# Bytes fetched per partition at a time. Records a fetch brings are handed out before any
# fetched later, so with Kafka's 1 MiB a partner's queued batch put about 3 MiB (some 2,000
# referrals, 30 s of routing) in front of an urgent referral from anyone else; 64 KiB keeps
# that to a few dozen referrals a partition. Routing, not fetching, bounds the rate.
FETCH_PARTITION_BYTES = 64 * 1024
# A batch that one fetch left short of MAX_POLL_RECORDS while more waits on the broker is
# topped up by further polls for at most this long: the small fetches above then still keep
# an urgent referral near the head of the queue, and a backlog of larger (sealed) referrals is
# still routed 200 to a transaction, not the 80 or so that 64 KiB holds. Each transaction
# costs the broker markers on every partition it wrote (copies, archive, audit, ledger), so
# halving their number takes about half a millisecond of the broker's CPU off every sealed
# referral on this machine (`bench router`).
TOP_UP_S = 0.05
URGENT = b"urgent"
BACKOFF_S = (0.5, 30.0)  # first and longest wait between client rebuilds


def priority_symbols(schema: dict[str, Any]) -> frozenset[bytes]:
    """The referral schema's priorities, as an ``rb-priority`` header carries them: a dead
    letter's reason echoes a header's value only when it is one of these."""
    return frozenset(str(symbol).encode() for symbol in field_schema(schema, "priority")["symbols"])


def audit_record(
    decision: Decision,
    *,
    decision_id: str,
    referral_id: str,
    version: int,
    view_fp: str | None,
    decided_at: datetime,
    policy_version: int,
    referrer: str | None,
    subjects: Sequence[str],
) -> dict[str, Any]:
    """The ``audit_decision`` record of one decision (the router's, and ``bench router``'s floor)."""
    grounds = list(decision.grounds) + list(decision.special_category_conditions)
    return {
        "decision_id": decision_id,
        "referral_id": referral_id,
        "version": version,
        "recipient": decision.recipient,
        "recipient_name": decision.recipient_name or None,
        "recipient_rules": list(decision.rules),
        "unresolved_reason": decision.unresolved,
        "purpose": ",".join(decision.purposes) or None,
        "fields_shared": list(decision.shared),
        "fields_withheld": [{"path": p, "reason": r} for p, r in decision.withheld.items()],
        "ground": "; ".join(grounds) if decision.delivered else "none: not shared",
        "conditions_met": [*decision.conditions_met, f"basis:{decision.basis}"],
        "override_reference": decision.override_id,
        "view_fingerprint": view_fp,
        "decided_at": decided_at,
        "delivered": decision.delivered,
        "basis": decision.basis,
        "special_category_conditions": list(decision.special_category_conditions),
        "no_onward_sharing": list(decision.no_onward_sharing),
        "policy_version": policy_version,
        "referrer": referrer,
        "subject_keys": list(subjects),
    }


class RouterSealer(Protocol):
    """The router's cryptography: verify and open what partners send, seal what it sends,
    sign audit records. :class:`HubKeySealer` is the only one a deployment uses; the router
    benchmark passes its own to measure the router without crypto."""

    def open(self, record: Record, *, sender: str | None, kind: str) -> Received:
        """Verified and opened, from ``sender`` and of ``kind``, or a ReferralBrokerError."""
        ...

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
        sign: bool = True,
        reuse: Any = None,
    ) -> OutgoingMessage:
        """The sealed message; ``sign=False`` (every copy the router routes): signed or
        ``awaiting_signature``, for :meth:`sign_batch`. ``record`` may hold more than
        ``schema`` (the router passes the whole referral with a recipient's view): only the
        fields of ``schema`` may be written, as an Avro write of it does. ``reuse``: the
        ``class_bytes`` of what :meth:`open` returned, the values ``record`` holds, for parts
        not to encode again."""
        ...

    def sign(
        self, *, topic: str, key: bytes, value: bytes, kind: str, extra_headers: Sequence[tuple[str, bytes]] = ()
    ) -> OutgoingMessage:
        """An audit record (or a heads entry), signed or ``awaiting_signature``: then
        :meth:`sign_batch` signs it with the rest of its batch."""
        ...

    def sign_batch(self, messages: list[OutgoingMessage]) -> list[OutgoingMessage]:
        """``messages`` (each ``awaiting_signature``) signed, in order."""
        ...


class HubKeySealer:
    """The council hub's keys: opens intake sealed for the hub, seals per recipient, signs."""

    def __init__(self, hub: Identity) -> None:
        self.hub = hub

    def open(self, record: Record, *, sender: str | None, kind: str) -> Received:
        """The one verified receive path (``consumers.receiving``), as every recipient's."""
        return open_verified(self.hub, record, sender=sender, kinds=(kind,), keep_bytes=True)

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
        sign: bool = True,
        reuse: Any = None,
    ) -> OutgoingMessage:
        return self.hub.sealer.seal(
            record,
            schema,
            topic=topic,
            recipient=recipient,
            referral_id=referral_id,
            referral_version=referral_version,
            kind=kind,
            case_id=case_id,
            extra_headers=extra_headers,
            sign=sign,
            reuse=reuse,
        )

    def sign(
        self, *, topic: str, key: bytes, value: bytes, kind: str, extra_headers: Sequence[tuple[str, bytes]] = ()
    ) -> OutgoingMessage:
        # one signature for a batch's messages to a topic (sign_batch), not one each
        return sign_plain(
            self.hub.keystore, topic=topic, key=key, value=value, kind=kind, extra_headers=extra_headers, sign=False
        )

    def sign_batch(self, messages: list[OutgoingMessage]) -> list[OutgoingMessage]:
        return sign_messages(self.hub.keystore, messages)


@contextlib.contextmanager
def claim_instance(settings: Settings, instance: str | None) -> Iterator[str]:
    """This router's instance name, held with a lock file in the data folder while it runs.

    The name makes the transactional id (``<prefix>referral-router-<name>``), so a router
    restarted under the same name fences its predecessor's open transaction at once. Without
    ``instance`` the first free ``<host>-<n>`` slot on this machine is taken: a restart gets
    the slot its dead predecessor held, a second router beside a live one gets the next. Two
    live routers may never share a name (they would fence each other in turn), so a taken
    explicit name is refused."""
    folder = private_folder(settings.paths_data_dir / "router")
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "host"
    names = [instance] if instance else [f"{host}-{n}" for n in range(64)]
    prefix = re.sub(r"[^A-Za-z0-9._-]", "-", settings.kafka_topic_prefix)
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,80}", name):
            raise ConfigError("a router instance name is 1-80 letters, digits, '.', '_' or '-'")
        handle = open(folder / f"{prefix}{name}.lock", "a+")  # noqa: SIM115 - held until the router stops
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        try:
            yield name
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return
    raise ConfigError(
        f"router instance '{instance}' is already running on this machine; give each router its own --instance"
        if instance
        else f"64 routers already run on this machine under {folder}"
    )


class _CommitFailed(Exception):
    """A batch's transaction could not be committed; the producer must be rebuilt."""

    def __init__(self, batch: list[Record], error: BaseException) -> None:
        super().__init__(str(error))
        self.batch = batch
        self.error = error


class _GiveUp(Exception):
    """An error that no rebuild can cure (raised as ``error`` by :meth:`Router.run`)."""

    def __init__(self, error: ReferralBrokerError) -> None:
        super().__init__(str(error))
        self.error = error


_INTERRUPTED = {  # what a stop inside a batch did with its transaction (Producer.end_interrupted)
    "aborted": "stopped inside a batch: its transaction was aborted",
    "committed": "stopped inside a batch whose commit was already sent: it committed",
    "ended": "stopped inside a batch that had just committed: no transaction was open",
}


def _within(seconds: float, action: Callable[[], Any]) -> bool:
    """Run a cleanup step that could wait on an unreachable cluster for at most ``seconds``;
    True when it finished in time without an error."""
    done: list[bool] = []

    def step() -> None:
        action()
        done.append(True)

    worker = threading.Thread(target=lambda: _quietly(step), daemon=True, name="router-cleanup")
    worker.start()
    worker.join(seconds)
    return bool(done)


def _drop(producer: Producer | None, consumer: Any) -> None:
    """Close the clients of a failed batch. The producer is closed at once, sending nothing
    it still holds: its transaction is given up (or settled by the new producer that fences
    it), and records of it sent later, to a broker back from an outage while the new producer
    takes over, could only arrive after that transaction ended."""
    if producer is not None:
        _within(5.0, producer.abandon)
    if consumer is not None:
        _within(5.0, consumer.close)


def _quietly(action: Callable[[], Any]) -> None:
    with contextlib.suppress(Exception):
        action()


@dataclass
class RouterStats:
    consumed: int = 0
    routed: int = 0
    statuses: int = 0
    delivered: int = 0
    audited: int = 0
    dead_lettered: int = 0
    batches: int = 0
    aborted: int = 0
    rebuilds: int = 0
    stalls: int = 0  # looks that found assigned partitions with records this router could not read
    first_record_at: float | None = None  # monotonic; the busy window excludes group joining
    last_commit_at: float | None = None
    by_reason: dict[str, int] = field(default_factory=dict)
    phases: BatchPhases = field(default_factory=BatchPhases)  # where the batches' time went

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "phases": self.phases.summary()}


# The headers of a copy that name fields, as JSON: the same few lists for every referral of a
# kind, so each is written once (bounded, like the views).
@lru_cache(maxsize=256)
def _paths_header(paths: tuple[str, ...]) -> bytes:
    return _json(list(paths))


@lru_cache(maxsize=256)
def _withheld_header(withheld: tuple[tuple[str, str], ...]) -> bytes:
    """``rb-withheld``: {reason: [paths]} of a decision's withheld (path, reason) pairs."""
    grouped: dict[str, list[str]] = {}
    for path, reason in withheld:
        grouped.setdefault(reason, []).append(path)
    return _json(grouped)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


@lru_cache(maxsize=256)
def _view(granted: tuple[str, ...]) -> dict[str, Any]:
    return view_schema(granted)


class Router:
    """One router process. ``clock`` gives the decision time (tests pass a fixed one);
    ``sealer`` does the cryptography (the hub's keys unless given); ``instance`` names this
    router for its transactional id (see :func:`claim_instance`)."""

    # A status is the recipient answering the referrer about the referrer's own referral.
    STATUS_GROUND = "uk_gdpr_6_1_e"

    # Every organisation's intake and status topics have a few partitions each: the range
    # assignor hands the first member the larger share of EVERY topic (2 of 3, for two routers:
    # 2/3 of all the work), round robin spreads all of them evenly. Range stays second so a
    # group with a router from before round robin in it (a rolling upgrade) still agrees on one.
    ASSIGNORS: tuple[type, ...] = (RoundRobinPartitionAssignor, RangePartitionAssignor)

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        *,
        policy: SharingPolicy | None = None,
        identity: Identity | None = None,
        sealer: RouterSealer | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        instance: str | None = None,
        transaction_timeout_ms: int = TRANSACTION_TIMEOUT_MS,
        stall_after_s: float = STALL_AFTER_S,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.policy = policy or load_policy()
        self.hub = identity or load_identity(settings, bootstrap, HUB)
        self.sealer: RouterSealer = sealer or HubKeySealer(self.hub)
        self.clock = clock
        self._instance_option = instance
        self.instance = instance  # the name in use while run() runs (a free slot when not given)
        self.transaction_timeout_ms = transaction_timeout_ms
        self.stall = StallWatch(stall_after_s)
        self.metrics = RouterMetrics()
        self.stats = RouterStats(phases=BatchPhases(self.metrics.phase_seconds))
        self.canonical = referral_schema()
        self.priorities = priority_symbols(self.canonical)
        self._canonical_fp = codec.prepare(self.canonical).fingerprint
        self.audit_schema = audit_decision_schema()
        self._audit_encoder = codec.RepeatedFieldsEncoder(self.audit_schema, ("fields_shared", "fields_withheld"))
        self.status_schema = status_schema()
        # The organisation registry, followed: caught up before every batch, so an ``orgs add``
        # or ``orgs disable`` holds from the next batch on, without a restart.
        self._registry_reader: RegistryReader | None = None
        # Who referred each referral and who received it: statuses are checked against it.
        self._ledger: DeliveryLedger | None = None
        # This router's audit chains (one per audit partition, named by its transactional id)
        # and the hub's subject-hash secret (the family's sharing history); both made on first use.
        self._audit_chain: AuditChain | None = None
        self._subject_secret: bytes | None = None
        # partitions the group took from this router since the current batch was read
        self._revoked: set[TopicPartition] = set()
        self._in_transaction = False
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Stop after the batch in hand: it is committed (or given up, as any batch can be),
        then the router leaves the group and ``run`` returns. Safe from a signal handler or
        another thread. A stop that interrupted a batch instead (KeyboardInterrupt) must settle
        its transaction on the way out; one it left open held back every later record on the
        partitions it wrote until the coordinator's timeout (read_committed readers stop at it)."""
        self._stopping.set()

    # -- one input record -> its outputs ------------------------------------------------------
    def process(self, record: Record) -> list[OutgoingMessage]:
        """Every output for one input, signed, or an exception (which dead-letters the input)."""
        return sign_awaiting(self._process(record), self.sealer.sign_batch)

    def _process(self, record: Record) -> list[OutgoingMessage]:
        """Every output for one input; its copies and the hub's own records (audit, archive,
        ledger) may still await their signature."""
        party = party_of_topic(self.settings, "status", record.topic)
        if party is not None:
            return self._process_status(record, self._sender(record, party))
        party = party_of_topic(self.settings, "intake", record.topic)
        return self._process_referral(record, self._sender(record, party))

    def _sender(self, record: Record, party: str | None) -> str:
        """The registered, active organisation whose topic this is."""
        found = all_parties().get(party) if party is not None else None
        if found is None or not found.sends:
            raise SealingError(f"topic {record.topic} belongs to no registered organisation; refused")
        if not found.active:
            raise PolicyError(f"sender {found.name} is disabled in the organisation registry; not routed")
        return found.name

    def _open_from(self, record: Record, party: str, kind: str) -> Received:
        """What ``party``'s topic carries: signed by ``party``, for the hub, of ``kind``."""
        return self.sealer.open(record, sender=party, kind=kind)

    @property
    def ledger(self) -> DeliveryLedger:
        if self._ledger is None:
            self._ledger = DeliveryLedger(self.settings, self.bootstrap, self.hub)
        return self._ledger

    @property
    def audit_chain(self) -> AuditChain:
        if self._audit_chain is None:
            self._audit_chain = AuditChain(
                self.settings, self.bootstrap, self.member_name, self.sealer.sign, verify=self.hub.opener.verify
            )
        return self._audit_chain

    def _subject_keys(self, referral: dict[str, Any]) -> list[str]:
        if self._subject_secret is None:
            self._subject_secret = subject_secret(self.hub.keystore.root)
        return referral_subject_keys(self._subject_secret, referral)

    def catch_up(self) -> None:
        """Apply organisation registry changes and deliveries committed since the last batch."""
        if self._registry_reader is None:
            self._registry_reader = RegistryReader(self.settings, self.bootstrap)
        # both topics' end offsets in one request (each is read by its own consumer)
        end = self.ledger.end_offsets(also=self._registry_reader.partitions())
        use_registry(self._registry_reader.catch_up(end))
        self.ledger.catch_up(end)
        self.audit_chain.heads()  # read once (and again after a commit whose outcome was unknown)

    def _process_referral(self, record: Record, partner: str) -> list[OutgoingMessage]:
        referral, referral_id, version, opened = self._open_referral(record, partner)
        now = self.clock()
        ensure_valid(referral, self.canonical, now=now)
        if str(referral["referral_id"]) != referral_id or referral["version"] != version:
            raise ContractError("message key and headers do not match the referral's id and version")
        priority = record.header(H_PRIORITY)
        if priority is not None and priority != str(referral["priority"]).encode():
            # the header put it first (or not): it must be the referral's own priority
            shown = priority.decode() if priority in self.priorities else "not a priority"
            raise ContractError(
                f"the {H_PRIORITY} header ({shown}) is not the referral's priority ({referral['priority']}); refused"
            )
        claimed, expected = referral["referrer"]["partner"], _referrer_kind(get_party(partner))
        if claimed != expected:
            # a referral's clear claims are the signer's: a charity cannot refer as the police
            raise PolicyError(f"the referral claims a {claimed} referrer but {partner} ({expected}) signed it; refused")
        decisions = decide(self.policy, referral, referrer_party=partner, at=now)
        unresolved = {d.recipient: d.unresolved for d in decisions if d.unresolved}
        outputs: list[OutgoingMessage] = []
        subjects = self._subject_keys(referral)
        for decision in decisions:
            decision_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{referral_id}/{version}/{decision.recipient}"))
            view_fp = None
            withheld = tuple(decision.withheld.items())
            if decision.delivered:
                # The minimisation: each copy is Avro-encoded with its view schema, which writes
                # the view's fields and nothing else, so the whole referral is passed as it is.
                view = _view(decision.shared)
                headers = [
                    (H_VIEW, _paths_header(decision.shared)),
                    (H_WITHHELD, _withheld_header(withheld)),
                    (H_NO_ONWARD, _paths_header(decision.no_onward_sharing)),
                    (H_REFERRER, partner.encode()),
                    (H_DECISION, decision_id.encode()),
                ]
                if unresolved and get_party(decision.recipient).kind == "district_team":
                    # the team works the case: it must know who else was not told, and why
                    headers.append((H_UNRESOLVED, _json(unresolved)))
                outputs.append(
                    self._seal(referral, view, decision.recipient, referral_id, version, "referral", headers, reuse=opened)
                )
                view_fp = codec.prepare(view).fingerprint.hex()
                self.stats.delivered += 1
                self.metrics.deliveries.labels(recipient=_metric_kind(get_party(decision.recipient))).inc()
            outputs.append(
                self._audit(decision, decision_id, referral_id, version, view_fp, now, referrer=partner, subjects=subjects)
            )
        # The council's own long-lived copy, sealed under the case key (crypto-shredding).
        outputs.append(
            self._seal(
                referral,
                self.canonical,
                HUB,
                referral_id,
                version,
                "archive",
                [(H_REFERRER, partner.encode())],
                topic=topic_name(self.settings, "archive"),
                reuse=opened,
            )
        )
        delivered_to = {d.recipient for d in decisions if d.delivered}
        outputs.append(self.ledger.record(referral_id, version, partner, delivered_to))
        self.stats.routed += 1
        self.metrics.routed.inc()
        return outputs

    def _open_referral(self, record: Record, partner: str) -> tuple[dict[str, Any], str, int, Any]:
        """The referral in today's shape, its id and version, and the bytes it was opened from
        when they are today's (the copies reuse them where a view has their shape)."""
        opened = self._open_from(record, partner, "referral")
        referral = opened.record
        if opened.schema_fingerprint != self._canonical_fp:
            # an older writer version: resolve into today's shape before deciding
            writer = self.hub.schemas(opened.schema_fingerprint)
            referral = codec.decode(codec.encode(referral, writer), self.canonical)
            return referral, opened.referral_id, opened.version, None
        return referral, opened.referral_id, opened.version, opened.class_bytes

    def _process_status(self, record: Record, party: str) -> list[OutgoingMessage]:
        opened = self._open_from(record, party, "status")
        status = opened.record
        ensure_valid(
            status, self.status_schema, now=self.clock(), context="status", known_parties=all_parties()
        )
        if status["from_party"] != party:
            raise ContractError(f"status from_party does not match its sender {party}")
        to_party = status["to_party"]
        # Only an organisation the referral was delivered to may answer, and only its referrer
        # hears the answer: a status is a disclosure too (its free text may name people).
        delivered = self.ledger.lookup(opened.referral_id)
        if delivered is None or party not in delivered.versions.get(opened.version, set()):
            raise PolicyError(f"status from {party} about a referral version it was not sent; refused")
        if to_party != delivered.referrer:
            raise PolicyError(f"status addressed to {to_party[:60]}, not to the referral's referrer; refused")
        recipient = get_party(to_party)
        self.stats.statuses += 1
        self.metrics.statuses.inc()
        decision = Decision(
            recipient=to_party,
            delivered=True,
            shared=tuple(sorted(status)),
            withheld={},
            purposes=("status-to-referrer",),
            grounds=(self.STATUS_GROUND,),
            special_category_conditions=(),
            # status-code: the hub's retention learns a case's closure from this audit record
            conditions_met=(f"received-by:{party}", f"status:{status['status_id']}", f"status-code:{status['status']}"),
            basis="not_required",
            override_id=None,
            no_onward_sharing=(),
            recipient_name=recipient.description,
            rules=("referrer",),
        )
        decision_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{opened.referral_id}/{opened.version}/status/{status['status_id']}"))
        return [
            self._seal(
                status,
                self.status_schema,
                to_party,
                opened.referral_id,
                opened.version,
                "status",
                [(H_REFERRER, to_party.encode()), (H_DECISION, decision_id.encode())],
            ),
            self._audit(decision, decision_id, opened.referral_id, opened.version, None, self.clock(), referrer=party),
        ]

    def _seal(
        self,
        record: dict[str, Any],
        schema: dict[str, Any],
        recipient: str,
        referral_id: str,
        version: int,
        kind: str,
        headers: list[tuple[str, bytes]],
        *,
        topic: str | None = None,
        reuse: Any = None,
    ) -> OutgoingMessage:
        topic = topic or topic_name(self.settings, "out", recipient)
        long_lived = recipient == HUB or get_party(recipient).kind == "district_team"
        # every copy is signed with the rest of its batch (one signature per topic)
        return self.sealer.seal(
            record,
            schema,
            topic=topic,
            recipient=recipient,
            referral_id=referral_id,
            referral_version=version,
            kind=kind,
            case_id=referral_id if long_lived else None,
            extra_headers=headers,
            sign=False,
            reuse=reuse,
        )

    def _audit(
        self,
        decision: Decision,
        decision_id: str,
        referral_id: str,
        version: int,
        view_fp: str | None,
        now: datetime,
        *,
        referrer: str | None = None,
        subjects: Sequence[str] = (),
    ) -> OutgoingMessage:
        audit = audit_record(
            decision,
            decision_id=decision_id,
            referral_id=referral_id,
            version=version,
            view_fp=view_fp,
            decided_at=now,
            policy_version=self.policy.version,
            referrer=referrer,
            subjects=subjects,
        )
        # the field lists are the decision's: the same few for every referral of a kind
        value = self._audit_encoder.encode(audit, (decision.shared, tuple(decision.withheld.items())))
        self.stats.audited += 1
        # the next record of this router's chain in the audit partition of the referral
        return self.audit_chain.append(referral_id.encode(), value, "audit.decision")

    # -- the loop -----------------------------------------------------------------------------
    def topic_pattern(self) -> str:
        """Every organisation's intake and status topic, present and future."""
        return topic_pattern(self.settings, ("intake", "status"))

    def run(self, *, stop_when_idle: float | None = None, max_records: int | None = None) -> RouterStats:
        """Route until stopped (Ctrl-C, SIGTERM from the CLI), idle for ``stop_when_idle``
        seconds, or ``max_records``. Cluster failures of any length are waited out: the
        clients are rebuilt with backoff and routing resumes from the committed offsets."""
        with claim_instance(self.settings, self._instance_option) as instance:
            self.instance = instance
            try:
                return self._run(stop_when_idle, max_records)
            except _GiveUp as exc:
                raise exc.error from None

    @property
    def group(self) -> str:
        return f"{self.settings.kafka_topic_prefix}{GROUP}"

    @property
    def member_name(self) -> str:
        """Transactional id and static group member id (``group.instance.id``) alike."""
        return f"{self.settings.kafka_topic_prefix}{GROUP}-{self.instance}"

    def _consumer(self) -> Any:
        return build_consumer(
            self.settings,
            self.bootstrap,
            [],
            pattern=self.topic_pattern(),
            # a newly registered organisation's topics are found within this long
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
            group_id=self.group,
            on_revoked=self._on_revoked,
            max_poll_records=MAX_POLL_RECORDS,
            max_partition_fetch_bytes=FETCH_PARTITION_BYTES,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_MS,
            # A static member: a router restarted under the same name takes its predecessor's
            # place (and partitions) in the group at once, without waiting for its session to
            # expire. Static members do not leave on close, so a clean stop removes it (below).
            group_instance_id=self.member_name,
            partition_assignment_strategy=self.ASSIGNORS,
        )

    def _leave_group(self) -> None:
        """Remove this router from the group now, so the others take over at once (a static
        member's close does not; kafka-python sends no LeaveGroup for one)."""
        from kafka.admin import MemberToRemove

        from referral_broker.cluster.topics import admin_client

        admin = admin_client(self.settings, self.bootstrap)
        try:
            admin.remove_group_members(self.group, [MemberToRemove(group_instance_id=self.member_name)])
        finally:
            admin.close()

    def _producer(self) -> Producer:
        return build_producer(
            self.settings,
            self.bootstrap,
            transactional_id=self.member_name,
            transaction_timeout_ms=self.transaction_timeout_ms,
            linger_ms=LINGER_MS,
        )

    def _on_revoked(self, partitions: list[TopicPartition]) -> None:
        # Runs inside consumer.poll() (kafka-python joins the group only there), so never in
        # the middle of a batch; the batch check below still reads it before every commit.
        self._revoked.update(partitions)

    def _run(self, stop_when_idle: float | None, max_records: int | None) -> RouterStats:
        consumer: Any = None
        producer: Producer | None = None
        idle: IdleTimer | None = None
        failures = 0
        read_ahead = False
        try:
            while not self._stopping.is_set():
                try:
                    if consumer is None:
                        if not read_ahead:  # once: after a rebuild the next catch-up is short
                            read_ahead = True
                            self._read_ahead()
                        consumer = self._consumer()
                        idle = IdleTimer(consumer, stop_when_idle or 0.0)
                        self.stall.restarted()
                    if producer is None:
                        producer = self._producer()  # fences (and settles) the one it replaces
                    assert idle is not None
                    clock = BatchClock()
                    batch = poll_records(consumer, timeout_ms=500)
                    self._revoked.clear()  # what moved inside that poll is settled in its result
                    if not batch:
                        if stop_when_idle is not None and self._idle(consumer, idle):
                            return self.stats
                        if self._stalled(consumer):
                            _drop(producer, consumer)
                            producer = consumer = None
                        continue
                    idle.activity()
                    self.stall.progress()
                    if self.stats.first_record_at is None:
                        self.stats.first_record_at = time.monotonic()
                    batch = self._topped_up(consumer, batch)
                    clock.lap("poll")
                    for part in urgent_first(batch):
                        self._route_batch(consumer, producer, part, clock)
                        clock = BatchClock()  # a poll split in two: the second part polled nothing
                    failures = 0
                    if max_records is not None and self.stats.consumed >= max_records:
                        return self.stats
                except _CommitFailed as exc:
                    _give_up_if_refused(exc.error)
                    # The producer may hold state of the failed transaction (kafka-python keeps
                    # the offsets of a rejected offset commit and would send them with the next
                    # one): a new producer under the same transactional id starts clean and
                    # fences the old one, which settles whatever it left open (a commit already
                    # on its way lands, the rest is aborted). The consumer is replaced too (as
                    # a static member it takes its own place back at once) and so reads again
                    # from the committed offsets, waiting for that transaction to settle.
                    failures += 1
                    self._lost_clients("transaction failed; batch will be read again", exc.error, failures)
                    _drop(producer, consumer)
                    producer = consumer = None
                    self._backoff(failures)
                except (BrokerError, KafkaError, OSError) as exc:
                    _give_up_if_refused(exc)
                    failures += 1
                    self._lost_clients("Kafka clients failed; rebuilding them", exc, failures)
                    _drop(producer, consumer)
                    producer = consumer = None
                    self._backoff(failures)
            return self.stats
        except KeyboardInterrupt:
            return self.stats
        finally:
            if producer is not None:
                if self._in_transaction:
                    self._settle_open_transaction(producer)
                _within(10.0, producer.close)
            if consumer is not None:
                _within(10.0, consumer.close)
                _within(5.0, self._leave_group)  # the others take over at once
            if self._registry_reader is not None:
                _quietly(self._registry_reader.close)
                self._registry_reader = None
            if self._ledger is not None:
                self._ledger.abort()
                _quietly(self._ledger.close)

    def _read_ahead(self) -> None:
        """Catch up before joining the group (``poll`` joins it), not in the first batch: that
        read the registry, the audit chain's heads and the whole delivery ledger (0.5 s to over
        a second, longer as the ledger grows) while the partitions just handed to this router
        stood still. A failure is left to the first batch, which catches up again and handles it
        as any other (a cluster not there yet, topics missing, an identity refused)."""
        try:
            self.catch_up()
        except (BrokerError, KafkaError, OSError) as exc:
            log.warning("could not catch up before joining the group", error=type(exc).__name__)

    def _stalled(self, consumer: Any) -> bool:
        """Warn while assigned partitions hold records this router cannot read (see
        :mod:`consumers.router_stall`); True when its clients should be rebuilt."""
        stall = self.stall.check(consumer)
        if stall is None:
            return False
        self.stats.stalls += 1
        self.metrics.stalls.inc()
        rebuild = self.stall.rebuild_due(stall, self.transaction_timeout_ms / 1000)
        if rebuild:
            self.stats.rebuilds += 1
            self.metrics.rebuilds.inc()
        event = "routing stalled; rebuilding the Kafka clients" if rebuild else "routing stalled"
        log.warning(event, **stall.as_log())
        return rebuild

    def _lost_clients(self, event: str, exc: BaseException, failures: int) -> None:
        self.stats.rebuilds += 1
        self.metrics.rebuilds.inc()
        log.warning(event, error=type(exc).__name__, reason=str(exc)[:300], count=failures)

    def _backoff(self, failures: int) -> None:
        first, longest = BACKOFF_S
        self._stopping.wait(min(longest, first * 2 ** (failures - 1)))  # a stop ends the wait

    def _settle_open_transaction(self, producer: Producer) -> str:
        """Leave no transaction open on the way out of an interrupted batch: abort it, or wait
        for its commit when the signal came after the commit was sent; when that does not
        complete in time (kafka-python's close does not wait for an abort still queued behind
        a slow produce), fence it with a new producer under the same transactional id, whose
        start aborts whatever the old one left open (a commit already sent still lands).
        Returns what became of it: aborted, committed, ended (it already had) or fenced."""
        self._in_transaction = False
        ended: list[str] = []
        if _within(5.0, lambda: ended.append(producer.end_interrupted())):
            log.info(_INTERRUPTED[ended[0]])
            return ended[0]
        log.warning("the stop's abort did not complete; fencing the transaction instead")
        _within(5.0, producer.abandon)

        def fence() -> None:
            self._producer().close(timeout_s=5.0)  # init_transactions aborts the open transaction

        if not _within(15.0, fence):
            log.warning("a transaction may be left open until its timeout", timeout_ms=self.transaction_timeout_ms)
        return "fenced"

    def _topped_up(self, consumer: Any, batch: list[Record]) -> list[Record]:
        """``batch`` with what further polls bring within :data:`TOP_UP_S`, up to
        :data:`MAX_POLL_RECORDS`, while an assigned partition has more waiting on the broker
        (by its last known high watermark): a router keeping up adds no wait, and an urgent
        referral waits TOP_UP_S more at most (the batch is split urgent first after this). A
        batch that :meth:`_moved` would refuse after those polls (a rebalance, its partitions
        revoked) is dropped whole, rewound, to be read again from the committed offsets:
        records read under the old membership are not mixed with the new one's."""
        member = consumer.group_metadata()
        deadline = time.monotonic() + TOP_UP_S
        while len(batch) < MAX_POLL_RECORDS and _waiting(consumer):
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            more = poll_records(consumer, timeout_ms=left_ms, max_records=MAX_POLL_RECORDS - len(batch))
            if self._moved(consumer, batch + more, member)[0]:
                self._rewind(consumer, batch + more)
                self._revoked.clear()
                return []
            if not more:
                break
            batch = batch + more
        return batch

    def _idle(self, consumer: Any, idle: IdleTimer) -> bool:
        """Idle means: nothing read for the idle time, and every assigned partition read to
        its end, as the cluster says now. A cluster that does not answer is not idleness:
        the router keeps waiting for it."""
        try:
            if not idle.expired():
                return False
        except BrokerError as exc:  # no partitions assigned in time
            if metadata_topic_count(self.bootstrap, timeout_s=5, settings=self.settings) is not None:
                raise _GiveUp(exc) from None  # the cluster answers: the topics are missing
            raise
        owned = list(consumer.assignment())
        if not owned and consumer.group_metadata().state != MemberState.STABLE:
            idle.activity()  # a rebalance is under way: partitions (and work) may come back
            return False
        try:
            ends = consumer.end_offsets(owned, timeout_ms=5_000)
            # no wait for a position: poll has just looked for each, and a partition whose committed
            # offset cannot be read yet (an open transaction holds it) would block here in turn
            behind = [tp for tp in owned if (consumer.position(tp, timeout_ms=0) or 0) < ends[tp]]
        except KafkaError:
            behind = owned
        if behind:
            idle.activity()  # records are waiting (or the cluster is away): not idle yet
            return False
        return True

    def _route_batch(self, consumer: Any, producer: Producer, batch: list[Record], clock: BatchClock) -> None:
        started = time.monotonic()
        member = consumer.group_metadata()  # the membership this batch was read under
        owned = consumer.assignment()
        batch = [r for r in batch if TopicPartition(r.topic, r.partition) in owned]
        if not batch:
            return
        if member.generation_id < 0 or not member.member_id:
            # evicted while it was polling (a heartbeat said so): not worth routing; the next
            # poll rejoins the group and reads whatever is still this router's
            log.warning("batch dropped: this router is no longer a member of the group", count=len(batch))
            self._rewind(consumer, batch)
            return
        self.catch_up()  # a cluster failure here is handled like any other
        clock.lap("catch_up")
        case_keys = self.hub.case_keys
        if case_keys is not None:
            case_keys.defer_durability()  # new case keys: one group of fsyncs before the commit
        try:
            producer.begin(offsets_for=self.group)
            self._in_transaction = True
            clock.lap("commit")
            budget = self.transaction_timeout_ms / 1000 * BATCH_TIME_SHARE
            unsigned: list[OutgoingMessage] = []  # one signature per topic for SIGN_EVERY records
            send = self._batch_send(producer)
            for done, record in enumerate(batch):
                if done and time.monotonic() - started > budget:
                    # A slow machine must not let a batch outrun its transaction: commit what
                    # is routed, read the rest again with the next poll.
                    self._rewind(consumer, batch[done:])
                    batch = batch[:done]
                    break
                outputs = self._outputs(record)
                clock.lap("route")
                for message in outputs:
                    if message.awaiting_signature:
                        unsigned.append(message)
                    else:
                        send(message)
                if (done + 1) % SIGN_EVERY == 0:
                    for message in self.sealer.sign_batch(unsigned):
                        send(message)
                    unsigned = []
                clock.lap("sign_send")
            unsigned += self.audit_chain.checkpoint()  # chain heads, in this transaction
            clock.lap("route")
            for message in self.sealer.sign_batch(unsigned):
                send(message)
            clock.lap("sign_send")
            if case_keys is not None:
                # before the commit: no committed message may name a key a power cut could lose
                case_keys.sync()
            clock.lap("key_sync")
            moved, checked = self._moved(consumer, batch, member)
            clock.lap("check")
            if moved:
                producer.abort()
                self.ledger.abort()
                self.audit_chain.abort()
                self._in_transaction = False
                self.stats.aborted += 1
                self.metrics.aborted.inc()
                log.warning("batch abandoned before commit; it will be read again", reason=moved, count=len(batch))
                self._rewind(consumer, batch)
                return
            # the membership just checked is the one the commit names: the broker rejects it
            # if the group has moved on since
            producer.commit(next_offsets(batch, consumer), checked)
            self.ledger.commit()
            self.audit_chain.commit()
            self._in_transaction = False
            clock.lap("commit")
        except (BrokerError, KafkaError, OSError) as exc:  # OSError: the case keys' fsync
            self.ledger.abort()  # if the commit landed after all, catch_up reads it back
            self.audit_chain.lost()  # the heads are read again (committed or not) before the next record
            self._in_transaction = False
            self.stats.aborted += 1
            self.metrics.aborted.inc()
            raise _CommitFailed(batch, exc) from exc
        self.stats.consumed += len(batch)
        self.stats.batches += 1
        self.stats.last_commit_at = time.monotonic()
        self.metrics.consumed.inc(len(batch))
        self.metrics.batch_seconds.observe(self.stats.last_commit_at - started)
        self.stats.phases.add(clock, len(batch))

    def _batch_send(self, producer: Producer) -> Callable[[OutgoingMessage], None]:
        """How this batch sends a message: the delivery ledger's entries tell the ledger where
        they were written, so its next catch-up need not read them back."""
        ledger = self.ledger
        topic = ledger.topic

        def send(message: OutgoingMessage) -> None:
            written = message.send(producer)
            if message.topic == topic:
                ledger.sent(message, written)

        return send

    def _moved(self, consumer: Any, batch: list[Record], read_under: Any) -> tuple[str | None, Any]:
        """Why this batch may not be committed by this router now (or None), and the group
        membership that was checked.

        The broker checks a transactional offset commit only against the group generation it
        names, and accepts one that names no generation at all (-1 with an empty member id:
        what kafka-python reports once a heartbeat learns the member was evicted). So the
        router checks itself: same generation and member as when the batch was read, a real
        one, and every partition of the batch still assigned."""
        now = consumer.group_metadata()
        if now.generation_id < 0 or not now.member_id:
            return "this router is no longer a member of the group", now
        if (now.generation_id, now.member_id) != (read_under.generation_id, read_under.member_id):
            return "the group rebalanced while the batch was routed", now
        owned = consumer.assignment()
        partitions = {TopicPartition(r.topic, r.partition) for r in batch}
        if not partitions <= owned or partitions & self._revoked:
            return "partitions of the batch moved to another router", now
        return None, now

    @staticmethod
    def _rewind(consumer: Any, batch: list[Record]) -> None:
        """Seek back to the start of ``batch`` on the partitions this router still owns (the
        committed offsets: each batch starts where the last commit ended); the rest belong
        to another router now, which reads them from the committed offsets."""
        owned = consumer.assignment()
        first: dict[TopicPartition, int] = {}
        for r in batch:
            tp = TopicPartition(r.topic, r.partition)
            first[tp] = min(first.get(tp, r.offset), r.offset)
        for tp, offset in first.items():
            if tp in owned:
                consumer.seek(tp, offset)

    def _outputs(self, record: Record) -> list[OutgoingMessage]:
        if time.monotonic() - self.hub.loaded_at > self.settings.keys_directory_refresh_s:
            self.hub.refresh(self.settings, self.bootstrap)
        mark = self.audit_chain.mark()  # a record that fails (or is tried again) leaves no chain gap

        def attempt(_hub: Identity) -> list[OutgoingMessage]:
            self.audit_chain.rollback(mark)
            return self._process(record)

        try:
            # a key published after the last load (a recipient's rotation): one reload, then again
            return self.hub.retrying(attempt)
        except BrokerError:
            raise
        except ReferralBrokerError as exc:
            self.audit_chain.rollback(mark)
            stage = {ContractError: "validate", SealingError: "verify-open", PolicyError: "policy"}
            kind = next((k for k in stage if isinstance(exc, k)), None)
            return [self._dead(record, exc, stage[kind] if kind else "config")]
        except Exception as exc:
            self.audit_chain.rollback(mark)
            log.error(
                "unexpected error routing a record",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                error=type(exc).__name__,
            )
            return [self._dead(record, exc, "internal")]

    def _dead(self, record: Record, exc: BaseException, stage: str) -> OutgoingMessage:
        self.stats.dead_lettered += 1
        self.metrics.dead_letters.labels(stage=stage).inc()
        self.stats.by_reason[stage] = self.stats.by_reason.get(stage, 0) + 1
        log.info(
            "dead-lettered",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=stage,
        )
        return dead_letter(self.settings, record, exc, stage, signer=self.hub.keystore)


def _waiting(consumer: Any) -> bool:
    """Whether an assigned partition has more than one offset the consumer has not reached by
    its last known high watermark (one may be a transaction marker, never a record)."""
    for tp in consumer.assignment():
        end = consumer.highwater(tp)  # a look-up; the position only for a partition with records
        if end is not None and end > 1 and end - (consumer.position(tp, timeout_ms=0) or end) > 1:
            return True
    return False


def urgent_first(batch: list[Record]) -> list[list[Record]]:
    """``batch`` as the transactions to route it in: first the partitions holding an urgent
    referral (by its signed ``rb-priority`` header), then the rest. A partition is never split
    (its records stay in order and its offsets are committed once); an urgent referral queued
    behind others in its own partition still waits for them."""
    urgent = {(r.topic, r.partition) for r in batch if r.header(H_PRIORITY) == URGENT}
    if not urgent:
        return [batch]
    first = [r for r in batch if (r.topic, r.partition) in urgent]
    rest = [r for r in batch if (r.topic, r.partition) not in urgent]
    return [first, rest] if rest else [first]


def _metric_kind(party: Party) -> str:
    """A bounded metric label: the organisation's kind, never one label per organisation."""
    return party.org.kind.value if party.org is not None else party.kind


def _referrer_kind(party: Party) -> str:
    """What ``referrer.partner`` must say for a referral this party signed."""
    return party.format or ("district_team" if party.kind == "district_team" else party.kind)


def _give_up_if_refused(exc: BaseException) -> None:
    """The cluster refused this router's credentials or rights: waiting will not change that,
    so stop with the cause ("not authorised to write topic T") instead of rebuilding forever."""
    from referral_broker.cluster.security import authorisation_error

    if isinstance(exc, (BrokerAuthenticationError, BrokerTrustError, BrokerProtocolError, NotAuthorisedError)):
        raise _GiveUp(exc) from None
    refused = authorisation_error(exc, "route") if isinstance(exc, KafkaError) else None
    if refused is not None:
        raise _GiveUp(refused) from None
