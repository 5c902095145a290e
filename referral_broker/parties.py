"""The parties on the broker, read from ``parties.toml`` (data, reviewed like the policy)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from referral_broker.errors import ConfigError

KINDS = ("hub", "partner", "district_team", "research")
_NAME = re.compile(r"^[a-z][a-z0-9-]{1,40}$")


@dataclass(frozen=True)
class Party:
    name: str
    kind: str
    description: str

    @property
    def sends(self) -> bool:
        """Parties with an intake topic: partners and the district teams (status, referrals)."""
        return self.kind in ("partner", "district_team")

    @property
    def receives(self) -> bool:
        return self.kind in ("partner", "district_team", "research")


@cache
def all_parties() -> dict[str, Party]:
    text = resources.files("referral_broker").joinpath("parties.toml").read_text("utf-8")
    parties: dict[str, Party] = {}
    for name, entry in tomllib.loads(text).items():
        if not _NAME.match(name):
            raise ConfigError(f"parties.toml: party name '{name}' must be lower-case letters, digits, '-'")
        if entry.get("kind") not in KINDS:
            raise ConfigError(
                f"parties.toml: party '{name}' has kind {entry.get('kind')!r}, not one of {KINDS}"
            )
        parties[name] = Party(name, entry["kind"], entry.get("description", ""))
    return parties


def get_party(name: str) -> Party:
    try:
        return all_parties()[name]
    except KeyError:
        known = ", ".join(sorted(all_parties()))
        raise ConfigError(f"unknown party '{name}'; known parties: {known}") from None


HUB = "council"
