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
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a readable document with a timeline (for a letter to the family).")
@json_option
@pass_cli
def subject(
    obj: CliContext,
    nhs_number: str | None,
    upn: str | None,
    ni_number: str | None,
    case: str | None,
    html_out: Path | None,
    as_json: bool,
) -> None:
    """Every audit event about one child or household member: who sent what, which
    organisations received which fields, when, on what ground and purpose, under which
    override, who opened it in the inbox, statuses, shreds. The identifier is hashed with the
    hub's secret and the audit scanned for that hash: no identifier is stored in clear, and
    none is printed. No records is an empty report, not an error."""
    import uuid

    from referral_broker.audit_log import history_html, hub_subject_secret, query_subject_key, subject_history
    from referral_broker.errors import ContractError

    given = {k: v for k, v in (("nhs_number", nhs_number), ("upn", upn), ("ni_number", ni_number), ("case", case)) if v}
    if len(given) != 1:
        raise click.UsageError("give exactly one of --nhs-number, --upn, --ni-number, --case")
    (kind, value), = given.items()
    key = None
    if kind == "case":
        try:
            value = str(uuid.UUID(value))
        except ValueError:
            raise ContractError("the case id given is not a referral id (a UUID; not shown)") from None
    else:
        key = query_subject_key(hub_subject_secret(obj.settings), kind, value)
    from referral_broker.identity import load_identity
    from referral_broker.parties import HUB

    bootstrap = obj.bootstrap()
    hub = load_identity(obj.settings, bootstrap, HUB)  # each event's signature is checked
    report = subject_history(
        obj.settings, bootstrap, key=key, case=value if kind == "case" else None, verify=hub.opener.verify
    )
    report = {"query": kind, **report}
    if html_out is not None:
        html_out.write_text(history_html(report), "utf-8")

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

    emit(report, as_json, human)
