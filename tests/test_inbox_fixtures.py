"""Shared set-up for the inbox tests (no tests here): real key stores for the hub and the
district teams with their public keys on the test's ``keys`` topic, and routed referrals built
the way the router builds them (synthetic referral -> sharing-policy decision -> view schema
by Avro resolution -> sealed for the team under the case key and signed by the hub with the
sealing package). Nothing here fakes the format or the crypto.

Test modules wrap ``make_routing`` / ``make_store`` in their own small fixtures.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from referral_broker.consumers.inbox.auth import add_user
from referral_broker.consumers.inbox.frontend import install_frontend
from referral_broker.consumers.inbox.sealed_format import H_GRANTED, H_WITHHELD, SealedReferralFormat
from referral_broker.consumers.inbox.store import InboxStore
from referral_broker.schemas.registry import status_schema
from referral_broker.schemas.synth import synthetic_referral
from referral_broker.schemas.views import project, view_schema

from referral_broker.cluster.clients import build_consumer, build_producer, poll_records
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.parties import HUB
from referral_broker.policy import decide, load_policy
from referral_broker.sealing import (
    CaseKeyStore,
    KeyDirectory,
    KeyStore,
    MessageOpener,
    MessageSealer,
    OpenedMessage,
    OutgoingMessage,
    schema_book,
)
from referral_broker.sealing.directory import load_topic, publish

TEAM = "district-fenland"
OTHER_TEAM = "district-cambridge"
PASSWORD = "synthetic-password-1"
CHROMIUM = "/usr/bin/chromium"


def district_of(team: str) -> str:
    return team.removeprefix("district-").replace("-", "_")


@dataclass
class Routing:
    """The hub's side: seals referrals for district teams as the router does."""

    settings: Settings
    hub: KeyStore
    teams: dict[str, KeyStore]
    directory: KeyDirectory
    case_keys: CaseKeyStore
    sent: list[OutgoingMessage] = field(default_factory=list)

    def referral(self, team: str, seed: int, **changes: Any) -> dict[str, Any]:
        """A synthetic referral whose family lives in ``team``'s district."""
        record = synthetic_referral(random.Random(seed))
        record["referral_id"] = str(uuid.UUID(int=random.Random(seed).getrandbits(128), version=4))
        record["district"] = district_of(team)
        record.update(changes)
        return record

    def route(
        self,
        record: dict[str, Any],
        team: str,
        *,
        granted: Iterable[str] | None = None,
        withheld: dict[str, str] | None = None,
    ) -> OutgoingMessage:
        """Seal ``record`` for ``team`` the way the router does: the policy decides the fields
        (unless ``granted``/``withheld`` stand for a narrower decision), the view schema
        projects the record, the hub seals it under the case key and signs it."""
        if granted is None:
            decisions = decide(
                load_policy(), record, referrer_party=record["referrer"]["partner"], at=datetime.now(UTC)
            )
            decision = next(d for d in decisions if d.recipient == team)
            assert decision.delivered
            granted, withheld = decision.shared, dict(decision.withheld)
        granted = sorted(granted)
        view = view_schema(granted)
        message = MessageSealer(self.hub, self.directory, case_keys=self.case_keys).seal(
            project(record, view),
            view,
            topic=topic_name(self.settings, "out", team),
            recipient=team,
            referral_id=record["referral_id"],
            referral_version=record["version"],
            case_id=record["referral_id"],
            extra_headers=[
                (H_GRANTED, json.dumps(granted).encode()),
                (H_WITHHELD, json.dumps(withheld or {}).encode()),
            ],
        )
        self.sent.append(message)
        return message

    def send(self, *messages: OutgoingMessage) -> None:
        producer = build_producer(self.settings, self.settings.bootstrap_servers)
        try:
            for message in messages:
                message.send(producer)
            producer.flush()
        finally:
            producer.close()

    def open_status(self, record: Any) -> OpenedMessage:
        """What the router will do with a status message: verify and open it as the hub."""
        return MessageOpener(self.hub, self.directory, schema_book(status_schema())).open(record)

    def format(self, teams: Iterable[str]) -> SealedReferralFormat:
        """The inbox's own format, loading the key directory from the keys topic."""
        return SealedReferralFormat.from_settings(self.settings, tuple(teams))


def make_routing(topics: Settings) -> Routing:
    """Key stores for the hub and two district teams; public keys published on ``keys``.
    ``topics`` is the conftest fixture's settings (the whole plan created)."""
    keys_dir = topics.keys_dir
    hub = KeyStore.create(keys_dir, HUB)
    teams = {t: KeyStore.create(keys_dir, t) for t in (TEAM, OTHER_TEAM)}
    entries = [e for store in (hub, *teams.values()) for e in store.public_entries()]
    publish(topics, topics.bootstrap_servers, entries)
    directory = load_topic(topics, topics.bootstrap_servers)
    return Routing(topics, hub, teams, directory, CaseKeyStore.open(keys_dir))


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
    import time

    consumer = build_consumer(settings, settings.bootstrap_servers, [topic], group_id=None)
    found: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < expect and time.monotonic() < deadline:
            found.extend(poll_records(consumer, 500))
    finally:
        consumer.close()
    return found
