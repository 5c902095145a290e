"""``referral-broker objections add|list``: families who object to the research export."""

from __future__ import annotations

from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table


@click.group()
def objections() -> None:
    """Objections to the research export, kept as keyed hashes in the hub's data folder.

    No identifier is stored or printed; run where the hub's keys are. A district team records
    one from the inbox ("Record that the family objects"); the hub takes those in with
    'objections sync', and every research export does so first.
    """


@objections.command()
@click.option("--nhs-number", default=None, help="The child's NHS number.")
@click.option("--upn", default=None, help="The child's Unique Pupil Number.")
@click.option("--ni-number", default=None, help="The child's NI number.")
@click.option("--given-name", default=None, help="With --family-name and --date-of-birth.")
@click.option("--family-name", default=None)
@click.option("--date-of-birth", default=None, help="YYYY-MM-DD.")
@json_option
@pass_cli
def add(
    obj: CliContext,
    nhs_number: str | None,
    upn: str | None,
    ni_number: str | None,
    given_name: str | None,
    family_name: str | None,
    date_of_birth: str | None,
    as_json: bool,
) -> None:
    """Record that a child's family objects to the research export (audited by id only).

    Give every identifier you hold (each is matched on its own), or name and date of birth.
    """
    from referral_broker import objections as lib

    identifiers = {
        "nhs_number": nhs_number,
        "upn": upn,
        "ni_number": ni_number,
        "given_name": given_name,
        "family_name": family_name,
        "date_of_birth": date_of_birth,
    }
    lib.query_keys(bytes(32), **identifiers)  # refuse bad input before any cluster is reached
    done = lib.add(obj.settings, obj.bootstrap(), identifiers)
    emit(
        done.as_dict(),
        as_json,
        lambda d: click.echo(
            f"Objection {d['objection_id']} recorded ({', '.join(d['identified_by'])}); "
            "the child is left out of every research export from now on."
        ),
    )


@objections.command("list")
@json_option
@pass_cli
def list_(obj: CliContext, as_json: bool) -> None:
    """List the recorded objections (ids, how identified, when, by whom; never an identifier)."""
    from referral_broker import objections as lib

    rows = [o.as_dict() for o in lib.load(obj.settings)]

    def human(items: list[dict[str, Any]]) -> None:
        if not items:
            click.echo("No objections recorded.")
            return
        click.echo(
            table(
                [(i["objection_id"], ",".join(i["identified_by"]), i["recorded_at"], i["recorded_by"], i["source"]) for i in items],
                ["objection", "identified by", "recorded at", "by", "source"],
            )
        )

    emit(rows, as_json, human)


@objections.command()
@json_option
@pass_cli
def sync(obj: CliContext, as_json: bool) -> None:
    """Take in the objections district teams recorded in the inbox (from the audit topic, each
    signed by its team; the child hashed from the hub's archive copy of the referral)."""
    from referral_broker import objections as lib

    done = lib.sync_inbox(obj.settings, obj.bootstrap()).as_dict()

    def human(d: dict[str, Any]) -> None:
        click.echo(f"{len(d['taken_in'])} taken in from the inbox, {d['known']} already recorded")
        if d["waiting"]:
            click.echo(f"{len(d['waiting'])} waiting: their referral cannot be read in the archive now", err=True)
        if d["refused"]:
            click.echo(f"{d['refused']} refused: not signed by the team they name", err=True)

    emit(done, as_json, human)
