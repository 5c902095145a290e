"""The inbox's :class:`RecordFormat` over the router's messages and the sealing package.

Routed referrals arrive signed by the hub and sealed for one district team under the case key
(``consumers.router``: ``sealer.seal(..., recipient=<team>, case_id=<referral id>)``), with the
router's signed headers (``referral_broker.identity``): ``rb-view`` (the granted field paths,
from which the view schema is derived and checked against ``rb-schema``), ``rb-withheld``
(``{reason: [paths]}``), ``rb-no-onward`` (granted paths the team must not pass on) and
``rb-referrer`` (the referring party, which status messages are addressed to). This module:

- ``summarise``: verifies the signature and the signer first, checks that the hub sent it to
  this team as a referral, then reads the operational fields, which the wire schema carries in
  the clear. Nothing is decrypted, no key is touched.
- ``open``: the team's :class:`~referral_broker.identity.Identity` opener (the team's private
  key and the hub's case-key lookup), so a shredded case no longer opens here either.
- ``seal_status``: a ``status.v1`` record, validated, sealed for the hub and signed by the team,
  for ``referrals.status.<team>``; the router carries it back to the referrer.
- ``sign_event``: an access audit event (ids and outcomes, no values) signed by the team.

Every stage loads its keys the same way (``load_identity``); when a message names a key the
directory does not know yet (a rotation since start-up), the identities are reloaded once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.inbox.records import (
    OpenedReferral,
    OutboundRecord,
    ReferralSummary,
    SealedRecord,
    WithheldField,
)
from referral_broker.errors import ContractError, KeyNotFoundError, SealingError, ValidationError
from referral_broker.identity import (
    H_NO_ONWARD,
    H_REFERRER,
    H_WITHHELD,
    Identity,
    load_directory,
    load_identity,
    no_onward_from,
    withheld_from,
)
from referral_broker.parties import HUB, all_parties
from referral_broker.schemas.registry import status_schema
from referral_broker.schemas.validation import validate_status
from referral_broker.sealing import sealing_plan, sign_plain, verify_signed

REFERRAL_KIND = "referral"
STATUS_KIND = "status"
_RELOAD_AFTER_S = 30.0


class SealedReferralFormat:
    """Reads routed referrals for the teams whose identities (key stores) it holds; thread-safe."""

    def __init__(
        self,
        settings: Settings,
        identities: Mapping[str, Identity],
        *,
        reload: Callable[[], Mapping[str, Identity]] | None = None,
        hub: str = HUB,
    ) -> None:
        self.settings = settings
        self._identities = dict(identities)
        self._reload = reload
        self._loaded_at = time.monotonic()
        self._lock = threading.Lock()
        self.hub = hub

    @classmethod
    def from_settings(
        cls, settings: Settings, teams: list[str] | tuple[str, ...], bootstrap: str | None = None
    ) -> SealedReferralFormat:
        """Each team's identity (key store, permissions checked; the hub's case keys) over one
        key directory read from the ``keys`` topic (and the published file)."""
        server = bootstrap or settings.bootstrap_servers

        def load() -> dict[str, Identity]:
            directory = load_directory(settings, server)
            return {team: load_identity(settings, server, team, directory=directory) for team in teams}

        return cls(settings, load(), reload=load)

    def identity(self, team: str) -> Identity:
        try:
            return self._identities[team]
        except KeyError:
            raise KeyNotFoundError(f"this inbox holds no key store for {team}") from None

    def _retrying(self, team: str, action: Callable[[Identity], Any]) -> Any:
        """Run ``action`` with the team's identity; on a key the directory does not know, reload
        the identities once (not more often than every 30 s) and try again."""
        try:
            return action(self.identity(team))
        except KeyNotFoundError:
            if self._reload is None:
                raise
            with self._lock:
                if time.monotonic() - self._loaded_at < _RELOAD_AFTER_S:
                    raise
                self._identities = dict(self._reload())
                self._loaded_at = time.monotonic()
            return action(self.identity(team))

    # -- RecordFormat ------------------------------------------------------------------------
    def summarise(self, record: SealedRecord, team: str) -> ReferralSummary:
        return self._retrying(team, lambda ident: self._summarise(ident, record, team))

    def _summarise(self, ident: Identity, record: SealedRecord, team: str) -> ReferralSummary:
        headers = verify_signed(ident.directory, record)  # before anything else is believed
        text = lambda name: headers.get(name, b"").decode("ascii", "replace")
        if text("rb-sender") != self.hub:
            raise SealingError(f"referral sent by {text('rb-sender')}, not by the hub; refused")
        if text("rb-recipient") != team:
            raise SealingError(f"message is addressed to {text('rb-recipient')}, not to {team}; refused")
        if text("rb-kind") != REFERRAL_KIND:
            raise ContractError(f"message kind {text('rb-kind')} is not a referral; refused")
        ident.schemas.learn(record.headers)  # derives the view from rb-view, checked against rb-schema
        try:
            fingerprint = bytes.fromhex(text("rb-schema"))
        except ValueError:
            raise SealingError("header rb-schema is not a hex fingerprint") from None
        schema = ident.schemas(fingerprint)
        if schema is None:
            raise ContractError(f"unknown view schema {text('rb-schema')[:16]}; refused")
        wire = sealing_plan(schema).decode_wire(record.value)
        referral_id = str(wire.get("referral_id") or "")
        version = wire.get("version")
        if not referral_id or not isinstance(version, int):
            raise ContractError("routed referral lacks referral_id or version; refused")
        if record.key != referral_id.encode("utf-8"):
            raise SealingError("message key is not the referral id; refused")
        if text("rb-referral-version") != str(version):
            raise SealingError("header rb-referral-version does not match the record; refused")
        referrer = wire.get("referrer") if isinstance(wire.get("referrer"), dict) else {}
        named = text(H_REFERRER)  # the exact referring party, when the router names it
        return ReferralSummary(
            referral_id=referral_id,
            version=version,
            referrer=named if named in all_parties() else str(referrer.get("partner") or "unknown"),
            referrer_organisation=referrer.get("organisation"),
            concern_types=tuple(str(c) for c in wire.get("concern_types") or ()),
            priority=str(wire.get("priority") or "not_given"),
            district=wire.get("district"),
            withheld=tuple(
                WithheldField(path, reason)
                for path, reason in withheld_from(record.header(H_WITHHELD)).items()
            ),
            no_onward=no_onward_from(record.header(H_NO_ONWARD)),
        )

    def open(self, record: SealedRecord, team: str) -> OpenedReferral:
        opened = self._retrying(team, lambda ident: ident.open(record))
        if opened.sender != self.hub or opened.kind != REFERRAL_KIND:
            raise SealingError(f"message from {opened.sender} of kind {opened.kind} is not a routed referral")
        return OpenedReferral(granted=opened.record)

    def seal_status(self, status: Mapping[str, Any], team: str) -> OutboundRecord:
        problems = validate_status(dict(status), now=datetime.now(UTC))
        if problems:
            raise ValidationError(problems, "status message")

        def seal(ident: Identity) -> Any:
            return ident.sealer.seal(
                dict(status),
                status_schema(),
                topic=topic_name(self.settings, "status", team),
                recipient=self.hub,
                referral_id=status["referral_id"],
                referral_version=status["version"],
                kind=STATUS_KIND,
            )

        message = self._retrying(team, seal)
        return OutboundRecord(message.key, message.value, list(message.headers))

    def sign_event(self, team: str | None, topic: str, key: bytes, value: bytes, kind: str) -> OutboundRecord:
        signer = team if team in self._identities else next(iter(self._identities))
        message = self._retrying(
            signer, lambda ident: sign_plain(ident.keystore, topic=topic, key=key, value=value, kind=kind)
        )
        return OutboundRecord(message.key, message.value, list(message.headers))
