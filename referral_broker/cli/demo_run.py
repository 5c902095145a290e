"""The end-to-end demo: every partner sends synthetic referrals in its own native format, the
router shares them by policy, every recipient receives and reads its share, and status
messages go back to the referrers. Everything runs on the real broker with real keys; the
data is synthetic (``schemas.synth``) and shaped so each rule of the policy shows once.
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
from referral_broker.cluster.topics import ensure_topics
from referral_broker.config import Settings
from referral_broker.consumers.receiving import PartnerReceiver, Received, Refused, json_records
from referral_broker.consumers.router import Router, RouterStats
from referral_broker.parties import HUB, all_parties, get_party
from referral_broker.policy import load_policy
from referral_broker.producers.sending import PartnerSender
from referral_broker.schemas.synth import synthetic_referral
from referral_broker.sealing.key_admin import init_parties

PARTNERS = ("schools", "health", "dwp", "police", "charities")
NO_FLAGS = {"safeguarding_concern": False, "crime_prevention": False, "early_support_pathway": False}


def _concerns(types: list[str]) -> list[dict[str, Any]]:
    return [
        {"type": t, "detail": f"Synthetic {t.replace('_', ' ')} concern for the demo", "since": None}
        for t in types
    ]


def _scenario(partner: str, n: int, rng: random.Random, now: dt.datetime) -> dict[str, Any]:
    """One synthetic referral from ``partner``; ``n`` picks which policy rule it shows."""
    r = copy.deepcopy(synthetic_referral(rng, now, partner=partner))
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
    return r


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


def run_demo(
    settings: Settings, bootstrap: str, *, per_partner: int = 2, say: Callable[[str], None] = lambda s: None
) -> DemoResult:
    work = settings.paths_data_dir / "demo" / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    outbox, inbox = work / "outbox", work / "inbox"
    say("Ensuring topics")
    ensure_topics(settings, bootstrap)
    say("Creating demo keys for every party (kept if they exist)")
    init_parties(settings, sorted(all_parties()), bootstrap=bootstrap, skip_existing=True)

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    rng = random.Random()
    sent: dict[str, list[str]] = {}
    for partner in PARTNERS:
        records = [_scenario(partner, n, rng, now) for n in range(per_partner)]
        native = adapters.render_file(partner, json_records(records), outbox / partner).path
        assert native is not None  # rendered into a folder, so it names the file
        report = PartnerSender(settings, bootstrap, partner).send_file(native)
        report.raise_if_pending(partner)
        sent[partner] = [s.referral_id for s in report.delivered]
        say(f"  {partner:<10} sent {len(report.delivered)} referrals from {native}")

    say("Routing")
    stats = Router(settings, bootstrap).run(stop_when_idle=3)
    ours = {rid for ids in sent.values() for rid in ids}
    policy = load_policy()
    summaries: dict[str, RecipientSummary] = {}
    to_answer: list[tuple[str, Received]] = []
    for party in policy.recipients():
        summary = summaries.setdefault(party, RecipientSummary(party))
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
    for partner in PARTNERS:
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
