"""``referral-broker audit verify|subject``: the tamper-evident audit trail and a family's
sharing history (issue 16)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table


@click.group()
def audit() -> None:
    """The audit trail: prove it intact, or list one person's sharing history."""


@audit.command()
@json_option
@pass_cli
def verify(obj: CliContext, as_json: bool) -> None:
    """Read every audit partition and check each writer's hash chain from its first record:
    a deleted record (a sequence gap), an edited one (a hash or signature that no longer
    matches), a reordered one, and a chain whose last records were cut (behind its last signed
    checkpoint or head) are each named with partition, offset and chain. Exits 1 when any is
    found. Run where the hub's keys are (signatures are checked against the key directory)."""
    from referral_broker.audit_chain import verify_audit
    from referral_broker.identity import load_identity
    from referral_broker.parties import HUB

    bootstrap = obj.bootstrap()
    hub = load_identity(obj.settings, bootstrap, HUB)
    report = verify_audit(obj.settings, bootstrap, verify=hub.opener.verify).as_dict()

    def human(r: dict[str, Any]) -> None:
        rows = [
            [p, s["records"], s["chains"], s["checkpoints"], s["unchained"]] for p, s in r["partitions"].items()
        ]
        click.echo(table(rows, ["partition", "records", "chains", "checkpoints", "unchained (older)"]))
        if r["intact"]:
            click.echo("\nEvery chain is intact from its first record.")
            return
        click.echo("")
        click.echo(
            table(
                [
                    [p["problem"], p["partition"], "-" if p["offset"] is None else p["offset"], p["chain"] or "-", p["detail"]]
                    for p in r["problems"]
                ],
                ["problem", "partition", "offset", "chain", "detail"],
            )
        )
        click.echo(f"\n{len(r['problems'])} problem(s): the audit trail is NOT intact.")

    emit(report, as_json, human)
    if not report["intact"]:
        sys.exit(1)


@audit.command()
@click.option("--nhs-number", default=None, help="The child's NHS number.")
@click.option("--upn", default=None, help="The child's Unique Pupil Number.")
@click.option("--ni-number", default=None, help="An NI number (the child's or a household member's).")
@click.option("--case", "case", default=None, help="A referral (case) id.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json", "html", "pdf"]), default=None,
    help="table (default) or json on stdout; html or pdf: a readable document with a timeline "
    "(for a letter to the family) written to --out, the table still printed.",
)
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where --format html/pdf (or json) writes the document (0600).")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the HTML document to this file (same as --format html --out FILE).")
@click.option("--no-index", is_flag=True,
              help="Scan the whole audit topic instead of using the hub's local audit index.")
@json_option
@pass_cli
def subject(
    obj: CliContext,
    nhs_number: str | None,
    upn: str | None,
    ni_number: str | None,
    case: str | None,
    fmt: str | None,
    out: Path | None,
    html_out: Path | None,
    no_index: bool,
    as_json: bool,
) -> None:
    """Every audit event about one child or household member: who sent what, which
    organisations received which fields, when, on what ground and purpose, under which
    override, who opened it in the inbox, statuses, shreds. The identifier is hashed with the
    hub's secret and looked up in the hub's local audit index (brought up to date from the
    audit topic first; built on first use), and only the records it names are read, each
    signature checked: no identifier is stored in clear, and none is printed. No records is an
    empty report, not an error."""
    import uuid

    from referral_broker.audit_log import (
        history_html,
        history_pdf,
        hub_subject_secret,
        query_subject_key,
        subject_lookup,
    )
    from referral_broker.errors import ContractError

    given = {k: v for k, v in (("nhs_number", nhs_number), ("upn", upn), ("ni_number", ni_number), ("case", case)) if v}
    if len(given) != 1:
        raise click.UsageError("give exactly one of --nhs-number, --upn, --ni-number, --case")
    if as_json and fmt not in (None, "json"):
        raise click.UsageError("--json prints JSON: do not combine it with --format html/pdf")
    fmt = "json" if as_json else (fmt or "table")
    if fmt in ("html", "pdf") and out is None:
        raise click.UsageError(f"--format {fmt} needs --out FILE")
    (kind, value), = given.items()
    key = None
    secret = hub_subject_secret(obj.settings)
    if kind == "case":
        try:
            value = str(uuid.UUID(value))
        except ValueError:
            raise ContractError("the case id given is not a referral id (a UUID; not shown)") from None
    else:
        key = query_subject_key(secret, kind, value)
    from referral_broker.identity import load_identity
    from referral_broker.parties import HUB

    bootstrap = obj.bootstrap()
    hub = load_identity(obj.settings, bootstrap, HUB)  # each event's signature is checked
    report = subject_lookup(
        obj.settings, bootstrap, secret=secret, key=key, case=value if kind == "case" else None,
        verify=hub.opener.verify, use_index=not no_index, note=lambda message: click.echo(message, err=True),
    )
    report = {"query": kind, **report}
    if html_out is not None:
        _write_private(html_out, history_html(report).encode("utf-8"))
    if out is not None:
        if fmt == "pdf":
            _write_private(out, history_pdf(report))
        elif fmt == "html":
            _write_private(out, history_html(report).encode("utf-8"))
        else:
            import json

            _write_private(out, (json.dumps(report, indent=2, default=str) + "\n").encode("utf-8"))
            if fmt == "json":
                return

    def human(r: dict[str, Any]) -> None:
        if not r["events"]:
            click.echo(f"No audit records about this person ({r['scanned']} records read).")
            return
        click.echo(
            table(
                [
                    [e["at"], e["event"], e.get("to") or e.get("team") or "-", e.get("purpose") or "-", str(e["referral_id"])[:8]]
                    for e in r["events"]
                ],
                ["when", "event", "to / team", "purpose", "referral"],
            )
        )
        click.echo(f"\n{r['count']} event(s) about {len(r['referrals'])} referral(s); {r['scanned']} records read.")
        if r["refused"]:
            click.echo(f"{r['refused']} record(s) left out: not validly signed by their writer (run 'audit verify').")
        if out is not None:
            click.echo(f"{fmt.upper()} written to {out}.", err=True)

    emit(report, fmt == "json", human)


@audit.command("index")
@click.option("--rebuild", is_flag=True, help="Drop the index and build it again from the whole audit topic.")
@json_option
@pass_cli
def index_cmd(obj: CliContext, rebuild: bool, as_json: bool) -> None:
    """Bring the hub's local audit index up to date (each 'audit subject' does this first; run
    it from cron after busy hours to keep lookups instant). It holds keyed hashes and offsets
    only: never an identifier or a referral id."""
    from tqdm import tqdm

    from referral_broker.audit_index import refresh
    from referral_broker.audit_log import hub_subject_secret

    secret = hub_subject_secret(obj.settings)
    bootstrap = obj.bootstrap()
    with tqdm(desc="indexing the audit", unit="rec", disable=as_json, leave=False) as bar:
        info = refresh(
            obj.settings, bootstrap, secret, rebuild=rebuild,
            note=lambda message: click.echo(message, err=True), progress=bar.update,
        )

    def human(d: dict[str, Any]) -> None:
        click.echo(
            f"{d['records_indexed']} audit records indexed; {d['new_records_read']} new read in "
            f"{d['catch_up_seconds']} s ({d['path']})."
        )

    emit(info, as_json, human)


def _write_private(path: Path, data: bytes) -> None:
    """A document about one person: readable by its owner only."""
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
