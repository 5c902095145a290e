"""``referral-broker kafka start|stop|status``: the local broker, or the configured cluster;
``kafka transactions``: the open ones, and those that hang."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table
from referral_broker.cluster.runtime import (
    BrokerStatus,
    ClusterStatus,
    LocalBroker,
    LocalCluster,
    remote_status,
    write_compose_files,
)


def _show(status: BrokerStatus) -> None:
    where = "local broker" if status.managed else "configured cluster"
    if status.answering:
        click.echo(
            f"Kafka ({where}) is answering at {status.bootstrap}; {status.topics} topics; "
            f"this machine's clients use {status.security}."
        )
    elif status.running:
        click.echo(f"Kafka ({where}) is running (pid {status.pid}) but not answering at {status.bootstrap}.")
    else:
        click.echo(f"Kafka ({where}) is not running at {status.bootstrap}.")
    if status.problem and not status.answering:
        click.echo(f"  {status.problem}")


def _show_cluster(status: ClusterStatus) -> None:
    state = "answering" if status.answering else "not answering"
    click.echo(
        f"Kafka (local cluster of {len(status.nodes)} nodes) is {state} at {status.bootstrap}; "
        f"{status.topics if status.topics is not None else '?'} topics; live brokers {status.brokers}; "
        f"clients use {status.security}."
    )
    for n in status.nodes:
        run = f"running (pid {n.pid})" if n.running else "stopped"
        led = f", leads {n.leaders} partitions" if n.leaders is not None else ""
        click.echo(f"  node {n.node} [{n.roles}] {n.bootstrap} (controller {n.controller}): {run}, "
                   f"{'answering' if n.answering else 'not answering'}{led}")
    if status.problem:
        click.echo(f"  {status.problem}")


def _cluster(obj: CliContext, nodes: int | None = None) -> LocalCluster:
    if not obj.settings.uses_local_broker:
        raise click.UsageError("KAFKA_BOOTSTRAP_SERVERS is set; there is no local cluster here")
    return LocalCluster(obj.settings, nodes)


@click.group()
def kafka() -> None:
    """Run a real single-node Apache Kafka locally (KRaft, no Docker), or inspect the cluster."""


@kafka.command()
@click.option(
    "--insecure",
    is_flag=True,
    help="A plaintext listener with no authentication or ACLs, for debugging only.",
)
@click.option("--fresh", is_flag=True, help="Delete the local broker's data (every topic) before starting.")
@click.option(
    "--nodes",
    type=click.IntRange(min=1, max=9),
    default=None,
    help="Run a local cluster of this many KRaft nodes (e.g. 3: replication 3, min ISR 2), each on "
    "two ports from REFERRAL_BROKER_LOCAL_PORT up, instead of the single broker.",
)
@click.option("--node", type=int, default=None, help="Start only this node of the local cluster (after 'stop --node').")
@json_option
@pass_cli
def start(
    obj: CliContext, insecure: bool, fresh: bool, nodes: int | None, node: int | None, as_json: bool
) -> None:
    """Start the local broker (idempotent) and wait until it answers.

    Secured by default: TLS with a local CA, SCRAM-SHA-512 logins, ACLs enforced (nothing is
    allowed without one), a controller reachable only with the broker's certificate. The
    administrator's client settings are written to client.toml in the broker's folder (0600);
    local commands find them by the port. Fetches Kafka's jars into the cache folder on first
    use. Refuses when KAFKA_BOOTSTRAP_SERVERS is set: that cluster is used and nothing is started.
    """
    if nodes is not None or node is not None:
        cluster = _cluster(obj, nodes)
        cs = cluster.start_node(node) if node is not None else cluster.start(insecure=insecure, fresh=fresh)
        emit(cs.as_dict(), as_json, lambda _: _show_cluster(cs))
        return
    status = LocalBroker(obj.settings).start(insecure=insecure, fresh=fresh)
    emit(status.as_dict(), as_json, lambda _: click.echo(f"{status.bootstrap} ({status.security})"))


@kafka.command()
@click.option("--node", type=int, default=None, help="Stop only this node of the local cluster.")
@click.option("--kill", is_flag=True, help="With --node: SIGKILL (a crash) instead of a controlled shutdown.")
@json_option
@pass_cli
def stop(obj: CliContext, node: int | None, kill: bool, as_json: bool) -> None:
    """Stop the local broker, or the local cluster, if it runs (the data stays in the cache folder)."""
    if not obj.settings.uses_local_broker:
        raise click.UsageError("KAFKA_BOOTSTRAP_SERVERS is set; there is no local broker to stop")
    cluster = LocalCluster(obj.settings)
    if node is not None:
        if not cluster.exists():
            raise click.UsageError("there is no local cluster; --node applies to 'kafka start --nodes N'")
        cluster.stop_node(node, kill=kill)
        cs = cluster.status()
        emit(cs.as_dict(), as_json, lambda _: _show_cluster(cs))
        return
    if cluster.exists():
        cluster.stop()
    status = LocalBroker(obj.settings).stop()
    emit(status.as_dict(), as_json, lambda _: click.echo("Kafka (local broker) stopped."))


@kafka.command()
@json_option
@pass_cli
def status(obj: CliContext, as_json: bool) -> None:
    """Is the broker running and answering metadata requests? Exit 1 when it is not."""
    if obj.settings.uses_local_broker and LocalCluster(obj.settings).exists():
        cs = LocalCluster(obj.settings).status()
        emit(cs.as_dict(), as_json, lambda _: _show_cluster(cs))
        if not cs.answering:
            raise click.exceptions.Exit(1)
        return
    s = LocalBroker(obj.settings).status() if obj.settings.uses_local_broker else remote_status(obj.settings)
    emit(s.as_dict(), as_json, lambda _: _show(s))
    if not s.answering:
        raise click.exceptions.Exit(1)


@kafka.command("compose-files")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="kafka", show_default=True, help="The broker's name on the network.")
@click.option("--port", default=9092, show_default=True, help="The SASL_SSL listener.")
@click.option("--controller-port", default=9093, show_default=True, help="The mTLS controller listener.")
@click.option("--data-dir", default="/var/lib/kafka/data", show_default=True, help="log.dirs in the container.")
@click.option("--owner", type=int, default=None, help="Numeric uid (and gid) to own the files (the Kafka image's user).")
@click.option(
    "--nodes",
    type=click.IntRange(min=1, max=9),
    default=1,
    show_default=True,
    help="Nodes of the cluster: with 3, <host>-1..3 each get server-<i>.properties (ports PORT+2(i-1) and the next).",
)
@json_option
def compose_files(
    out: Path,
    host: str,
    port: int,
    controller_port: int,
    data_dir: str,
    owner: int | None,
    nodes: int,
    as_json: bool,
) -> None:
    """Write the secured broker's files for docker-compose.yml into OUT (idempotent): local CA,
    broker keystore, passwords, cluster id, server.properties, the administrator's client.toml
    and admin.properties. Every file 0600."""
    files = write_compose_files(
        out, host=host, port=port, controller_port=controller_port, data_dir=data_dir, owner=owner, nodes=nodes
    )
    emit([str(f) for f in files], as_json, lambda names: click.echo("\n".join(names)))


@kafka.command()
@click.option(
    "--older-than",
    type=click.FloatRange(min=0.0),
    default=None,
    metavar="SECONDS",
    help="Also count as hanging any transaction open longer than this (default: only those no "
    "coordinator will end: past their timeout, or unknown to it for 20 minutes).",
)
@click.option("--abort-hanging", is_flag=True, help="Write an abort marker for each hanging one (audited).")
@json_option
@pass_cli
def transactions(obj: CliContext, older_than: float | None, abort_hanging: bool, as_json: bool) -> None:
    """Open transactions on this deployment's partitions and the group offsets, and which hang.

    A transaction left open holds back everything after it from read_committed readers, and a
    router whose group offsets it holds routes nothing ("routing stalled" in its log). Exit 1
    while any hanging transaction is left (after --abort-hanging: any it could not abort).
    """
    from referral_broker.cluster import transactions as txns

    bootstrap = obj.bootstrap()
    found = txns.open_transactions(obj.settings, bootstrap, older_than_s=older_than)
    aborted = []
    if abort_hanging:
        for t in (t for t in found if t.hanging):
            txns.abort(obj.settings, bootstrap, t)
            aborted.append(t)
    data: dict[str, Any] = {
        "open": [t.as_dict() for t in found],
        "hanging": sum(t.hanging for t in found),
        "aborted": [t.as_dict() for t in aborted],
    }
    if aborted:
        data["audit"] = obj.audit_change(
            {
                "type": "transactions.aborted",
                "aborted": [
                    f"{t.topic}-{t.partition} producer {t.producer_id} epoch {t.producer_epoch} "
                    f"({t.transactional_id or 'unknown id'}): {t.why}"
                    for t in aborted
                ],
            },
            key="transactions",
        )

    def human(d: dict[str, Any]) -> None:
        if not found:
            click.echo("No open transactions.")
            return
        rows = [
            (
                f"{t.topic}-{t.partition}",
                t.transactional_id or "(unknown)",
                t.producer_id,
                f"{t.open_s:.0f}s",
                "HANGING" if t.hanging else "open",
                t.why,
            )
            for t in found
        ]
        click.echo(table(rows, ["partition", "transactional id", "producer", "open", "", "why"]))
        if aborted:
            click.echo(f"Aborted {len(aborted)} hanging transaction(s).")
        elif d["hanging"]:
            click.echo(f"{d['hanging']} hanging: 'referral-broker kafka transactions --abort-hanging' ends them.")

    emit(data, as_json, human)
    if data["hanging"] > len(aborted):
        raise click.exceptions.Exit(1)
