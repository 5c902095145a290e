"""``bench orgs``: does the design hold N registered organisations (issue 13, Build 4)?

Each measured run works under a fresh topic prefix and a throw-away data folder, on the broker
it is given, so it never touches other data:

1. N synthetic organisations (valid identifiers: 6-digit URNs, GP-practice ODS codes, 7-digit
   charity numbers; synthetic names), in addition to the shipped county, are published to the
   registry topic; ``topics ensure`` (``ensure_topics``: reads the registry, creates every
   organisation's topics) is timed, then timed again with nothing left to create;
2. the broker's resident memory (``/proc/<pid>/status`` VmRSS) and JVM heap (``jcmd <pid>
   GC.heap_info``; with ``full_gc`` the live heap after a full collection, from ``jcmd <pid>
   GC.class_histogram``) before and after, when the broker runs on this machine;
3. a key pair per organisation (``init_parties``), then ``load_directory`` timed;
4. K referrals from a few senders, naming the shipped county's organisations (the child's
   school, GP practice, charity providers), routed by one router run to idle: referrals/s.

The same is done for a small registry (20 organisations by default) and the two are printed
side by side with their ratios. Topics are deleted at the end unless ``keep``. Figures are for
this machine and this run: printed, never asserted.
"""

from __future__ import annotations

import contextlib
import copy
import re
import resource
import shutil
import subprocess
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from referral_broker.cluster.runtime import kafka_folder, listening_pid
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, TopicPlanError
from referral_broker.organisations import Organisation, OrgKind, Registry, districts, load_file, organisation

# Who sends the measured referrals: organisations of the shipped county, one per format used.
SENDERS = ("school-110123", "school-110756", "police-35", "nhs-zhv01")
BASELINE = 20
# Synthetic organisations, by share: a county's few hundred schools, dozens of GP practices,
# tens of charities (police forces, DWP, district teams and research are the shipped county's).
SHARES = ((OrgKind.SCHOOL, 0.7), (OrgKind.NHS_ORGANISATION, 0.2), (OrgKind.CHARITY, 0.1))
DELETE_CHUNK = 500
# Parties per CreateTopics request when one request for all is refused: 100 partner parties make
# about 2,000 metadata records (a topic, each partition, each config), a fifth of the controller's
# cap, and 300 topics that can appear within kafka-python's 10 s wait on a busy machine.
CHUNK_PARTIES = 100
CHUNK_ATTEMPTS = 5


# -- synthetic organisations -----------------------------------------------------------------
def synthetic_organisations(count: int) -> list[Organisation]:
    """``count`` valid organisations that do not clash with the shipped county: schools with
    URNs from 300000, GP practices with ODS codes Y00000.., charities numbered from 3000000;
    each serves one district, in turn."""
    places = districts()
    counts = {kind: int(count * share) for kind, share in SHARES}
    counts[OrgKind.SCHOOL] += count - sum(counts.values())
    orgs: list[Organisation] = []
    n = 0
    for kind, how_many in counts.items():
        for i in range(how_many):
            district = places[n % len(places)]
            n += 1
            services: tuple[str, ...] = ()
            if kind is OrgKind.SCHOOL:
                ident, name = f"{300000 + i}", f"Synthetic Benchmark School {i:04d}"
            elif kind is OrgKind.NHS_ORGANISATION:
                ident, name = f"Y{i:05d}", f"Synthetic Benchmark Surgery {i:04d}"
            else:
                ident, name = f"{3000000 + i}", f"Synthetic Benchmark Charity {i:04d}"
                services = ("family_support",)
            orgs.append(
                organisation(kind=kind, identifier=ident, name=name, districts=[district], services=services)
            )
    return orgs


# -- the referrals ---------------------------------------------------------------------------
def county_referrals(count: int, seed: int = 13) -> list[tuple[str, dict[str, Any]]]:
    """(sender, referral) pairs: synthetic referrals, the senders in turn, each naming the
    shipped county's organisations for its district (a registered school, a GP practice that
    serves it, a charity provider for a requested service it provides), with consent given
    and no override, so each is routed (never dead-lettered) to a handful of organisations."""
    from referral_broker.parties import get_party
    from referral_broker.schemas.synth import synthetic_referrals

    county = load_file()
    out: list[tuple[str, dict[str, Any]]] = []
    services = ["family_support", "school_nurse", "parenting_programme"]
    for n, record in enumerate(synthetic_referrals(count, seed=seed)):
        sender = SENDERS[n % len(SENDERS)]
        r = copy.deepcopy(record)
        district = r["district"]
        pick = zlib.crc32(str(r["referral_id"]).encode())
        r["referrer"]["partner"] = get_party(sender).format
        r["services_requested"] = services
        r["consent"] = {"state": "given", "recorded_at": r["created_at"], "recorded_by": "Synthetic Worker"}
        r["sharing_override"] = None
        r["flags"] = {"safeguarding_concern": False, "crime_prevention": False, "early_support_pathway": False}
        r["concern_types"] = ["parenting"]
        r["concerns"] = [{"type": "parenting", "detail": "Synthetic detail", "since": None}]
        if r.get("school"):
            urns = [o.identifier for o in county if o.kind is OrgKind.SCHOOL and o.serves(district)]
            r["school"]["urn"] = urns[pick % len(urns)]
        health = r.get("health_and_development")
        if health is not None:
            gps = [
                o.identifier
                for o in county
                if o.kind is OrgKind.NHS_ORGANISATION and not o.services and o.serves(district)
            ]
            health["gp_practice_ods"] = gps[pick % len(gps)] if gps else None
        r["service_providers"] = [
            {"service": s, "provider": found[0].identifier}
            for s in services
            if (found := [o for o in county if o.kind is OrgKind.CHARITY and o.provides(s) and o.serves(district)])
        ]
        out.append((sender, r))
    return out


# -- the broker's memory ---------------------------------------------------------------------
def broker_pid(bootstrap: str) -> int | None:
    """The pid of the process listening on the bootstrap address's port, when that address is
    this machine's and the process is a Kafka broker; None otherwise (a remote cluster)."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    if host.strip("[]") not in ("127.0.0.1", "localhost", "::1", "0.0.0.0") or not port.isdigit():
        return None
    pid = listening_pid(int(port))
    return pid if pid is not None and kafka_folder(pid) is not None else None


def _jcmd(pid: int, *args: str) -> str | None:
    jcmd = shutil.which("jcmd")
    if jcmd is None:
        return None
    try:
        done = subprocess.run([jcmd, str(pid), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


_HEAP = re.compile(r"heap\s+total\s+(\d+)K,\s+used\s+(\d+)K")
_HISTO_TOTAL = re.compile(r"^Total\s+\d+\s+(\d+)\s*$", re.MULTILINE)


def broker_memory(pid: int | None, *, full_gc: bool = False) -> dict[str, Any]:
    """VmRSS and JVM heap of the broker process (MB); nulls when it is not on this machine."""
    found: dict[str, Any] = {"rss_mb": None, "heap_used_mb": None, "heap_committed_mb": None, "live_heap_mb": None}
    if pid is None:
        return found
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                found["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    if full_gc:  # a stop-the-world full collection: the histogram's total is the live heap
        histo = _jcmd(pid, "GC.class_histogram")
        match = _HISTO_TOTAL.search(histo or "")
        if match:
            found["live_heap_mb"] = round(int(match.group(1)) / 2**20, 1)
    match = _HEAP.search(_jcmd(pid, "GC.heap_info") or "")
    if match:
        found["heap_committed_mb"] = round(int(match.group(1)) / 1024, 1)
        found["heap_used_mb"] = round(int(match.group(2)) / 1024, 1)
    return found


# -- one measured run ------------------------------------------------------------------------
@dataclass
class _Clock:
    figures: dict[str, float]

    @contextlib.contextmanager
    def time(self, name: str) -> Any:
        start = time.perf_counter()
        yield
        self.figures[name] = round(time.perf_counter() - start, 3)


def _delete_topics(settings: Settings, bootstrap: str) -> int:
    from referral_broker.cluster.topics import admin_client

    admin = admin_client(settings, bootstrap)
    try:
        names = [t for t in admin.list_topics() if t.startswith(settings.kafka_topic_prefix)]
        for i in range(0, len(names), DELETE_CHUNK):
            admin.delete_topics(names[i : i + DELETE_CHUNK], timeout_ms=120_000, raise_errors=False)
        return len(names)
    finally:
        admin.close()


def short_error(exc: BaseException) -> str:
    """The reason of a failed CreateTopics, without the request it quotes whole (megabytes)."""
    text = str(exc)
    reasons = sorted(set(re.findall(r"error_message='([^']*)'", text)))
    head = text.split(" Request ", 1)[0].split(": Request", 1)[0][:200].rstrip(": ")
    return f"{head}: {'; '.join(reasons)}" if reasons else text[:300]


def chunked_ensure(
    settings: Settings, bootstrap: str, retried: list[str], per_request: int = CHUNK_PARTIES
) -> list[Any]:
    """``ensure_topics``'s work in several CreateTopics requests of ``per_request`` parties each;
    a chunk whose topics were slow to appear is ensured again (its first party goes into
    ``retried``)."""
    from referral_broker.cluster.topics import ensure_party_topics
    from referral_broker.parties import all_parties, use_cluster_registry

    use_cluster_registry(settings, bootstrap)
    parties = sorted(all_parties())
    states: dict[str, Any] = {}
    for i in range(0, len(parties), per_request):
        chunk = parties[i : i + per_request]
        for attempt in range(CHUNK_ATTEMPTS):
            try:
                for state in ensure_party_topics(settings, bootstrap, chunk):
                    if state.spec.name not in states or state.created:
                        states[state.spec.name] = state
                break
            except TopicPlanError:
                # created, but not all visible within kafka-python's fixed 10 s wait: the next
                # attempt finds them (and creates any that are still missing)
                if attempt == CHUNK_ATTEMPTS - 1:
                    raise
                retried.append(chunk[0])
    return list(states.values())


def measure(
    base: Settings,
    bootstrap: str,
    *,
    organisations: int,
    referrals: int,
    pid: int | None,
    keep: bool = False,
    full_gc: bool = False,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """One run with ``organisations`` synthetic organisations beside the shipped county."""
    from referral_broker.cluster.topics import ensure_topics, plan
    from referral_broker.consumers.router import Router
    from referral_broker.identity import load_directory, load_identity
    from referral_broker.organisations import load_registry
    from referral_broker.organisations import publish as publish_orgs
    from referral_broker.parties import all_parties, use_registry
    from referral_broker.producers.intake import IntakeSender
    from referral_broker.sealing.key_admin import init_parties

    prefix = f"bench{uuid.uuid4().hex[:8]}."
    label = f"{organisations} organisations"
    seconds: dict[str, float] = {}
    clock = _Clock(seconds)
    memory: dict[str, Any] = {}
    result: dict[str, Any] = {"organisations": organisations, "prefix": prefix}
    with tempfile.TemporaryDirectory(prefix="rb-bench-orgs-") as tmp:
        settings = base.replace(kafka_topic_prefix=prefix, paths_data_dir=Path(tmp) / "data")
        try:
            memory["before"] = broker_memory(pid, full_gc=full_gc)
            orgs = [*load_file(), *synthetic_organisations(organisations)]
            progress(f"{label}: registry ({len(orgs)} entries)")
            # the fixed topics (the registry's among them) first, untimed: with no organisation
            # installed, the plan has no per-organisation topics yet
            use_registry(Registry())
            ensure_topics(settings, bootstrap, read_registry=False)
            with clock.time("registry_publish_s"):
                publish_orgs(settings, bootstrap, orgs)
            with clock.time("registry_load_s"):
                registry = load_registry(settings, bootstrap)
            progress(f"{label}: topics ensure")
            start = time.perf_counter()
            retried: list[str] = []
            try:
                states = ensure_topics(settings, bootstrap)
                seconds["topics_ensure_s"] = round(time.perf_counter() - start, 3)
            except TopicPlanError as exc:
                # a single KRaft controller refuses one CreateTopics request of more than
                # 10,000 metadata records (a topic, its partitions and its configs each count):
                # recorded as the finding it is, then the same topics are made in chunks
                seconds["topics_ensure_failed_after_s"] = round(time.perf_counter() - start, 3)
                result["topics_ensure_error"] = short_error(exc)
                progress(f"{label}: topics ensure failed ({result['topics_ensure_error']}); creating in chunks")
                with clock.time("topics_ensure_chunked_s"):
                    states = chunked_ensure(settings, bootstrap, retried)
                result["topics_ensure_chunks_retried"] = len(retried)
            with clock.time("topics_ensure_again_s"):
                again = ensure_topics(settings, bootstrap)
            per_org = [s.spec for s in states if s.spec.party]
            result.update(
                registered=len(registry),
                parties=len(all_parties()),
                # under a fresh prefix every organisation's topic is this run's (a chunk ensured
                # again reports the ones its first attempt made as existing)
                topics_created=len(per_org) if retried else sum(1 for s in states if s.created),
                topics_created_again=sum(1 for s in again if s.created),
                per_organisation_topics=len(per_org),
                per_organisation_partitions=sum(s.partitions for s in per_org),
                topics_in_plan=len(plan(settings.kafka_topic_profile, prefix)),
            )
            memory["after_topics"] = broker_memory(pid, full_gc=full_gc)

            progress(f"{label}: a key pair per organisation")
            parties = sorted(all_parties())
            with clock.time("keys_init_s"):
                init_parties(settings, parties, bootstrap=bootstrap)
            loads = []
            for _ in range(3):
                start = time.perf_counter()
                directory = load_directory(settings, bootstrap)
                loads.append(time.perf_counter() - start)
            seconds["key_directory_load_s"] = round(loads[0], 3)
            seconds["key_directory_load_best_s"] = round(min(loads), 3)
            result["key_directory_entries"] = len(directory.entries())
            result["key_directory_refused"] = len(directory.refused)

            progress(f"{label}: {referrals} referrals sent")
            pairs = county_referrals(referrals)
            with clock.time("send_s"):
                for sender in SENDERS:
                    mine = [r for s, r in pairs if s == sender]
                    if mine:
                        identity = load_identity(settings, bootstrap, sender, directory=directory)
                        with IntakeSender(settings, bootstrap, sender, identity=identity) as out:
                            out.send_referrals(mine)
            progress(f"{label}: router run to idle")
            start = time.perf_counter()
            router = Router(settings, bootstrap, instance=uuid.uuid4().hex[:6])
            stats = router.run(max_records=referrals, stop_when_idle=30)
            wall = time.perf_counter() - start
            if stats.dead_lettered or stats.first_record_at is None or stats.last_commit_at is None:
                raise BrokerError(f"benchmark router run dead-lettered or read nothing: {stats.by_reason}")
            busy = stats.last_commit_at - stats.first_record_at
            seconds["router_wall_s"] = round(wall, 3)
            seconds["router_busy_s"] = round(busy, 3)
            result["router"] = {
                "consumed": stats.consumed,
                "routed": stats.routed,
                "delivered": stats.delivered,
                "audited": stats.audited,
                "dead_lettered": stats.dead_lettered,
                "batches": stats.batches,
                "aborted": stats.aborted,
                "rebuilds": stats.rebuilds,
                "referrals_per_s": round(stats.consumed / busy, 1) if busy > 0 else None,
                "referrals_per_s_wall": round(stats.consumed / wall, 1),
            }
            memory["after_router"] = broker_memory(pid, full_gc=full_gc)
        finally:
            if keep:
                result["deleted_topics"] = 0
            else:
                progress(f"{label}: deleting its topics")
                with clock.time("topics_delete_s"):
                    result["deleted_topics"] = _delete_topics(settings, bootstrap)
    result["seconds"] = seconds
    result["broker_memory"] = memory
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def run(
    base: Settings,
    bootstrap: str,
    *,
    organisations: int,
    referrals: int = 500,
    baseline: int = BASELINE,
    keep: bool = False,
    full_gc: bool = False,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """The small registry (``baseline``), then ``organisations``; both runs and their ratios."""
    from referral_broker.parties import current_registry, use_registry

    pid = broker_pid(bootstrap)
    installed = current_registry()  # each run installs its own registry; put this one back after
    try:
        small = measure(
            base, bootstrap, organisations=baseline, referrals=referrals, pid=pid, keep=keep,
            full_gc=full_gc, progress=progress,
        )  # fmt: skip
        large = measure(
            base, bootstrap, organisations=organisations, referrals=referrals, pid=pid, keep=keep,
            full_gc=full_gc, progress=progress,
        )  # fmt: skip
    finally:
        use_registry(installed)

    def mem(run_: dict[str, Any], when: str, what: str) -> float | None:
        value: float | None = run_["broker_memory"].get(when, {}).get(what)
        return value

    def grew(run_: dict[str, Any], what: str) -> float | None:
        a, b = mem(run_, "before", what), mem(run_, "after_topics", what)
        return round(b - a, 1) if a is not None and b is not None else None

    def creating(run_: dict[str, Any]) -> float | None:
        """Seconds to create every organisation's topics: one ``topics ensure``, or in chunks."""
        found: float | None = run_["seconds"].get("topics_ensure_s") or run_["seconds"].get("topics_ensure_chunked_s")
        return found

    ratios = {
        "router_referrals_per_s": _ratio(large["router"]["referrals_per_s"], small["router"]["referrals_per_s"]),
        "router_referrals_per_s_wall": _ratio(
            large["router"]["referrals_per_s_wall"], small["router"]["referrals_per_s_wall"]
        ),
        "topics_create_s": _ratio(creating(large), creating(small)),
        "key_directory_load_s": _ratio(
            large["seconds"]["key_directory_load_best_s"], small["seconds"]["key_directory_load_best_s"]
        ),
    }
    return {
        "bootstrap": bootstrap,
        "profile": base.kafka_topic_profile,
        "broker_pid": pid,
        "broker_on_this_machine": pid is not None,
        "full_gc": full_gc,
        "referrals": referrals,
        "senders": list(SENDERS),
        "shipped_county": len(load_file()),
        "runs": [small, large],
        "ratios_large_over_small": ratios,
        "broker_growth_mb": {
            "rss_small": grew(small, "rss_mb"),
            "rss_large": grew(large, "rss_mb"),
            "live_heap_small": grew(small, "live_heap_mb"),
            "live_heap_large": grew(large, "live_heap_mb"),
        },
        "bench_process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# -- the human table -------------------------------------------------------------------------
def _fmt(value: Any, unit: str = "", places: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{places}f}{unit}" if value < 10 else f"{value:,.1f}{unit}"
    return f"{value:,}{unit}"


def rows(data: dict[str, Any]) -> list[list[str]]:
    """Metric, small run, large run, large / small."""
    small, large = data["runs"]

    def line(name: str, get: Callable[[dict[str, Any]], Any], unit: str = "") -> list[str]:
        a, b = get(small), get(large)
        ratio = _ratio(b, a) if isinstance(a, int | float) and isinstance(b, int | float) else None
        places = 3 if unit == " s" else 1
        return [name, _fmt(a, unit, places), _fmt(b, unit, places), _fmt(ratio)]

    def mem(when: str, what: str) -> Callable[[dict[str, Any]], Any]:
        return lambda r: r["broker_memory"].get(when, {}).get(what)

    out = [
        line("registered organisations", lambda r: r["registered"]),
        line("per-organisation topics", lambda r: r["per_organisation_topics"]),
        line("per-organisation partitions", lambda r: r["per_organisation_partitions"]),
        line("registry publish", lambda r: r["seconds"]["registry_publish_s"], " s"),
        line("registry load", lambda r: r["seconds"]["registry_load_s"], " s"),
        line("topics ensure (creating)", lambda r: r["seconds"].get("topics_ensure_s"), " s"),
        line("  ... refused after", lambda r: r["seconds"].get("topics_ensure_failed_after_s"), " s"),
        line(f"  ... in chunks of {CHUNK_PARTIES} orgs", lambda r: r["seconds"].get("topics_ensure_chunked_s"), " s"),
        line("topics ensure (again)", lambda r: r["seconds"]["topics_ensure_again_s"], " s"),
        line("keys init (a pair each)", lambda r: r["seconds"]["keys_init_s"], " s"),
        line("key directory entries", lambda r: r["key_directory_entries"]),
        line("key directory load (first)", lambda r: r["seconds"]["key_directory_load_s"], " s"),
        line("key directory load (best of 3)", lambda r: r["seconds"]["key_directory_load_best_s"], " s"),
        line(f"send {data['referrals']} referrals", lambda r: r["seconds"]["send_s"], " s"),
        line("router: referrals routed", lambda r: r["router"]["routed"]),
        line("router: copies delivered", lambda r: r["router"]["delivered"]),
        line("router: referrals/s (busy)", lambda r: r["router"]["referrals_per_s"]),
        line("router: referrals/s (wall, to idle)", lambda r: r["router"]["referrals_per_s_wall"]),
        line("router: run to idle", lambda r: r["seconds"]["router_wall_s"], " s"),
        line("topics delete", lambda r: r["seconds"].get("topics_delete_s"), " s"),
    ]
    for when in ("before", "after_topics", "after_router"):
        out.append(line(f"broker RSS {when.replace('_', ' ')}", mem(when, "rss_mb"), " MB"))
        out.append(line(f"broker heap used {when.replace('_', ' ')}", mem(when, "heap_used_mb"), " MB"))
        if data["full_gc"]:
            out.append(line(f"broker live heap {when.replace('_', ' ')}", mem(when, "live_heap_mb"), " MB"))
    return [row for row in out if row[1] != "-" or row[2] != "-"]  # a figure neither run has
