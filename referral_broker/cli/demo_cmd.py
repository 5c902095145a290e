"""``referral-broker demo``: the whole flow on a local broker, in under a minute."""

from __future__ import annotations

import time

import click

from referral_broker.cli.context import CliContext, pass_cli, table
from referral_broker.config import Settings


@click.command()
@click.option(
    "--no-serve", is_flag=True, help="Stop after the summary instead of serving the district-team inbox."
)
@click.option(
    "--per-partner",
    default=2,
    show_default=True,
    type=click.IntRange(1, 50),
    help="Synthetic referrals each partner sends.",
)
@click.option("--port", default=8000, show_default=True, help="Port for the inbox (without --no-serve).")
@pass_cli
def demo(obj: CliContext, no_serve: bool, per_partner: int, port: int) -> None:
    """Start the local broker (unless KAFKA_BOOTSTRAP_SERVERS is set), create topics and demo
    keys, have every partner send synthetic referrals in its own format, route them, receive
    them at every recipient, print who got which fields and what was withheld (names, never
    values), and return status messages to the referrers. Safe to run again."""
    from referral_broker.cli.demo_run import compact_paths, run_demo

    started = time.monotonic()

    def say(s: str) -> None:
        click.echo(s, err=True)

    say(f"Kafka at {obj.bootstrap()}")
    result = run_demo(obj.settings, obj.bootstrap(), per_partner=per_partner, say=say)
    s = result.routed
    click.echo(
        f"\nRouted {s.routed} referrals: {s.delivered} deliveries, {s.audited} audit decisions, "
        f"{s.dead_lettered} dead letters.\n"
    )
    from referral_broker.parties import get_party

    rows = [
        [
            get_party(r.party).label,
            str(r.referrals),
            compact_paths(r.received_fields, result.units) or "-",
            compact_paths(r.withheld_fields, result.units) or "-",
        ]
        for r in result.recipients.values()
        if r.referrals
    ]
    click.echo("What each recipient received (field names only; values stay sealed for it alone):\n")
    for party, count, got, withheld in rows:
        click.echo(f"{party}: {count} referral(s)\n  received: {got}\n  withheld: {withheld}\n")
    silent = [r.party for r in result.recipients.values() if not r.referrals]
    if silent:
        click.echo(
            f"{len(silent)} organisations received nothing (not named by any referral, no purpose applied, "
            f"or consent/override missing): {', '.join(silent)}\n"
        )
    click.echo(
        table(
            [[get_party(p).label, str(n)] for p, n in result.statuses_back.items()],
            ["referring organisation", "status messages back"],
        )
    )
    click.echo(f"\nNative files sent: {result.outbox}\nNative files received: {result.inbox}")
    click.echo(
        f"Done in {time.monotonic() - started:.0f}s. Audit, dead letters: "
        "'referral-broker dlq list', 'referral-broker orgs unresolved', "
        "'referral-broker policy explain --recipient police:35'."
    )
    note = broker_left_running(obj.settings)
    try:
        if not no_serve:
            from referral_broker.cli.main import COMMANDS

            if "inbox" in COMMANDS:
                from referral_broker.consumers.inbox.demo_serve import serve_demo

                serve_demo(obj.settings, obj.bootstrap(), port=port, say=say)
    finally:
        if note:
            say(note)


def broker_left_running(settings: Settings) -> str | None:
    """What the demo leaves behind: the local broker it started keeps running after it ends
    (Ctrl-C included), so the commands it suggests can read what it sent; a newcomer should
    not have to find a JVM by accident. ``None`` when the cluster is someone else's."""
    if not settings.uses_local_broker:
        return None
    return (
        f"The local Kafka broker ({settings.bootstrap_servers}) is still running for the commands above; "
        "stop it with 'referral-broker kafka stop'."
    )
