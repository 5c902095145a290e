"""``referral-broker acl plan|apply|check``: Kafka ACLs generated from the organisation registry,
the topic plan and the prefix (``referral_broker/cluster/acls.py``), never written by hand."""

from __future__ import annotations

import sys
from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table
from referral_broker.cluster import acls


def _registry(obj: CliContext) -> Any:
    from referral_broker.organisations import load_registry

    return load_registry(obj.settings, obj.bootstrap())


def _rows(bindings: list[dict[str, str]]) -> str:
    return table(
        [[b["principal"], b["permission"], b["operation"], b["resource"], b["pattern"], b["name"]] for b in bindings],
        ["user", "permission", "operation", "resource", "pattern", "name"],
    )


@click.group()
def acl() -> None:
    """Kafka ACLs from data: one identity per organisation (user = its party name under the
    prefix), plus router, keyadmin and ops. Disabled organisations get no bindings."""


@acl.command()
@json_option
@pass_cli
def plan(obj: CliContext, as_json: bool) -> None:
    """Print every binding the cluster must hold (from the registry on the cluster)."""
    registry = _registry(obj)
    data = {
        "prefix": obj.settings.kafka_topic_prefix,
        "identities": [i.as_dict() for i in acls.identities(obj.settings, registry)],
        "bindings": [b.as_dict() for b in acls.plan(obj.settings, registry)],
    }

    def human(d: dict[str, Any]) -> None:
        click.echo(_rows(d["bindings"]))
        click.echo(f"\n{len(d['bindings'])} bindings for {len(d['identities'])} identities")

    emit(data, as_json, human)


@acl.command()
@json_option
@pass_cli
def apply(obj: CliContext, as_json: bool) -> None:
    """Create the missing bindings and delete the extra ones within the project's prefix
    (idempotent). Needs the administrator (a super user)."""
    from referral_broker.cluster.security import super_admin_client

    registry = _registry(obj)
    wanted = acls.plan(obj.settings, registry)
    admin = super_admin_client(obj.settings, obj.bootstrap())
    try:
        done = acls.apply(obj.settings, admin, wanted)
    finally:
        admin.close()
    result = done.as_dict()
    if result["created"] or result["deleted"]:
        result["audit"] = obj.audit_change(
            {
                "type": "acl.applied",
                "created": [acls.Binding(**b).describe() for b in result["created"]],
                "deleted": [acls.Binding(**b).describe() for b in result["deleted"]],
                "kept": result["kept"],
            },
            key="acl",
        )

    def human(d: dict[str, Any]) -> None:
        for b in d["created"]:
            click.echo(f"created  {acls.Binding(**b).describe()}")
        for b in d["deleted"]:
            click.echo(f"deleted  {acls.Binding(**b).describe()}")
        click.echo(f"{len(d['created'])} created, {len(d['deleted'])} deleted, {d['kept']} already present")

    emit(result, as_json, human)


@acl.command()
@json_option
@pass_cli
def check(obj: CliContext, as_json: bool) -> None:
    """Report drift: bindings the plan wants that are missing, and extra ones within the
    prefix. Exits 1 on any."""
    from referral_broker.cluster.security import super_admin_client

    registry = _registry(obj)
    wanted = acls.plan(obj.settings, registry)
    admin = super_admin_client(obj.settings, obj.bootstrap())
    try:
        found = acls.drift(obj.settings, admin, wanted)
    finally:
        admin.close()

    def human(d: dict[str, Any]) -> None:
        for b in d["missing"]:
            click.echo(f"missing  {acls.Binding(**b).describe()}")
        for b in d["extra"]:
            click.echo(f"extra    {acls.Binding(**b).describe()}")
        click.echo(f"{len(d['missing'])} missing, {len(d['extra'])} extra ({len(wanted)} planned)")

    emit(found.as_dict(), as_json, human)
    if not found.clean:
        sys.exit(1)
