"""``referral-broker setup --out DIR``: the council's one-shot set-up of a secured cluster, run as
the administrator (docker-compose.yml's ``setup`` service), idempotent.

1. the county, as the demo prepares it (``demo_run.prepare_county``): the topic plan, the
   shipped county's organisations and their topics, the root of trust and every organisation's
   key store (kept when they exist), published on the keys topic;
2. ``acl apply``: the bindings and the organisations' client quotas of ``acl plan`` for the
   registry on the cluster, nothing else;
3. the services' own Kafka identities, as ``orgs enrol`` makes them: the router and each
   district team's inbox get a SCRAM user and a folder ``DIR/<name>/`` (client config, the
   password file 0600, the CA, the trust anchor). A password already in a folder is set again,
   not replaced, so a second run changes nothing a running service uses.

The services then run with only their folder's credentials and the rights the plan gives them;
no service but this one needs the administrator's password.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli
from referral_broker.config import Settings


def run_setup(
    settings: Settings,
    bootstrap: str,
    out: Path,
    teams: tuple[str, ...] = (),
    *,
    say: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Everything ``setup`` does (see the module's note); returns what it did, as data."""
    from referral_broker.cli.demo_run import prepare_county
    from referral_broker.cluster import acls, enrolment, quotas
    from referral_broker.cluster.security import super_admin_client
    from referral_broker.errors import ConfigError
    from referral_broker.organisations import OrgKind, load_registry

    county = prepare_county(settings, bootstrap, say=say)
    registry = load_registry(settings, bootstrap)
    known = sorted(o.party for o in registry.organisations(OrgKind.DISTRICT_TEAM, active_only=True))
    unknown = sorted(set(teams) - set(known))
    if unknown:
        raise ConfigError(f"not an active district team: {', '.join(unknown)}; district teams: {', '.join(known)}")
    say("Applying the ACL plan and the organisations' quotas")
    admin = super_admin_client(settings, bootstrap)
    try:
        applied = acls.apply(settings, admin, acls.plan(settings, registry))
        limited = quotas.apply(settings, admin, quotas.plan(settings, registry))
    finally:
        admin.close()
    enrolled = []
    for name in (acls.ROUTER, *(teams or known)):
        folder = out / name
        had = (folder / enrolment.PASSWORD_FILE).is_file()
        done = enrolment.enrol(settings, bootstrap, name, folder, keep_password=True)
        enrolled.append(done.as_dict() | {"password": "kept" if had else "new"})
        say(f"  {name}: Kafka user {done.user}, folder {done.folder} ({'password kept' if had else 'new password'})")
    return {
        "organisations": {
            "added": len(county.imported.added),
            "unchanged": len(county.imported.unchanged),
            "kept_disabled": len(county.imported.kept_disabled),
        },
        "key_entries_published": county.keys,
        "acl": {"created": len(applied.created), "deleted": len(applied.deleted), "kept": applied.kept},
        "quotas": {"set": len(limited.set), "removed": len(limited.removed), "kept": limited.kept},
        "enrolled": enrolled,
    }


@click.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Write each service's folder here: OUT/router, OUT/<district team>.",
)
@click.option(
    "--team",
    "teams",
    multiple=True,
    metavar="TEAM",
    help="A district team whose inbox to enrol (repeatable); every active district team when left out.",
)
@json_option
@pass_cli
def setup(obj: CliContext, out: Path, teams: tuple[str, ...], as_json: bool) -> None:
    """The council's set-up of a secured cluster, as the administrator, safe to run again:
    topics, the shipped county's organisations, the root of trust and every organisation's
    keys (as the demo makes them), 'acl apply', then the router and each district team's inbox
    enrolled as their own Kafka identities (OUT/<name>/: config, password file 0600, CA, trust
    anchor; a password already there is kept). docker-compose.yml runs this once before the
    services start."""

    def say(s: str) -> None:
        if not as_json:
            click.echo(s, err=True)

    data = run_setup(obj.settings, obj.bootstrap(), out.expanduser().resolve(), teams, say=say)

    def human(d: dict[str, Any]) -> None:
        o, a, q = d["organisations"], d["acl"], d["quotas"]
        click.echo(
            f"Organisations: {o['added']} added, {o['unchanged']} unchanged, {o['kept_disabled']} kept disabled; "
            f"{d['key_entries_published']} key entries published; ACLs: {a['created']} created, "
            f"{a['deleted']} deleted, {a['kept']} already present; quotas: {q['set']} set, "
            f"{q['removed']} removed, {q['kept']} already present"
        )
        for e in d["enrolled"]:
            click.echo(f"{e['name']}: Kafka user {e['user']} in {e['folder']} (password {e['password']})")

    emit(data, as_json, human)
