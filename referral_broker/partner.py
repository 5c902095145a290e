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
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

from referral_broker.config import Settings
from referral_broker.consumers.receiving import Received, Refused, receive
from referral_broker.parties import get_party
from referral_broker.producers.intake import Sent
from referral_broker.producers.sending import PartnerSender, SendReport


def json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


class PartnerClient:
    def __init__(self, settings: Settings, bootstrap: str, party: str) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.party = get_party(party).name

    # -- sending (producers.sending.PartnerSender; kept here until this module goes) ---------
    def send_file(self, path: str | Path, **options: Any) -> SendReport:
        return PartnerSender(self.settings, self.bootstrap, self.party).send_file(path, **options)

    def send_status(self, status: dict[str, Any]) -> Sent:
        return PartnerSender(self.settings, self.bootstrap, self.party).send_status(status)

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
