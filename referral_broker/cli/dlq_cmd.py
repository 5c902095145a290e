"""``referral-broker dlq list|replay``: dead letters and replays after a fix."""

from __future__ import annotations

from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table


@click.group()
def dlq() -> None:
    """Dead letters: everything that could not be processed, with the reason."""


@dlq.command("list")
@click.option("--limit", type=int, default=None, help="Show at most this many (newest last).")
@json_option
@pass_cli
def list_cmd(obj: CliContext, limit: int | None, as_json: bool) -> None:
    """Every dead letter with its reason, stage and source topic/partition/offset."""
    from referral_broker.consumers.dead_letters import read_dead_letters

    letters = [letter.as_dict() for _, letter in read_dead_letters(obj.settings, obj.bootstrap())]
    if limit is not None:
        letters = letters[-limit:]

    def human(rows: list[dict[str, Any]]) -> None:
        if not rows:
            click.echo("No dead letters.")
            return
        click.echo(
            table(
                [
                    [
                        f"{r['partition']}@{r['offset']}",
                        f"{r['source_topic']}/{r['source_partition']}@{r['source_offset']}",
                        r["stage"],
                        r["reason"][:90],
                    ]
                    for r in rows
                ],
                ["dlq", "source", "stage", "reason"],
            )
        )
        click.echo(f"\n{len(rows)} dead letters.")

    emit(letters, as_json, human)


@dlq.command()
@click.option(
    "--stage", default=None, help="Replay only letters from this stage (validate, verify-open, policy...)."
)
@click.option("--source-topic", default=None, help="Replay only letters from this source topic.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_cli
def replay(obj: CliContext, stage: str | None, source_topic: str | None, yes: bool, as_json: bool) -> None:
    """Send dead letters back to their source topic, exactly as they arrived, to be routed
    again after a fix (those still failing return here with their reason)."""
    from tqdm import tqdm

    from referral_broker.consumers.dead_letters import replay as do_replay

    if not yes and not as_json:
        click.confirm("Replay the selected dead letters to their source topics?", abort=True)
    select = lambda d: (
        (stage is None or d.stage == stage) and (source_topic is None or d.source_topic == source_topic)
    )
    with tqdm(desc="replaying", unit="msg", disable=as_json, leave=False) as bar:
        count = do_replay(obj.settings, obj.bootstrap(), select=select, progress=bar.update)
    emit({"replayed": count}, as_json, lambda d: click.echo(f"Replayed {d['replayed']} dead letters."))
