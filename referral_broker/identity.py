"""A party as the broker sees it at run time: its private key store, the public key directory,
and the sealer and opener built from them. Every stage (adapters, router, inbox) gets these
from :func:`load_identity`, so they all trust the same directory the same way."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from referral_broker.config import Settings
from referral_broker.errors import ContractError, KeyNotFoundError
from referral_broker.parties import HUB, get_party
from referral_broker.schemas.registry import fingerprint as schema_fingerprint
from referral_broker.schemas.registry import shipped_versions
from referral_broker.schemas.views import view_schema
from referral_broker.sealing import (
    CaseKeyStore,
    DekCache,
    KeyDirectory,
    KeyStore,
    MessageOpener,
    MessageSealer,
)
from referral_broker.sealing.directory import load_topic
from referral_broker.sealing.envelope import H_SCHEMA, ConsumedRecord, OpenedMessage, VerifiedHeaders
from referral_broker.sealing.fields import DataKey

T = TypeVar("T")
# A key miss reloads the directory at most this often (seconds).
RELOAD_AFTER_S = 5.0

# Headers the router adds to every message it sends to a recipient (signed with the rest).
H_VIEW = "rb-view"  # JSON list of the granted field paths: the recipient derives the view schema
H_WITHHELD = "rb-withheld"  # JSON {reason: [paths]}: what was withheld and why (no values)
H_NO_ONWARD = "rb-no-onward"  # JSON list of granted paths the recipient must not pass on
H_REFERRER = "rb-referrer"  # the party that referred, to address status messages to
H_DECISION = "rb-decision"  # the audit decision id this message was sent under
H_UNRESOLVED = "rb-unresolved"  # JSON {recipient rule: reason}: who was not told and why
# A referral's priority, signed beside it on the partner's intake message so the router can put
# urgent ones first without opening anything; the router refuses one that differs from the
# sealed referral's own priority.
H_PRIORITY = "rb-priority"


# A router header longer than this is refused unread (every field path of the Referral
# schema, JSON-encoded, is a few KiB).
MAX_JSON_HEADER = 64 * 1024


def _json_header(raw: bytes | None, name: str) -> Any:
    if raw is None:
        return None
    if len(raw) > MAX_JSON_HEADER:
        raise ContractError(f"header {name} is longer than {MAX_JSON_HEADER} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ContractError(f"header {name} is not valid JSON") from None


def withheld_from(raw: bytes | None) -> dict[str, str]:
    """``rb-withheld`` as {path: reason}, in the order the router wrote it."""
    grouped = _json_header(raw, H_WITHHELD)
    if grouped is None:
        return {}
    if not isinstance(grouped, dict) or not all(
        isinstance(reason, str) and isinstance(paths, list) and all(isinstance(p, str) for p in paths)
        for reason, paths in grouped.items()
    ):
        raise ContractError(f"header {H_WITHHELD} must be a JSON object of reason -> [field paths]")
    return {path: reason for reason, paths in grouped.items() for path in paths}


def no_onward_from(raw: bytes | None) -> tuple[str, ...]:
    """``rb-no-onward`` as field paths."""
    paths = _json_header(raw, H_NO_ONWARD)
    if paths is None:
        return ()
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ContractError(f"header {H_NO_ONWARD} must be a JSON array of field paths")
    return tuple(paths)


# Learned view schemas kept per identity (least recently used dropped first). The shipped
# policy grants a few dozen distinct views; 256 leaves room for policy changes while a process
# runs, and bounds what a stream of distinct (even validly signed) views can make it hold.
MAX_LEARNED_VIEWS = 256


class SchemaBook:
    """fingerprint -> schema for an opener: every shipped schema, plus view schemas learned
    from a message's own ``rb-view`` header (checked against its ``rb-schema`` fingerprint).

    Call :meth:`learn` only with headers whose signature has been verified
    (:meth:`Identity.open` does). Learned views are an LRU of at most ``max_views``
    (:data:`MAX_LEARNED_VIEWS`); any malformed header is a ``ContractError``, never another
    exception, and its text is never echoed."""

    def __init__(self, max_views: int = MAX_LEARNED_VIEWS) -> None:
        self._shipped: dict[bytes, dict[str, Any]] = {v.fingerprint: v.schema for v in shipped_versions()}
        # the shipped Referral versions, latest first: what a message's rb-view is derived from
        self._referrals = [v.schema for v in reversed(shipped_versions()) if v.family == "referral"]
        self.max_views = max_views
        # (granted paths, claimed fingerprint header) -> fingerprint, and fingerprint -> view
        # schema, both in LRU order (one grant derives another view under an older version)
        self._views: OrderedDict[tuple[tuple[str, ...], bytes], bytes] = OrderedDict()
        self._learned: OrderedDict[bytes, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, fingerprint: bytes) -> dict[str, Any] | None:
        shipped = self._shipped.get(fingerprint)
        if shipped is not None:
            return shipped
        with self._lock:
            view = self._learned.get(fingerprint)
            if view is not None:
                self._learned.move_to_end(fingerprint)
            return view

    def __len__(self) -> int:
        """How many learned views are held (shipped schemas not counted)."""
        return len(self._learned)

    def learn(self, headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes]) -> None:
        """Register the view schema a message names, if it names one."""
        named = dict(headers.items() if isinstance(headers, Mapping) else headers)
        raw = named.get(H_VIEW)
        if raw is None:
            return
        granted = _granted_paths(raw)
        key = (granted, named.get(H_SCHEMA, b""))
        with self._lock:
            known = self._views.get(key)
            if known is not None and known in self._learned:
                self._views.move_to_end(key)
                self._learned.move_to_end(known)
                return
        view, fp = self._derive(granted, named)
        with self._lock:
            self._views[key] = fp
            self._learned[fp] = view
            while len(self._views) > self.max_views:
                _, dropped = self._views.popitem(last=False)
                if dropped not in self._views.values():  # two grants can project to one schema
                    self._learned.pop(dropped, None)

    def _derive(self, granted: tuple[str, ...], named: dict[str, bytes]) -> tuple[dict[str, Any], bytes]:
        """The view the message names, derived from the latest Referral or, for a message routed
        before a newer version shipped (referral v3 made two yes/no fields nullable, which
        changes a view holding them), from the older shipped version it names."""
        derived = None
        for canonical in self._referrals:
            try:
                view = view_schema(granted, canonical)
            except ContractError:
                continue  # an older version may lack a path the latest has
            fp = schema_fingerprint(view)
            derived = derived or (view, fp)
            if named.get(H_SCHEMA, b"") == fp.hex().encode():
                return view, fp
        if derived is None:
            raise ContractError(f"header {H_VIEW} names field paths the Referral schema does not have")
        self._check_claim(named, derived[1])  # raises: no shipped version derives the claim
        return derived

    @staticmethod
    def _check_claim(named: dict[str, bytes], fp: bytes) -> None:
        claimed = named.get(H_SCHEMA, b"")
        if claimed != fp.hex().encode():
            raise ContractError(f"header {H_VIEW} does not derive the schema named in {H_SCHEMA}")


def _granted_paths(raw: bytes) -> tuple[str, ...]:
    """``rb-view`` as a sorted, de-duplicated tuple of field paths, or a ContractError."""
    paths = _json_header(raw, H_VIEW)
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ContractError(f"header {H_VIEW} is not a JSON list of field paths")
    return tuple(sorted(set(paths)))


@dataclass
class Identity:
    party: str
    keystore: KeyStore
    directory: KeyDirectory
    sealer: MessageSealer
    opener: MessageOpener
    schemas: SchemaBook
    case_keys: CaseKeyStore | None = None
    loaded_at: float = field(default_factory=time.monotonic)
    # Where the directory is reloaded from; None for an identity built without a cluster.
    settings: Settings | None = field(default=None, repr=False)
    bootstrap: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def refresh(self, settings: Settings | None = None, bootstrap: str | None = None) -> None:
        """Reload the key directory, so rotations and revocations published since take effect
        (the sealer drops cached data keys of keys that are no longer current)."""
        settings, bootstrap = settings or self.settings, bootstrap or self.bootstrap
        if settings is None or bootstrap is None:
            raise KeyNotFoundError(f"{self.party}'s identity has no cluster to reload its key directory from")
        directory = load_directory(settings, bootstrap)
        self.directory = self.sealer.directory = self.opener.directory = directory
        self.loaded_at = time.monotonic()

    def retrying(self, action: Callable[[Identity], T]) -> T:
        """Run ``action``; when it names a key the directory does not know (published since the
        last load), reload the directory once and run it again. Reloads happen at most every
        ``RELOAD_AFTER_S`` seconds, so a message naming a key that never existed cannot make
        every record a directory read. The one place any stage reloads keys on a miss."""
        try:
            return action(self)
        except KeyNotFoundError:
            with self._lock:
                if self.settings is None or time.monotonic() - self.loaded_at < RELOAD_AFTER_S:
                    raise
                self.refresh()
            return action(self)

    def open(self, record: ConsumedRecord, *, verified: VerifiedHeaders | None = None) -> OpenedMessage:
        """Verify and open a consumed record addressed to this party. The signature is checked
        before any header is parsed: an unsigned or forged record never reaches the view parser.
        ``verified``: the headers ``opener.verify`` already returned for this very record (the
        receive path has them), so it is verified once, not twice."""
        if verified is None or not verified.of(record):
            verified = self.opener.verify(record)
        self.schemas.learn(verified)
        return self.opener.open(record, verified=verified)


def load_directory(settings: Settings, bootstrap: str) -> KeyDirectory:
    """The key directory: the compacted keys topic, then this machine's published file merged
    in (statuses only move forward, so a revocation either of them holds stands). Every record
    of both is verified against the pinned trust anchor; refused ones are in ``.refused``."""
    from referral_broker.errors import SealingError
    from referral_broker.sealing.directory import directory_file
    from referral_broker.sealing.trust import MALFORMED

    directory = load_topic(settings, bootstrap)
    if directory_file(settings).exists():
        try:
            directory.absorb(KeyDirectory.load_local(settings))
        except SealingError as exc:  # an unreadable file is reported, not fatal
            directory.refuse("directory file", MALFORMED, str(exc))
    return directory


def load_identity(
    settings: Settings, bootstrap: str, party: str, *, directory: KeyDirectory | None = None
) -> Identity:
    get_party(party)
    keystore = KeyStore.open(settings.keys_dir, party)
    directory = directory if directory is not None else load_directory(settings, bootstrap)
    cache: DekCache[tuple[DataKey, bytes]] = DekCache.from_settings(settings)
    # The hub seals district-team and archive copies under case keys; the council's own inbox
    # (a district team) opens them with the same store, and seals its statuses and texts under
    # the keys the router made (its volume may be mounted read-only).
    case_keys = None
    if party == HUB or get_party(party).kind == "district_team":
        case_keys = CaseKeyStore.open(settings.keys_dir, makes_keys=party == HUB)
    schemas = SchemaBook()
    sealer = MessageSealer(keystore, directory, cache=cache, case_keys=case_keys)
    opener = MessageOpener(
        keystore,
        directory,
        schemas,
        cache=DekCache.from_settings(settings),
        case_keys=case_keys.lookup if case_keys is not None else None,
    )
    return Identity(
        party, keystore, directory, sealer, opener, schemas, case_keys, settings=settings, bootstrap=bootstrap
    )
