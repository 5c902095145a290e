"""``bench urgent``: does an urgent referral reach the district team in seconds while another
partner's batch is queued in front of the router?

Issue 20 says an urgent safeguarding referral should land in seconds whatever else is queued.
Under a fresh topic prefix (topics deleted at the end) with the shipped county, as ``bench e2e``
runs it (the router as its own ``referral-broker route`` process, the Cambridge team's inbox
ingest in a thread of this process): DWP sends a batch of ``backlog`` routine referrals at
once (sealed and signed ahead, then produced as fast as the client goes), and once the router
is busy with it, a school sends ``probes`` urgent referrals, one at a time, ``gap`` seconds
apart. For each probe: the seconds from its send to its row in the team's inbox, and how many
of the batch's referrals were stored meanwhile (routed ahead of it). The batch's own figures
(its rate, what was still queued) say what the probes competed with. Figures are printed,
never asserted.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from referral_broker.cluster.topics import ensure_with_county
from referral_broker.config import Settings
from referral_broker.consumers.e2e_bench import (
    TEAM,
    WARMUP,
    TimedStore,
    close_inbox,
    router_process,
    wait_stored,
)
from referral_broker.consumers.inbox.ingest import TeamIngest
from referral_broker.consumers.inbox.sealed_format import SealedReferralFormat
from referral_broker.consumers.router_bench import SENDER, _shaped, delete_namespace
from referral_broker.errors import BrokerError
from referral_broker.parties import HUB, all_parties
from referral_broker.producers.intake import IntakeSender, as_checked
from referral_broker.sealing.key_admin import init_parties

BATCH_PARTY = "dwp"
STARTED_AFTER = 50  # batch referrals stored before the first probe: the router is busy with it


def batch_referrals(count: int, seed: int) -> list[dict[str, Any]]:
    """Routine referrals DWP may send (no school or practice named), each for the Cambridge team."""
    out = []
    for r in _shaped(count, 1, seed=seed):
        r = copy.deepcopy(r)
        r["referrer"]["partner"] = BATCH_PARTY
        r["priority"] = "routine"
        if r.get("school"):
            r["school"]["urn"] = None
        out.append(r)
    return out


def _urgent(count: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for r in _shaped(count, 1, seed=seed):
        out.append({**r, "priority": "urgent"})
    return out


def run(
    base: Settings,
    bootstrap: str,
    *,
    backlog: int = 3000,
    probes: int = 5,
    gap: float = 2.0,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    prefix = f"benchu{uuid.uuid4().hex[:6]}."
    probe_figures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rb-bench-urgent-") as tmp:
        settings = base.replace(
            kafka_topic_prefix=prefix, paths_data_dir=Path(tmp) / "data", kafka_bootstrap_servers=bootstrap
        )
        settings.paths_data_dir.mkdir(mode=0o700)
        ingest: TeamIngest | None = None
        store: TimedStore | None = None
        try:
            progress("topics and keys")
            ensure_with_county(settings, bootstrap)
            init_parties(settings, [HUB, SENDER, *[p for p in all_parties() if p not in (SENDER, HUB)]], bootstrap=bootstrap)
            progress(f"{backlog} routine referrals from {BATCH_PARTY}, {probes} urgent ones from {SENDER}")
            batch = batch_referrals(backlog, seed=11)
            urgent = _urgent(probes + WARMUP, seed=12)
            warm, urgent = urgent[:WARMUP], urgent[WARMUP:]
            with router_process(settings, bootstrap, Path(tmp) / "router.log", "bench-urgent") as router:
                store = TimedStore(settings.inbox_db_path)
                ingest = TeamIngest(settings, TEAM, store, SealedReferralFormat.from_settings(settings, (TEAM,)))
                ingest.start()
                with IntakeSender(settings, bootstrap, SENDER) as school, IntakeSender(
                    settings, bootstrap, BATCH_PARTY
                ) as dwp:
                    progress("sealing ahead of the clock")
                    batch_messages = [dwp.sealer.referral(c.record) for c in as_checked(batch)]
                    probe_messages = [school.sealer.referral(c.record) for c in as_checked(urgent)]
                    progress(f"warm-up: {WARMUP} referrals through router and ingest")
                    school.send_referrals(warm)
                    if not wait_stored(store, [str(r["referral_id"]) for r in warm], 180.0, ingest):
                        raise BrokerError("the warm-up referrals did not reach the inbox within 180 s")
                    progress(f"{BATCH_PARTY} sends its batch")
                    batch_ids = [str(r["referral_id"]) for r in batch]
                    sent = time.monotonic()
                    for message in batch_messages:
                        message.send(dwp.producer)
                    dwp.producer.flush()
                    batch_sent_s = time.monotonic() - sent
                    progress("waiting for the router to be busy with it")
                    while sum(1 for i in batch_ids if i in store.stored_at) < min(STARTED_AFTER, backlog):
                        if router.poll() is not None or ingest.error is not None:
                            raise BrokerError("the router or the ingest stopped during the batch")
                        time.sleep(0.05)
                    for n, (record, message) in enumerate(zip(urgent, probe_messages, strict=True), 1):
                        progress(f"urgent referral {n} of {probes}")
                        rid = str(record["referral_id"])
                        queued = backlog - sum(1 for i in batch_ids if i in store.stored_at)
                        at = time.monotonic()
                        message.send(school.producer)
                        school.producer.flush()
                        landed = wait_stored(store, [rid], 300.0, ingest)
                        stored_at = store.stored_at.get(rid)
                        ahead = sum(1 for i in batch_ids if at <= store.stored_at.get(i, -1.0) <= (stored_at or time.monotonic()))
                        probe_figures.append(
                            {
                                "seconds": round((stored_at - at), 2) if stored_at else None,
                                "landed": landed,
                                "batch_queued_at_send": queued,
                                "batch_stored_meanwhile": ahead,
                            }
                        )
                        time.sleep(gap)
                    batch_done = sum(1 for i in batch_ids if i in store.stored_at)
                    times = sorted(store.stored_at[i] for i in batch_ids if i in store.stored_at)
                ingest.stop()
            stats = router.stats()  # once it stopped
        finally:
            close_inbox(ingest, store)
            delete_namespace(settings, bootstrap)
    seconds = [p["seconds"] for p in probe_figures if p["seconds"] is not None]
    return {
        "batch": {
            "party": BATCH_PARTY,
            "referrals": backlog,
            "sent_in_s": round(batch_sent_s, 2),
            "stored_by_the_end": batch_done,
            "rate_per_s": round((len(times) - 1) / (times[-1] - times[0]), 1) if len(times) > 1 else None,
        },
        "urgent": {"party": SENDER, "team": TEAM, "probes": probe_figures},
        "urgent_seconds": {"max": max(seconds), "median": sorted(seconds)[len(seconds) // 2]} if seconds else {},
        "all_landed": all(p["landed"] for p in probe_figures),
        "router": {k: stats.get(k) for k in ("consumed", "routed", "delivered", "dead_lettered", "batches")},
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "prefix": prefix,
    }
