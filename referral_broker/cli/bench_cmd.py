"""``referral-broker bench ...``: micro-benchmarks that print figures (never asserted)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table


@click.group()
def bench() -> None:
    """Micro-benchmarks on synthetic data; figures are for this machine, this run."""


def _show_seal(data: dict[str, Any]) -> None:
    click.echo(
        f"Sealing a {data['schema']} referral ({data['sealing_units']} sealed fields, "
        f"{data['record_bytes']} bytes of Avro -> {data['sealed_message_bytes']} bytes sealed+signed), "
        f"{data['iterations']} iterations, best of 3:\n"
    )
    rows = [
        [name.replace("_", " "), f"{v['no_cache']:.1f}", f"{v['cache']:.1f}"]
        for name, v in data["per_referral_us"].items()
    ]
    click.echo(table(rows, ["per referral", "no DEK cache (µs)", "DEK cache (µs)"]))
    click.echo("")
    click.echo(
        table(
            [[k.replace("_", " "), f"{v:.1f}"] for k, v in data["primitives_us"].items()], ["primitive", "µs"]
        )
    )
    cache = data["dek_cache"]
    click.echo(
        f"\nDEK cache bound: {cache['max_uses']} uses / {cache['max_age_s']:.0f} s. "
        f"Throughput, 3 recipients with cache: ~{data['referrals_per_second_3_recipients_cached']} referrals/s "
        "on one core."
    )


@bench.command()
@click.option("--iterations", default=200, show_default=True, type=click.IntRange(1, 100_000))
@json_option
@pass_cli
def seal(obj: CliContext, iterations: int, as_json: bool) -> None:
    """Seal and open cost per referral (1 and 3 recipients, with and without the DEK cache)
    beside AES-GCM, X25519, HPKE, Ed25519 and Avro encode measured in the same run."""
    from referral_broker.sealing import bench as bench_lib

    emit(bench_lib.run(obj.settings, iterations=iterations), as_json, _show_seal)


@bench.command()
@click.option(
    "--count",
    default=2000,
    show_default=True,
    type=click.IntRange(50, 1_000_000),
    help="Referrals per measured run.",
)
@click.option(
    "--processes",
    default=1,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Also route COUNT referrals with one 'route' process, then with this many in one group (scale-out).",
)
@click.option(
    "--rounds",
    default=1,
    show_default=True,
    type=click.IntRange(1, 20),
    help=(
        "Repeat the four router runs (with --profile: the two stage runs), sealed and unsealed "
        "alternating, and show the medians."
    ),
)
@click.option(
    "--profile",
    is_flag=True,
    help=(
        "Instead: route COUNT referrals to 3 recipients under cProfile and show where the time goes, "
        "then each stage's CPU sealed and unsealed (no profiler)."
    ),
)
@json_option
@pass_cli
def router(obj: CliContext, count: int, processes: int, rounds: int, profile: bool, as_json: bool) -> None:
    """Router throughput on the real broker: the floor of the job (the primitives any design
    must pay) beside the per-field floor, raw kafka-python pass-through, the router at 1 and 3
    recipients, and the same without sealing/signing; ratios and peak RSS. With --processes N,
    one router process against N in one consumer group, and why when N do not reach 1.6x.
    With --profile, the router's time by component instead, and by stage sealed and unsealed
    (what sealing and signing add to each, against what the 0.74 goal allows them)."""
    from referral_broker.cli.bench_orgs import broker_pid
    from referral_broker.consumers.router_bench import profile_replay, profile_router, profile_stages, run

    progress: Callable[[str], None] = (
        (lambda s: None) if as_json else (lambda s: click.echo(f"  measuring {s} ...", err=True))
    )
    bootstrap = obj.bootstrap()
    if profile:
        progress("the router under cProfile")
        profiled = profile_router(obj.settings, bootstrap, count=count)
        progress("the router's stages, sealed and unsealed")
        profiled["stages"] = profile_stages(obj.settings, bootstrap, count=count, rounds=rounds)
        progress("the router's own work replayed with no Kafka, sealed and unsealed")
        profiled["replay"] = profile_replay(obj.settings, bootstrap, count=count, rounds=rounds)
        emit(profiled, as_json, _show_profile)
        return
    data = run(
        obj.settings,
        bootstrap,
        count=count,
        processes=processes,
        rounds=rounds,
        broker=broker_pid(bootstrap),
        progress=progress,
    )
    emit(data, as_json, _show_router)


def _show_profile(d: dict[str, Any]) -> None:
    click.echo(
        f"Router at 3 recipients under cProfile, {d['count']} referrals: {d['referrals_per_second_profiled']}/s, "
        f"{d['cpu_ms_per_referral_profiled']} ms CPU per referral (profiled; both worse than without the profiler)\n"
    )
    _show_components(d)
    stages = d["stages"]
    each = f", the median of {stages['rounds']} rounds" if stages["rounds"] > 1 else ""
    click.echo(f"\nThe router's CPU by stage, µs a referral at 3 recipients (no profiler{each}):")
    rows = [
        [label, f"{v['sealed']:.0f}", f"{v['unsealed']:.0f}", f"{v['sealed'] - v['unsealed']:+.0f}"]
        for label, v in stages["stages_us_per_referral"].items()
    ]
    total = stages["total_us"]
    adds = stages["sealing_adds_us"]
    rows.append(["all", f"{total['sealed']:.0f}", f"{total['unsealed']:.0f}", f"{adds:+.0f}"])
    click.echo(table(rows, ["stage", "sealed", "unsealed", "sealing adds"]))
    click.echo(
        f"Sealing and signing add {stages['sealing_adds_us']:.0f} µs a referral; sealed over unsealed >= 0.74 "
        f"allows {stages['goal_allows_us']:.0f} µs."
    )
    replay, own = d["replay"], stages["own_us"]
    click.echo(
        "The same work replayed in one process with no Kafka client and the broker idle (the machine to "
        f"itself): {replay['us_per_referral']['sealed']:.0f} µs sealed, {replay['us_per_referral']['unsealed']:.0f} "
        f"unsealed; sealing adds {replay['sealing_adds_us']:.0f} µs; sealed over unsealed by CPU "
        f"{replay['sealed_over_unsealed_by_cpu']:.3f}. Inside the running router the same stages took "
        f"{own['sealed']:.0f} and {own['unsealed']:.0f} µs (sealed over unsealed {own['unsealed'] / own['sealed']:.3f})."
    )


def _by_run(figures: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('router_').replace('_', ' ')} {v}" for k, v in figures.items())


def _show_router(d: dict[str, Any]) -> None:
    rounds = d.get("rounds", 1)
    each = f", the median of {rounds} rounds" if rounds > 1 else ""
    click.echo(f"Router benchmark, {d['count']} referrals per run{each}:\n")
    click.echo(
        table(
            [[k.replace("_", " "), f"{v:,.1f}"] for k, v in d["referrals_per_second"].items()],
            ["referrals/s", "rate"],
        )
    )
    for key, what in (
        ("cpu_ms_per_referral", "CPU a referral (ms, this process, every thread)"),
        ("referrals_per_batch", "Referrals a transaction"),
        ("routing_thread_off_cpu_ms_per_referral", "The routing thread off the CPU a referral, routing and committing (ms: waits, the GIL)"),
        ("broker_cpu_ms_per_referral", "The broker's CPU a referral (ms, on this machine)"),
    ):
        if d.get(key):
            click.echo(f"{what}: {_by_run(d[key])}")
    click.echo("")
    goals = d.get("goals", {})
    click.echo(
        table(
            [
                [k.replace("_", " "), f"{v:.3f}", f">= {goals[k]}" if k in goals else ""]
                for k, v in d["ratios"].items()
            ],
            ["ratio", "value", "goal"],
        )
    )
    if rounds > 1:
        for k, v in d["ratios_by_round"].items():
            click.echo(f"{k.replace('_', ' ')}, round by round: {', '.join(f'{x:.3f}' for x in v)}")
    job = d["job_floor"]
    click.echo(
        f"\nFloor of the job (3 recipients: {job['recipients_per_referral']} delivered per referral, "
        f"best of 3 over {job['referrals_timed']} referrals): {job['total_us']:.0f} µs per referral"
    )
    click.echo(table([[k.replace("_", " "), f"{v:.1f}"] for k, v in job["us_per_referral"].items()], ["primitive", "µs"]))
    click.echo(
        f"(with a cached data key, no wrap per copy: {job['total_us_with_cached_wrap']:.0f} µs, "
        f"{1e6 / job['total_us_with_cached_wrap']:,.0f} referrals/s)"
    )
    click.echo(
        f"\nPer-field floor (sealed format 2: one AES-GCM per field, the archive copy): "
        f"{d['floor_us_per_referral_3_recipients']:.0f} µs per referral (3 recipients). "
        f"Peak RSS {d['peak_rss_mb']} MB."
    )
    for goal, why in d["why"].items():
        click.echo(f"\nWhy {goal.replace('_', ' ')} is under its goal: {why}.")
    scale = d.get("scale_out")
    if scale:
        click.echo(
            f"\nScale-out, {scale['count']} referrals per run, {scale['cores']} cores, intake partitions "
            f"{scale['intake_partitions']}; cores used over each run's busy window (/proc):"
        )
        rows = [
            [
                str(r["processes"]),
                f"{r['referrals_per_second']:,.1f}",
                " / ".join(str(c) for c in r["consumed_per_process"]),
                " / ".join(str(c) for c in r["intake_partitions_per_process"]),
                str(r["cores_used"]["routers"]),
                str(r["cores_used"]["broker"]),
                str(r["cores_used"]["others"]),
            ]
            for r in scale["runs"]
        ]
        click.echo(table(rows, ["routers", "referrals/s", "read by each", "partitions each", "router cores", "broker cores", "other cores"]))
        click.echo(f"ratio {scale['ratio']:.2f}x (goal >= {scale['goal']}x)")
        if scale["why"]:
            click.echo(f"Why: {scale['why']}")


@bench.command()
@click.option(
    "--organisations",
    default=1000,
    show_default=True,
    type=click.IntRange(1, 20_000),
    help="Synthetic organisations registered beside the shipped county.",
)
@click.option("--referrals", default=500, show_default=True, type=click.IntRange(1, 100_000), help="Referrals routed per run.")
@click.option(
    "--baseline",
    default=20,
    show_default=True,
    type=click.IntRange(1, 20_000),
    help="Synthetic organisations in the run it is compared with.",
)
@click.option("--keep", is_flag=True, help="Keep the benchmark's topics (deleted by default).")
@click.option(
    "--full-gc",
    is_flag=True,
    help="Also measure the broker's live heap after a full (stop-the-world) collection; not on a shared broker.",
)
@json_option
@pass_cli
def orgs(
    obj: CliContext, organisations: int, referrals: int, baseline: int, keep: bool, full_gc: bool, as_json: bool
) -> None:
    """Scale with N organisations, each with its own topics and keys, under a fresh topic prefix:
    'topics ensure' time, broker RSS and heap, key-directory load time, router throughput, beside
    the same run with a small registry (--baseline)."""
    from referral_broker.cli import bench_orgs

    progress = (lambda s: None) if as_json else (lambda s: click.echo(f"  {s} ...", err=True))
    data = bench_orgs.run(
        obj.settings, obj.bootstrap(), organisations=organisations, referrals=referrals,
        baseline=baseline, keep=keep, full_gc=full_gc, progress=progress,
    )  # fmt: skip

    def human(d: dict[str, Any]) -> None:
        small, large = d["runs"]
        where = f"broker pid {d['broker_pid']}" if d["broker_on_this_machine"] else "remote broker: no memory figures"
        click.echo(
            f"Organisations benchmark on {d['bootstrap']} ({where}, topic profile {d['profile']}); "
            f"the shipped county ({d['shipped_county']}) plus N synthetic organisations, "
            f"{d['referrals']} referrals from {', '.join(d['senders'])}:\n"
        )
        head = ["", f"N={small['organisations']}", f"N={large['organisations']}", "ratio"]
        click.echo(table(bench_orgs.rows(d), head))
        for run in (small, large):
            if run.get("topics_ensure_error"):
                click.echo(
                    f"\n'topics ensure' with N={run['organisations']} FAILED: {run['topics_ensure_error']}; "
                    f"the figures after it are with the topics created {bench_orgs.CHUNK_PARTIES} organisations a request."
                )
        kept = "" if small["deleted_topics"] else f"\nTopics kept under {small['prefix']} and {large['prefix']}."
        click.echo(f"\nBenchmark process peak RSS {d['bench_process_peak_rss_mb']} MB.{kept}")

    emit(data, as_json, human)


@bench.command()
@click.option("--rows", default=100_000, show_default=True, type=click.IntRange(1, 10_000_000), help="Rows in the DWP batch.")
@click.option("--profile", is_flag=True, help="Run the send under cProfile and show where the time goes (slower).")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="The send's checking and sealing processes (1: none, all in the sending process); "
    "default: [send] workers, one a core for a file of 4 MB or more.",
)
@json_option
@pass_cli
def batch(obj: CliContext, rows: int, profile: bool, workers: int | None, as_json: bool) -> None:
    """DWP's monthly batch end to end: make a synthetic DWP batch CSV of ROWS rows (the real
    adapter format), then time what 'send --as dwp --file' does (read, validate, seal, sign,
    keep in the outbox, send to the broker) under a fresh topic prefix; rows/s, seconds, the
    send's RSS (its worker processes included) sampled during the run, and the goal (100k rows
    in 60 s). With --profile, also the sending process's time by component."""
    from referral_broker.cli.bench_orgs import broker_pid
    from referral_broker.producers.batch_bench import run

    progress = (lambda s: None) if as_json else (lambda s: click.echo(f"  {s} ...", err=True))
    bootstrap = obj.bootstrap()
    data = run(
        obj.settings, bootstrap, rows=rows, progress=progress, profile=profile, broker=broker_pid(bootstrap), workers=workers
    )
    emit(data, as_json, _show_batch)


def _show_batch(d: dict[str, Any]) -> None:
    s, rss, goal = d["seconds"], d["rss"], d["goal"]
    click.echo(
        f"send --as {d['party']}: {d['rows_in_file']:,} rows ({d['file_mb']} MB, "
        f"{d['distinct_households']:,} distinct households), {d['rows_sent']:,} sent, "
        f"{d['records_on_intake_topic']:,} on the intake topic, {d['rows_queued']} queued, "
        f"{d['rows_rejected']} rejected"
    )
    click.echo(
        f"{s['total']:.1f} s ({s['read_validate']:.1f} s read+validate, {s['seal_send']:.1f} s seal+send): "
        f"{d['rows_per_second']:,.0f} rows/s"
    )
    urgent = d["urgent_last_row"]
    if urgent["seconds"] is not None:
        click.echo(
            f"The file's last row, its one urgent referral, was sent as number {urgent['sent_as']:,}: on the "
            f"intake topic {urgent['seconds']:.1f} s after send began (the whole batch {s['total']:.1f} s)"
        )
    click.echo(
        f"RSS {rss['start_mb']} MB at start, peak {rss['peak_mb']} MB, at each quarter "
        f"{' / '.join(str(v) for v in rss['at_quarters_mb'])} MB ({rss['samples']} samples)"
    )
    click.echo(
        f"Goal {goal['rows']:,} rows in {goal['seconds']:.0f} s ({goal['rows_per_second']:,.0f} rows/s): "
        f"ratio {d['ratio_to_goal']:.2f} (100k rows would take {d['projected_seconds_for_goal_rows']:.0f} s). "
        f"Load average {d['load_average'][0]}."
    )
    cap = d["capacity"]
    send = cap["send_cpu_ms_per_row"]
    broker = cap["broker_cpu_ms_per_row"]
    click.echo(
        f"CPU a row (ms): the send {send['total']} ({send['read_validate']} read+validate, {send['seal_send']} "
        f"seal+send), the broker {broker if broker is not None else 'remote, not counted'}: the goal's rate needs "
        f"{cap['cores_needed_for_goal']} of {cap['cores']} cores; "
        + (
            f"one send process about {cap['send_rows_per_second_one_core']:,} rows/s on one core."
            if d["processes"] == 1
            else f"{d['processes']} processes: the sender and {d['processes'] - 1} checking and sealing workers."
        )
    )
    if cap["why"]:
        click.echo(f"Why the goal is out of reach here: {cap['why']}")
    if d.get("profile"):
        click.echo("\nUnder cProfile (the figures above include its cost):")
        _show_components(d["profile"])


def _show_components(d: dict[str, Any]) -> None:
    rows = [[c["component"], f"{c['seconds']:.2f}", f"{c['share']:.1%}"] for c in d["components"]]
    click.echo(table(rows, ["component (own time)", "s", "share"]))
    click.echo("")
    rows = [[f["function"][:70], f"{f['seconds']:.2f}", f"{f['share']:.1%}"] for f in d["top_functions"]]
    click.echo(table(rows, ["function", "s", "share"]))


@bench.command()
@click.option("--rate", default=200.0, show_default=True, type=click.FloatRange(0.1, 100_000), help="Referrals offered per second.")
@click.option("--seconds", default=60.0, show_default=True, type=click.FloatRange(0.1, 3600), help="How long they are offered.")
@click.option(
    "--routers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 8),
    help="'route' processes in the router group (they settle before the clock starts).",
)
@json_option
@pass_cli
def e2e(obj: CliContext, rate: float, seconds: float, routers: int, as_json: bool) -> None:
    """Latency from a school's send to the district team's inbox store: referrals offered at a
    fixed rate (open loop: each one due at its time, whatever the ones before did) through a
    'route' process and the inbox ingest, under a fresh topic prefix; p50/p95/p99/max from when
    each was due to when its row was stored, the achieved rate, the sender's lag, the goal
    (p99 <= 250 ms)."""
    from referral_broker.cli.bench_orgs import broker_pid
    from referral_broker.consumers.e2e_bench import run

    progress = (lambda s: None) if as_json else (lambda s: click.echo(f"  {s} ...", err=True))
    bootstrap = obj.bootstrap()
    data = run(
        obj.settings, bootstrap, rate=rate, seconds=seconds, broker=broker_pid(bootstrap), progress=progress, routers=routers
    )
    emit(data, as_json, _show_e2e)


def _show_e2e(d: dict[str, Any]) -> None:
    lat, lag = d["latency_ms"], d["sender"]["lag_ms"]
    click.echo(
        f"{d['partner']} -> {'router' if d['routers'] == 1 else str(d['routers']) + ' routers'} -> "
        f"{d['team']}'s inbox store: {d['offered']:,} offered at "
        f"{d['rate_target']:g}/s for {d['seconds_target']:g} s (offered {d['offered_rate']:,.1f}/s), "
        f"{d['delivered']:,} stored ({d['lost_or_late']} not within the drain time); achieved {d['achieved_rate']:,.1f}/s"
    )
    if lat:
        at_least = ">= " if d["latency_lower_bound"] else ""
        click.echo(table([[k, f"{at_least}{v:,.1f}"] for k, v in lat.items()], ["latency", "ms"]))
        if at_least:
            click.echo(f"(the {d['lost_or_late']:,} referrals not stored by the end count with the time they had waited: lower bounds)")
        click.echo(
            f"Goal p99 <= {d['goal']['p99_ms']:.0f} ms: p99 {lat['p99']:,.1f} ms "
            f"({d['ratio_p99_to_goal']:.2f}x the goal)."
        )
    stages = [[k.replace("_", " "), *(f"{v.get(q, 0):,.1f}" for q in ("p50", "p95", "p99", "max"))] for k, v in d["stages_ms"].items() if v]
    if stages:
        click.echo(table(stages, ["where (ms)", "p50", "p95", "p99", "max"]))
    behind = (
        f"the sender FELL BEHIND: {d['sender']['late_sends']} sends more than 100 ms late"
        if d["sender"]["fell_behind"]
        else f"the sender kept to the schedule ({d['sender']['late_sends']} sends more than 100 ms late)"
    )
    click.echo(
        f"Sender lag p50 {lag['p50']} ms, p99 {lag['p99']} ms, max {lag['max']} ms: {behind} "
        f"(each referral validated, sealed and signed ahead: {d['sealed_ahead_ms_per_referral']} ms). "
        f"Load average {d['load_average'][0]}."
    )
    cap = d["capacity"]
    per = cap["cpu_ms_per_referral"]
    click.echo(
        f"\nCPU a stored referral over {cap['window_s']} s (ms): router {per['router']}, "
        f"broker {per['broker'] if cap['broker_on_this_machine'] else 'remote'}, "
        f"school's produce + inbox ingest {per['this_process']}, school's sealing {per['sealing_ahead']}: "
        f"pipeline {per['pipeline']} (the whole machine: {per['machine']}). At {d['rate_target']:g}/s that is "
        f"{cap['cores_needed_at_rate']} of {cap['cores']} cores; the router{'s' if d['routers'] > 1 else ''} alone "
        f"{cap['router_cores_needed_at_rate']} (one router process: about {cap['router_rate_one_core']}/s on one core)."
        + (f" Referrals each router read: {' / '.join(map(str, d['consumed_by_router']))}." if d["routers"] > 1 else "")
    )
    if cap["why"]:
        click.echo(f"Why the goal is out of reach here: {cap['why']}")
    for i, b in enumerate(d.get("router_batches") or []):
        if b:
            _show_batches(b, "the router" if d["routers"] == 1 else f"router {i + 1}", d)


def _show_batches(b: dict[str, Any], who: str, d: dict[str, Any]) -> None:
    """A router process's batches by phase (its own clocks, the whole run), and the wait they
    make: a referral waits for the batch in hand, then for its own."""
    rows = [[p.replace("_", " "), f"{v['wall']:,.2f}", f"{v['cpu']:,.2f}"] for p, v in b["ms_a_batch"].items()]
    click.echo(
        f"\nWhere {who}'s batches went ({b['batches']:,} batches, {b['records_a_batch']} referrals each; "
        f"a batch took p50 {b['batch_ms']['p50']} ms, p99 {b['batch_ms']['p99']} ms):"
    )
    click.echo(table(rows, ["phase", "ms a batch", "CPU ms"]))
    rate = d["rate_target"] / d["routers"]
    predicted = b["predicted_batch_ms"]
    settles = (
        f"so a batch settles at {b['fixed_ms']} / (1 - {b['busy']}) = {predicted} ms, and a referral waits "
        f"about two of them (the one in hand, then its own): about {2 * predicted:,.0f} ms before the inbox reads it"
        if predicted is not None
        else "so the router cannot keep up: its batches grow without bound"
    )
    click.echo(
        f"A batch costs {b['fixed_ms']} ms whatever it holds (poll, catch-up, key sync, check, commit) and "
        f"{b['per_referral_ms']} ms a referral (routing, signing, sending); at {rate:g}/s the referrals take "
        f"{b['busy']:.0%} of {who}'s time, {settles}."
    )


@bench.command()
@click.option("--backlog", default=3000, show_default=True, type=click.IntRange(100, 1_000_000), help="Routine referrals DWP sends at once.")
@click.option("--probes", default=5, show_default=True, type=click.IntRange(1, 100), help="Urgent referrals sent while they are queued.")
@click.option("--gap", default=2.0, show_default=True, type=click.FloatRange(0, 60), help="Seconds between two urgent referrals.")
@json_option
@pass_cli
def urgent(obj: CliContext, backlog: int, probes: int, gap: float, as_json: bool) -> None:
    """An urgent referral while another partner's batch is queued: DWP sends BACKLOG routine
    referrals at once; while the router works through them, a school sends PROBES urgent ones,
    one at a time. Prints, for each, the seconds from its send to its row in the district
    team's inbox and how many of the batch were stored meanwhile."""
    from referral_broker.consumers.urgent_bench import run

    progress = (lambda s: None) if as_json else (lambda s: click.echo(f"  {s} ...", err=True))
    data = run(obj.settings, obj.bootstrap(), backlog=backlog, probes=probes, gap=gap, progress=progress)
    emit(data, as_json, _show_urgent)


def _show_urgent(d: dict[str, Any]) -> None:
    b, u = d["batch"], d["urgent"]
    click.echo(
        f"{b['party']} sent {b['referrals']:,} routine referrals at once ({b['sent_in_s']} s); the router stored "
        f"{b['stored_by_the_end']:,} of them by the end, at {b['rate_per_s']}/s. Meanwhile {u['party']} sent "
        f"{len(u['probes'])} urgent ones for {u['team']}:"
    )
    rows = [
        [str(n), "not within 300 s" if p["seconds"] is None else f"{p['seconds']:.2f}", f"{p['batch_queued_at_send']:,}", f"{p['batch_stored_meanwhile']:,}"]
        for n, p in enumerate(u["probes"], 1)
    ]
    click.echo(table(rows, ["urgent", "seconds to the inbox", "batch queued at its send", "batch stored meanwhile"]))
    if d["urgent_seconds"]:
        click.echo(
            f"Urgent referrals: median {d['urgent_seconds']['median']:.2f} s, max {d['urgent_seconds']['max']:.2f} s. "
            f"Load average {d['load_average'][0]}."
        )
