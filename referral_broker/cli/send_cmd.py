"""``referral-broker send`` and ``receive``: a partner's two verbs, thin over
``producers.sending.PartnerSender`` and the receiver."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table
from referral_broker.errors import ReferralBrokerError


@click.command()
@click.option("--as", "party", required=True, help="The sending organisation: kind:identifier (school:110123) or its party name (school-110123).")
@click.option("--file", "path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["native", "canonical"]),
    default="native",
    show_default=True,
    help="native: the partner's own format; canonical: JSON lines as 'synth' writes.",
)
@click.option("--skip-invalid", is_flag=True, help="Send the valid records and report each rejected one.")
@click.option(
    "--metrics-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Add this run's adapter metrics (records read, refused by reason, sent, bytes, time) to this "
    "Prometheus text file, for node_exporter's textfile collector. Counts only, no identifier.",
)
@json_option
@pass_cli
def send(
    obj: CliContext, party: str, path: Path, fmt: str, skip_invalid: bool, metrics_file: Path | None, as_json: bool
) -> None:
    """Validate every record of FILE, seal each for the council's hub, sign it, keep it in the
    party's outbox and send it.

    The whole file is checked before anything connects to Kafka: nothing is sent when any record
    is invalid, unless --skip-invalid. A referral (id, version) already sent from this outbox is
    not sent again. When the cluster cannot be reached, or fails mid-file, the rest stays in the
    outbox: the command prints "N delivered, M queued" and exits with DeliveryPendingError's
    code; 'referral-broker outbox flush' delivers them. Prints the delivered referral ids.

    A native file of 4 MB or more is checked and sealed by worker processes, one a core
    ([send] workers, REFERRAL_BROKER_SEND_WORKERS; 1: none), in the same order.
    """
    from tqdm import tqdm

    from referral_broker.cli.outbox_cmd import reach
    from referral_broker.producers.adapter_metrics import SEND_METRICS
    from referral_broker.producers.checked import check_file
    from referral_broker.producers.sending import PartnerSender
    from referral_broker.startup_heap import freeze_startup_heap

    if metrics_file is not None:  # written however the run ends
        before = SEND_METRICS.snapshot()
        click.get_current_context().call_on_close(lambda: SEND_METRICS.write_textfile(metrics_file, since=before))

    try:
        checking = tqdm(desc="checking", unit="rec", disable=as_json, leave=False)
        with checking:
            checked = check_file(
                party,
                path,
                fmt=fmt,
                skip_invalid=skip_invalid,
                on_checked=lambda n: checking.update(n - checking.n),
                settings=obj.settings,
            )
        # Only now, with the file known good, is a broker started or a connection made.
        bootstrap, offline = reach(obj)
        sender = PartnerSender(obj.settings, bootstrap, party, offline=offline)
        freeze_startup_heap()
        with tqdm(desc=f"sending as {party}", unit="ref", disable=as_json, leave=False, total=checked.total) as bar:
            report = sender.send_checked(checked, progress=bar.update)
    except ReferralBrokerError as exc:
        if as_json:  # a JSON error object on stdout, with the dry run's fields (validate --as)
            from referral_broker.cli.validate_cmd import send_failure_report

            emit(send_failure_report(party, path, fmt, exc, obj.settings), True, print)
        raise
    data = {
        "delivered": [s.referral_id for s in report.delivered],
        "queued": [s.referral_id for s in report.queued],
        "already_sent": [s.referral_id for s in report.already_sent],
        "rejected": report.rejected,
    }

    def human(d: dict[str, Any]) -> None:
        for line in d["rejected"]:
            click.echo(f"rejected: {line}", err=True)
        for rid in d["delivered"]:
            click.echo(rid)
        click.echo(
            f"{len(d['delivered'])} delivered, {len(d['queued'])} queued as {party}; "
            f"{len(d['already_sent'])} already sent, {len(d['rejected'])} rejected.",
            err=True,
        )

    emit(data, as_json, human)
    report.raise_if_pending(party)


@click.command()
@click.option("--as", "party", required=True, help="The receiving organisation, e.g. police:35, school:110123 or district-fenland.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write what arrived in the party's native format (JSON lines where it has none).",
)
@click.option(
    "--stop-when-idle",
    type=float,
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="Stop after this many seconds with nothing new.",
)
@click.option("--all", "from_start", is_flag=True, help="Read everything on the topic, not only what is new.")
@json_option
@pass_cli
def receive(
    obj: CliContext, party: str, out_dir: Path | None, stop_when_idle: float, from_start: bool, as_json: bool
) -> None:
    """Receive what was routed to PARTY: verified, opened with its own key, with the fields
    withheld from it named. Only messages the council's hub signed, addressed to PARTY, on
    PARTY's out topic are accepted; anything else is refused with the reason (exit 1). A message
    PARTY already received (a replayed or re-delivered copy, also under --all) is reported as a
    duplicate and not delivered again."""
    from referral_broker.consumers.receiving import (
        Duplicate,
        PartnerReceiver,
        Received,
        Refused,
        json_default,
    )
    from referral_broker.schemas.registry import flatten

    client = PartnerReceiver(obj.settings, obj.bootstrap(), party)
    items = list(client.receive(stop_when_idle=stop_when_idle, group=None if from_start else "default"))
    good = [i for i in items if isinstance(i, Received)]
    refused = [i for i in items if isinstance(i, Refused)]
    duplicates = [i for i in items if isinstance(i, Duplicate)]
    written = [str(p) for p in client.render(good, out_dir)] if out_dir else []
    data = {
        "received": [
            {
                "referral_id": i.referral_id,
                "version": i.version,
                "kind": i.kind,
                "from": i.sender,
                "referrer": i.referrer,
                "record": i.record,
                "withheld": sorted(i.withheld),
                "no_onward_sharing": list(i.no_onward_sharing),
            }
            for i in good
        ],
        "refused": [r.__dict__ for r in refused],
        "duplicates": [d.__dict__ for d in duplicates],
        "written": written,
    }

    def human(d: dict[str, Any]) -> None:
        rows = [
            [
                r["referral_id"],
                str(r["version"]),
                r["kind"],
                r["referrer"] or r["from"],
                str(len(flatten(r["record"]))),
                str(len(r["withheld"])),
            ]
            for r in d["received"]
        ]
        click.echo(
            table(rows, ["referral", "v", "kind", "referrer", "fields", "withheld"])
            if rows
            else "Nothing new."
        )
        for r in d["refused"]:
            click.echo(f"refused {r['topic']}/{r['partition']}@{r['offset']}: {r['reason']}", err=True)
        for r in d["duplicates"]:
            click.echo(
                f"duplicate {r['topic']}/{r['partition']}@{r['offset']}: {r['kind']} {r['referral_id']} "
                f"v{r['version']} was already received; not delivered again",
                err=True,
            )
        for path in d["written"]:
            click.echo(f"wrote {path}")

    if as_json:
        click.echo(json.dumps(data, indent=2, default=json_default))
    else:
        emit(data, False, human)
    if refused:
        raise click.exceptions.Exit(1)

