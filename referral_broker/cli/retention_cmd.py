"""``referral-broker retention shred|hold|release|sweep|run|check``: crypto-shredding of a case,
audited; the sweep that shreds every case past its retention rule (issue 16, Build 3)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli
from referral_broker.config import Settings
from referral_broker.errors import ReferralBrokerError
from referral_broker.sealing import retention as retention_lib


@click.group()
def retention() -> None:
    """Retention of the council's case copies: sweep (shred every case past its rule), run
    (sweep daily), check the rules and the topic plan, shred a case key, place or lift a hold.

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
    click.echo(
        "Copies sealed for the hub by their senders cannot be re-keyed; the hub's key opens them until:"
    )
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


# -- retention that runs itself (issue 16, Build 3) ---------------------------------------------
rules_option = click.option(
    "--rules",
    "rules_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Retention schedule to apply (default: the reviewed referral_broker/retention_rules.toml).",
)


def _today(now: str | None) -> date:
    if now is None:
        return datetime.now(UTC).date()
    try:
        return datetime.fromisoformat(now).date() if "T" in now else date.fromisoformat(now)
    except ValueError:
        raise click.BadParameter("give a date (2032-05-01) or an ISO date-time", param_hint="--now") from None


def _sweep_shred(obj: CliContext) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    """One case's shred exactly as ``retention shred`` does it: audited first, then the key,
    then the inbox's tombstone on this machine."""

    def shred_case(case: str, record: dict[str, Any]) -> dict[str, Any]:
        data = retention_lib.shred(obj.settings, obj.bootstrap(), case, rule=record)
        data["inbox"] = _shred_inbox(obj.settings, obj.bootstrap(), data)
        return data

    return shred_case


def _show_sweep(r: dict[str, Any]) -> None:
    verb = "would shred" if r["dry_run"] else "shred"
    click.echo(
        f"Retention sweep on {r['today']} (rules {r['rules_version']}): {r['cases_known']} closed case(s) known, "
        f"{r['closures_learnt']} closure(s) learnt now, {r['not_yet_due']} not yet due, "
        f"{r['already_shredded']} already shredded."
    )
    if r["refused_audit_records"]:
        click.echo(
            f"{r['refused_audit_records']} closure record(s) refused: not signed by the hub (run 'audit verify')."
        )
    if r["dry_run"]:
        for d in r["due"]:
            click.echo(f"  would shred {d['case_id']}: due {d['due']} ({d['basis']})")
        if not r["due"]:
            click.echo("Nothing is due: nothing would be shredded.")
    else:
        for d in r["shredded"]:
            teams = f"; inbox tombstone for {', '.join(d['inbox_teams'])}" if d["inbox_teams"] else ""
            click.echo(f"  shredded {d['case_id']}: due {d['due']}{teams}")
        if not r["shredded"] and not r["stopped"]:
            click.echo("Nothing was due: nothing shredded.")
    for h in r["held"]:
        click.echo(f"  skipped {h['case_id']} (due {h['due']}): {h['reason']}")
    for f in r["failed"]:
        click.echo(f"  FAILED {f['case_id']} (due {f['due']}), kept for the next sweep: {f['reason']}")
    for w in r["waiting"]:
        click.echo(f"  not judged {w['case_id']}: {w['reason']}")
    if r["stopped"]:
        left = len(r["due"]) - len(r["shredded"])
        click.echo(
            f"Sweep STOPPED after {len(r['shredded'])} of {len(r['due'])} shred(s), {left} left for the next sweep "
            f"(each shred is all or nothing): {r['stopped']}"
        )
    elif r["dry_run"]:
        click.echo(f"{len(r['due'])} case(s) {verb}; nothing was changed (dry run).")
    else:
        click.echo(f"{len(r['shredded'])} case(s) shredded.")


def _run_sweep(
    obj: CliContext, rules_path: Path | None, today: date, dry_run: bool, as_json: bool
) -> dict[str, Any]:
    from referral_broker.retention_rules import load_rules

    rules = load_rules(rules_path)

    def progress(cases: list[str]) -> Any:
        if as_json:
            yield from cases
            return
        with click.progressbar(cases, label="Shredding", file=sys.stderr, show_pos=True) as bar:
            yield from bar

    return retention_lib.sweep(
        obj.settings,
        obj.bootstrap(),
        rules,
        today=today,
        dry_run=dry_run,
        shred_case=_sweep_shred(obj),
        progress=progress,
    )


@retention.command()
@click.option(
    "--dry-run", is_flag=True, help="Change nothing: list what would be shredded and what is skipped."
)
@click.option(
    "--now", "now", default=None, metavar="DATE", help="Judge due dates as of DATE (tests, previews)."
)
@rules_option
@json_option
@pass_cli
def sweep(obj: CliContext, dry_run: bool, now: str | None, rules_path: Path | None, as_json: bool) -> None:
    """Shred every case past its retention rule.

    Learns closures first (a district team closing or declining a case in its inbox, from the
    router's hub-signed audit), gives each newly closed case its due date under the rules, then
    shreds every case due, one by one, each exactly as 'retention shred' (audited first, all or
    nothing). Cases under legal hold are skipped and named with the hold. Exits 3 when Kafka
    does not answer (nothing is shredded; mid-sweep: the sweep stops there); a case whose own
    shred fails is listed and the rest go on (exit: that error's code).
    """
    result = _run_sweep(obj, rules_path, _today(now), dry_run, as_json)
    emit(result, as_json, _show_sweep)
    if result["exit_code"]:
        sys.exit(result["exit_code"])


def _interval(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise click.BadParameter("a duration: 90s, 30m, 24h or 1d", param_hint="--every") from None
    if value <= 0:
        raise click.BadParameter("must be positive", param_hint="--every")
    return value


@retention.command()
@click.option(
    "--every", "every", default="24h", show_default=True, help="Time between sweeps: 90s, 30m, 24h, 1d."
)
@rules_option
@json_option
@pass_cli
def run(obj: CliContext, every: str, rules_path: Path | None, as_json: bool) -> None:
    """Sweep now and then every --every until stopped (Ctrl-C or SIGTERM ends it cleanly,
    never in the middle of a shred). A sweep that fails (Kafka away) is reported and tried again
    at the next interval. A cron line does the same: see the README."""
    seconds = _interval(every)
    stop = threading.Event()

    def stopping(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, stopping) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.is_set():
            try:
                result = _run_sweep(obj, rules_path, datetime.now(UTC).date(), False, as_json)
                emit(result, as_json, _show_sweep)
            except ReferralBrokerError as exc:
                click.echo(f"Error: retention sweep failed, next in {every}: {exc}", err=True)
            stop.wait(seconds)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    click.echo("retention run stopped.", err=True)


@retention.command()
@click.option("--live", is_flag=True, help="Also check the topics as the cluster has them (drift).")
@rules_option
@json_option
@pass_cli
def check(obj: CliContext, live: bool, rules_path: Path | None, as_json: bool) -> None:
    """Load and check the retention rules, and hold the topic plan's retention against them:
    a topic of records kept shorter than the longest rule, a topic of personal data in transit
    kept forever or longer than the longest rule, a topic role the rules do not class. Exits 1
    when anything is found."""
    from referral_broker.retention_rules import load_rules

    rules = load_rules(rules_path)
    findings = retention_lib.check_plan(obj.settings, rules, bootstrap=obj.bootstrap() if live else None)
    data = {"rules": rules.as_dict(), "findings": findings, "ok": not findings}

    def human(d: dict[str, Any]) -> None:
        r = d["rules"]
        click.echo(f"Retention rules {r['version']} ({r['reviewed']}), from {r['path']}:")
        for rule in r["rules"]:
            when = (
                "every case"
                if not rule["when_any"]
                else "; ".join(f"{p} in {', '.join(map(str, v))}" for p, v in rule["when_any"].items())
            )
            clocks = (
                [f"{rule['years_after_closure']} years after closure"] if rule["years_after_closure"] else []
            )
            clocks += [f"until birthday {rule['until_birthday']}"] if rule["until_birthday"] else []
            click.echo(f"  {rule['record_type']:<18} {' or '.join(clocks):<40} when {when}")
        click.echo(f"A case's clock starts when a district team sends: {', '.join(r['closing_statuses'])}.")
        if not d["findings"]:
            click.echo(f"Every topic's retention fits the rules (longest rule: {r['longest_years']} years).")
            return
        for f in d["findings"]:
            click.echo(f"  {f['topic']}: {f['problem']}")
        click.echo(f"{len(d['findings'])} topic(s) do not fit the retention rules.")

    emit(data, as_json, human)
    if findings:
        sys.exit(1)
