"""``referral-broker acl plan|apply|check``: Kafka ACLs and client quotas generated from the
organisation registry, the topic plan, ``quotas.toml`` and the prefix
(``referral_broker/cluster/acls.py``, ``quotas.py``), never written by hand."""

from __future__ import annotations

import sys
from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table
from referral_broker.cluster import acls, quotas


def _registry(obj: CliContext) -> Any:
    from referral_broker.organisations import load_registry

    return load_registry(obj.settings, obj.bootstrap())


def _rows(bindings: list[dict[str, str]]) -> str:
    return table(
        [[b["principal"], b["permission"], b["operation"], b["resource"], b["pattern"], b["name"]] for b in bindings],
        ["user", "permission", "operation", "resource", "pattern", "name"],
    )


def _quota_rows(planned: list[dict[str, Any]]) -> str:
    return table([[q["user"], q["key"], quotas.shown(q["value"])] for q in planned], ["user", "quota", "value"])


@click.group()
def acl() -> None:
    """Kafka ACLs and quotas from data: one identity per organisation (user = its party name
    under the prefix), plus router, keyadmin and ops. Each organisation's identity gets its
    kind's client quotas (quotas.toml); the services get none. Disabled organisations get no
    bindings and no quotas."""


@acl.command()
@json_option
@pass_cli
def plan(obj: CliContext, as_json: bool) -> None:
    """Print every binding and quota the cluster must hold (from the registry on the cluster)."""
    registry = _registry(obj)
    data = {
        "prefix": obj.settings.kafka_topic_prefix,
        "identities": [i.as_dict() for i in acls.identities(obj.settings, registry)],
        "bindings": [b.as_dict() for b in acls.plan(obj.settings, registry)],
        "quotas": [q.as_dict() for q in quotas.plan(obj.settings, registry)],
    }

    def human(d: dict[str, Any]) -> None:
        click.echo(_rows(d["bindings"]))
        click.echo(f"\n{_quota_rows(d['quotas'])}")
        click.echo(
            f"\n{len(d['bindings'])} bindings for {len(d['identities'])} identities; "
            f"{len(d['quotas'])} quotas"
        )

    emit(data, as_json, human)


@acl.command()
@json_option
@pass_cli
def apply(obj: CliContext, as_json: bool) -> None:
    """Create the missing bindings and delete the extra ones within the project's prefix, then
    the same for the organisations' quotas (idempotent). Needs the administrator (a super user)."""
    from referral_broker.cluster.security import super_admin_client

    registry = _registry(obj)
    wanted = acls.plan(obj.settings, registry)
    admin = super_admin_client(obj.settings, obj.bootstrap())
    try:
        done = acls.apply(obj.settings, admin, wanted)
        limits = quotas.apply(obj.settings, admin, quotas.plan(obj.settings, registry))
    finally:
        admin.close()
    result: dict[str, Any] = done.as_dict() | {"quotas": limits.as_dict()}
    if done.created or done.deleted or limits.set or limits.removed:
        result["audit"] = obj.audit_change(
            {
                "type": "acl.applied",
                "created": [b.describe() for b in done.created],
                "deleted": [b.describe() for b in done.deleted],
                "kept": done.kept,
                "quotas_set": [q.describe() for q in limits.set],
                "quotas_removed": [q.describe() for q in limits.removed],
            },
            key="acl",
        )

    def human(d: dict[str, Any]) -> None:
        for b in d["created"]:
            click.echo(f"created  {acls.Binding(**b).describe()}")
        for b in d["deleted"]:
            click.echo(f"deleted  {acls.Binding(**b).describe()}")
        limited = d["quotas"]
        for x in limited["set"]:
            click.echo(f"set      quota {quotas.Quota(**x).describe()}")
        for x in limited["removed"]:
            click.echo(f"removed  quota {quotas.Quota(**x).describe()}")
        click.echo(f"{len(d['created'])} created, {len(d['deleted'])} deleted, {d['kept']} already present")
        click.echo(
            f"quotas: {len(limited['set'])} set, {len(limited['removed'])} removed, {limited['kept']} already present"
        )

    emit(result, as_json, human)


@acl.command()
@json_option
@pass_cli
def check(obj: CliContext, as_json: bool) -> None:
    """Report drift: bindings and quotas the plan wants that are missing (or, for a quota,
    hold another value), and extra ones within the prefix. Exits 1 on any."""
    from referral_broker.cluster.security import super_admin_client

    registry = _registry(obj)
    wanted = acls.plan(obj.settings, registry)
    planned = quotas.plan(obj.settings, registry)
    admin = super_admin_client(obj.settings, obj.bootstrap())
    try:
        found = acls.drift(obj.settings, admin, wanted)
        limits = quotas.drift(obj.settings, admin, planned)
    finally:
        admin.close()
    clean = found.clean and limits.clean
    data = found.as_dict() | {"quotas": limits.as_dict(), "clean": clean}

    def human(d: dict[str, Any]) -> None:
        for b in d["missing"]:
            click.echo(f"missing  {acls.Binding(**b).describe()}")
        for b in d["extra"]:
            click.echo(f"extra    {acls.Binding(**b).describe()}")
        q = d["quotas"]
        for x in q["missing"]:
            click.echo(f"missing  quota {quotas.Quota(**x).describe()}")
        for x in q["changed"]:
            found_value = quotas.shown(x["found"]["value"])
            click.echo(f"changed  quota {quotas.Quota(**x['planned']).describe()} (the cluster holds {found_value})")
        for x in q["extra"]:
            click.echo(f"extra    quota {quotas.Quota(**x).describe()}")
        click.echo(f"{len(d['missing'])} missing, {len(d['extra'])} extra ({len(wanted)} planned)")
        click.echo(
            f"quotas: {len(q['missing'])} missing, {len(q['changed'])} changed, {len(q['extra'])} extra "
            f"({len(planned)} planned)"
        )

    emit(data, as_json, human)
    if not clean:
        sys.exit(1)
