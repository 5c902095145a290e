"""``referral-broker synth --count N``: realistic, valid, entirely fake referrals as JSON lines."""

from __future__ import annotations

import datetime as dt
import json
from typing import IO

import click

from referral_broker.schemas import registry
from referral_broker.schemas.json_form import to_json_form
from referral_broker.schemas.synth import DEFAULT_ANCHOR, synthetic_referrals


@click.command()
@click.option("--count", type=click.IntRange(min=0), required=True, help="How many referrals.")
@click.option("--seed", type=int, default=None, help="Seed: the same seed gives the same referrals.")
@click.option(
    "--as-of",
    "as_of",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help=f"Referrals are created in the 90 days before this date (default {DEFAULT_ANCHOR.date()}).",
)
@click.option(
    "--out", type=click.File("w", encoding="utf-8"), default="-", help="Output file (default: stdout)."
)
def synth(count: int, seed: int | None, as_of: dt.datetime | None, out: IO[str]) -> None:
    """Write COUNT synthetic canonical referrals as JSON lines (valid check digits, fake data)."""
    anchor = as_of.replace(tzinfo=dt.UTC) if as_of else DEFAULT_ANCHOR
    schema = registry.referral_schema()
    for referral in synthetic_referrals(count, seed, anchor):
        out.write(json.dumps(to_json_form(referral, schema), ensure_ascii=False) + "\n")
