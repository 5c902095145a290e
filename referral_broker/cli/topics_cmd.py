"""``referral-broker topics list|ensure``: the topic plan against the cluster."""

from __future__ import annotations

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table
from referral_broker.cluster.topics import TopicState, consumer_lag, ensure_topics, list_topics


def _rows(states: list[TopicState]) -> list[list[str]]:
    rows = []
    for st in states:
        state = "created" if st.created else ("exists" if st.exists else "missing")
        rows.append([st.spec.name, st.spec.role, st.spec.party or "-", state, "; ".join(st.drift) or "-"])
    return rows


def _print(states: list[TopicState]) -> None:
    click.echo(table(_rows(states), ["topic", "role", "party", "state", "drift"]))


@click.group()
def topics() -> None:
    """The declarative topic plan: intake, out, status, archive, audit, dead letters, keys."""


@topics.command("list")
@json_option
@pass_cli
def list_cmd(obj: CliContext, as_json: bool) -> None:
    """Each topic of the plan with its role, its party and whether it exists."""
    states = list_topics(obj.settings, obj.bootstrap())
    emit([s.as_dict() for s in states], as_json, lambda _: _print(states))


@topics.command()
@json_option
@pass_cli
def ensure(obj: CliContext, as_json: bool) -> None:
    """Create every missing topic and report drift in existing ones (exit 1 on drift)."""
    states = ensure_topics(obj.settings, obj.bootstrap())
    drift = [s for s in states if s.drift]
    data = {
        "profile": obj.settings.kafka_topic_profile,
        "created": sum(s.created for s in states),
        "existing": sum(s.exists and not s.created for s in states),
        "drift": len(drift),
        "topics": [s.as_dict() for s in states],
    }

    def human(_: object) -> None:
        _print(states)
        click.echo(
            f"\n{data['created']} created, {data['existing']} already present, {len(drift)} with drift "
            f"(profile: {data['profile']})."
        )

    emit(data, as_json, human)
    if drift:
        raise click.exceptions.Exit(1)


@topics.command()
@click.option("--group", "groups", multiple=True, help="Only this consumer group (repeatable).")
@json_option
@pass_cli
def lag(obj: CliContext, groups: tuple[str, ...], as_json: bool) -> None:
    """Consumer lag per group and topic: how far the router, receivers and inboxes are behind."""
    rows = consumer_lag(obj.settings, obj.bootstrap(), list(groups) or None)

    def human(_: object) -> None:
        if not rows:
            click.echo("No consumer group has committed offsets on the plan's topics.")
            return
        click.echo(
            table(
                [[r.group, r.topic, str(r.committed), str(r.end), str(r.lag)] for r in rows],
                ["group", "topic", "committed", "end", "lag"],
            )
        )

    emit([r.as_dict() for r in rows], as_json, human)
