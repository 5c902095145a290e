"""``referral-broker keys init|list|rotate|revoke|generate|certify|root``: party keys and the
council's root of trust, over ``sealing.key_admin`` and ``sealing.trust``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table
from referral_broker.errors import ConfigError, SealingError
from referral_broker.sealing import key_admin, trust


def _rows(all_entries: list[dict[str, Any]]) -> None:
    entries = [e for e in all_entries if e["status"] != "refused"]
    refused = [e for e in all_entries if e["status"] == "refused"]
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
    if refused:
        click.echo(
            f"\nRefused records ({len(refused)}): not in the directory, nobody seals to or trusts them"
        )
        click.echo(
            table(
                [
                    [r["key_id"] or "-", r["party"] or "-", r["refused"], r["where"], r["reason"]]
                    for r in refused
                ],
                ["key id", "party", "refused", "where", "reason"],
            )
        )


@click.group()
def keys() -> None:
    """Party keys: private keys in a local key store, public keys in the key directory.

    The key store lives under the data folder (keys/<party>/, mode 0700); the directory is
    the compacted keys topic, every entry signed by the council's root key and verified
    against the pinned trust anchor ([keys] trust_anchor). Private keys never leave this machine.
    """


@keys.command()
@click.option("--party", "parties", multiple=True, help="Party to create keys for (repeatable).")
@click.option("--all", "every", is_flag=True, help="Every party in parties.toml that has no key store yet.")
@click.option(
    "--publish/--no-publish",
    default=True,
    show_default=True,
    help="Sign with the root and publish on the keys topic (a partner in production runs 'keys generate' instead).",
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


def _audit_keys(obj: CliContext, what: str, party: str, entries: list[Any]) -> dict[str, Any]:
    """Audit a change of ``party``'s keys: which key ids now have which status."""
    event = {"type": what, "party_changed": party, "keys": [f"{e.key_id}={e.status.value}" for e in entries]}
    return obj.audit_change(event, key=party)


@keys.command()
@click.option("--party", required=True, help="Party whose key to rotate.")
@json_option
@pass_cli
def rotate(obj: CliContext, party: str, as_json: bool) -> None:
    """Make a new active key; the old one is retired and still opens old messages."""
    entries = key_admin.rotate(obj.settings, party, bootstrap=obj.bootstrap())
    data = [key_admin.entry_view(e, held_here=True) for e in entries]
    _audit_keys(obj, "key.rotated", party, entries)
    emit(data, as_json, lambda _: _rows(data))


@keys.command()
@click.option("--key-id", required=True, help="The key id to revoke, e.g. health.3fa9c1d20b7e.")
@json_option
@pass_cli
def revoke(obj: CliContext, key_id: str, as_json: bool) -> None:
    """Revoke a key: nobody seals to it or accepts its signatures any more."""
    entry = key_admin.revoke(obj.settings, key_id, bootstrap=obj.bootstrap())
    data = key_admin.entry_view(entry) | {"audit": _audit_keys(obj, "key.revoked", entry.party, [entry])}
    emit(
        data,
        as_json,
        lambda _: click.echo(
            f"Key {entry.key_id} of {entry.party} is revoked; run 'keys rotate --party {entry.party}'."
        ),
    )


@keys.command()
@click.option("--as", "party", required=True, help="The party making its key pair (on its own machine).")
@click.option(
    "--public-out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the key request (public halves and a proof of possession) here, for the hub.",
)
@click.option("--rotate", is_flag=True, help="The party already has keys: make its next key.")
@json_option
@pass_cli
def generate(obj: CliContext, party: str, public_out: Path, rotate: bool, as_json: bool) -> None:
    """Make a key pair for PARTY here; its private half stays in this machine's key store.

    Hand the --public-out file to the hub, which runs 'keys certify'. Until then nobody seals
    to the new key.
    """
    if public_out.exists():
        raise ConfigError(f"{public_out} already exists; refusing to overwrite it")
    entry, request = key_admin.generate(obj.settings, party, rotate=rotate)
    public_out.write_text(json.dumps(request, indent=2) + "\n", encoding="utf-8")
    data = {**key_admin.entry_view(entry, held_here=True), "request_file": str(public_out)}
    emit(
        data,
        as_json,
        lambda _: click.echo(
            f"Key {entry.key_id} of {party} made here. Give {public_out} to the hub: "
            f"referral-broker keys certify {party} --public {public_out.name}"
        ),
    )


@keys.command()
@click.argument("party")
@click.option(
    "--public",
    "public",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The key request file the party wrote with 'keys generate --public-out'.",
)
@click.option("--publish/--no-publish", default=True, show_default=True, help="Publish on the keys topic.")
@json_option
@pass_cli
def certify(obj: CliContext, party: str, public: Path, publish: bool, as_json: bool) -> None:
    """Hub: check PARTY's key request, sign its entry with the root key and publish it.

    The request must carry a proof that its maker holds the key; a key id that already exists
    with other public keys is refused. PARTY's previously active keys become retired.
    """
    try:
        request = json.loads(public.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise SealingError(f"{public} is not a key request (not JSON)") from None
    entries = key_admin.certify(obj.settings, party, request, bootstrap=obj.bootstrap() if publish else None)
    data = [key_admin.entry_view(e) for e in entries]
    if publish:
        _audit_keys(obj, "key.certified", party, entries)
    emit(data, as_json, lambda _: _rows(data))


@keys.group()
def root() -> None:
    """The council's root signing key and the trust anchor every party pins.

    The root signs every key-directory entry and revocation; it is not a routing key. Its
    public half (the trust anchor, [keys] trust_anchor, default <data>/keys/trust-anchor.pem)
    goes to every organisation.
    """


def _anchor_view(obj: CliContext, anchor: trust.TrustAnchor) -> dict[str, Any]:
    return {
        "fingerprint": anchor.fingerprint,
        "public_key_pem": anchor.to_pem().decode("ascii"),
        "trust_anchor": str(trust.anchor_path(obj.settings)),
        "root_key_here": trust.holds_root(obj.settings),
    }


def _show_anchor(data: dict[str, Any]) -> None:
    click.echo(data["public_key_pem"].rstrip())
    click.echo(f"fingerprint (SHA-256): {data['fingerprint']}")
    click.echo(f"trust anchor file:     {data['trust_anchor']}")
    click.echo(f"root signing key here: {'yes' if data['root_key_here'] else 'no'}")


@root.command("init")
@click.option(
    "--export",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the root's PRIVATE key to this new file (0600), for offline storage.",
)
@json_option
@pass_cli
def root_init(obj: CliContext, export: Path | None, as_json: bool) -> None:
    """Make the council's root signing key (refuses to overwrite one) and pin its public half."""
    made = trust.init_root(obj.settings, export=export)
    data = {**_anchor_view(obj, made.anchor), "exported_to": str(export) if export else None}
    emit(data, as_json, _show_anchor)


@root.command("show")
@json_option
@pass_cli
def root_show(obj: CliContext, as_json: bool) -> None:
    """The pinned trust anchor: the root's public key and fingerprint."""
    anchor = trust.load_anchor(obj.settings)
    if anchor is None:
        raise ConfigError(
            f"no trust anchor at {trust.anchor_path(obj.settings)}; on the hub run 'keys root init', "
            "elsewhere copy the council's trust-anchor.pem there"
        )
    data = _anchor_view(obj, anchor)
    emit(data, as_json, _show_anchor)
