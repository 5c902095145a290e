"""``referral-broker orgs add|disable|enable|list|show|import|unresolved``: the organisation registry
(``referral_broker/organisations.py``), kept on its compacted topic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from referral_broker import organisations as orgs_mod
from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table
from referral_broker.cluster.topics import provision_parties


def _row(o: dict[str, Any]) -> list[str]:
    return [
        o["party"],
        o["kind"],
        o["id"],
        o["name"],
        ",".join(o["districts"]) if len(o["districts"]) < len(orgs_mod.districts()) else "all",
        ",".join(o["services"]) or "-",
        o["partner_format"] or "-",
        o["status"],
    ]


def _print(entries: list[dict[str, Any]]) -> None:
    headers = ["party", "kind", "identifier", "name", "districts", "services", "format", "status"]
    click.echo(table([_row(o) for o in entries], headers))


def _print_change(data: dict[str, Any]) -> None:
    click.echo(f"{data['party']} ({data['name']}): {data['outcome']}")


@click.group()
def orgs() -> None:
    """Organisations: every school, NHS organisation, police force, DWP, charity, district
    team and research recipient is its own party.

    The registry is the compacted organisations topic (run 'topics ensure' first); changes
    take effect for readers at their next reload, with no restart. Name an organisation as
    kind:identifier (school:110123, nhs:A81001, police:35, charity:1234567, dwp,
    district:fenland) or by its party name (school-110123).
    """


def _audited(obj: CliContext, change: dict[str, Any], what: str) -> dict[str, Any]:
    """``change`` with its audit outcome, when it changed the registry."""
    if change["outcome"] not in ("added", "disabled", "enabled"):
        return change
    event = {"type": what, "org": change["party"], "kind": change["kind"], "status": change["status"]}
    return change | {"audit": obj.audit_change(event, key=str(change["party"]))}


@orgs.command()
@click.option("--kind", required=True, help="school, nhs_organisation, police_force, dwp, charity, district_team, research.")
@click.option("--id", "identifier", required=True, help="URN, ODS code, force code, charity number or the project's id.")
@click.option("--name", required=True, help="The organisation's name.")
@click.option("--district", "districts", multiple=True, required=True, help="A district it serves (repeatable), or 'all'.")
@click.option("--service", "services", multiple=True, help="A service it provides (repeatable; the Referral schema's Service symbols).")
@click.option("--partner-format", default="default", show_default=True, help="Native format: schools, health, dwp, police, charities, none.")
@json_option
@pass_cli
def add(
    obj: CliContext,
    kind: str,
    identifier: str,
    name: str,
    districts: tuple[str, ...],
    services: tuple[str, ...],
    partner_format: str,
    as_json: bool,
) -> None:
    """Register an organisation. Re-adding an identical one changes nothing; the same
    identifier with other details is an error."""
    org = orgs_mod.organisation(
        kind=kind,
        identifier=identifier,
        name=name,
        districts=districts,
        services=services,
        partner_format=partner_format,
    )
    bootstrap = obj.bootstrap()
    change = orgs_mod.add(obj.settings, bootstrap, org)
    provision_parties(obj.settings, bootstrap, [org.party])  # its topics, even when re-added
    emit(_audited(obj, change.as_dict(), "org.added"), as_json, _print_change)


@orgs.command()
@click.argument("org")
@json_option
@pass_cli
def disable(obj: CliContext, org: str, as_json: bool) -> None:
    """Disable an organisation: nothing more is routed to it (a new version; kept, never deleted),
    and its Kafka user and ACL bindings are deleted (re-enabling needs a new enrol and acl apply)."""
    from referral_broker.cluster.enrolment import revoke

    change = orgs_mod.disable(obj.settings, obj.bootstrap(), org)
    data = change.as_dict() | {"kafka": revoke(obj.settings, obj.bootstrap(), change.organisation.party)}
    emit(_audited(obj, data, "org.disabled"), as_json, _print_change)


@orgs.command()
@click.argument("org")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="The folder to write.")
@json_option
@pass_cli
def enrol(obj: CliContext, org: str, out: Path, as_json: bool) -> None:
    """Write what ORG's machine needs into OUT: client config, its SCRAM credentials (created
    or reset; password file 0600), the CA file and the council's trust anchor. ORG may also be
    a service: router, keyadmin, ops."""
    from referral_broker.cluster.enrolment import enrol as do_enrol

    done = do_enrol(obj.settings, obj.bootstrap(), org, out)
    data = done.as_dict()
    data["audit"] = obj.audit_change({"type": "credentials.enrolled", "name": data["name"], "user": data["user"]}, key=str(data["name"]))
    emit(
        data,
        as_json,
        lambda d: click.echo(f"{d['name']} enrolled as Kafka user {d['user']} in {d['folder']}: {', '.join(d['files'])}"),
    )


@orgs.command("rotate-credentials")
@click.argument("org")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Its enrolment folder.")
@json_option
@pass_cli
def rotate_credentials(obj: CliContext, org: str, out: Path, as_json: bool) -> None:
    """Replace ORG's Kafka password (the old one is refused from now on); the new one is
    written to OUT's password file (0600), never printed."""
    from referral_broker.cluster.enrolment import rotate

    done = rotate(obj.settings, obj.bootstrap(), org, out)
    data = done.as_dict()
    data["audit"] = obj.audit_change({"type": "credentials.rotated", "name": data["name"]}, key=str(data["name"]))
    emit(data, as_json, lambda d: click.echo(f"{d['name']}: new password in {d['folder']}"))


@orgs.command()
@click.argument("org")
@json_option
@pass_cli
def enable(obj: CliContext, org: str, as_json: bool) -> None:
    """Re-enable a disabled organisation."""
    change = orgs_mod.enable(obj.settings, obj.bootstrap(), org)
    emit(_audited(obj, change.as_dict(), "org.enabled"), as_json, _print_change)


@orgs.command("list")
@click.option("--kind", default=None, help="Only organisations of this kind.")
@click.option(
    "--status",
    type=click.Choice(["all", "active", "disabled"]),
    default="all",
    show_default=True,
    help="Only active or only disabled organisations.",
)
@json_option
@pass_cli
def list_cmd(obj: CliContext, kind: str | None, status: str, as_json: bool) -> None:
    """Every registered organisation (latest version of each)."""
    registry = orgs_mod.load_registry(obj.settings, obj.bootstrap())
    found = registry.organisations(kind)
    data = [o.to_json() for o in found if status == "all" or o.status.value == status]
    emit(data, as_json, _print)


@orgs.command()
@click.argument("org")
@json_option
@pass_cli
def show(obj: CliContext, org: str, as_json: bool) -> None:
    """One organisation: its party name, identifier, districts, services and status."""
    data = orgs_mod.load_registry(obj.settings, obj.bootstrap()).require(org).to_json()

    def human(d: dict[str, Any]) -> None:
        for key in ("party", "kind", "id", "name", "districts", "services", "partner_format", "status", "updated_at", "disabled_at"):
            value = d[key]
            if isinstance(value, list):
                value = ", ".join(value) or "-"
            click.echo(f"{key:15} {value if value is not None else '-'}")

    emit(data, as_json, human)


@orgs.command("import")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@json_option
@pass_cli
def import_cmd(obj: CliContext, file: Path | None, as_json: bool) -> None:
    """Seed the registry from a county file (default: the shipped demo county). Idempotent:
    only organisations not yet registered are written; disabled ones stay disabled."""
    bootstrap = obj.bootstrap()
    report = orgs_mod.import_file(obj.settings, bootstrap, file)
    provision_parties(obj.settings, bootstrap, report.added + report.unchanged + report.kept_disabled)
    data = report.as_dict()
    emit(
        data,
        as_json,
        lambda d: click.echo(
            f"{len(d['added'])} added, {len(d['unchanged'])} unchanged, {len(d['kept_disabled'])} kept disabled"
        ),
    )


@orgs.command()
@json_option
@pass_cli
def unresolved(obj: CliContext, as_json: bool) -> None:
    """Referrals a recipient rule could not resolve (a school not registered, a disabled GP
    practice, no provider named): nobody of that kind was sent anything; follow them up."""
    from referral_broker.audit_log import unresolved as find

    rows = find(obj.settings, obj.bootstrap())

    def human(found: list[dict[str, Any]]) -> None:
        if not found:
            click.echo("Every recipient rule was resolved: nothing to follow up.")
            return
        click.echo(
            table(
                [(r["referral_id"], r["version"], r["rule"], r["reason"], r["decided_at"]) for r in found],
                ["referral", "version", "rule", "reason", "decided at"],
            )
        )

    emit(rows, as_json, human)
