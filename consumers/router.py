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
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from kafka import TopicPartition

from referral_broker.cluster.clients import (
    IdleTimer,
    Record,
    build_consumer,
    build_producer,
    next_offsets,
    poll_records,
)
from referral_broker.cluster.topics import plan, topic_name
from referral_broker.config import Settings
from referral_broker.errors import (
    BrokerError,
    ContractError,
    KeyNotFoundError,
    PolicyError,
    ReferralBrokerError,
    SealingError,
)
from referral_broker.identity import (
    H_DECISION,
    H_NO_ONWARD,
    H_REFERRER,
    H_VIEW,
    H_WITHHELD,
    Identity,
    load_identity,
)
from referral_broker.parties import HUB, all_parties, get_party
from referral_broker.policy import Decision, SharingPolicy, decide, load_policy
from referral_broker.schemas import codec
from referral_broker.schemas.registry import audit_decision_schema, referral_schema, status_schema
from referral_broker.schemas.validation import ensure_valid
from referral_broker.schemas.views import view_schema
from referral_broker.sealing import OutgoingMessage, sign_plain
from referral_broker.structured_log import get_logger

from .dead_letters import dead_letter
from .router_metrics import RouterMetrics

log = get_logger(__name__)
GROUP = "referral-router"


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
    first_record_at: float | None = None  # monotonic; the busy window excludes group joining
    last_commit_at: float | None = None
    by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _group_withheld(decision: Decision) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for path, reason in decision.withheld.items():
        grouped.setdefault(reason, []).append(path)
    return grouped


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


@lru_cache(maxsize=256)
def _view(granted: tuple[str, ...]) -> dict[str, Any]:
    return view_schema(granted)


class Router:
    """One router process. ``clock`` gives the decision time (tests pass a fixed one)."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        *,
        policy: SharingPolicy | None = None,
        identity: Identity | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        instance: str | None = None,
        _unsealed_for_benchmark: bool = False,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.policy = policy or load_policy()
        self.hub = identity or load_identity(settings, bootstrap, HUB)
        self.clock = clock
        self.instance = instance or uuid.uuid4().hex[:8]
        self.stats = RouterStats()
        self.metrics = RouterMetrics()
        self.canonical = referral_schema()
        self._canonical_fp = codec.prepare(self.canonical).fingerprint
        self.audit_schema = audit_decision_schema()
        self.status_schema = status_schema()
        self._unsealed = _unsealed_for_benchmark
        specs = plan(settings.kafka_topic_profile, settings.kafka_topic_prefix)
        self.intake_party = {s.name: s.party for s in specs if s.role == "intake"}
        self.status_party = {s.name: s.party for s in specs if s.role == "status"}

    # -- one input record -> its outputs ------------------------------------------------------
    def process(self, record: Record) -> list[OutgoingMessage]:
        """Every output for one input, or an exception (which dead-letters the input)."""
        if record.topic in self.status_party:
            return self._process_status(record, self.status_party[record.topic])
        return self._process_referral(record, self.intake_party[record.topic])

    def _open_from(self, record: Record, party: str | None) -> Any:
        opened = self.hub.open(record)
        if opened.sender != party:
            raise SealingError(f"message on {party}'s topic is signed by {opened.sender}; refused")
        return opened

    def _process_referral(self, record: Record, partner: str | None) -> list[OutgoingMessage]:
        referral, referral_id, version = self._open_referral(record, partner)
        now = self.clock()
        ensure_valid(referral, self.canonical, now=now)
        if str(referral["referral_id"]) != referral_id or referral["version"] != version:
            raise ContractError("message key and headers do not match the referral's id and version")
        decisions = decide(self.policy, referral, referrer_party=partner or "", at=now)
        outputs: list[OutgoingMessage] = []
        encoded = codec.encode(referral, self.canonical)  # once; each view is resolved from it
        for decision in decisions:
            decision_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{referral_id}/{version}/{decision.recipient}"))
            view_fp = None
            if decision.delivered:
                view = _view(decision.shared)
                share = codec.decode(encoded, view)  # Avro resolution does the minimisation
                headers = [
                    (H_VIEW, _json(list(decision.shared))),
                    (H_WITHHELD, _json(_group_withheld(decision))),
                    (H_NO_ONWARD, _json(list(decision.no_onward_sharing))),
                    (H_REFERRER, (partner or "").encode()),
                    (H_DECISION, decision_id.encode()),
                ]
                outputs.append(
                    self._seal(share, view, decision.recipient, referral_id, version, "referral", headers)
                )
                view_fp = codec.prepare(view).fingerprint.hex()
                self.stats.delivered += 1
                self.metrics.deliveries.labels(recipient=decision.recipient).inc()
            outputs.append(self._audit(decision, decision_id, referral_id, version, view_fp, now))
        # The council's own long-lived copy, sealed under the case key (crypto-shredding).
        outputs.append(
            self._seal(
                referral,
                self.canonical,
                HUB,
                referral_id,
                version,
                "archive",
                [(H_REFERRER, (partner or "").encode())],
                topic=topic_name(self.settings, "archive"),
            )
        )
        self.stats.routed += 1
        self.metrics.routed.inc()
        return outputs

    def _open_referral(self, record: Record, partner: str | None) -> tuple[dict[str, Any], str, int]:
        if self._unsealed:  # benchmark only: the input is a plain single-object referral
            referral = codec.decode(record.value or b"", self.canonical)
            return referral, str(referral["referral_id"]), referral["version"]
        opened = self._open_from(record, partner)
        if opened.kind != "referral":
            raise ContractError(f"intake topics carry referrals, not '{opened.kind}' messages")
        referral = opened.record
        if opened.schema_fingerprint != self._canonical_fp:
            # an older writer version: resolve into today's shape before deciding
            writer = self.hub.schemas(opened.schema_fingerprint)
            referral = codec.decode(codec.encode(referral, writer), self.canonical)
        return referral, opened.referral_id, opened.referral_version

    def _process_status(self, record: Record, party: str | None) -> list[OutgoingMessage]:
        opened = self._open_from(record, party)
        if opened.kind != "status":
            raise ContractError(f"status topics carry status messages, not '{opened.kind}' messages")
        status = opened.record
        ensure_valid(
            status, self.status_schema, now=self.clock(), context="status", known_parties=all_parties()
        )
        if status["from_party"] != party:
            raise ContractError(f"status from_party does not match its sender {party}")
        to_party = status["to_party"]
        get_party(to_party)  # an unknown referrer is a dead letter, not a crash
        self.stats.statuses += 1
        self.metrics.statuses.inc()
        return [
            self._seal(
                status,
                self.status_schema,
                to_party,
                opened.referral_id,
                opened.referral_version,
                "status",
                [(H_REFERRER, to_party.encode())],
            )
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
    ) -> OutgoingMessage:
        topic = topic or topic_name(self.settings, "out", recipient)
        long_lived = recipient == HUB or get_party(recipient).kind == "district_team"
        if self._unsealed:  # benchmark only: same projection and encoding, no crypto
            return OutgoingMessage(topic, referral_id.encode(), codec.encode(record, schema), headers)
        return self.hub.sealer.seal(
            record,
            schema,
            topic=topic,
            recipient=recipient,
            referral_id=referral_id,
            referral_version=version,
            kind=kind,
            case_id=referral_id if long_lived else None,
            extra_headers=headers,
        )

    def _audit(
        self,
        decision: Decision,
        decision_id: str,
        referral_id: str,
        version: int,
        view_fp: str | None,
        now: datetime,
    ) -> OutgoingMessage:
        grounds = list(decision.grounds) + list(decision.special_category_conditions)
        audit = {
            "decision_id": decision_id,
            "referral_id": referral_id,
            "version": version,
            "recipient": decision.recipient,
            "purpose": ",".join(decision.purposes) or None,
            "fields_shared": list(decision.shared),
            "fields_withheld": [{"path": p, "reason": r} for p, r in decision.withheld.items()],
            "ground": "; ".join(grounds) if decision.delivered else "none: not shared",
            "conditions_met": [*decision.conditions_met, f"basis:{decision.basis}"],
            "override_reference": decision.override_id,
            "view_fingerprint": view_fp,
            "decided_at": now,
            "delivered": decision.delivered,
            "basis": decision.basis,
            "special_category_conditions": list(decision.special_category_conditions),
            "no_onward_sharing": list(decision.no_onward_sharing),
            "policy_version": self.policy.version,
        }
        value = codec.encode(audit, self.audit_schema)
        self.stats.audited += 1
        topic = topic_name(self.settings, "audit")
        if self._unsealed:
            return OutgoingMessage(topic, referral_id.encode(), value, [])
        return sign_plain(
            self.hub.keystore, topic=topic, key=referral_id.encode(), value=value, kind="audit.decision"
        )

    # -- the loop -----------------------------------------------------------------------------
    def topics(self) -> list[str]:
        return sorted(self.intake_party) + sorted(self.status_party)

    def run(self, *, stop_when_idle: float | None = None, max_records: int | None = None) -> RouterStats:
        """Route until stopped (Ctrl-C), idle for ``stop_when_idle`` seconds, or ``max_records``."""
        consumer = build_consumer(
            self.settings,
            self.bootstrap,
            self.topics(),
            group_id=f"{self.settings.kafka_topic_prefix}{GROUP}",
            max_poll_records=200,
        )
        producer = build_producer(
            self.settings,
            self.bootstrap,
            transactional_id=f"{self.settings.kafka_topic_prefix}{GROUP}-{self.instance}",
        )
        idle = IdleTimer(consumer, stop_when_idle or 0.0)
        try:
            while True:
                batch = poll_records(consumer, timeout_ms=500)
                if not batch:
                    if stop_when_idle is not None and idle.expired():
                        return self.stats
                    continue
                idle.activity()
                if self.stats.first_record_at is None:
                    self.stats.first_record_at = time.monotonic()
                self._route_batch(consumer, producer, batch)
                if max_records is not None and self.stats.consumed >= max_records:
                    return self.stats
        except KeyboardInterrupt:
            return self.stats
        finally:
            producer.close()
            consumer.close()

    def _route_batch(self, consumer: Any, producer: Any, batch: list[Record]) -> None:
        started = time.monotonic()
        producer.begin()
        try:
            for record in batch:
                for message in self._outputs(record):
                    message.send(producer)
            producer.commit(next_offsets(batch, consumer), consumer.group_metadata())
        except BrokerError as exc:
            # Nothing of this batch is visible to read_committed readers: rewind and retry it.
            self.stats.aborted += 1
            self.metrics.aborted.inc()
            log.warning("batch aborted; it will be read again", reason=str(exc), count=len(batch))
            with contextlib.suppress(BrokerError):
                producer.abort()
            first: dict[TopicPartition, int] = {}
            for r in batch:
                tp = TopicPartition(r.topic, r.partition)
                first[tp] = min(first.get(tp, r.offset), r.offset)
            for tp, offset in first.items():
                consumer.seek(tp, offset)
            return
        self.stats.consumed += len(batch)
        self.stats.batches += 1
        self.stats.last_commit_at = time.monotonic()
        self.metrics.consumed.inc(len(batch))
        self.metrics.batch_seconds.observe(self.stats.last_commit_at - started)

    def _outputs(self, record: Record) -> list[OutgoingMessage]:
        if time.monotonic() - self.hub.loaded_at > self.settings.keys_directory_refresh_s:
            self.hub.refresh(self.settings, self.bootstrap)
        try:
            try:
                return self.process(record)
            except KeyNotFoundError:
                # a key published after the last reload: reload once (at most every 5 s) and retry
                if time.monotonic() - self.hub.loaded_at < 5:
                    raise
                self.hub.refresh(self.settings, self.bootstrap)
                return self.process(record)
        except BrokerError:
            raise
        except ReferralBrokerError as exc:
            stage = {ContractError: "validate", SealingError: "verify-open", PolicyError: "policy"}
            kind = next((k for k in stage if isinstance(exc, k)), None)
            return [self._dead(record, exc, stage[kind] if kind else "config")]
        except Exception as exc:
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
        return dead_letter(self.settings, record, exc, stage)
