"""``referral-broker schemas list|show|check-evolution``: the data contract, readable.

A thin layer over ``referral_broker.schemas``: the JSON and the human output come from the
same data. ``show --fields`` prints a view schema built from the given field paths, ``show --view``
the widest view the sharing policy grants a recipient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from referral_broker.cli.context import emit, json_option, table
from referral_broker.errors import ContractError
from referral_broker.schemas import evolution, registry, views


def _type_label(info: registry.FieldInfo) -> str:
    node = info.type
    if isinstance(node, dict):
        if node.get("logicalType"):
            label = node["logicalType"]
        elif node.get("type") == "array":
            items = registry.without_null(node["items"])
            inner = items.get("name", items.get("type")) if isinstance(items, dict) else items
            label = f"array<{str(inner).rpartition('.')[2]}>"
        elif node.get("type") in ("record", "enum", "fixed"):
            label = f"{node['type']} {node['name'].rpartition('.')[2]}"
        else:
            label = str(node.get("type"))
    else:
        label = str(node)
    return f"{label}?" if info.optional else label


def describe(schema: registry.Schema) -> dict[str, Any]:
    """What ``show`` prints: the schema's identity and one row per field path."""
    units = set(registry.sealing_units(schema))
    return {
        "name": registry.full_name(schema["name"], schema.get("namespace")),
        "fingerprint": registry.fingerprint(schema).hex(),
        **({"view_of": schema["view_of"], "granted": schema["granted"]} if "view_of" in schema else {}),
        "fields": [
            {
                "path": info.path,
                "type": _type_label(info),
                "data_class": info.data_class,
                "sealing_unit": info.path in units,
                "doc": info.field.get("doc", ""),
            }
            for info in registry.walk_fields(schema)
        ],
        "schema": schema,
    }


@click.group()
def schemas() -> None:
    """The Avro data contract: versions, fields and data classes, views, evolution."""


@schemas.command("list")
@json_option
def list_cmd(as_json: bool) -> None:
    """Every shipped schema version with its fingerprint (all stay readable)."""
    rows = [
        {"family": v.family, "version": v.version, "file": v.path.name, "fingerprint": v.fingerprint_hex}
        for v in registry.shipped_versions()
    ]
    cells = [[r["family"], str(r["version"]), r["file"], r["fingerprint"]] for r in rows]
    emit(rows, as_json, lambda _: click.echo(table(cells, ["family", "version", "file", "fingerprint"])))


@schemas.command()
@click.option(
    "--family",
    type=click.Choice(registry.FAMILIES),
    default="referral",
    show_default=True,
    help="Schema family.",
)
@click.option("--version", "version", type=int, default=None, help="Schema version (default: latest).")
@click.option(
    "--fields",
    "fields_csv",
    default=None,
    help="Comma-separated field paths: show the view schema that grants only these.",
)
@click.option(
    "--view",
    "recipient",
    default=None,
    metavar="RECIPIENT",
    help="Show the widest view the sharing policy can grant RECIPIENT (e.g. police).",
)
@click.option(
    "--avsc", is_flag=True, help="Print the Avro schema itself (.avsc JSON) instead of the field table."
)
@json_option
def show(
    family: str, version: int | None, fields_csv: str | None, recipient: str | None, avsc: bool, as_json: bool
) -> None:
    """Fields of a schema (or of a view) with type, data class and whether each is sealed."""
    schema = registry.load_schema(family, version)
    if fields_csv is not None and recipient is not None:
        raise click.UsageError("give --fields or --view, not both")
    if recipient is not None:
        from referral_broker.policy import load_policy
        from referral_broker.policy.review import granted_fields

        fields_csv = ",".join(granted_fields(load_policy(schema=schema), recipient))
    if fields_csv is not None:
        schema = views.view_schema(fields_csv.split(","), schema)
    data = describe(schema)
    if avsc:
        emit(schema, True, lambda _: None)
        return
    if as_json:
        emit(data, True, lambda _: None)
        return
    click.echo(f"{data['name']}  fingerprint {data['fingerprint']}")
    if "view_of" in data:
        click.echo(f"view of {data['view_of']} granting {len(data['granted'])} path(s)")
    rows = [
        [f["path"], f["type"], f["data_class"] or "-", "sealed" if f["sealing_unit"] else "-"]
        for f in data["fields"]
    ]
    click.echo(table(rows, ["path", "type", "data class", "sealing"]))


@schemas.command("check-evolution")
@click.argument("old", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("new", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--family", type=click.Choice(registry.FAMILIES), default=None, help="Only this family's versions."
)
@json_option
def check_evolution(old: Path | None, new: Path | None, family: str | None, as_json: bool) -> None:
    """Full compatibility (both directions) of NEW against OLD, or of every consecutive pair of
    shipped versions when no files are given; backward only where NEW declares it (``evolution``
    in its file, with a reason). Exits non-zero if any pair is not compatible as required."""
    if (old is None) != (new is None):
        raise click.UsageError("give both OLD and NEW schema files, or neither to check the shipped versions")
    if old is not None and new is not None:
        results = [evolution.check_files(old, new)]
    else:
        results = evolution.check_shipped_history(family)

    def human(_: object) -> None:
        for result in results:
            click.echo(f"{result.family}: {result.old} -> {result.new}: {result.verdict}")
            for problem in result.problems:
                click.echo(f"  {problem}")

    emit([r.as_dict() for r in results], as_json, human)
    failing = [r for r in results if not r.compatible]
    if failing:
        # One of our errors, so main() prints one line and exits with the contract exit code.
        raise ContractError(f"{len(failing)} schema pair(s) not fully compatible")
