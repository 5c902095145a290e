"""``referral-broker validate``: the dry run, before anything is sent.

``validate --as KIND --file F`` runs a partner's own file through the whole check ``send``
runs (the adapter's reading, conversion, edge validation, the file-level rules: repeated
records, empty files), with no broker and no keys, and exits with the code ``send`` would:
0 when every record is good (or with ``--skip-invalid``), ``PartnerInputError`` (7) when
records are invalid or the file is malformed, ``EmptyInputError`` (71) when it holds none.
Without ``--as`` it checks canonical JSON lines (what ``synth`` writes), one record a line,
and exits with ``ContractError`` (4) when any is invalid.

Both list every problem by record number and field path, never the value; ``--json`` prints
the report (the same fields whatever happened, ``error`` set on failure).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli
from referral_broker.config import Settings
from referral_broker.errors import (
    ContractError,
    PartnerInputError,
    Problem,
    ReferralBrokerError,
    ValidationError,
)
from referral_broker.schemas import registry
from referral_broker.schemas.json_form import from_json_form
from referral_broker.schemas.validation import validate
from referral_broker.structured_log import get_logger


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


def error_object(exc: ReferralBrokerError) -> dict[str, Any]:
    """An error as the JSON reports print it: class, exit code, message (never a value)."""
    return {"class": type(exc).__name__, "exit_code": exc.exit_code, "message": str(exc)}


def _format_of(kind: str, path: Path) -> str:
    from referral_broker.adapters.native_files import sniff

    found = sniff(path)
    if kind == "health":
        return "FHIR XML" if found == "xml" else "FHIR JSON"
    if kind == "schools":
        return "DfE CTF XML" if found == "xml" else "CSV"
    return {"dwp": "CSV"}.get(kind, "JSON")


def native_report(
    kind: str, path: Path, *, skip_invalid: bool = False, settings: Settings | None = None
) -> tuple[dict[str, Any], ReferralBrokerError | None]:
    """The dry run of ``send --as KIND --file PATH``: (report, the error send would raise).
    With ``settings``, a large file is checked by worker processes, as ``send`` checks it."""
    from referral_broker import adapters
    from referral_broker.organisations import PARTNER_FORMATS
    from referral_broker.parties import get_party
    from referral_broker.producers.file_pool import FilePool, workers_for

    report: dict[str, Any] = {
        "file": path.name,
        "as": kind,
        "format": None,
        "records": 0,
        "valid": 0,
        "invalid": 0,
        "problems": [],
        "warnings": [],
        "error": None,
    }
    try:
        # a partner format (schools) or an organisation (school:110123), whose format it is
        native = kind if kind in PARTNER_FORMATS else get_party(kind).format
        if native is None:
            raise PartnerInputError(f"{kind} has no native format; use --format canonical")
        if not path.is_file():
            raise PartnerInputError(f"{path.name}: file not found")
        report["format"] = _format_of(native, path)
        # Every record is checked, so every problem is listed; send refuses the same file.
        workers = 1 if settings is None else workers_for(settings, path)
        stream: adapters.FileStream | FilePool
        if settings is not None and workers > 1:
            with FilePool(native, kind, path, settings, workers=workers, skip_invalid=True) as stream:
                pass  # checked: the workers stop here, nothing sealed
            get_logger(__name__).info("file checked by worker processes", workers=workers, count=stream.total)
        else:
            stream = adapters.iter_file(native, path, skip_invalid=True)
    except ReferralBrokerError as exc:
        report["error"] = error_object(exc)
        return report, exc
    problems = [p for parsed in stream.rejected for p in parsed.problems]
    report.update(
        records=stream.total + len(stream.rejected),
        valid=stream.total,
        invalid=len(stream.rejected),
        problems=[{"record": p.record, "path": p.path, "reason": p.reason} for p in problems],
        warnings=list(stream.warnings),
    )
    if stream.rejected and not skip_invalid:
        # The message send gives (``producers.checked``), but nothing was going to be sent.
        invalid = ValidationError(
            problems, f"referrals in {path.name} ({len(stream.rejected)} record(s) rejected, nothing accepted)"
        )
        error = PartnerInputError(f"{invalid}; nothing would be sent")
        report["error"] = error_object(error)
        return report, error
    return report, None


def send_failure_report(
    party: str, path: Path, fmt: str, exc: ReferralBrokerError, settings: Settings | None = None
) -> dict[str, Any]:
    """What ``send --json`` prints when it fails: the dry run's fields (for a file it refused,
    the dry run's problems and counts) with send's own error, and nothing delivered."""
    if fmt == "native" and isinstance(exc, PartnerInputError):
        report, _ = native_report(party, path, settings=settings)
    else:
        report = {
            "file": path.name,
            "as": party,
            "format": "canonical JSON lines" if fmt == "canonical" else None,
            "records": None,
            "valid": None,
            "invalid": None,
            "problems": [],
            "warnings": [],
        }
    return {**report, "error": error_object(exc), "delivered": [], "queued": [], "already_sent": [], "rejected": []}


@click.command("validate")
@click.option(
    "--file",
    "source",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True, path_type=str),
    help="The file to check: a partner's native file with --as, else JSON lines ('-' for stdin).",
)
@click.option(
    "--as",
    "kind",
    default=None,
    metavar="KIND",
    help="Check FILE as this partner's native file (schools, health, dwp, police, charities): "
    "the whole check send runs, with no broker and no keys.",
)
@click.option(
    "--family",
    type=click.Choice(registry.FAMILIES),
    default="referral",
    show_default=True,
    help="Record type of canonical JSON lines (without --as).",
)
@click.option("--skip-invalid", is_flag=True, help="With --as: exit 0 when some records are good, as send would send them.")
@json_option
@pass_cli
def validate_cmd(cli: CliContext, source: str, kind: str | None, family: str, skip_invalid: bool, as_json: bool) -> None:
    """Check every record; list each problem as record number and field path (never the value).

    With --as KIND, FILE is that partner's own file (CSV, JSON, FHIR JSON or XML, DfE CTF) and
    the exit code is the one send would give. A file of 4 MB or more is checked by worker
    processes, as send checks it ([send] workers)."""
    if kind is not None:
        report, error = native_report(kind, Path(source), skip_invalid=skip_invalid, settings=cli.settings)

        def human_native(r: dict[str, Any]) -> None:
            for warning in r["warnings"]:
                click.echo(f"warning: {warning}", err=True)
            for p in r["problems"]:
                click.echo(f"record {p['record']}: {p['path']}: {p['reason']}")
            if r["error"] is None or r["records"]:
                click.echo(
                    f"{r['file']} ({r['format']}) as {r['as']}: {r['records']} record(s): "
                    f"{r['valid']} valid, {r['invalid']} invalid."
                )

        emit(report, as_json, human_native)
        if error is not None:
            raise error
        return
    if source == "-":
        report = validate_lines(sys.stdin, family)
    else:
        try:
            with open(source, encoding="utf-8") as handle:
                report = validate_lines(handle, family)
        except OSError as exc:
            raise PartnerInputError(f"{Path(source).name}: cannot read ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise PartnerInputError(f"{Path(source).name}: not UTF-8 text") from None

    def human(_: object) -> None:
        for p in report["problems"]:
            click.echo(f"record {p['record']}: {p['path']}: {p['reason']}")
        click.echo(f"{report['records']} record(s): {report['valid']} valid, {report['invalid']} invalid.")

    emit(report, as_json, human)
    if report["invalid"]:
        raise ContractError(f"{report['invalid']} of {report['records']} record(s) invalid")
