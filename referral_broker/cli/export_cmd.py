"""``referral-broker export research --period 2026-Q3 --out DIR``: the evaluation extract."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli


@click.group()
def export() -> None:
    """Exports from the council's archive (run where the hub's keys are)."""


def _show(d: dict[str, Any]) -> None:
    counts = d["counts"]
    click.echo(f"Research export {d['export_id']} for {d['period']} ({d['period_start']} to {d['period_end']}):")
    click.echo(f"  identifiers part: {d['files']['identifiers']['name']} (sealed for {d['recipient']} alone)")
    click.echo(f"  attributes part:  {d['files']['attributes']['name']} (coarse, joined only by the link key)")
    click.echo(f"  families exported: {counts['families_exported']}; objectors left out: {counts['objectors_left_out']}")
    click.echo(
        f"  archive records read: {counts['archive_records_read']}; "
        f"unreadable (shredded): {counts['archive_records_unreadable']}"
    )
    for group, cells in d["cells"].items():
        click.echo(f"  by {group}: " + ", ".join(f"{k} {v}" for k, v in cells.items()))
    click.echo(f"Counts of 1 to 9 families are shown as <10. Manifest: {d['files_dir']}/manifest.json")


@export.command()
@click.option("--period", required=True, help="The quarter to export: YYYY-Qn (e.g. 2026-Q3).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="A new or empty folder.")
@click.option("--recipient", default="ons", show_default=True, help="The research organisation (party).")
@json_option
@pass_cli
def research(obj: CliContext, period: str, out: Path, recipient: str, as_json: bool) -> None:
    """Write the Supporting Families evaluation extract for PERIOD, in split form.

    An identifiers part (name, date of birth, sex, last address, NI number where held) sealed
    for the research recipient alone; an attributes part (age band, district, the Supporting
    Families headings) in the clear; a manifest. The parts share only a random link key made
    for this export. Families who objected are left out and counted. Audited. Every count of
    1 to 9 families printed is suppressed (<10).
    """
    from referral_broker import research_export

    research_export.parse_period(period)  # bad input is refused before any cluster is reached
    manifest = research_export.export(obj.settings, obj.bootstrap(), period=period, out=out, recipient=recipient)
    shown = research_export.printable(manifest)
    shown["files_dir"] = str(out)
    emit(shown, as_json, _show)


@export.command("open-identifiers")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--as", "party", required=True, help="The research recipient whose private key opens the part.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="A new file: JSON lines, 0600.")
@json_option
@pass_cli
def open_identifiers(obj: CliContext, path: Path, party: str, out: Path, as_json: bool) -> None:
    """Open an identifiers part on the research recipient's machine (with its key store).

    Every line must verify (signed by the hub) and open with PARTY's key, or nothing is
    written. The identifiers go to OUT only; the command prints how many rows.
    """
    import json
    import os

    from referral_broker import research_export
    from referral_broker.errors import ConfigError

    if out.exists():
        raise ConfigError(f"{out} exists: opening never overwrites a file")
    rows = research_export.open_identifiers(obj.settings, obj.bootstrap(), path, party=party)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=str, sort_keys=True) + "\n")
    emit(
        {"opened_as": party, "rows": len(rows), "out": str(out)},
        as_json,
        lambda d: click.echo(f"{d['rows']} rows opened as {d['opened_as']} into {d['out']}."),
    )
