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
    """Every dead letter with its reason, stage, source topic/partition/offset and the party
    its rb-dlq-signer header names (as written; 'dlq replay' verifies the signature)."""
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
                        r["signed_by"] or "unsigned",
                        r["reason"][:90],
                    ]
                    for r in rows
                ],
                ["dlq", "source", "stage", "signed by", "reason"],
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
    again after a fix (those still failing return here with their reason).

    Only letters the router signed (checked against the key directory) go back, and only to
    an intake or status topic; any other selected letter is refused with the reason, nothing of
    it is sent, and the command exits non-zero."""
    from tqdm import tqdm

    from referral_broker.consumers.dead_letters import replay as do_replay
    from referral_broker.errors import SignatureError

    if not yes and not as_json:
        click.confirm("Replay the selected dead letters to their source topics?", abort=True)
    select = lambda d: (
        (stage is None or d.stage == stage) and (source_topic is None or d.source_topic == source_topic)
    )
    with tqdm(desc="replaying", unit="msg", disable=as_json, leave=False) as bar:
        report = do_replay(obj.settings, obj.bootstrap(), select=select, progress=bar.update)
    data = {"replayed": report.replayed, "refused": [r.__dict__ for r in report.refused]}

    def human(d: dict[str, Any]) -> None:
        for r in d["refused"]:
            click.echo(f"refused dlq {r['partition']}@{r['offset']}: {r['reason']}", err=True)
        click.echo(f"Replayed {d['replayed']} dead letters; refused {len(d['refused'])}.")

    emit(data, as_json, human)
    if report.refused:
        raise click.exceptions.Exit(SignatureError.exit_code)
