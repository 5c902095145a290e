"""Shared set-up for the inbox tests (no tests here): every party's real key store with the
public keys on the test's ``keys`` topic, referrals sent the way a partner's adapter sends them
(``IntakeSender`` / the partner's identity) and routed by the real router
(``consumers.router.Router``), so the inbox sees exactly what production sends it. Nothing here
fakes the message format or the crypto.

Test modules wrap ``make_pipeline`` / ``make_store`` in their own small fixtures.
"""

from __future__ import annotations

import copy
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from test_sealing_support import send_all

from referral_broker.cluster.clients import Record, build_consumer, poll_records
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.inbox.auth import add_user
from referral_broker.consumers.inbox.frontend import install_frontend
from referral_broker.consumers.inbox.sealed_format import SealedReferralFormat
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.consumers.receiving import Received, Refused, receive
from referral_broker.consumers.router import Router, RouterStats
from referral_broker.identity import Identity, load_identity
from referral_broker.parties import HUB, all_parties
from referral_broker.policy import SharingPolicy, load_policy
from referral_broker.producers.intake import IntakeSender
from referral_broker.schemas.registry import referral_schema
from referral_broker.schemas.synth import synthetic_referral
from referral_broker.sealing import OutgoingMessage
from referral_broker.sealing.key_admin import init_parties

TEAM = "district-fenland"
OTHER_TEAM = "district-cambridge"
REFERRER = "schools"
PASSWORD = "synthetic-password-1"
CHROMIUM = "/usr/bin/chromium"

# A narrower policy than the shipped one, so that some fields are withheld from the team with
# the policy's own reasons (the shipped policy gives district teams every class).
NARROW_POLICY = """\
version = 1

[[purpose]]
recipient = "kind:district_team"
name = "early-help-triage"
description = "Test policy: the family's district team triages without identifiers or special category data"
provides = ["family_support"]
when_all = ["family_district"]
ground = "uk_gdpr_6_1_e"
consent = "not_required"
classes = ["operational", "personal"]
fields = []
no_onward_sharing = ["child.address"]
"""


def district_of(team: str) -> str:
    return team.removeprefix("district-").replace("-", "_")


def as_record(message: OutgoingMessage, offset: int = 0) -> Record:
    """An outgoing message as a consumer would hand it over (for calling stages directly)."""
    return Record(
        message.topic, 0, offset, message.key, message.value, list(message.headers), int(time.time() * 1000)
    )


def as_sealed(message: OutgoingMessage, offset: int = 0) -> Record:
    return as_record(message, offset)


@dataclass
class Pipeline:
    """Partners, the hub's router and the key material of one test's topic namespace."""

    settings: Settings
    hub: Identity
    policy: SharingPolicy
    _partners: dict[str, Identity] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return self.settings.bootstrap_servers

    def referral(self, team: str, seed: int, *, partner: str = REFERRER, **changes: Any) -> dict[str, Any]:
        """A synthetic referral from ``partner`` about a family in ``team``'s district."""
        record = copy.deepcopy(synthetic_referral(random.Random(seed)))
        record["referral_id"] = str(uuid.UUID(int=random.Random(f"id{seed}").getrandbits(128), version=4))
        record["district"] = district_of(team)
        record["referrer"]["partner"] = partner
        record.update(changes)
        return record

    def partner(self, party: str) -> Identity:
        if party not in self._partners:
            self._partners[party] = load_identity(self.settings, self.bootstrap, party)
        return self._partners[party]

    def router(self) -> Router:
        return Router(self.settings, self.bootstrap, policy=self.policy, identity=self.hub)

    def routed(self, record: dict[str, Any], team: str, *, partner: str = REFERRER) -> OutgoingMessage:
        """What the router sends ``team`` for ``record`` (its real ``process``, no Kafka hop)."""
        intake = self.partner(partner).sealer.seal(
            record,
            referral_schema(),
            topic=topic_name(self.settings, "intake", partner),
            recipient=HUB,
            referral_id=record["referral_id"],
            referral_version=record["version"],
            kind="referral",
        )
        out = topic_name(self.settings, "out", team)
        return next(m for m in self.router().process(as_record(intake)) if m.topic == out)

    def send_referrals(self, records: Iterable[dict[str, Any]], *, partner: str = REFERRER) -> None:
        """As the partner's adapter does: validated, sealed for the hub, signed, on its intake topic."""
        with IntakeSender(self.settings, self.bootstrap, partner, identity=self.partner(partner)) as sender:
            sender.send_referrals(list(records))

    def route(self, *, routed: int = 0, statuses: int = 0, timeout_s: float = 60.0) -> tuple[int, int]:
        """Run the router until it has routed ``routed`` referrals and ``statuses`` status
        messages (a cold consumer group can take a moment to join); returns what it did."""
        done = [0, 0]
        deadline = time.monotonic() + timeout_s
        while True:
            stats: RouterStats = self.router().run(stop_when_idle=2.0)
            done[0] += stats.routed
            done[1] += stats.statuses
            if (done[0] >= routed and done[1] >= statuses) or time.monotonic() > deadline:
                return done[0], done[1]

    def received(self, party: str = REFERRER) -> list[Received | Refused]:
        """What ``party``'s adapter receives from its out topic (everything, no commit)."""
        return list(receive(self.settings, self.bootstrap, party, stop_when_idle=2, group_id=None))

    def statuses_received(self, party: str, *, expect: int, timeout_s: float = 30.0) -> list[Received]:
        """Status messages ``party``'s adapter receives, read until ``expect`` are there."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = [r for r in self.received(party) if isinstance(r, Received) and r.kind == "status"]
            if len(got) >= expect or time.monotonic() > deadline:
                return got

    def produce(self, *messages: OutgoingMessage) -> None:
        send_all(self.settings, self.bootstrap, messages)

    def format(self, teams: Iterable[str]) -> SealedReferralFormat:
        """The inbox's own format, loading identities and the key directory as ``serve`` does."""
        return SealedReferralFormat.from_settings(self.settings, tuple(teams))


def make_pipeline(topics: Settings, *, narrow_policy: bool = False) -> Pipeline:
    """Key stores for every party, published on ``keys``; the shipped policy or the narrow one.
    ``topics`` is the conftest fixture's settings (the whole plan created)."""
    init_parties(topics, sorted(all_parties()), bootstrap=topics.bootstrap_servers)
    policy = load_policy()
    if narrow_policy:
        path = topics.paths_data_dir / "narrow_policy.toml"
        path.write_text(NARROW_POLICY, encoding="utf-8")
        policy = load_policy(path)
    hub = load_identity(topics, topics.bootstrap_servers, HUB)
    return Pipeline(topics, hub, policy)


def make_store(settings: Settings) -> InboxStore:
    """The inbox store with two members of TEAM and one of OTHER_TEAM (password PASSWORD)."""
    store = InboxStore(settings.inbox_db_path)
    now = datetime.now(UTC)
    add_user(store, "fen.worker", TEAM, PASSWORD, at=now, role="Family worker")
    add_user(store, "fen.lead", TEAM, PASSWORD, at=now, role="Team manager")
    add_user(store, "cam.worker", OTHER_TEAM, PASSWORD, at=now)
    return store


def frontend_assets() -> Path:
    """The real govuk-frontend assets, installed (once) into the user's cache folder."""
    from referral_broker.config import load_settings

    return install_frontend(load_settings(environ={}))


def read_topic(settings: Settings, topic: str, *, expect: int, timeout_s: float = 30.0) -> list[Any]:
    """Every record on ``topic`` once ``expect`` have arrived (polling with a deadline)."""
    consumer = build_consumer(settings, settings.bootstrap_servers, [topic], group_id=None)
    found: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < expect and time.monotonic() < deadline:
            found.extend(poll_records(consumer, 500))
    finally:
        consumer.close()
    return found
