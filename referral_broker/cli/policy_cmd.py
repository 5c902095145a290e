"""``referral-broker policy check|explain|diff``: the sharing policy as a DPO reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from referral_broker.cli.context import emit, json_option, table
from referral_broker.policy import load_policy
from referral_broker.policy.review import diff, explain

policy_file = click.option(
    "--policy",
    "policy_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Policy file (default: the shipped sharing_policy.toml).",
)


@click.group()
def policy() -> None:
    """The sharing policy: who gets which fields, for what purpose, on what ground."""


@policy.command()
@policy_file
@json_option
def check(policy_path: Path | None, as_json: bool) -> None:
    """Load and check the policy (file, line and problem on failure)."""
    pol = load_policy(policy_path)
    data: dict[str, Any] = {
        "policy": pol.source,
        "version": pol.version,
        "purposes": len(pol.purposes),
        "recipients": pol.recipients(),
    }
    emit(
        data,
        as_json,
        lambda d: click.echo(
            f"{d['policy']}: OK, {d['purposes']} purposes for {len(d['recipients'])} recipients."
        ),
    )


@policy.command("explain")
@click.option(
    "--recipient",
    required=True,
    help="A recipient rule (child_school, gp_practice, service_provider, named_charity, police_force, dwp, "
    "district_team) or an organisation (school:110123, district-fenland).",
)
@policy_file
@json_option
def explain_cmd(recipient: str, policy_path: Path | None, as_json: bool) -> None:
    """Every field RECIPIENT gets, under which conditions and ground, and every field it does not."""
    data = explain(load_policy(policy_path), recipient)

    def human(d: dict[str, Any]) -> None:
        who = d.get("rule") or d.get("name")
        click.echo(
            f"Recipient: {d['recipient']}: {who}  (policy {d['policy']}, version {d['policy_version']})\n"
        )
        if not d["purposes"]:
            click.echo("No purpose names this recipient: it receives nothing (default deny).")
        for p in d["purposes"]:
            click.echo(f"Purpose {p['name']} (line {p['line']}): {p['description']}")
            click.echo(f"  ground: {p['ground']}")
            if p["special_category_condition"]:
                click.echo(f"  special category condition: {p['special_category_condition']}")
            conds = " and ".join(p["when_all"]) + (" and " if p["when_all"] and p["when_any"] else "")
            conds += ("any of " + ", ".join(p["when_any"])) if p["when_any"] else ""
            click.echo(f"  when: {conds or 'always'}")
            consent = (
                "consent to a service it provides"
                if p["consent"] == "required"
                else "not required (council service)"
            )
            click.echo(
                f"  consent: {consent}; without consent only with an override on: {', '.join(p['override_grounds']) or 'never'}\n"
            )
        rows = [
            [
                f["path"],
                f["data_class"],
                ", ".join(f["purposes"]),
                "no onward sharing" if f["no_onward_sharing"] else "",
            ]
            for f in d["fields"]
        ]
        click.echo(f"Fields it gets ({len(rows)}):")
        click.echo(table(rows, ["field", "class", "purposes", "marks"]) if rows else "  none")
        click.echo(f"\nFields it never gets ({len(d['not_shared'])}):")
        click.echo(table([[f["path"], f["data_class"]] for f in d["not_shared"]], ["field", "class"]))

    emit(data, as_json, human)


@policy.command("diff")
@click.argument("old", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("new", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def diff_cmd(old: Path, new: Path, as_json: bool) -> None:
    """What changing the policy from OLD to NEW would start or stop sharing, per recipient."""
    data = diff(load_policy(old), load_policy(new))

    def human(d: dict[str, Any]) -> None:
        if not d["recipients"]:
            click.echo("No change to what any recipient receives.")
        for recipient, entry in d["recipients"].items():
            click.echo(f"{recipient}:")
            for path in entry["starts_sharing"]:
                click.echo(f"  + starts receiving {path}")
            for path in entry["stops_sharing"]:
                click.echo(f"  - stops receiving {path}")
            for t in entry["purpose_changes"]:
                click.echo(
                    f"  ~ purpose {t['purpose']} {t['change']}"
                    + (f": {', '.join(t['keys'])}" if t.get("keys") else "")
                )

    emit(data, as_json, human)
