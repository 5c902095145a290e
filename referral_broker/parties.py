"""The parties on the broker: the council's hub plus every organisation in the registry.

A party is one organisation (``school-110123``, ``nhs-z90001``, ``police-35``, ``dwp``,
``charity-1190001``, ``district-fenland``, ``ons``) or the hub (``council``). Partner kinds
(``schools``, ``health``, ...) are the adapters' formats and the policy's vocabulary, never a
party: nothing is ever sent to a kind.

The organisations come from a :class:`~referral_broker.organisations.Registry` snapshot. Until
a process installs one (:func:`use_registry`, or :func:`use_cluster_registry` which reads the
registry topic), the snapshot is the shipped demo county (``organisations.toml``), so code with
no cluster (``policy explain``, ``validate``) still knows its parties.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from referral_broker.errors import ConfigError, RegistryError
from referral_broker.organisations import (
    PARTNER_FORMATS,
    Organisation,
    OrgKind,
    Registry,
    load_file,
    load_registry,
    ref_party,
)

if TYPE_CHECKING:
    from referral_broker.config import Settings

KINDS = ("hub", "partner", "district_team", "research")
HUB = "council"
HUB_DESCRIPTION = "The council's Early Help hub: runs the router, holds the case keys"


@dataclass(frozen=True)
class Party:
    name: str
    kind: str  # hub | partner | district_team | research
    description: str  # the organisation's name
    format: str | None = None  # the partner format it sends and receives natively
    org: Organisation | None = None

    @property
    def active(self) -> bool:
        return self.org is None or self.org.active

    @property
    def sends(self) -> bool:
        """Parties with an intake topic: partners and the district teams (status, referrals)."""
        return self.kind in ("partner", "district_team")

    @property
    def receives(self) -> bool:
        return self.kind in ("partner", "district_team", "research")

    @property
    def label(self) -> str:
        """What people read: ``Fenland Fields Primary School (school-110123)``."""
        return f"{self.description} ({self.name})"


def _party_kind(org: Organisation) -> str:
    if org.kind is OrgKind.DISTRICT_TEAM:
        return "district_team"
    if org.kind is OrgKind.RESEARCH:
        return "research"
    return "partner"


class _Snapshot:
    """The installed registry and the parties built from it; replaced whole, never edited."""

    def __init__(self, registry: Registry, generation: int) -> None:
        self.registry = registry
        self.generation = generation
        self.parties: dict[str, Party] = {HUB: Party(HUB, "hub", HUB_DESCRIPTION)}
        for org in registry.organisations():
            self.parties[org.party] = Party(org.party, _party_kind(org), org.name, org.partner_format, org)


_lock = threading.Lock()
_current: _Snapshot | None = None


def _snapshot() -> _Snapshot:
    global _current
    snap = _current
    if snap is None:
        with _lock:
            if _current is None:
                _current = _Snapshot(Registry(load_file()), 0)
            snap = _current
    return snap


def use_registry(registry: Registry) -> Registry:
    """Install ``registry`` as this process's parties (a router after each catch-up)."""
    global _current
    with _lock:
        previous = _current.generation if _current is not None else 0
        if _current is None or _current.registry != registry:
            _current = _Snapshot(registry, previous + 1)
    return registry


def use_shipped_registry() -> Registry:
    """Back to the shipped demo county (tests start from it)."""
    return use_registry(Registry(load_file()))


def use_cluster_registry(settings: Settings, bootstrap: str) -> Registry:
    """Read the registry topic and install it. A registry topic that is missing or empty is
    an error for the commands that need parties, not a silent fall back to the demo county."""
    return use_registry(load_registry(settings, bootstrap))


def current_registry() -> Registry:
    return _snapshot().registry


def generation() -> int:
    """Changes whenever a different registry is installed (caches keyed on parties use it)."""
    return _snapshot().generation


def all_parties() -> dict[str, Party]:
    return _snapshot().parties


def party_name(text: str) -> str:
    """The party a reference names: ``council``, a party name, or ``kind:identifier``
    (``school:110123``). A partner kind is refused with what to write instead."""
    raw = str(text).strip()
    if raw in (HUB, "hub"):
        return HUB
    if raw == "dwp":  # the one format that is also an organisation's party name
        return raw
    if raw in PARTNER_FORMATS or raw in ("district_team", "district"):
        raise ConfigError(
            f"'{raw}' is a partner kind, not a party: name the organisation, e.g. school:110123 "
            "('referral-broker orgs list')"
        )
    try:
        return ref_party(raw)
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None


def get_party(name: str) -> Party:
    """The party a name or reference stands for; :class:`ConfigError` when not registered."""
    parties = all_parties()
    found = parties.get(name)
    if found is not None:
        return found
    resolved = party_name(name)
    found = parties.get(resolved)
    if found is None:
        raise ConfigError(f"unknown party '{resolved}': not in the organisation registry ('referral-broker orgs list')")
    return found


def format_of(name: str) -> str | None:
    """The native partner format of a party, known before any connection: the installed
    registry's entry, else the default format of the reference's organisation kind."""
    found = all_parties().get(name)
    if found is None:
        try:
            found = get_party(name)
        except ConfigError:
            from referral_broker.organisations import KINDS, parse_ref

            try:
                return KINDS[parse_ref(party_name(name))[0]].partner_format
            except RegistryError as exc:
                raise ConfigError(str(exc)) from None
    return found.format


def require_sender(name: str) -> Party:
    """A party that may send now: registered, active, with an intake topic."""
    party = get_party(name)
    if not party.active:
        raise ConfigError(f"organisation {party.name} is disabled ('referral-broker orgs enable {party.name}')")
    if not party.sends:
        raise ConfigError(f"party {party.name} ({party.kind}) does not send referrals")
    return party
