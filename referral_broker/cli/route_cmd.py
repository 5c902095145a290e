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
@click.option(
    "--instance",
    envvar="REFERRAL_BROKER_ROUTER_INSTANCE",
    default=None,
    metavar="NAME",
    help="This router's stable name (its transactional id): a router restarted under the same "
    "name fences its predecessor's open transaction at once. Default: the first free "
    "<host>-<n> slot on this machine.",
)
@click.option(
    "--transaction-timeout",
    type=click.FloatRange(min=1.0, max=900.0),
    default=20.0,
    show_default=True,
    metavar="SECONDS",
    help="The coordinator aborts a transaction left open this long by a router that vanished.",
)
@click.option(
    "--stall-after",
    type=click.FloatRange(min=1.0, max=3600.0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Warn when the router has read nothing this long while its partitions hold records "
    "(offsets held by an open transaction, or fetches that stopped); once that has lasted longer "
    "than the transaction timeout too, rebuild its Kafka clients.",
)
@json_option
@pass_cli
def route(
    obj: CliContext,
    stop_when_idle: float | None,
    metrics_port: int | None,
    policy_path: str | None,
    instance: str | None,
    transaction_timeout: float,
    stall_after: float,
    as_json: bool,
) -> None:
    """Route every intake and status message: verify, open, validate, decide, minimise, seal,
    sign, send; one audit decision per recipient; dead letters for anything that fails.

    Runs until Ctrl-C or SIGTERM (or --stop-when-idle): the batch in hand is committed, then
    the router leaves the group at once so the other routers take over; a second Ctrl-C stops
    without waiting for that batch and aborts it (one whose commit was already sent
    lands). Start more processes to scale out. When
    Kafka is away, the router logs one line per attempt and waits for it with backoff.
    """
    import signal
    from pathlib import Path

    from referral_broker.consumers.router import Router
    from referral_broker.policy import load_policy
    from referral_broker.startup_heap import freeze_startup_heap

    policy = load_policy(Path(policy_path)) if policy_path else None
    router = Router(
        obj.settings,
        obj.bootstrap(),
        policy=policy,
        instance=instance,
        transaction_timeout_ms=int(transaction_timeout * 1000),
        stall_after_s=stall_after,
    )

    def stopping(signum: int, frame: object) -> None:
        # The first Ctrl-C or SIGTERM lets the batch in hand commit; a second one interrupts it
        # (its transaction is aborted on the way out).
        if stop_asked:
            raise KeyboardInterrupt
        stop_asked.append(signum)
        router.stop()

    stop_asked: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopping)
    if metrics_port is not None:
        router.metrics.serve(metrics_port)
    freeze_startup_heap()
    stats = router.run(stop_when_idle=stop_when_idle)
    emit(
        stats.as_dict(),
        as_json,
        lambda s: click.echo(
            f"Routed {s['routed']} referrals ({s['delivered']} deliveries, {s['audited']} audit decisions), "
            f"{s['statuses']} status messages; {s['dead_lettered']} dead letters."
        ),
    )
