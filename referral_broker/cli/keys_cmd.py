"""``referral-broker keys init|list|rotate|revoke``: party keys, over ``sealing.key_admin``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table
from referral_broker.sealing import key_admin


def _rows(entries: list[dict[str, Any]]) -> None:
    rows = [
        [
            e["key_id"],
            e["party"],
            e["status"],
            e["not_before"],
            e["not_after"],
            {True: "yes", False: "no"}.get(e["held_here"], "-") if "held_here" in e else "-",
        ]
        for e in entries
    ]
    click.echo(table(rows, ["key id", "party", "status", "not before", "not after", "private key here"]))


@click.group()
def keys() -> None:
    """Party keys: private keys in a local key store, public keys in the key directory.

    The key store lives under the data folder (keys/<party>/, mode 0700); the directory is
    the compacted keys topic. Private keys never leave this machine.
    """


@keys.command()
@click.option("--party", "parties", multiple=True, help="Party to create keys for (repeatable).")
@click.option("--all", "every", is_flag=True, help="Every party in parties.toml that has no key store yet.")
@click.option(
    "--publish/--no-publish",
    default=True,
    show_default=True,
    help="Publish the public keys on the keys topic (partners in production: --no-publish, hand the output to the hub).",
)
@json_option
@pass_cli
def init(obj: CliContext, parties: tuple[str, ...], every: bool, publish: bool, as_json: bool) -> None:
    """Create a party's key store with its first signing and encryption key."""
    if not parties and not every:
        raise click.UsageError("name a party with --party, or use --all")
    names = key_admin.all_party_names() if every else list(parties)
    entries = key_admin.init_parties(
        obj.settings, names, bootstrap=obj.bootstrap() if publish else None, skip_existing=every
    )
    data = [key_admin.entry_view(e, held_here=True) for e in entries]
    emit(data, as_json, lambda _: _rows(data))


@keys.command("list")
@click.option("--party", default=None, help="Only this party's keys.")
@click.option(
    "--from-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the directory from this JSON file instead of the keys topic.",
)
@click.option(
    "--write-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also save the directory that was read to this JSON file.",
)
@json_option
@pass_cli
def list_cmd(
    obj: CliContext, party: str | None, from_file: Path | None, write_file: Path | None, as_json: bool
) -> None:
    """Every key in the directory: status, validity, and whether its private key is held here."""
    directory = key_admin.load(
        obj.settings, bootstrap=None if from_file else obj.bootstrap(), from_file=from_file
    )
    if write_file is not None:
        directory.save_file(write_file)
    data = key_admin.listing(obj.settings, directory, party)
    emit(data, as_json, lambda _: _rows(data))


@keys.command()
@click.option("--party", required=True, help="Party whose key to rotate.")
@json_option
@pass_cli
def rotate(obj: CliContext, party: str, as_json: bool) -> None:
    """Make a new active key; the old one is retired and still opens old messages."""
    entries = key_admin.rotate(obj.settings, party, bootstrap=obj.bootstrap())
    data = [key_admin.entry_view(e, held_here=True) for e in entries]
    emit(data, as_json, lambda _: _rows(data))


@keys.command()
@click.option("--key-id", required=True, help="The key id to revoke, e.g. health.3fa9c1d20b7e.")
@json_option
@pass_cli
def revoke(obj: CliContext, key_id: str, as_json: bool) -> None:
    """Revoke a key: nobody seals to it or accepts its signatures any more."""
    entry = key_admin.revoke(obj.settings, key_id, bootstrap=obj.bootstrap())
    data = key_admin.entry_view(entry)
    emit(
        data,
        as_json,
        lambda _: click.echo(
            f"Key {entry.key_id} of {entry.party} is revoked; run 'keys rotate --party {entry.party}'."
        ),
    )
