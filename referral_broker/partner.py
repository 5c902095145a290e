"""The Python API a partner system embeds: the same verbs as ``referral-broker send`` and
``receive``, over the adapters (native formats), the intake sender and the receiver.

    client = PartnerClient(settings, bootstrap, "schools")
    ids = client.send_file("export.csv")                  # validate all, seal, sign, send
    for item in client.receive(stop_when_idle=5): ...     # verified, opened views and statuses
    client.render(items, "inbox/")                        # back to the partner's own format
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from referral_broker.config import Settings
from referral_broker.consumers.receiving import Received, Refused, receive
from referral_broker.errors import PartnerInputError, ValidationError
from referral_broker.parties import get_party
from referral_broker.producers.intake import IntakeSender, Sent


@dataclass
class SendReport:
    sent: list[Sent] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # "file: record N: path: reason", no values


def json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def read_canonical_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, record or None, problem) for each JSON line ``synth`` writes."""
    from referral_broker.schemas.json_form import from_json_form
    from referral_broker.schemas.registry import referral_schema

    schema = referral_schema()
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise PartnerInputError(f"{path}: cannot read ({exc.strerror})") from exc
    with handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield number, from_json_form(json.loads(line), schema), None
                except json.JSONDecodeError as exc:
                    yield number, None, f"not valid JSON (column {exc.colno})"
                except (ValueError, TypeError, KeyError) as exc:
                    yield number, None, f"not a canonical referral ({type(exc).__name__})"
        except UnicodeDecodeError:
            raise PartnerInputError(f"{path}: not UTF-8 text") from None


class PartnerClient:
    def __init__(self, settings: Settings, bootstrap: str, party: str) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.party = get_party(party).name

    # -- sending --------------------------------------------------------------------------
    def send_file(
        self,
        path: str | Path,
        *,
        fmt: str = "native",
        skip_invalid: bool = False,
        progress: Callable[[int], None] = lambda n: None,
        on_total: Callable[[int], None] = lambda n: None,
        on_checked: Callable[[int], None] | None = None,
    ) -> SendReport:
        """Validate every record of the file first; send nothing if any is invalid (unless
        ``skip_invalid``, which reports each rejected record and sends the rest)."""
        path = Path(path)
        report = SendReport()
        if fmt == "canonical":
            records = self._canonical(path, skip_invalid, report)
        elif fmt == "native":
            records = self._native(path, skip_invalid, report, on_checked)
        else:
            raise PartnerInputError(f"unknown format '{fmt}' (native or canonical)")
        on_total(len(records) if isinstance(records, list) else getattr(records, "total", 0))
        with IntakeSender(self.settings, self.bootstrap, self.party) as sender:
            report.sent = sender.send_referrals(
                (r.record if hasattr(r, "record") else r for r in records), progress=progress
            )
        return report

    def _canonical(self, path: Path, skip_invalid: bool, report: SendReport) -> list[dict[str, Any]]:
        from referral_broker.schemas.validation import validate

        good: list[dict[str, Any]] = []
        problems = []
        for number, record, problem in read_canonical_lines(path):
            found = (
                [problem]
                if problem
                else [f"{p.path}: {p.reason}" for p in validate(record, record_number=number)]
            )
            if found:
                problems.extend(f"{path}: record {number}: {p}" for p in found)
            else:
                good.append(record)  # type: ignore[arg-type]
        if problems and not skip_invalid:
            raise PartnerInputError(f"{len(problems)} problem(s), nothing sent: " + "; ".join(problems[:5]))
        report.rejected = problems
        return good

    def _native(
        self, path: Path, skip_invalid: bool, report: SendReport, on_checked: Callable[[int], None] | None
    ) -> Any:
        from referral_broker import adapters

        if get_party(self.party).kind != "partner":
            raise PartnerInputError(f"{self.party} has no native format; use --format canonical")
        try:
            stream = adapters.iter_file(self.party, path, skip_invalid=skip_invalid, on_checked=on_checked)
        except ValidationError as exc:
            raise PartnerInputError(f"{exc}; nothing sent") from exc
        report.rejected = [str(r) for r in stream.rejected]
        return stream

    def send_status(self, status: dict[str, Any]) -> Sent:
        with IntakeSender(self.settings, self.bootstrap, self.party) as sender:
            return sender.send_status(status)

    # -- receiving ------------------------------------------------------------------------
    def receive(
        self, *, stop_when_idle: float = 5.0, group: str | None = "default"
    ) -> Iterator[Received | Refused]:
        return receive(
            self.settings, self.bootstrap, self.party, stop_when_idle=stop_when_idle, group_id=group
        )

    def render(self, items: Iterable[Received], out_dir: str | Path) -> list[Path]:
        """Write what was received in the partner's own format (JSON lines where it has none)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        items = list(items)
        referrals = [i.record for i in items if i.kind == "referral"]
        statuses = [i.record for i in items if i.kind == "status"]
        written: list[Path] = []
        if get_party(self.party).kind == "partner":
            from referral_broker import adapters

            if referrals:
                written.append(adapters.render_file(self.party, json_records(referrals), out).path)
            if statuses:
                written.append(adapters.render_statuses(self.party, json_records(statuses), out).path)
            return [p for p in written if p is not None]
        for name, rows in (("referrals.jsonl", referrals), ("statuses.jsonl", statuses)):
            if rows:
                path = out / name
                path.write_text(
                    "".join(json.dumps(r, default=json_default) + "\n" for r in rows), encoding="utf-8"
                )
                written.append(path)
        return written


def json_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in the JSON form adapters render from (ISO dates, string ids)."""
    return [json.loads(json.dumps(r, default=json_default)) for r in records]
