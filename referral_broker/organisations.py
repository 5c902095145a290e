"""The organisation registry: every school, NHS organisation, police force, DWP, charity,
district team and research recipient is its own party, as data.

An :class:`Organisation` has a kind, its official identifier (DfE URN, ODS code, Home Office
force code, charity number; the project's own ids for DWP, district teams and research), a
name, the districts it serves and the services it provides (the Referral schema's ``District``
and ``Service`` symbols), the partner format it sends and receives natively, and a status.

**Party names** come from kind + identifier and are safe in Kafka topic names, key ids and
key-store file names: ``school-110123``, ``nhs-a81001``, ``police-35``, ``charity-1234567``,
``dwp``, ``district-fenland``, ``ons``. A reference (``parse_ref``) is either that party name or
``kind:identifier`` (``school:110123``, ``nhs:A81001``, ``charity:1234567-1``).

**Storage** is the compacted topic of role ``orgs`` (message key = party name, value = the
organisation as JSON). Writers append a whole new version; nothing is deleted (disabling writes
a version with ``status = "disabled"`` and the time). Readers take the latest value per key:
:func:`load_registry` reads the topic to its end once; a :class:`RegistryReader` keeps its
place and :meth:`RegistryReader.catch_up` applies only what was added since, so a long-running
router sees an ``orgs add`` or ``orgs disable`` at its next catch-up, with no restart. The
shipped ``organisations.toml`` (a synthetic county) seeds the topic through :func:`import_file`.

**Resolution** (:class:`Registry` methods, pure): ``school_by_urn``, ``nhs_by_ods``,
``service_for_district``, ``district_team`` and ``charity_for`` each return exactly one active
:class:`Organisation` or an :class:`Unresolved` with a reason fit for an audit record (it names
kinds, services and districts, never a person). None of them ever returns a list of a kind.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from referral_broker.config import Settings
from referral_broker.errors import BrokerError, RegistryError
from referral_broker.schemas.registry import named_types, referral_schema
from referral_broker.schemas.validation import STRING_RULES

FORMAT = 1
SHIPPED_FILE = "organisations.toml"


class OrgKind(StrEnum):
    SCHOOL = "school"
    NHS_ORGANISATION = "nhs_organisation"
    POLICE_FORCE = "police_force"
    DWP = "dwp"
    CHARITY = "charity"
    DISTRICT_TEAM = "district_team"
    RESEARCH = "research"


class OrgStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


# The native formats of the adapters (the Referral schema's PartnerKind, less district_team).
PARTNER_FORMATS = ("schools", "health", "dwp", "police", "charities")

_ODS = re.compile(r"^(?:[A-Z][0-9]{5}|(?=[A-Z0-9]*[A-Z])(?:[A-Z0-9]{3}|[A-Z0-9]{5}))$")
_FORCE = re.compile(r"^(?!00)[0-9]{2}$")
_RESEARCH = re.compile(r"^[a-z][a-z0-9-]{1,30}$")
_NAME_MAX = 120
# Party names that are not organisations: the hub, and the partner kinds parties.toml used to
# give one party each (a reference to one of them is a mistake, not a research recipient).
RESERVED_PARTIES = frozenset({"council", "hub", "schools", "health", "police", "charities", "district"})


@dataclass(frozen=True)
class KindRules:
    kind: OrgKind
    aliases: tuple[str, ...]  # accepted before ':' in a reference; aliases[0] is the short one
    prefix: str  # party name = prefix + identifier ("" for research, whose id is the name)
    identifier: str  # what the identifier is, for messages
    partner_format: str | None  # the native format by default


KINDS: dict[OrgKind, KindRules] = {
    r.kind: r
    for r in (
        KindRules(OrgKind.SCHOOL, ("school",), "school-", "DfE URN (6 digits)", "schools"),
        KindRules(
            OrgKind.NHS_ORGANISATION,
            ("nhs", "nhs_organisation"),
            "nhs-",
            "ODS code (GP practice: a letter and 5 digits, e.g. A81001; trust or service: "
            "3 or 5 letters and digits, e.g. RGT or RGT01)",
            "health",
        ),
        KindRules(
            OrgKind.POLICE_FORCE,
            ("police", "police_force"),
            "police-",
            "Home Office force code (2 digits, e.g. 35)",
            "police",
        ),
        KindRules(OrgKind.DWP, ("dwp",), "", "the fixed id 'dwp'", "dwp"),
        KindRules(
            OrgKind.CHARITY,
            ("charity",),
            "charity-",
            "registered charity number (6 to 8 digits, '-N' for a linked charity)",
            "charities",
        ),
        KindRules(
            OrgKind.DISTRICT_TEAM,
            ("district", "district_team"),
            "district-",
            "the district it serves (e.g. fenland, east-cambs)",
            None,
        ),
        KindRules(
            OrgKind.RESEARCH,
            ("research",),
            "",
            "the project's own id (lower-case letters, digits, '-', e.g. ons)",
            None,
        ),
    )
}
_ALIASES = {alias: r.kind for r in KINDS.values() for alias in (*r.aliases, r.kind.value)}

SERVICE_LABELS = {
    "school_nurse": "school nursing",
    "youth_worker": "youth work",
    "emotional_health_wellbeing": "emotional health and wellbeing",
    "health_visitor": "health visiting",
    "neet_support": "NEET support",
    "caring_together": "Caring Together",
    "childrens_centres": "children's centres",
    "citizens_advice": "Citizens Advice",
    "family_support": "family support",
    "drug_alcohol_support": "drug and alcohol support",
    "parenting_programme": "parenting programme",
}


@cache
def _enum(name: str) -> tuple[str, ...]:
    return tuple(named_types(referral_schema())[f"earlyhelp.referral.{name}"]["symbols"])


def districts() -> tuple[str, ...]:
    """The Referral schema's ``District`` symbols (``east_cambs``, not ``east-cambs``)."""
    return _enum("District")


def services() -> tuple[str, ...]:
    """The Referral schema's ``Service`` symbols (the items of ``services_requested``)."""
    return _enum("Service")


def service_label(service: str) -> str:
    return SERVICE_LABELS.get(service, service.replace("_", " "))


# -- validation ----------------------------------------------------------------------------
def parse_kind(text: str) -> OrgKind:
    kind = _ALIASES.get(str(text).strip().lower())
    if kind is None:
        known = ", ".join(k.value for k in OrgKind)
        raise RegistryError(f"unknown organisation kind {str(text)[:40]!r}; kinds: {known}")
    return kind


def normalise_district(text: str) -> str:
    """A district symbol from ``fenland``, ``east-cambs`` or ``east_cambs``."""
    value = str(text).strip().lower().replace("-", "_")
    if value not in districts():
        known = ", ".join(districts())
        raise RegistryError(f"unknown district {str(text)[:40]!r}; districts: {known}")
    return value


def normalise_service(text: str) -> str:
    value = str(text).strip().lower().replace("-", "_")
    if value not in services():
        known = ", ".join(services())
        raise RegistryError(f"unknown service {str(text)[:40]!r}; services: {known}")
    return value


def normalise_identifier(kind: OrgKind, text: str) -> str:
    """The identifier in its one stored form, or :class:`RegistryError` saying what it must be."""
    raw = str(text).strip()
    shown = raw[:40]
    rules = KINDS[kind]
    if kind is OrgKind.SCHOOL:
        ok = STRING_RULES["school.urn"](raw) is None
        value = raw
    elif kind is OrgKind.NHS_ORGANISATION:
        value = raw.upper()
        ok = bool(_ODS.match(value))
    elif kind is OrgKind.POLICE_FORCE:
        value = raw
        ok = bool(_FORCE.match(value))
    elif kind is OrgKind.DWP:
        value = raw.lower()
        ok = value == "dwp"
    elif kind is OrgKind.CHARITY:
        value = raw
        ok = _charity_number(value)
    elif kind is OrgKind.DISTRICT_TEAM:
        value = raw.lower().replace("_", "-")
        ok = value.replace("-", "_") in districts()
    else:
        value = raw.lower()
        ok = bool(_RESEARCH.match(value)) and not _reserved(value)
    if not ok:
        raise RegistryError(f"malformed {kind.value} identifier {shown!r}: expected {rules.identifier}")
    return value


def _charity_number(text: str) -> bool:
    """The contract's own rule for a registered charity number (one rule, not two copies)."""
    return STRING_RULES["service_providers.provider"](text) is None


def _reserved(name: str) -> bool:
    prefixes = tuple(r.prefix for r in KINDS.values() if r.prefix)
    return name in RESERVED_PARTIES or name == "dwp" or name.startswith(prefixes)


def party_name(kind: OrgKind, identifier: str) -> str:
    """The party name of an organisation: lower-case letters, digits and '-'."""
    identifier = normalise_identifier(kind, identifier)
    if kind is OrgKind.DWP:
        return "dwp"
    return (KINDS[kind].prefix + identifier).lower()


def parse_ref(text: str) -> tuple[OrgKind, str]:
    """``kind:identifier`` or a party name -> (kind, normalised identifier)."""
    raw = str(text).strip()
    if ":" in raw:
        alias, _, identifier = raw.partition(":")
        kind = parse_kind(alias)
        return kind, normalise_identifier(kind, identifier)
    lowered = raw.lower()
    if lowered == "dwp":
        return OrgKind.DWP, "dwp"
    for rules in KINDS.values():
        if rules.prefix and lowered.startswith(rules.prefix):
            return rules.kind, normalise_identifier(rules.kind, raw[len(rules.prefix) :])
    if lowered in RESERVED_PARTIES:
        raise RegistryError(
            f"{raw[:40]!r} is not an organisation; name one as kind:identifier (e.g. school:110123)"
        )
    return OrgKind.RESEARCH, normalise_identifier(OrgKind.RESEARCH, raw)


def ref_party(text: str) -> str:
    """The party name a reference (``school:110123`` or ``school-110123``) stands for."""
    return party_name(*parse_ref(text))


def _now() -> float:
    return time.time()


def _to_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _from_iso(text: Any, what: str) -> float:
    try:
        return datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise RegistryError(f"organisation registry: {what} is not a UTC time (YYYY-MM-DDTHH:MM:SSZ)") from None


# -- the model -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Organisation:
    """One organisation, one party. Build it with :func:`organisation` (validates)."""

    kind: OrgKind
    identifier: str
    name: str
    districts: tuple[str, ...]
    services: tuple[str, ...]
    partner_format: str | None
    status: OrgStatus = OrgStatus.ACTIVE
    updated_at: float = 0.0
    disabled_at: float | None = None

    @cached_property
    def party(self) -> str:
        return party_name(self.kind, self.identifier)

    @property
    def ref(self) -> str:
        """The short reference the CLI prints: ``school:110123``."""
        return f"{KINDS[self.kind].aliases[0]}:{self.identifier}"

    @property
    def active(self) -> bool:
        return self.status is OrgStatus.ACTIVE

    def details(self) -> tuple[Any, ...]:
        """What makes two versions the same organisation (status and times aside)."""
        return (self.kind, self.identifier, self.name, self.districts, self.services, self.partner_format)

    def serves(self, district: str) -> bool:
        return district in self.districts

    def provides(self, service: str) -> bool:
        return service in self.services

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "party": self.party,
            "kind": self.kind.value,
            "id": self.identifier,
            "name": self.name,
            "districts": list(self.districts),
            "services": list(self.services),
            "partner_format": self.partner_format,
            "status": self.status.value,
            "updated_at": _to_iso(self.updated_at),
            "disabled_at": _to_iso(self.disabled_at) if self.disabled_at is not None else None,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Organisation:
        """Read a registry value, checking it as strictly as ``orgs add`` checks input."""
        allowed = {
            "format",
            "party",
            "kind",
            "id",
            "name",
            "districts",
            "services",
            "partner_format",
            "status",
            "updated_at",
            "disabled_at",
        }
        if not isinstance(doc, dict):
            raise RegistryError("organisation registry: an entry must be a JSON object")
        unknown = sorted(set(doc) - allowed)
        if unknown:
            raise RegistryError(f"organisation registry: unknown entry fields {', '.join(unknown)}")
        if doc.get("format") != FORMAT:
            raise RegistryError(f"organisation registry: entry format {doc.get('format')!r}, expected {FORMAT}")
        try:
            status = OrgStatus(doc["status"])
        except (KeyError, ValueError):
            raise RegistryError("organisation registry: entry status must be active or disabled") from None
        try:
            org = organisation(
                kind=doc["kind"],
                identifier=doc["id"],
                name=doc["name"],
                districts=doc["districts"],
                services=doc["services"],
                partner_format=doc.get("partner_format", "default"),
                status=status,
                updated_at=_from_iso(doc["updated_at"], "updated_at"),
                disabled_at=_from_iso(doc["disabled_at"], "disabled_at") if doc.get("disabled_at") else None,
            )
        except KeyError as exc:
            raise RegistryError(f"organisation registry: entry lacks {exc.args[0]!r}") from None
        if doc.get("party") is not None and doc["party"] != org.party:
            raise RegistryError(f"organisation registry: entry for {org.ref} names party {str(doc['party'])[:60]!r}")
        return org


def organisation(
    *,
    kind: str | OrgKind,
    identifier: str,
    name: str,
    districts: Iterable[str] = (),
    services: Iterable[str] = (),
    partner_format: str | None = "default",
    status: OrgStatus = OrgStatus.ACTIVE,
    updated_at: float | None = None,
    disabled_at: float | None = None,
) -> Organisation:
    """A validated :class:`Organisation`. ``districts`` may be ``["all"]``; ``partner_format``
    ``"default"`` takes the kind's native format, ``None`` or ``"none"`` means none."""
    kind = parse_kind(kind) if not isinstance(kind, OrgKind) else kind
    ident = normalise_identifier(kind, identifier)
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"{kind.value} {ident}: a name is required")
    name = " ".join(name.split())
    if len(name) > _NAME_MAX:
        raise RegistryError(f"{kind.value} {ident}: name longer than {_NAME_MAX} characters")
    if isinstance(districts, str) or isinstance(services, str):
        raise RegistryError(f"{kind.value} {ident}: districts and services are lists")
    wanted = list(districts)
    if [d for d in wanted if str(d).strip().lower() == "all"]:
        served = set(_enum("District"))
    else:
        served = {normalise_district(d) for d in wanted}
    if kind is OrgKind.DISTRICT_TEAM:
        own = ident.replace("-", "_")
        if served - {own}:
            raise RegistryError(f"district team {ident} serves its own district only")
        served = {own}
    if not served:
        raise RegistryError(f"{kind.value} {ident}: name at least one district it serves (or 'all')")
    provided = {normalise_service(s) for s in services}
    if partner_format == "default":
        fmt = KINDS[kind].partner_format
    elif partner_format in (None, "none", ""):
        fmt = None
    elif partner_format in PARTNER_FORMATS:
        fmt = partner_format
    else:
        raise RegistryError(
            f"unknown partner format {str(partner_format)[:40]!r}; formats: {', '.join(PARTNER_FORMATS)}, none"
        )
    order = {d: i for i, d in enumerate(_enum("District"))}
    return Organisation(
        kind=kind,
        identifier=ident,
        name=name,
        districts=tuple(sorted(served, key=order.__getitem__)),
        services=tuple(sorted(provided)),
        partner_format=fmt,
        status=OrgStatus(status),
        updated_at=_now() if updated_at is None else updated_at,
        disabled_at=disabled_at if status == OrgStatus.DISABLED else None,
    )


@dataclass(frozen=True)
class Unresolved:
    """A rule that found no organisation; ``reason`` goes into the audit decision as is."""

    reason: str

    def __str__(self) -> str:
        return self.reason


Resolution = Organisation | Unresolved


class Registry:
    """The latest version of every organisation, keyed by party name. Immutable: a reader that
    learns of changes builds a new one, so a router batch uses one consistent snapshot."""

    def __init__(self, orgs: Iterable[Organisation] = ()) -> None:
        self._orgs: dict[str, Organisation] = {}
        for org in orgs:
            self._orgs[org.party] = org  # later versions win
        self._by_service: dict[tuple[str, str], list[Organisation]] = {}
        self._by_kind: dict[OrgKind, list[Organisation]] = {}
        for org in self._orgs.values():
            self._by_kind.setdefault(org.kind, []).append(org)
            for service in org.services:
                for district in org.districts:
                    self._by_service.setdefault((service, district), []).append(org)

    def __len__(self) -> int:
        return len(self._orgs)

    def __iter__(self) -> Iterator[Organisation]:
        return iter(self.organisations())

    def __contains__(self, ref: str) -> bool:
        return self.get(ref) is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Registry) and self._orgs == other._orgs

    __hash__ = None  # type: ignore[assignment]

    def get(self, ref: str) -> Organisation | None:
        """By party name or ``kind:identifier``; None when not registered. A malformed
        reference raises :class:`RegistryError`."""
        return self._orgs.get(ref_party(ref))

    def require(self, ref: str) -> Organisation:
        org = self.get(ref)
        if org is None:
            raise RegistryError(f"organisation {ref_party(ref)} is not registered ('referral-broker orgs list')")
        return org

    def require_active(self, ref: str) -> Organisation:
        """A registered, active organisation (a sender: ``send --as school:110123``)."""
        org = self.require(ref)
        if not org.active:
            raise RegistryError(f"organisation {org.party} is disabled ('referral-broker orgs enable {org.party}')")
        return org

    def organisations(self, kind: OrgKind | str | None = None, *, active_only: bool = False) -> list[Organisation]:
        """For listings and administration; routing uses the resolution methods below."""
        want = parse_kind(kind) if isinstance(kind, str) else kind
        order = {k: i for i, k in enumerate(OrgKind)}
        found = [
            o
            for o in self._orgs.values()
            if (want is None or o.kind is want) and (o.active or not active_only)
        ]
        return sorted(found, key=lambda o: (order[o.kind], o.party))

    def parties(self, *, active_only: bool = True) -> list[str]:
        return [o.party for o in self.organisations(active_only=active_only)]

    def to_json(self) -> list[dict[str, Any]]:
        return [o.to_json() for o in self.organisations()]

    # -- resolution (the router's rules) ---------------------------------------------------
    def _one(self, kind: OrgKind, identifier: str | None, noun: str) -> Resolution:
        if identifier is None or not str(identifier).strip():
            return Unresolved(f"no {noun} identifier in the referral")
        try:
            party = party_name(kind, identifier)
        except RegistryError:
            return Unresolved(f"{noun} identifier malformed")
        org = self._orgs.get(party)
        if org is None:
            return Unresolved(f"{noun} not registered")
        if not org.active:
            return Unresolved(f"{noun} disabled")
        return org

    def school_by_urn(self, urn: str | None) -> Resolution:
        """The child's school (``school.urn``)."""
        return self._one(OrgKind.SCHOOL, urn, "school")

    def nhs_by_ods(self, code: str | None, *, noun: str = "NHS organisation") -> Resolution:
        """An NHS organisation by ODS code, any letter case; ``noun`` names it in the reason
        (the router's GP rule passes ``"GP practice"``: "GP practice not registered")."""
        return self._one(OrgKind.NHS_ORGANISATION, code, noun)

    def district_team(self, district: str) -> Resolution:
        """The district team of a district (a ``District`` symbol)."""
        return self._one(OrgKind.DISTRICT_TEAM, normalise_district(district), f"district team for {district}")

    def service_for_district(self, service: str, district: str, kind: OrgKind | str | None = None) -> Resolution:
        """The one active organisation (of ``kind``, when given) providing ``service`` in
        ``district``. None, only disabled ones, or more than one active: :class:`Unresolved`
        (the registry must say who; the router never guesses between two providers)."""
        service = normalise_service(service)
        district = normalise_district(district)
        want = parse_kind(kind) if isinstance(kind, str) else kind
        label = service_label(service)
        found = [o for o in self._by_service.get((service, district), []) if want is None or o.kind is want]
        return _exactly_one(found, f"{label} service for {district}", f"no {label} service for {district}")

    def serving(self, kind: OrgKind | str, district: str) -> Resolution:
        """The one active organisation of ``kind`` serving ``district`` (the police force, DWP)."""
        want = parse_kind(kind) if isinstance(kind, str) else kind
        district = normalise_district(district)
        noun = want.value.replace("_", " ")
        found = [o for o in self._by_kind.get(want, ()) if o.serves(district)]
        return _exactly_one(found, f"{noun} for {district}", f"no {noun} registered for {district}")

    def charity_for(self, service: str, district: str, named_provider: str | None) -> Resolution:
        """The charity the referral names as provider (charity number, ``charity:N`` or
        ``charity-N``), when it is registered, active, provides ``service`` and serves
        ``district``; no fallback to another charity."""
        service = normalise_service(service)
        district = normalise_district(district)
        if named_provider is None or not str(named_provider).strip():
            return Unresolved(f"no charity named as provider of {service_label(service)}")
        text = str(named_provider).strip()
        try:
            kind, identifier = parse_ref(text) if not _charity_number(text) else (OrgKind.CHARITY, text)
        except RegistryError:
            return Unresolved("named provider malformed")
        if kind is not OrgKind.CHARITY:
            return Unresolved("named provider is not a charity")
        found = self._one(OrgKind.CHARITY, identifier, "charity")
        if isinstance(found, Unresolved):
            return found
        if not found.provides(service):
            return Unresolved(f"charity does not provide {service_label(service)}")
        if not found.serves(district):
            return Unresolved(f"charity does not serve {district}")
        return found

    # -- changes (checked here, written by the functions below) ----------------------------
    def check_add(self, org: Organisation) -> str:
        """``"added"`` when new, ``"unchanged"`` when an identical active version exists;
        :class:`RegistryError` for the same identifier with other details, or a disabled one."""
        old = self._orgs.get(org.party)
        if old is None:
            return "added"
        if old.details() != org.details():
            raise RegistryError(
                f"{org.ref} is already registered as {old.party} with other details "
                f"({', '.join(_differences(old, org))}); nothing was written"
            )
        if not old.active:
            raise RegistryError(f"{org.ref} is registered and disabled; 'orgs enable {old.party}' re-enables it")
        return "unchanged"


def _exactly_one(found: list[Organisation], what: str, none: str) -> Resolution:
    """The one active organisation of ``found``; more than one active, only disabled ones, or
    none at all is :class:`Unresolved` (the registry must say who: never a guess)."""
    active = [o for o in found if o.active]
    if len(active) == 1:
        return active[0]
    if len(active) > 1:
        return Unresolved(f"more than one {what}")
    return Unresolved(f"{what} disabled" if found else none)


def _differences(old: Organisation, new: Organisation) -> list[str]:
    names = ("kind", "identifier", "name", "districts", "services", "partner_format")
    return [n for n, a, b in zip(names, old.details(), new.details(), strict=True) if a != b]


# -- files ---------------------------------------------------------------------------------
_FILE_KEYS = {"kind", "id", "name", "districts", "services", "partner_format"}


def load_file(path: Path | None = None) -> list[Organisation]:
    """The organisations of a county file (the shipped one by default): ``[[organisation]]``
    tables with kind, id, name, districts, services and optionally partner_format."""
    where = str(path) if path is not None else SHIPPED_FILE
    try:
        if path is None:
            text = resources.files("referral_broker").joinpath(SHIPPED_FILE).read_text("utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        doc = tomllib.loads(text)
    except FileNotFoundError:
        raise RegistryError(f"{where} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{where} cannot be read: {type(exc).__name__}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{where} is not valid TOML: {exc}") from None
    extra = sorted(set(doc) - {"organisation"})
    if extra or not isinstance(doc.get("organisation"), list):
        raise RegistryError(f"{where}: expected [[organisation]] tables only")
    orgs: dict[str, Organisation] = {}
    for n, entry in enumerate(doc["organisation"], start=1):
        unknown = sorted(set(entry) - _FILE_KEYS)
        if unknown:
            raise RegistryError(f"{where}: organisation {n}: unknown key(s) {', '.join(unknown)}")
        try:
            org = organisation(
                kind=entry["kind"],
                identifier=entry["id"],
                name=entry["name"],
                districts=entry.get("districts", ()),
                services=entry.get("services", ()),
                partner_format=entry.get("partner_format", "default"),
            )
        except KeyError as exc:
            raise RegistryError(f"{where}: organisation {n} lacks {exc.args[0]!r}") from None
        except RegistryError as exc:
            raise RegistryError(f"{where}: organisation {n}: {exc}") from None
        if org.party in orgs:
            raise RegistryError(f"{where}: organisation {n}: {org.ref} appears twice")
        orgs[org.party] = org
    return list(orgs.values())


# -- the compacted topic -------------------------------------------------------------------
def _topic(settings: Settings) -> str:
    from referral_broker.cluster.topics import topic_name

    return topic_name(settings, "orgs")


def publish(settings: Settings, bootstrap: str, orgs: Iterable[Organisation]) -> int:
    """Append each organisation's new version (key = party name) and wait until all are durable."""
    from referral_broker.cluster.clients import publish_records

    records = ((org.party.encode("ascii"), json.dumps(org.to_json(), sort_keys=True).encode("utf-8")) for org in orgs)
    return publish_records(settings, bootstrap, _topic(settings), records, kind=b"organisation")


@dataclass
class RegistryReader:
    """Follows the registry topic: :meth:`catch_up` applies what was written since the last
    call (the first call reads everything) and returns the current :class:`Registry`. Close it
    (or use ``with``). One reader per process is enough; it is not thread-safe."""

    settings: Settings
    bootstrap: str
    timeout_s: float = 30.0
    _consumer: Any = field(default=None, init=False, repr=False)
    _latest: dict[str, Organisation] = field(default_factory=dict, init=False, repr=False)
    _registry: Registry = field(default_factory=Registry, init=False, repr=False)

    def __enter__(self) -> RegistryReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def registry(self) -> Registry:
        """The snapshot of the last catch-up."""
        return self._registry

    def _open(self) -> Any:
        from kafka.errors import KafkaError

        from referral_broker.cluster.clients import build_consumer

        topic = _topic(self.settings)
        consumer = build_consumer(self.settings, self.bootstrap, [topic], group_id=None)
        if not consumer.assignment():
            consumer.close()
            raise BrokerError(
                f"the organisation registry topic {topic} does not exist; run 'referral-broker topics ensure'"
            )
        try:
            consumer.seek_to_beginning(*consumer.assignment())
        except KafkaError as exc:
            consumer.close()
            raise BrokerError(f"reading the organisation registry failed: {type(exc).__name__}") from exc
        return consumer

    def partitions(self) -> list[Any]:
        """The registry topic's partitions (what :meth:`catch_up`'s ``end`` must cover)."""
        if self._consumer is None:
            self._consumer = self._open()
        return list(self._consumer.assignment())

    def catch_up(self, end: dict[Any, int] | None = None) -> Registry:
        """Read the topic up to its end offsets as of this call (``end``: as a caller asked the
        cluster for them just now, with another topic's in the same request); a new snapshot if
        anything changed."""
        from kafka.errors import KafkaError

        from referral_broker.cluster.clients import end_offsets, read_to_end

        partitions = self.partitions()
        consumer = self._consumer
        changed = False
        try:
            end = end_offsets(consumer, partitions, end)
            what = "the organisation registry"
            for batch in read_to_end(consumer, partitions, end, what=what, timeout_s=self.timeout_s):
                for record in batch:
                    self._apply(record)
                    changed = True
        except (KafkaError, BrokerError) as exc:
            # A consumer that failed (a node died under it) can keep failing: the next
            # catch-up starts a new one, from where the registry read up to (latest is kept).
            self.close()
            if isinstance(exc, BrokerError):
                raise
            raise BrokerError(f"reading the organisation registry failed: {type(exc).__name__}") from exc
        if changed:
            self._registry = Registry(self._latest.values())
        return self._registry

    def _apply(self, record: Any) -> None:
        where = f"{record.topic}/{record.partition}@{record.offset}"
        key = record.key.decode("ascii", "replace") if record.key else ""
        if record.value is None:  # a tombstone written by hand: the organisation is gone
            self._latest.pop(key, None)
            return
        try:
            doc = json.loads(record.value)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RegistryError(f"organisation registry record at {where} is not JSON") from None
        try:
            org = Organisation.from_json(doc)
        except RegistryError as exc:
            raise RegistryError(f"organisation registry record at {where}: {exc}") from None
        if org.party != key:
            raise RegistryError(f"organisation registry record at {where} is keyed {key[:60]!r}, not {org.party}")
        self._latest[key] = org

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def load_registry(settings: Settings, bootstrap: str, *, timeout_s: float = 30.0) -> Registry:
    """The whole registry as of now (reads the topic to its end offsets)."""
    with RegistryReader(settings, bootstrap, timeout_s=timeout_s) as reader:
        return reader.catch_up()


# -- administration (the ``orgs`` commands) -------------------------------------------------
@dataclass(frozen=True)
class Change:
    organisation: Organisation
    outcome: str  # added | unchanged | disabled | enabled | already disabled | already active

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, **self.organisation.to_json()}


def add(settings: Settings, bootstrap: str, org: Organisation) -> Change:
    """Register ``org``. Re-adding an identical active organisation writes nothing."""
    registry = load_registry(settings, bootstrap)
    outcome = registry.check_add(org)
    if outcome == "added":
        publish(settings, bootstrap, [org])
        return Change(org, outcome)
    return Change(registry.require(org.party), outcome)


def set_status(settings: Settings, bootstrap: str, ref: str, status: OrgStatus, *, now: float | None = None) -> Change:
    """Disable or re-enable an organisation: a new version, the old ones are kept."""
    registry = load_registry(settings, bootstrap)
    old = registry.require(ref)
    if old.status is status:
        return Change(old, f"already {status.value}")
    ts = _now() if now is None else now
    new = replace(
        old, status=status, updated_at=ts, disabled_at=ts if status is OrgStatus.DISABLED else None
    )
    publish(settings, bootstrap, [new])
    return Change(new, "disabled" if status is OrgStatus.DISABLED else "enabled")


def disable(settings: Settings, bootstrap: str, ref: str, *, now: float | None = None) -> Change:
    return set_status(settings, bootstrap, ref, OrgStatus.DISABLED, now=now)


def enable(settings: Settings, bootstrap: str, ref: str, *, now: float | None = None) -> Change:
    return set_status(settings, bootstrap, ref, OrgStatus.ACTIVE, now=now)


@dataclass(frozen=True)
class ImportReport:
    added: list[str]
    unchanged: list[str]
    kept_disabled: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "unchanged": self.unchanged, "kept_disabled": self.kept_disabled}


def import_file(settings: Settings, bootstrap: str, path: Path | None = None) -> ImportReport:
    """Seed the registry from a county file (the shipped one by default). Idempotent: only
    organisations not yet registered are written. Any entry that contradicts the registry
    (same identifier, other details) stops the import before anything is written; one that
    an operator disabled stays disabled."""
    wanted = load_file(path)
    registry = load_registry(settings, bootstrap)
    added: list[Organisation] = []
    unchanged: list[str] = []
    kept: list[str] = []
    conflicts: list[str] = []
    for org in wanted:
        old = registry.get(org.party)
        if old is None:
            added.append(org)
        elif old.details() != org.details():
            conflicts.append(f"{org.ref} ({', '.join(_differences(old, org))})")
        elif old.active:
            unchanged.append(org.party)
        else:
            kept.append(org.party)
    if conflicts:
        shown = "; ".join(conflicts[:5]) + (f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise RegistryError(f"import would change registered organisations: {shown}; nothing was written")
    if added:
        publish(settings, bootstrap, added)
    return ImportReport([o.party for o in added], unchanged, kept)
