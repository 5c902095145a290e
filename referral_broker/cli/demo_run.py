"""The end-to-end demo: one organisation of each partner kind (a school, the health visiting
service, DWP, the police force, a charity) sends synthetic referrals in its own native format,
the router resolves each referral's recipients in the county's organisation registry and
shares by policy, every organisation receives and reads its share, and status messages go back
to the referring organisations. Everything runs on the real broker with real keys; the data is
synthetic (``schemas.synth``) and shaped so each rule of the policy shows once, including one
referral (Operation Encompass) that reaches exactly one school of the county's eight.
"""

from __future__ import annotations

import copy
import datetime as dt
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from referral_broker import adapters
from referral_broker.audit_log import decisions as audit_decisions
from referral_broker.cluster.topics import ensure_topics, provision_parties
from referral_broker.config import Settings
from referral_broker.consumers.receiving import PartnerReceiver, Received, Refused, json_records
from referral_broker.consumers.router import Router, RouterStats
from referral_broker.organisations import ImportReport, OrgKind, Registry, import_file
from referral_broker.parties import HUB, all_parties, current_registry, get_party
from referral_broker.policy import load_policy
from referral_broker.producers.sending import PartnerSender
from referral_broker.schemas.synth import NamedOrganisation, synthetic_referral
from referral_broker.sealing.key_admin import init_parties

PARTNERS = ("schools", "health", "dwp", "police", "charities")  # the formats, in sending order
# The organisation that sends each format in the demo (the shipped county's).
SENDERS = {
    "schools": "school-110123",
    "health": "nhs-zhv01",
    "dwp": "dwp",
    "police": "police-35",
    "charities": "charity-1190001",
}
NO_FLAGS = {"safeguarding_concern": False, "crime_prevention": False, "early_support_pathway": False}


def _concerns(types: list[str]) -> list[dict[str, Any]]:
    return [
        {"type": t, "detail": f"Synthetic {t.replace('_', ' ')} concern for the demo", "since": None}
        for t in types
    ]


def _named(registry: Registry, kind: OrgKind) -> list[NamedOrganisation]:
    return [
        NamedOrganisation(o.identifier, o.name, frozenset(o.services), frozenset(o.districts))
        for o in registry.organisations(kind, active_only=True)
    ]


def _scenario(
    partner: str, n: int, rng: random.Random, now: dt.datetime, registry: Registry
) -> dict[str, Any]:
    """One synthetic referral from ``partner``; ``n`` picks which policy rule it shows. It
    names the county's organisations: a school, GP practice and charities of its district."""
    practices = [p for p in _named(registry, OrgKind.NHS_ORGANISATION) if not p.services]
    charities = _named(registry, OrgKind.CHARITY)
    r = synthetic_referral(rng, now, partner=partner, gp_practices=practices, charities=charities)
    while partner == "police" and not r.get("school"):  # Operation Encompass: a child at school
        r = synthetic_referral(rng, now, partner=partner, gp_practices=practices, charities=charities)
    r = copy.deepcopy(r)
    r["version"] = 1
    r["sharing_override"] = None
    r["flags"] = dict(NO_FLAGS)
    consent = {"state": "given", "recorded_at": r["created_at"], "recorded_by": "Demo Practitioner"}
    shapes: dict[str, list[tuple[list[str], list[str], dict[str, bool], bool]]] = {
        # (concern types, services, flags, override without consent)
        "schools": [
            (["attendance"], ["family_support", "citizens_advice"], {}, False),
            (["crime_prevention"], ["youth_worker"], {"crime_prevention": True}, False),
        ],
        "health": [
            (
                ["development"],
                ["health_visitor", "parenting_programme"],
                {"early_support_pathway": True},
                False,
            ),
            (["safeguarding"], ["family_support"], {"safeguarding_concern": True}, True),
        ],
        "dwp": [(["financial"], ["citizens_advice", "family_support"], {}, False)],
        "police": [
            (["domestic_abuse", "safeguarding"], ["family_support"], {"safeguarding_concern": True}, True)
        ],
        "charities": [
            (["parenting"], ["school_nurse", "youth_worker", "parenting_programme"], {}, False),
            (["financial", "housing"], ["neet_support", "citizens_advice"], {}, False),
        ],
    }
    types, services, flags, override = shapes[partner][n % len(shapes[partner])]
    r["concern_types"] = types
    r["concerns"] = _concerns(types)
    r["services_requested"] = services
    r["flags"].update(flags)
    if flags.get("early_support_pathway"):
        born = now.date().replace(year=now.year - 3)
        r["child"]["date_of_birth"] = born
    if override:
        consent = {"state": "refused", "recorded_at": r["created_at"], "recorded_by": "Demo Practitioner"}
        r["sharing_override"] = {
            "override_id": uuid.UUID(int=rng.getrandbits(128), version=4),
            "ground": "risk_of_significant_harm",
            "reason": "Demo: a synthetic risk of significant harm assessed by the duty manager",
            "approved_by": {"role": "Early Help duty manager", "name": "Demo Approver"},
            "approved_at": r["created_at"],
        }
    r["consent"] = consent
    schools = [
        o.identifier for o in registry.organisations(OrgKind.SCHOOL, active_only=True) if o.serves(r["district"])
    ]
    if r.get("school") and schools:
        r["school"]["urn"] = rng.choice(schools)
    r["service_providers"] = _providers(services, r["district"], charities)
    return r


def _providers(services: list[str], district: str, charities: list[NamedOrganisation]) -> list[dict[str, str]]:
    """The charity named for each requested service a charity in the district provides."""
    named = []
    for service in services:
        found = [c for c in charities if service in c.services and c.serves(district)]
        if found:
            named.append({"service": service, "provider": found[0].identifier})
    return named


@dataclass
class RecipientSummary:
    party: str
    referrals: int = 0
    statuses: int = 0
    received_fields: set[str] = field(default_factory=set)
    withheld_fields: set[str] = field(default_factory=set)
    refused: int = 0


@dataclass
class DemoResult:
    sent: dict[str, list[str]]
    routed: RouterStats
    recipients: dict[str, RecipientSummary]
    statuses_back: dict[str, int]
    outbox: Path
    inbox: Path
    units: tuple[str, ...] = ()


@dataclass
class County:
    """What :func:`prepare_county` set up: the registry import and the registry in force."""

    imported: ImportReport
    registry: Registry
    keys: int  # public key entries published (new and existing)


def prepare_county(settings: Settings, bootstrap: str, *, say: Callable[[str], None] = lambda s: None) -> County:
    """The council's side of a local county, idempotently: the topic plan, the shipped county's
    organisations (kept as they are when already there) with their topics, the root of trust
    and a key store for every organisation (kept when it exists), published on the keys topic.
    The demo and ``referral-broker setup`` (docker-compose.yml) both start here."""
    say("Ensuring topics")
    ensure_topics(settings, bootstrap)
    report = import_file(settings, bootstrap)  # the shipped county; kept as it is when already there
    provision_parties(settings, bootstrap, report.added + report.unchanged + report.kept_disabled)
    registry = current_registry()
    say(f"Organisation registry: {len(registry)} organisations ({len(report.added)} added)")
    say("Creating demo keys for every organisation (kept if they exist)")
    entries = init_parties(settings, sorted(all_parties()), bootstrap=bootstrap, skip_existing=True)
    return County(report, registry, len(entries))


def run_demo(
    settings: Settings, bootstrap: str, *, per_partner: int = 2, say: Callable[[str], None] = lambda s: None
) -> DemoResult:
    work = settings.paths_data_dir / "demo" / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    outbox, inbox = work / "outbox", work / "inbox"
    registry = prepare_county(settings, bootstrap, say=say).registry

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    rng = random.Random()
    sent: dict[str, list[str]] = {}
    for partner in PARTNERS:
        sender = SENDERS[partner]
        records = [_scenario(partner, n, rng, now, registry) for n in range(per_partner)]
        native = adapters.render_file(partner, json_records(records), outbox / sender).path
        assert native is not None  # rendered into a folder, so it names the file
        delivery = PartnerSender(settings, bootstrap, sender).send_file(native)
        delivery.raise_if_pending(sender)
        sent[sender] = [s.referral_id for s in delivery.delivered]
        say(f"  {get_party(sender).label:<48} sent {len(delivery.delivered)} referrals from {native}")

    say("Routing")
    stats = Router(settings, bootstrap).run(stop_when_idle=3)
    ours = {rid for ids in sent.values() for rid in ids}
    policy = load_policy()
    summaries: dict[str, RecipientSummary] = {}
    to_answer: list[tuple[str, Received]] = []
    # Who was sent something, from the audit trail; every other organisation is listed as
    # having received nothing (reading 25 empty topics would only show that more slowly).
    delivered_to = {
        str(d["recipient"])
        for d in audit_decisions(settings, bootstrap, idle_s=1.0)
        if d.get("delivered") and str(d["referral_id"]) in ours
    }
    for party in [p.name for p in all_parties().values() if p.receives and p.kind != "research"]:
        summary = summaries.setdefault(party, RecipientSummary(party))
        if party not in delivered_to:
            continue
        client = PartnerReceiver(settings, bootstrap, party)
        items = list(client.receive(stop_when_idle=1, group="demo"))
        mine = [i for i in items if isinstance(i, Received) and i.referral_id in ours]
        summary.refused = sum(isinstance(i, Refused) for i in items)
        for item in mine:
            summary.referrals += 1
            summary.received_fields |= set(policy.units) - set(item.withheld)
            summary.withheld_fields |= set(item.withheld)
            if get_party(party).kind != "district_team":  # a team answers from its inbox, not here
                to_answer.append((party, item))
        if mine:
            client.render(mine, inbox / party)
    say("Partners answer: status messages back to the referrers (district teams answer in the inbox)")
    for n, (party, item) in enumerate(to_answer):
        code = ("accepted", "more_information_needed", "declined")[n % 3]
        PartnerSender(settings, bootstrap, party).send_status(
            {
                "status_id": uuid.uuid4(),
                "referral_id": uuid.UUID(item.referral_id),
                "version": item.version,
                "from_party": party,
                "to_party": item.referrer or HUB,
                "status": code,
                "reason": "Demo: synthetic reason" if code != "accepted" else None,
                "at": dt.datetime.now(dt.UTC).replace(microsecond=0),
                "actor_role": "Demo practitioner",
            }
        )
    Router(settings, bootstrap).run(stop_when_idle=3)
    statuses_back: dict[str, int] = {}
    for partner in SENDERS.values():
        items = list(PartnerReceiver(settings, bootstrap, partner).receive(stop_when_idle=1, group="demo"))
        back = [i for i in items if isinstance(i, Received) and i.kind == "status" and i.referral_id in ours]
        statuses_back[partner] = len(back)
        summaries.setdefault(partner, RecipientSummary(partner)).statuses = len(back)
        if back:
            PartnerReceiver(settings, bootstrap, partner).render(back, inbox / partner)
    for summary in summaries.values():
        summary.withheld_fields -= summary.received_fields
    return DemoResult(sent, stats, summaries, statuses_back, outbox, inbox, policy.units)


def compact_paths(paths: set[str], universe: tuple[str, ...]) -> str:
    """Field names, compactly: a record named once when all of its fields are in ``paths``
    (``school``), otherwise its parts (``child.{date_of_birth,given_name}``)."""
    wanted = {u for u in universe if u in paths or any(u.startswith(p + ".") for p in paths)}

    def walk(prefix: str, units: list[str]) -> list[str]:
        heads: dict[str, list[str]] = {}
        for u in units:
            heads.setdefault(u[len(prefix) :].split(".")[0], []).append(u)
        out = []
        for head, under in heads.items():
            full = prefix + head
            if all(u in wanted for u in under):
                out.append(full)
            elif any(u in wanted for u in under):
                out.extend(walk(full + ".", under))
        return out

    names = walk("", list(universe))
    groups: dict[str, list[str]] = {}
    for name in names:
        head, _, rest = name.partition(".")
        groups.setdefault(head, []).append(rest)
    return ", ".join(
        head
        if rests == [""]
        else f"{head}.{rests[0]}"
        if len(rests) == 1
        else f"{head}.{{{','.join(rests)}}}"
        for head, rests in groups.items()
    )
