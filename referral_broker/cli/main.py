"""Entry point. Commands load lazily (``COMMANDS``) so ``kafka status`` does not import Avro
and crypto; every expected failure becomes one line on stderr and the error's exit code here,
in one place. Exit codes: the error's own (the tree in ``referral_broker/errors.py``, the README's
"Exit codes" table); 2 is click's usage error, 130 an interrupt, 1 a check that said no or an
unexpected crash (left to Python, with its traceback, so a bug is not mistaken for an expected
failure)."""

from __future__ import annotations

import importlib
import sys

import click

from referral_broker import __version__
from referral_broker.cli.context import CliContext
from referral_broker.config import load_settings
from referral_broker.errors import ReferralBrokerError
from referral_broker.structured_log import configure

# name -> "module:attribute"; adding a command group is one line here plus its module.
COMMANDS: dict[str, str] = {
    "kafka": "referral_broker.cli.kafka_cmd:kafka",
    "topics": "referral_broker.cli.topics_cmd:topics",
    "keys": "referral_broker.cli.keys_cmd:keys",
    "retention": "referral_broker.cli.retention_cmd:retention",
    "bench": "referral_broker.cli.bench_cmd:bench",
    "policy": "referral_broker.cli.policy_cmd:policy",
    "route": "referral_broker.cli.route_cmd:route",
    "dlq": "referral_broker.cli.dlq_cmd:dlq",
    "send": "referral_broker.cli.send_cmd:send",
    "outbox": "referral_broker.cli.outbox_cmd:outbox",
    "demo": "referral_broker.cli.demo_cmd:demo",
    "receive": "referral_broker.cli.send_cmd:receive",
    "schemas": "referral_broker.cli.schemas_cmd:schemas",
    "validate": "referral_broker.cli.validate_cmd:validate_cmd",
    "synth": "referral_broker.cli.synth_cmd:synth",
    "inbox": "referral_broker.cli.inbox_cmd:inbox",
    "orgs": "referral_broker.cli.orgs_cmd:orgs",
    "audit": "referral_broker.cli.audit_cmd:audit",
    "acl": "referral_broker.cli.acl_cmd:acl",
    "status": "referral_broker.cli.status_cmd:status",
    "tail": "referral_broker.cli.tail_cmd:tail",
    "export": "referral_broker.cli.export_cmd:export",
    "objections": "referral_broker.cli.objections_cmd:objections",
    "setup": "referral_broker.cli.setup_cmd:setup",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="referral-broker")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="JSON logs on stderr at this level (payloads are never logged).",
)
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, log_level: str) -> None:
    """Multi-agency Early Help referral broker on Apache Kafka."""
    from pathlib import Path

    configure(log_level)
    settings = load_settings(Path(config_file) if config_file else None)
    ctx.obj = CliContext(settings=settings)


def main(argv: list[str] | None = None) -> object:
    """The ``referral-broker`` program: the process is the command's own."""
    from referral_broker.startup_heap import own_process

    own_process()
    try:
        rc = cli.main(args=argv, prog_name="referral-broker", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ReferralBrokerError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    # standalone_mode=False hands back a command's exit code instead of exiting with it
    if isinstance(rc, int) and rc:
        sys.exit(rc)
    return rc


if __name__ == "__main__":
    main()
