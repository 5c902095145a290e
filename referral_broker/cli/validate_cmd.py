"""``referral-broker validate --file F``: check canonical JSON lines before anything is sent.

Lists every problem by record number (the line number) and field path, never the value; exits
0 only when every record is valid.
"""

from __future__ import annotations

import json
from typing import IO, Any

import click

from referral_broker.cli.context import emit, json_option
from referral_broker.errors import ContractError, Problem
from referral_broker.schemas import registry
from referral_broker.schemas.json_form import from_json_form
from referral_broker.schemas.validation import validate


def validate_lines(lines: IO[str], family: str = "referral") -> dict[str, Any]:
    """Validate each non-blank line as one record of ``family``; the report ``validate`` prints."""
    schema = registry.load_schema(family)
    problems: list[Problem] = []
    records = invalid = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        records += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            found = [Problem("<record>", "not valid JSON", number)]
        else:
            found = validate(from_json_form(obj, schema), schema, record_number=number)
        if found:
            invalid += 1
            problems.extend(found)
    return {
        "family": family,
        "records": records,
        "valid": records - invalid,
        "invalid": invalid,
        "problems": [{"record": p.record, "path": p.path, "reason": p.reason} for p in problems],
    }


@click.command("validate")
@click.option(
    "--file",
    "source",
    required=True,
    type=click.File("r", encoding="utf-8"),
    help="JSON lines file, one canonical record per line ('-' for stdin).",
)
@click.option(
    "--family",
    type=click.Choice(registry.FAMILIES),
    default="referral",
    show_default=True,
    help="Record type.",
)
@json_option
def validate_cmd(source: IO[str], family: str, as_json: bool) -> None:
    """Check every record; list each problem as record number and field path (never the value)."""
    report = validate_lines(source, family)

    def human(_: object) -> None:
        for p in report["problems"]:
            click.echo(f"record {p['record']}: {p['path']}: {p['reason']}")
        click.echo(f"{report['records']} record(s): {report['valid']} valid, {report['invalid']} invalid.")

    emit(report, as_json, human)
    if report["invalid"]:
        raise ContractError(f"{report['invalid']} of {report['records']} record(s) invalid")
