"""The inbox's :class:`RecordFormat` over the sealing package: verify, summarise, open, seal.

Routed referrals arrive signed by the hub and sealed for one district team under the case's
key (``referral_broker.sealing``: ``MessageSealer.seal(..., recipient=<team>, case_id=...)``).
This module:

- ``summarise``: verifies the signature and the signer (``verify_signed``) and that the hub sent
  it to this team as a referral, then reads the operational fields, which the wire schema
  carries in the clear. Nothing is decrypted, no key is touched.
- ``open``: ``MessageOpener.open`` with the team's private key and the hub's case-key lookup,
  so a shredded case no longer opens here either.
- ``seal_status``: a ``status.v1`` record, validated, sealed for the hub and signed by the
  team (``MessageSealer``), for ``referrals.status.<team>``.

The view schema a record was written with is found by its fingerprint (``rb-schema``) among the
shipped and registered schemas, else rebuilt from the granted field paths the router lists in
the signed ``rb-granted`` header (JSON array) and accepted only if its fingerprint matches.
Withheld fields and reasons come from the signed ``rb-withheld`` header (JSON object path ->
reason, as the policy decision gives them); without it the view's missing paths are listed
with a generic reason. An ``rb-referrer`` header may name the exact referring party (status
messages go back to it); otherwise the referral's ``referrer.partner`` kind stands for it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from referral_broker.consumers.inbox.records import (
    OpenedReferral,
    OutboundRecord,
    ReferralSummary,
    SealedRecord,
    WithheldField,
)
from referral_broker.schemas.registry import Schema, status_schema, writer_schemas
from referral_broker.schemas.validation import validate_status
from referral_broker.schemas.views import view_schema, withheld_paths

from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.errors import ContractError, KeyNotFoundError, SealingError, ValidationError
from referral_broker.parties import HUB, all_parties
from referral_broker.sealing import (
    CaseKeyStore,
    DekCache,
    KeyDirectory,
    KeyStore,
    MessageOpener,
    MessageSealer,
    sealing_plan,
    verify_signed,
)

H_GRANTED = "rb-granted"
H_WITHHELD = "rb-withheld"
H_REFERRER = "rb-referrer"
REFERRAL_KIND = "referral"
STATUS_KIND = "status"
GENERIC_WITHHELD = "not granted to this team by the sharing policy"
_DIRECTORY_REFRESH_S = 30.0


def _header(record: SealedRecord, name: str) -> bytes | None:
    return record.header(name)


def _json_header(record: SealedRecord, name: str) -> Any:
    raw = _header(record, name)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ContractError(f"header {name} is not valid JSON") from None


class SealedReferralFormat:
    """Reads routed referrals for the teams whose key stores it holds; thread-safe."""

    def __init__(
        self,
        settings: Settings,
        keystores: Mapping[str, KeyStore],
        directory_loader: Callable[[], KeyDirectory],
        case_keys: CaseKeyStore,
        *,
        hub: str = HUB,
    ) -> None:
        self.settings = settings
        self.keystores = dict(keystores)
        self._load_directory = directory_loader
        self._directory = directory_loader()
        self._loaded_at = time.monotonic()
        self._lock = threading.Lock()
        self.case_keys = case_keys
        self.hub = hub
        self._cache = DekCache.from_settings(settings)

    @classmethod
    def from_settings(
        cls, settings: Settings, teams: list[str] | tuple[str, ...], bootstrap: str | None = None
    ) -> SealedReferralFormat:
        """Open each team's key store (permissions checked), the hub's case keys, and the key
        directory from the ``keys`` topic."""
        from referral_broker.sealing.directory import load_topic

        keystores = {team: KeyStore.open(settings.keys_dir, team) for team in teams}
        server = bootstrap or settings.bootstrap_servers
        return cls(
            settings,
            keystores,
            lambda: load_topic(settings, server),
            CaseKeyStore.open(settings.keys_dir),
        )

    # -- key directory -------------------------------------------------------------------------
    @property
    def directory(self) -> KeyDirectory:
        return self._directory

    def _with_directory(self, action: Callable[[KeyDirectory], Any]) -> Any:
        """Run ``action``; when it meets a key the directory does not know, reload the
        directory once (a rotation since start-up) and try again."""
        try:
            return action(self._directory)
        except KeyNotFoundError:
            with self._lock:
                if time.monotonic() - self._loaded_at < _DIRECTORY_REFRESH_S:
                    raise
                self._directory = self._load_directory()
                self._loaded_at = time.monotonic()
            return action(self._directory)

    # -- schemas -------------------------------------------------------------------------------
    def _schema_lookup(self, record: SealedRecord) -> Callable[[bytes], Schema | None]:
        def lookup(fingerprint: bytes) -> Schema | None:
            known = writer_schemas()
            if fingerprint in known:
                return known.schema(fingerprint)
            granted = _json_header(record, H_GRANTED)
            if granted is None:
                return None
            if not isinstance(granted, list) or not all(isinstance(p, str) for p in granted):
                raise ContractError(f"header {H_GRANTED} must be a JSON array of field paths")
            view = view_schema(granted)
            return view if sealing_plan(view).fingerprint == fingerprint else None

        return lookup

    def _schema_of(self, record: SealedRecord) -> Schema:
        raw = _header(record, "rb-schema") or b""
        try:
            fingerprint = bytes.fromhex(raw.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise SealingError("header rb-schema is not a hex fingerprint") from None
        schema = self._schema_lookup(record)(fingerprint)
        if schema is None:
            raise ContractError(f"unknown view schema {raw.decode('ascii', 'replace')[:16]}; refused")
        return schema

    # -- RecordFormat ------------------------------------------------------------------------
    def summarise(self, record: SealedRecord, team: str) -> ReferralSummary:
        headers = self._with_directory(lambda d: verify_signed(d, record))
        sender = headers.get("rb-sender", b"").decode("ascii", "replace")
        recipient = headers.get("rb-recipient", b"").decode("ascii", "replace")
        kind = headers.get("rb-kind", b"").decode("ascii", "replace")
        if sender != self.hub:
            raise SealingError(f"referral sent by {sender}, not by the hub; refused")
        if recipient != team:
            raise SealingError(f"message is addressed to {recipient}, not to {team}; refused")
        if kind != REFERRAL_KIND:
            raise ContractError(f"message kind {kind} is not a referral; refused")
        schema = self._schema_of(record)
        wire = sealing_plan(schema).decode_wire(record.value)
        referral_id = str(wire.get("referral_id") or "")
        version = wire.get("version")
        if not referral_id or not isinstance(version, int):
            raise ContractError("routed referral lacks referral_id or version; refused")
        if record.key != referral_id.encode("utf-8"):
            raise SealingError("message key is not the referral id; refused")
        if headers.get("rb-referral-version") != str(version).encode("ascii"):
            raise SealingError("header rb-referral-version does not match the record; refused")
        referrer = wire.get("referrer") if isinstance(wire.get("referrer"), dict) else {}
        # The router may name the exact referring party (signed); else the partner kind.
        named = headers.get(H_REFERRER, b"").decode("ascii", "replace")
        return ReferralSummary(
            referral_id=referral_id,
            version=version,
            referrer=named if named in all_parties() else str(referrer.get("partner") or "unknown"),
            referrer_organisation=referrer.get("organisation"),
            concern_types=tuple(str(c) for c in wire.get("concern_types") or ()),
            priority=str(wire.get("priority") or "not_given"),
            district=wire.get("district"),
            withheld=self._withheld(record, schema),
        )

    @staticmethod
    def _withheld(record: SealedRecord, view: Schema) -> tuple[WithheldField, ...]:
        listed = _json_header(record, H_WITHHELD)
        if listed is None:
            try:
                return tuple(WithheldField(p, GENERIC_WITHHELD) for p in withheld_paths(view))
            except ContractError:
                return ()
        if isinstance(listed, dict):
            pairs = list(listed.items())
        elif isinstance(listed, list):
            pairs = [(i.get("path"), i.get("reason")) if isinstance(i, dict) else tuple(i) for i in listed]
        else:
            raise ContractError(f"header {H_WITHHELD} must be a JSON object of path -> reason")
        if not all(isinstance(p, str) and isinstance(r, str) for p, r in pairs):
            raise ContractError(f"header {H_WITHHELD} must map field paths to reasons")
        return tuple(WithheldField(p, r) for p, r in pairs)

    def open(self, record: SealedRecord, team: str) -> OpenedReferral:
        keystore = self.keystores.get(team)
        if keystore is None:
            raise KeyNotFoundError(f"this inbox holds no key store for {team}")

        def do(directory: KeyDirectory) -> Any:
            opener = MessageOpener(
                keystore,
                directory,
                self._schema_lookup(record),
                case_keys=self.case_keys.lookup,
            )
            return opener.open(record)

        opened = self._with_directory(do)
        if opened.sender != self.hub or opened.kind != REFERRAL_KIND:
            raise SealingError(f"message from {opened.sender} of kind {opened.kind} is not a routed referral")
        return OpenedReferral(granted=opened.record)

    def seal_status(self, status: Mapping[str, Any], team: str) -> OutboundRecord:
        keystore = self.keystores.get(team)
        if keystore is None:
            raise KeyNotFoundError(f"this inbox holds no key store for {team}")
        problems = validate_status(dict(status), now=datetime.now(UTC))
        if problems:
            raise ValidationError(problems, "status message")

        def do(directory: KeyDirectory) -> Any:
            sealer = MessageSealer(keystore, directory, cache=self._cache)
            return sealer.seal(
                dict(status),
                status_schema(),
                topic=topic_name(self.settings, "status", team),
                recipient=self.hub,
                referral_id=status["referral_id"],
                referral_version=status["version"],
                kind=STATUS_KIND,
            )

        message = self._with_directory(do)
        return OutboundRecord(message.key, message.value, list(message.headers))
