"""``referral-broker retention shred|hold|release``: crypto-shredding of a case, audited."""

from __future__ import annotations

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli
from referral_broker.sealing import retention as retention_lib


@click.group()
def retention() -> None:
    """Retention of the council's case copies: shred a case key, place or lift a legal hold.

    Every action is written to the audit topic (ids and reasons only).
    """


@retention.command()
@click.option("--case", "case_id", required=True, help="Case id whose key to destroy.")
@json_option
@pass_cli
def shred(obj: CliContext, case_id: str, as_json: bool) -> None:
    """Destroy a case's key: every copy of the case becomes unreadable, for good.

    Refused while the case is under legal hold.
    """
    data = retention_lib.shred(obj.settings, obj.bootstrap(), case_id)
    emit(
        data,
        as_json,
        lambda d: click.echo(
            f"Case {d['case_id']} shredded at {d['shredded_at']} (case key {d['case_key_id']} destroyed)."
        ),
    )


@retention.command()
@click.option("--case", "case_id", required=True, help="Case id to hold.")
@click.option("--reason", required=True, help="Why the case must be kept (e.g. the proceedings' reference).")
@json_option
@pass_cli
def hold(obj: CliContext, case_id: str, reason: str, as_json: bool) -> None:
    """Place a legal hold: the case cannot be shredded until it is released."""
    data = retention_lib.hold(obj.settings, obj.bootstrap(), case_id, reason)
    emit(
        data,
        as_json,
        lambda d: click.echo(f"Case {d['case_id']} is under legal hold since {d['placed_at']}."),
    )


@retention.command()
@click.option("--case", "case_id", required=True, help="Case id to release.")
@json_option
@pass_cli
def release(obj: CliContext, case_id: str, as_json: bool) -> None:
    """Lift the legal hold on a case, so retention (shredding) applies again."""
    data = retention_lib.release(obj.settings, obj.bootstrap(), case_id)
    emit(data, as_json, lambda d: click.echo(f"Legal hold on case {d['case_id']} released."))
