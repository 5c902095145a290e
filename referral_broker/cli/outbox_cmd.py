"""``referral-broker outbox status|flush``: what a party's outbox still holds, and delivering it."""

from __future__ import annotations

from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table

party_option = click.option("--as", "party", required=True, help="The sending party, e.g. schools.")


def reach(obj: CliContext) -> tuple[str, str | None]:
    """(bootstrap, None), or (the configured address, why not) when the cluster cannot be
    reached or the local broker not started: the outbox then keeps everything queued."""
    from referral_broker.errors import BrokerError

    try:
        return obj.bootstrap(), None
    except BrokerError as exc:
        return obj.settings.bootstrap_servers, str(exc)


@click.group()
def outbox() -> None:
    """A party's durable outbox: sealed messages kept until Kafka acknowledges them."""


@outbox.command()
@party_option
@json_option
@pass_cli
def status(obj: CliContext, party: str, as_json: bool) -> None:
    """Count queued and delivered messages and list the queued ones (no connection made)."""
    from referral_broker.producers.sending import outbox_status

    data = outbox_status(obj.settings, party)

    def human(d: dict[str, Any]) -> None:
        counts = d["counts"]
        click.echo(f"{d['party']}: {counts['queued']} queued, {counts['delivered']} delivered ({d['path']})")
        if d["queued"]:
            rows = [[q["referral_id"], str(q["version"]), q["kind"]] for q in d["queued"]]
            click.echo(table(rows, ["referral", "v", "kind"]))

    emit(data, as_json, human)


@outbox.command()
@party_option
@click.option(
    "--every",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Keep running: deliver whatever is queued every SECONDS (backing off while the cluster is away) "
    "until interrupted.",
)
@click.option(
    "--metrics-port", type=int, default=None, metavar="PORT",
    help="With --every: serve the adapter metrics (sent, bytes, delivery time, failures) on 127.0.0.1:PORT/metrics.",
)
@json_option
@pass_cli
def flush(obj: CliContext, party: str, every: float | None, metrics_port: int | None, as_json: bool) -> None:
    """Deliver every queued message once. Exits with DeliveryPendingError's code when some
    are still queued (the cluster could not be reached)."""
    from referral_broker.producers.sending import OutboxDrain, flush_outbox, pending_message

    if metrics_port is not None:
        if every is None:
            raise click.UsageError("--metrics-port needs --every (a one-off flush ends before any scrape)")
        from referral_broker.producers.adapter_metrics import SEND_METRICS

        SEND_METRICS.serve(metrics_port)
    if every is not None:
        _drain_until_stopped(OutboxDrain(obj.settings, obj.settings.bootstrap_servers, party, interval_s=every))
        return
    bootstrap, offline = reach(obj)
    report = flush_outbox(obj.settings, bootstrap, party, offline=offline)
    data = {
        "delivered": [rid for _, rid, _ in report.delivered],
        "found_already_delivered": report.found,
        "queued": [rid for _, rid, _ in report.queued],
    }

    def human(d: dict[str, Any]) -> None:
        click.echo(f"{len(d['delivered'])} delivered, {len(d['queued'])} queued.")
        if d["found_already_delivered"]:
            click.echo(
                f"{d['found_already_delivered']} sent by an interrupted run were already on the cluster.",
                err=True,
            )

    emit(data, as_json, human)
    if report.queued:
        from referral_broker.errors import DeliveryPendingError

        raise DeliveryPendingError(pending_message(len(report.delivered), len(report.queued), party, report.error))


def _drain_until_stopped(drain: Any) -> None:
    """Run a drain in the foreground; SIGTERM or Ctrl-C stops it after the current pass."""
    import signal

    previous = signal.signal(signal.SIGTERM, lambda *_: drain.stop(timeout_s=0))
    try:
        drain.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(f"{drain.delivered} delivered while draining.", err=True)
