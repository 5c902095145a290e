"""``referral-broker retention shred|hold|release``: crypto-shredding of a case, audited."""

from __future__ import annotations

from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli
from referral_broker.config import Settings
from referral_broker.errors import ReferralBrokerError
from referral_broker.sealing import retention as retention_lib


@click.group()
def retention() -> None:
    """Retention of the council's case copies: shred a case key, place or lift a legal hold.

    Every action is written to the audit topic (ids and reasons only).
    """


def _duration(ms: int) -> str:
    if ms < 0:
        return "forever"
    hours = ms / 3_600_000
    return f"{hours / 24:g} days" if hours >= 24 and hours % 24 == 0 else f"{hours:g} h"


def _teams_sent(settings: Settings, bootstrap: str, case_id: str) -> tuple[list[str], str | None]:
    """The district teams the router delivered the case to (its delivery ledger), whether or
    not their inbox has stored it yet; and why the ledger could not be read, if it could not."""
    from referral_broker.consumers.delivery_ledger import DeliveryLedger
    from referral_broker.identity import load_identity
    from referral_broker.parties import HUB, all_parties

    try:
        ledger = DeliveryLedger(settings, bootstrap, load_identity(settings, bootstrap, HUB))
        try:
            ledger.catch_up()
            found = ledger.lookup(case_id)
        finally:
            ledger.close()
    except ReferralBrokerError as exc:
        return [], f"{type(exc).__name__}: {exc}"
    parties = all_parties()
    sent = {r for recipients in (found.versions.values() if found else ()) for r in recipients}
    return sorted(r for r in sent if r in parties and parties[r].kind == "district_team"), None


def _shred_inbox(settings: Settings, bootstrap: str, data: dict[str, Any]) -> dict[str, Any]:
    """The inbox database on this machine (if there is one): the case's rows, events and texts
    deleted, a tombstone kept per team that held it or was sent it (shredded, when, by whom),
    so a copy that reaches the inbox later is not stored."""
    from datetime import datetime

    from referral_broker.consumers.inbox.store import InboxStore

    path = settings.inbox_db_path
    if not path.exists():
        return {"database": str(path), "present": False, "teams": [], "ledger_problem": None}
    sent, problem = _teams_sent(settings, bootstrap, data["case_id"])
    with InboxStore(path) as store:
        teams = store.shred_case(
            data["case_id"],
            at=datetime.fromisoformat(data["shredded_at"]),
            by=data["shredded_by"],
            case_key_id=data["case_key_id"],
            also_for=sent,
        )
    return {"database": str(path), "present": True, "teams": teams, "ledger_problem": problem}


def _show_shred(d: dict[str, Any]) -> None:
    click.echo(
        f"Case {d['case_id']} shredded at {d['shredded_at']} by {d['shredded_by']} "
        f"(case key {d['case_key_id']} destroyed): its archive and district-team copies, the statuses "
        "relayed to district teams and the inbox's texts no longer open."
    )
    inbox = d["inbox"]
    if not inbox["present"]:
        click.echo(f"Inbox: no database at {inbox['database']} on this machine.")
    elif inbox["teams"]:
        click.echo(
            f"Inbox: tombstone kept for {', '.join(inbox['teams'])}; the case's records, events and texts deleted."
        )
    else:
        click.echo("Inbox: held no copy of the case.")
    if inbox.get("ledger_problem"):
        click.echo(
            "Inbox: the delivery ledger could not be read, so only teams already holding the case have a "
            f"tombstone ({inbox['ledger_problem']}); run the shred again once Kafka answers."
        )
    click.echo("Copies sealed for the hub by their senders cannot be re-keyed; the hub's key opens them until:")
    for w in d["readable_until"]:
        until = w["readable_until"] or "never deleted (topic retention is unlimited: fix the drift)"
        click.echo(
            f"  {w['window']:<19} {w['topics']:<40} until {until} "
            f"(retention {_duration(w['retention_ms'])} + segment roll {_duration(w['segment_ms'])})"
        )
        for drift in w["drift"]:
            click.echo(f"    drift from the topic plan: {drift}")


@retention.command()
@click.option("--case", "case_id", required=True, help="Case id whose key to destroy.")
@json_option
@pass_cli
def shred(obj: CliContext, case_id: str, as_json: bool) -> None:
    """Destroy a case's key: every copy of the case sealed under it becomes unreadable, for good.

    Refused while the case is under legal hold. The inbox database on this machine keeps a
    tombstone of the case and deletes the rest. Prints until when the copies the council cannot
    re-key (intake, statuses, dead letters) stay readable.
    """
    data = retention_lib.shred(obj.settings, obj.bootstrap(), case_id)
    data["inbox"] = _shred_inbox(obj.settings, obj.bootstrap(), data)
    emit(data, as_json, _show_shred)


@retention.command()
@click.option("--case", "case_id", required=True, help="Case id to hold.")
@click.option("--reason", required=True, help="Why the case must be kept (e.g. the proceedings' reference).")
@json_option
@pass_cli
def hold(obj: CliContext, case_id: str, reason: str, as_json: bool) -> None:
    """Place a legal hold: the case cannot be shredded until it is released."""
    data = retention_lib.hold(obj.settings, obj.bootstrap(), case_id, reason)
    emit(
        data,
        as_json,
        lambda d: click.echo(f"Case {d['case_id']} is under legal hold since {d['placed_at']}."),
    )


@retention.command()
@click.option("--case", "case_id", required=True, help="Case id to release.")
@json_option
@pass_cli
def release(obj: CliContext, case_id: str, as_json: bool) -> None:
    """Lift the legal hold on a case, so retention (shredding) applies again."""
    data = retention_lib.release(obj.settings, obj.bootstrap(), case_id)
    emit(data, as_json, lambda d: click.echo(f"Legal hold on case {d['case_id']} released."))
