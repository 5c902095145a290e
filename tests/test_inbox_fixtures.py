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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from county import FORMAT, SCHOOL, in_county
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
REFERRER = SCHOOL  # the referring organisation (a party); its partner format is FORMAT[REFERRER]
PASSWORD = "synthetic-password-1"
CHROMIUM = "/usr/bin/chromium"

# A narrower policy than the shipped one, so that some fields are withheld from the team with
# the policy's own reasons (the shipped policy gives district teams every class).
NARROW_POLICY = """\
version = 1

[[purpose]]
recipient = "district_team"
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
        """A synthetic referral from the organisation ``partner`` about a family in ``team``'s
        district, naming the county's organisations for that district (``county.in_county``)."""
        record = copy.deepcopy(synthetic_referral(random.Random(seed)))
        record["referral_id"] = str(uuid.UUID(int=random.Random(f"id{seed}").getrandbits(128), version=4))
        record["district"] = district_of(team)
        record["referrer"]["partner"] = FORMAT.get(partner, partner)
        in_county(record)
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
        outputs = self.router().process(as_record(intake))
        # the router's delivery ledger goes to Kafka as routing would write it: a status
        # answering this referral is checked against it
        ledger = topic_name(self.settings, "deliveries")
        self.produce(*[m for m in outputs if m.topic == ledger])
        return next(m for m in outputs if m.topic == out)

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


# --- axe-core, the accessibility engine the browser tests run ---------------------------------

AXE_VERSION = "4.11.0"
AXE_INTEGRITY = (
    "sha512-ilYanEU8vxxBexpJd8cWM4ElSQq4QctCLKih0TSfjIfCQTeyH/6zVrmIJfLPrKTKJRbiG+cfnZbQIjAlJmF1jQ=="
)
# WCAG 2.2 A/AA and the best-practice rules (region: every element inside a landmark).
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"]


def axe_source() -> str:
    """axe-core's axe.min.js from npm (``npm pack``, npm's own client), checked against the
    pinned integrity, unpacked once into the user's cache folder."""
    import base64
    import hashlib
    import shutil
    import subprocess
    import tarfile
    import tempfile

    from referral_broker.config import load_settings

    target = load_settings(environ={}).paths_cache_dir / "axe-core" / AXE_VERSION / "axe.min.js"
    if target.is_file():
        return target.read_text(encoding="utf-8")
    npm = shutil.which("npm")
    assert npm is not None, "npm is needed to fetch axe-core for the accessibility checks"
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(
            [npm, "pack", f"axe-core@{AXE_VERSION}", "--silent"],
            cwd=work,
            check=True,
            capture_output=True,
            timeout=300,
        )
        tarball = next(Path(work).glob("axe-core-*.tgz"))
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        assert digest == AXE_INTEGRITY, "axe-core tarball does not match the pinned integrity"
        with tarfile.open(tarball) as tar:
            member = tar.extractfile("package/axe.min.js")
            assert member is not None
            source = member.read().decode("utf-8")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_text(source, encoding="utf-8")
    partial.replace(target)
    return source


def axe_violations(page: Any, source: str) -> list[dict[str, Any]]:
    """axe-core run on the page as it is now: the violations, each with its rule id, impact and
    the selectors of the offending nodes (for a readable assertion message)."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(source)
    result = page.evaluate(
        "tags => axe.run(document, {runOnly: {type: 'tag', values: tags}, resultTypes: ['violations']})",
        AXE_TAGS,
    )
    return [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]}
        for v in result["violations"]
    ]


# --- a district team's busy inbox, built fast ------------------------------------------------


@dataclass
class Day:
    """What :func:`fill_inbox` made: every referral, and the ones a test looks for."""

    records: list[dict[str, Any]]
    plan: dict[str, str]  # referral id -> what was done to it ("new", "open", "accept", ...)
    overdue_urgent: str
    overdue_routine: str

    def ids_with(self, *plans: str) -> set[str]:
        return {rid for rid, p in self.plan.items() if p in plans}


# i % 10 -> what the team already did to the i-th referral of the day
_PLANS = ("new", "new", "new", "new", "open", "accept", "decline", "request_information", "close", "new")


def fill_inbox(
    pipeline: Pipeline, store: InboxStore, fmt: SealedReferralFormat, n: int, *, team: str = TEAM
) -> Day:
    """``n`` referrals routed by the real router (one instance, no Kafka hop) and stored as
    ingest stores them, with a mix of states decided through the store's own transitions (their
    sealed status messages left in the outbox for the app to publish), and the router's audit
    decisions and delivery-ledger entries produced on their topics. Two are overdue: an
    urgent one received a week ago and a routine one received five weeks ago; every other one
    arrived now. About 20-40 ms a referral on the 2-core test machine."""
    from referral_broker.consumers.inbox.states import Action

    router = pipeline.router()
    sealer = pipeline.partner(REFERRER).sealer
    out_topic = topic_name(pipeline.settings, "out", team)
    now = datetime.now(UTC)
    records, plan = [], {}
    audit_topic = topic_name(pipeline.settings, "audit")
    # the router's audit decisions, and its delivery ledger (statuses are checked against it)
    kept_topics = {audit_topic, topic_name(pipeline.settings, "deliveries")}
    decisions: list[OutgoingMessage] = []
    overdue = {0: ("urgent", now - timedelta(days=7)), 1: ("routine", now - timedelta(days=35))}
    for i in range(n):
        changes: dict[str, Any] = {}
        received = now
        if i in overdue:
            changes["priority"], received = overdue[i]
        record = pipeline.referral(team, 5000 + i, **changes)
        intake = sealer.seal(
            record,
            referral_schema(),
            topic=topic_name(pipeline.settings, "intake", REFERRER),
            recipient=HUB,
            referral_id=record["referral_id"],
            referral_version=record["version"],
            kind="referral",
        )
        outputs = router.process(as_record(intake))
        routed = next(m for m in outputs if m.topic == out_topic)
        decisions += [m for m in outputs if m.topic in kept_topics]
        stored = Record(
            routed.topic,
            0,
            i,
            routed.key,
            routed.value,
            list(routed.headers),
            int(received.timestamp() * 1000),
        )
        store.ingest(team, fmt.summarise(stored, team), stored)
        records.append(record)
        plan[record["referral_id"]] = "new" if i in overdue else _PLANS[i % len(_PLANS)]

    def encode(decided: Any, referral: Any) -> OutgoingMessage:
        from referral_broker.consumers.inbox.outbound import status_record

        reason = "Synthetic reason." if decided.action.value in ("decline", "request_information") else None
        return fmt.seal_status(
            status_record(decided, referral, actor_role="Team manager", reason=reason), team
        )

    steps = {
        "open": [Action.OPEN],
        "accept": [Action.ACCEPT],
        "decline": [Action.DECLINE],
        "request_information": [Action.REQUEST_INFORMATION],
        "close": [Action.ACCEPT, Action.CLOSE],
    }
    for i, (rid, what) in enumerate(plan.items()):
        for action in steps.get(what, []):
            store.apply(team, rid, action, actor="fen.lead", at=now, encode_status=encode)
        if i % 7 == 3 and what in ("new", "open", "accept", "request_information"):
            store.apply(
                team,
                rid,
                Action.ALLOCATE,
                actor="fen.lead",
                at=now,
                encode_status=encode,
                allocated_to="fen.worker",
            )
    pipeline.produce(*decisions)  # the router's decisions and ledger, as it would have written them
    ids = list(plan)
    return Day(records, plan, overdue_urgent=ids[0], overdue_routine=ids[1])
