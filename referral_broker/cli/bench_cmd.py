"""``referral-broker bench ...``: micro-benchmarks that print figures (never asserted)."""

from __future__ import annotations

from typing import Any

import click

from referral_broker.cli.context import CliContext, emit, json_option, pass_cli, table


@click.group()
def bench() -> None:
    """Micro-benchmarks on synthetic data; figures are for this machine, this run."""


def _show_seal(data: dict[str, Any]) -> None:
    click.echo(
        f"Sealing a {data['schema']} referral ({data['sealing_units']} sealed fields, "
        f"{data['record_bytes']} bytes of Avro -> {data['sealed_message_bytes']} bytes sealed+signed), "
        f"{data['iterations']} iterations, best of 3:\n"
    )
    rows = [
        [name.replace("_", " "), f"{v['no_cache']:.1f}", f"{v['cache']:.1f}"]
        for name, v in data["per_referral_us"].items()
    ]
    click.echo(table(rows, ["per referral", "no DEK cache (µs)", "DEK cache (µs)"]))
    click.echo("")
    click.echo(
        table(
            [[k.replace("_", " "), f"{v:.1f}"] for k, v in data["primitives_us"].items()], ["primitive", "µs"]
        )
    )
    cache = data["dek_cache"]
    click.echo(
        f"\nDEK cache bound: {cache['max_uses']} uses / {cache['max_age_s']:.0f} s. "
        f"Throughput, 3 recipients with cache: ~{data['referrals_per_second_3_recipients_cached']} referrals/s "
        "on one core."
    )


@bench.command()
@click.option("--iterations", default=200, show_default=True, type=click.IntRange(1, 100_000))
@json_option
@pass_cli
def seal(obj: CliContext, iterations: int, as_json: bool) -> None:
    """Seal and open cost per referral (1 and 3 recipients, with and without the DEK cache)
    beside AES-GCM, X25519, HPKE, Ed25519 and Avro encode measured in the same run."""
    from referral_broker.sealing import bench as bench_lib

    emit(bench_lib.run(obj.settings, iterations=iterations), as_json, _show_seal)


@bench.command()
@click.option(
    "--count",
    default=2000,
    show_default=True,
    type=click.IntRange(50, 1_000_000),
    help="Referrals per measured run.",
)
@json_option
@pass_cli
def router(obj: CliContext, count: int, as_json: bool) -> None:
    """Router throughput on the real broker: primitive floor, raw kafka-python pass-through,
    router at 1 and 3 recipients, and the same without sealing/signing; ratios and peak RSS."""
    from referral_broker.consumers.router_bench import run

    progress = (lambda s: None) if as_json else (lambda s: click.echo(f"  measuring {s} ...", err=True))
    data = run(obj.settings, obj.bootstrap(), count=count, progress=progress)

    def human(d: dict[str, Any]) -> None:
        click.echo(f"Router benchmark, {d['count']} referrals per run:\n")
        click.echo(
            table(
                [[k.replace("_", " "), f"{v:,.1f}"] for k, v in d["referrals_per_second"].items()],
                ["referrals/s", "rate"],
            )
        )
        click.echo("")
        click.echo(
            table([[k.replace("_", " "), f"{v:.3f}"] for k, v in d["ratios"].items()], ["ratio", "value"])
        )
        click.echo(
            f"\nFloor: {d['floor_us_per_referral_3_recipients']:.0f} µs per referral (3 recipients). "
            f"Peak RSS {d['peak_rss_mb']} MB."
        )

    emit(data, as_json, human)
