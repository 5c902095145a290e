"""``referral-broker status [--json] [--watch S]``: the flow's health at a glance (:mod:`referral_broker.ops`).

Exit codes: 0 healthy, 1 degraded (the reasons are printed), the BrokerError's own code when the
cluster cannot be reached (a degraded verdict naming it is printed first). It never starts a
local broker: a status that started the thing it reports on would always say healthy.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import click

from referral_broker.cli.context import CliContext, json_option, pass_cli, table

DEGRADED_EXIT = 1


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _human(data: dict[str, Any], all_topics: bool) -> None:
    click.echo(f"Status at {data['at']} of {data['bootstrap']} (prefix '{data['prefix']}')\n")
    topics = data["topics"] if all_topics else [t for t in data["topics"] if t["end"] or t["rate_per_s"]]
    if topics:
        click.echo(
            table(
                [
                    [t["name"], t["role"], str(t["partitions"]), str(t["end"]), f"{t['rate_per_s'] or 0:g}/s"]
                    for t in topics
                ],
                ["topic", "role", "partitions", "end offset", "rate"],
            )
        )
        hidden = len(data["topics"]) - len(topics)
        if hidden:
            click.echo(f"({hidden} empty topics not shown; --all-topics shows them)")
    else:
        click.echo(f"{len(data['topics'])} topics, all empty.")
    click.echo("")
    if data["groups"]:
        click.echo(
            table(
                [
                    [g["group"], g["topic"], str(g["lag"]), _age(g["oldest_unprocessed_age_s"])]
                    for g in data["groups"]
                ],
                ["consumer group", "topic", "lag", "oldest unprocessed"],
            )
        )
    else:
        click.echo("No consumer group has committed offsets on the plan's topics.")
    dl = data["dead_letters"]
    click.echo(
        f"\nDead letters: {dl['depth']} on the topic, {dl['recent']} in the last {dl['window_hours']:g} h"
        + (f" (newest {dl['newest_at']})" if dl["newest_at"] else "")
    )
    keys = data["key_directory"]
    if keys["error"]:
        click.echo(f"Key directory: unreadable ({keys['error']})")
    else:
        click.echo(f"Key directory: {keys['entries']} entries, {keys['refused']} refused records")
        for r in keys["refusals"][:10]:
            click.echo(f"  refused {r['where']}: {r['category']} ({r['key_id'] or 'no key id'})")
    if data["missing_topics"]:
        click.echo(f"Missing topics: {len(data['missing_topics'])}")
    click.echo(f"\nVerdict: {data['verdict'].upper()}")
    for reason in data["reasons"]:
        click.echo(f"  - {reason}")


@click.command()
@click.option("--watch", type=float, default=None, metavar="SECONDS", help="Refresh every SECONDS until Ctrl-C.")
@click.option("--count", type=int, default=None, help="With --watch: stop after this many refreshes.")
@click.option(
    "--interval", type=float, default=3.0, show_default=True, help="Seconds between the two offset samples (rates)."
)
@click.option(
    "--max-lag-age",
    type=float,
    default=300.0,
    show_default=True,
    help="Degraded when a group's oldest unprocessed record is older than this (seconds).",
)
@click.option(
    "--dead-letter-hours",
    type=float,
    default=24.0,
    show_default=True,
    help="Degraded when a dead letter is newer than this (hours).",
)
@click.option("--all-topics", is_flag=True, help="List empty topics too.")
@json_option
@pass_cli
def status(
    obj: CliContext,
    watch: float | None,
    count: int | None,
    interval: float,
    max_lag_age: float,
    dead_letter_hours: float,
    all_topics: bool,
    as_json: bool,
) -> None:
    """Every topic's end offsets and rate, lag and the oldest unprocessed age per consumer group,
    dead letters, key-directory refusals, and a verdict (healthy / degraded, and why).

    Exits 1 when degraded and with the broker error's code when the cluster cannot be reached."""
    from referral_broker import ops
    from referral_broker.cluster.topics import admin_client
    from referral_broker.consumers.dead_letters import read_dead_letters
    from referral_broker.errors import BrokerError, ReferralBrokerError
    from referral_broker.parties import use_cluster_registry

    settings = obj.settings
    bootstrap = settings.bootstrap_servers  # never starts a broker
    thresholds = ops.Thresholds(
        interval_s=max(0.0, interval), max_lag_age_s=max_lag_age, dead_letter_hours=dead_letter_hours
    )

    def letters(settings_: Any, bootstrap_: str) -> Any:
        return (letter for _, letter in read_dead_letters(settings_, bootstrap_, idle_s=1.0))

    rounds = 0
    while True:
        error: BrokerError | None = None
        try:
            admin_client(settings, bootstrap).close()  # an unreachable cluster fails here, once
            with contextlib.suppress(ReferralBrokerError):  # the organisations the cluster knows
                use_cluster_registry(settings, bootstrap)
            report = ops.collect(settings, bootstrap, thresholds=thresholds, dead_letters=letters)
        except BrokerError as exc:
            error = exc
            report = ops.unreachable(settings, bootstrap, exc, thresholds)
        data = report.as_dict()
        if as_json:
            click.echo(json.dumps(data, indent=None if watch else 2, default=str))
        else:
            if watch:
                click.clear()
            _human(data, all_topics)
        rounds += 1
        if watch is None or (count is not None and rounds >= count):
            break
        time.sleep(watch)
    if error is not None:
        raise click.exceptions.Exit(error.exit_code)
    if not report.healthy:
        raise click.exceptions.Exit(DEGRADED_EXIT)
