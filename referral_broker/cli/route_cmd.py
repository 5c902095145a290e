"""``referral-broker route``: run the council's router."""

from __future__ import annotations

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli


@click.command()
@click.option(
    "--stop-when-idle",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Exit 0 after this many seconds with nothing to read (scripts, tests).",
)
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    metavar="PORT",
    help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics while routing.",
)
@click.option(
    "--policy", "policy_path", type=click.Path(exists=True, dir_okay=False), help="Sharing policy file."
)
@json_option
@pass_cli
def route(
    obj: CliContext,
    stop_when_idle: float | None,
    metrics_port: int | None,
    policy_path: str | None,
    as_json: bool,
) -> None:
    """Route every intake and status message: verify, open, validate, decide, minimise, seal,
    sign, send; one audit decision per recipient; dead letters for anything that fails.

    Runs until Ctrl-C (or --stop-when-idle). Start more processes to scale out.
    """
    from pathlib import Path

    from referral_broker.consumers.router import Router
    from referral_broker.policy import load_policy

    policy = load_policy(Path(policy_path)) if policy_path else None
    router = Router(obj.settings, obj.bootstrap(), policy=policy)
    if metrics_port is not None:
        router.metrics.serve(metrics_port)
    stats = router.run(stop_when_idle=stop_when_idle)
    emit(
        stats.as_dict(),
        as_json,
        lambda s: click.echo(
            f"Routed {s['routed']} referrals ({s['delivered']} deliveries, {s['audited']} audit decisions), "
            f"{s['statuses']} status messages; {s['dead_lettered']} dead letters."
        ),
    )
