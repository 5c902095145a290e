"""State shared by commands through ``ctx.obj`` and the one way they print results."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from referral_broker.config import Settings

T = TypeVar("T")

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


@dataclass
class CliContext:
    settings: Settings
    _bootstrap: str | None = field(default=None, repr=False)

    def bootstrap(self) -> str:
        """The cluster to use, starting the local broker only when none is configured."""
        if self._bootstrap is None:
            from referral_broker.cluster.runtime import ensure_broker

            self._bootstrap = ensure_broker(self.settings)
            self._read_registry(self._bootstrap)
        return self._bootstrap

    def _read_registry(self, bootstrap: str) -> None:
        """Know the parties the cluster knows (the organisation registry topic). A cluster
        that cannot be read now leaves the shipped county in place: only the router decides
        who receives what, and it always reads the registry itself."""
        from referral_broker.errors import BrokerError
        from referral_broker.parties import use_cluster_registry

        with contextlib.suppress(BrokerError):
            use_cluster_registry(self.settings, bootstrap)


    def audit_change(self, event: dict[str, Any], *, key: str) -> dict[str, Any]:
        """Audit an ACL, organisation or key change (``admin_audit.record_change``); says on
        stderr when it could not be (no hub key store on this machine)."""
        from referral_broker.admin_audit import record_change

        done = record_change(self.settings, self.bootstrap(), event, key=key)
        if not done["audited"]:
            click.echo(f"warning: not audited: {done['why']}", err=True)
        return done


pass_cli = click.make_pass_decorator(CliContext)


def emit(data: T, as_json: bool, human: Callable[[T], None]) -> None:
    """Print ``data`` as JSON or through ``human``: both views come from the same data."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str, sort_keys=False))
    else:
        human(data)


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[object]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])
