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
- ``seal_status``: a ``status.v1`` record, validated, sealed for the hub under the case key
  and signed by the team, for ``referrals.status.<team>``; the router carries it back to the
  referrer. Once the case is shredded it no longer opens, on the topic or in a dead letter.
- ``sign_event``: an access audit event (ids and outcomes, no values) signed by the team.
- ``seal_text`` / ``open_text``: a team's own text (case notes, information recorded, the words
  sent to the referrer) as a signed message sealed for the team under the case key (the
  ``CaseText`` schema here; its text is special category), kept as bytes in the database.

Every stage loads its keys the same way (``load_identity``); when a message names a key the
directory does not know yet (a rotation since start-up), that identity reloads its directory
once (``Identity.retrying``), as every stage does.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from referral_broker.config import Settings
from referral_broker.consumers.inbox.records import (
    OpenedReferral,
    OutgoingMessage,
    Record,
    ReferralSummary,
    WithheldField,
)
from referral_broker.consumers.receiving import open_verified, verify_arrival
from referral_broker.errors import ContractError, KeyNotFoundError, SealingError
from referral_broker.identity import (
    H_DECISION,
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
from referral_broker.producers.hub_seal import seal_status
from referral_broker.schemas import codec
from referral_broker.sealing import MessageOpener, schema_book, sealing_plan, sign_plain, verify_signed

T = TypeVar("T")

REFERRAL_KIND = "referral"
STATUS_KIND = "status"
TEXT_KIND = "inbox.text"
DECISION_KIND = "audit.decision"

# A team's own words about a case, sealed at rest: never sent anywhere, only stored.
CASE_TEXT_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "CaseText",
    "namespace": "earlyhelp.inbox",
    "doc": "A district team's own text about one referral (a case note, information recorded, "
    "the words sent to the referrer), sealed for the team itself.",
    "fields": [
        {"name": "referral_id", "type": "string", "data_class": "operational"},
        {"name": "text", "type": "string", "data_class": "special_category"},
    ],
}


class SealedReferralFormat:
    """Reads routed referrals for the teams whose identities (key stores) it holds; thread-safe."""

    def __init__(
        self,
        settings: Settings,
        identities: Mapping[str, Identity],
        *,
        hub: str = HUB,
    ) -> None:
        self.settings = settings
        self._identities = dict(identities)
        self.hub = hub

    @classmethod
    def from_settings(
        cls, settings: Settings, teams: list[str] | tuple[str, ...], bootstrap: str | None = None
    ) -> SealedReferralFormat:
        """Each team's identity (key store, permissions checked; the hub's case keys) over one
        key directory read from the ``keys`` topic (and the published file)."""
        server = bootstrap or settings.bootstrap_servers
        directory = load_directory(settings, server)
        return cls(
            settings, {team: load_identity(settings, server, team, directory=directory) for team in teams}
        )

    def identity(self, team: str) -> Identity:
        try:
            return self._identities[team]
        except KeyError:
            raise KeyNotFoundError(f"this inbox holds no key store for {team}") from None

    def _retrying(self, team: str, action: Callable[[Identity], T]) -> T:
        """Run ``action`` with the team's identity (which reloads its keys once on a miss)."""
        return self.identity(team).retrying(action)

    # -- RecordFormat ------------------------------------------------------------------------
    def summarise(self, record: Record, team: str) -> ReferralSummary:
        return self._retrying(team, lambda ident: self._summarise(ident, record, team))

    def _summarise(self, ident: Identity, record: Record, team: str) -> ReferralSummary:
        # before anything else is believed: signature, signer, sender, recipient, kind
        headers = verify_arrival(ident, record, sender=self.hub, kinds=(REFERRAL_KIND,))
        text = lambda name: headers.get(name, b"").decode("ascii", "replace")
        ident.schemas.learn(record.headers)  # derives the view from rb-view, checked against rb-schema
        try:
            fingerprint = bytes.fromhex(text("rb-schema"))
        except ValueError:
            raise SealingError("header rb-schema is not a hex fingerprint") from None
        schema = ident.schemas(fingerprint)
        if schema is None:
            raise ContractError(f"unknown view schema {text('rb-schema')[:16]}; refused")
        assert record.value is not None  # the signature check refuses a message without a value
        wire = sealing_plan(schema).decode_wire(record.value)
        referral_id = str(wire.get("referral_id") or "")
        version = wire.get("version")
        if not referral_id or not isinstance(version, int):
            raise ContractError("routed referral lacks referral_id or version; refused")
        if record.key != referral_id.encode("utf-8"):
            raise SealingError("message key is not the referral id; refused")
        if text("rb-referral-version") != str(version):
            raise SealingError("header rb-referral-version does not match the record; refused")
        referrer = wire.get("referrer")
        if not isinstance(referrer, dict):
            referrer = {}
        named = text(H_REFERRER)  # the exact referring party, when the router names it
        created = wire.get("created_at")
        flags = wire.get("flags")
        if not isinstance(flags, dict):
            flags = {}
        return ReferralSummary(
            referral_id=referral_id,
            version=version,
            referrer=named if named in all_parties() else str(referrer.get("partner") or "unknown"),
            referrer_organisation=referrer.get("organisation"),
            concern_types=tuple(str(c) for c in wire.get("concern_types") or ()),
            priority=str(wire.get("priority") or "not_given"),
            district=wire.get("district"),
            withheld=tuple(
                WithheldField(path, reason) for path, reason in withheld_from(headers.get(H_WITHHELD)).items()
            ),
            no_onward=no_onward_from(headers.get(H_NO_ONWARD)),
            created_at=created if isinstance(created, datetime) else None,
            flags=tuple(sorted(name for name, on in flags.items() if on is True)),
            decision_id=text(H_DECISION) or None,
        )

    def open(self, record: Record, team: str) -> OpenedReferral:
        opened = open_verified(self.identity(team), record, sender=self.hub, kinds=(REFERRAL_KIND,))
        return OpenedReferral(granted=opened.record)

    def seal_status(self, status: Mapping[str, Any], team: str) -> OutgoingMessage:
        """Through the one status sealer (``producers.hub_seal``), as a partner's statuses are,
        and under the case key too: the council's own words about a case (a decline's reason)
        must not open on the status topic once the case is shredded."""
        case_id = str(status["referral_id"])
        return self._retrying(
            team,
            lambda ident: seal_status(
                ident.sealer, self.settings, status, party=team, hub=self.hub, case_id=case_id
            ),
        )

    def signer(self, team: str | None) -> str:
        return team if team in self._identities else next(iter(self._identities))

    def sign_event(
        self,
        team: str | None,
        topic: str,
        key: bytes,
        value: bytes,
        kind: str,
        *,
        extra_headers: Sequence[tuple[str, bytes]] = (),
    ) -> OutgoingMessage:
        return self._retrying(
            self.signer(team),
            lambda ident: sign_plain(
                ident.keystore, topic=topic, key=key, value=value, kind=kind, extra_headers=extra_headers
            ),
        )

    def delivered_status(self, record: Record) -> tuple[str, str] | None:
        """Reads only the clear, operational part (``from_party``, ``status_id``) of a status the
        hub sealed for a referrer, after checking the hub's signature; opens nothing."""
        ident = next(iter(self._identities.values()))
        headers = ident.retrying(lambda i: verify_signed(i.directory, record))
        if headers.get("rb-kind") != STATUS_KIND.encode() or headers.get("rb-sender") != self.hub.encode():
            return None
        try:
            schema = ident.schemas(bytes.fromhex(headers.get("rb-schema", b"").decode("ascii")))
        except ValueError:
            raise SealingError("header rb-schema is not a hex fingerprint") from None
        if schema is None or record.value is None:
            return None
        wire = sealing_plan(schema).decode_wire(record.value)
        if not wire.get("status_id") or not wire.get("from_party"):
            return None
        return str(wire["from_party"]), str(wire["status_id"])

    def sharing_decision(self, record: Record) -> dict[str, Any] | None:
        """The router's audit decisions are signed, not sealed (names and codes only): check the
        hub's signature, then decode."""
        ident = next(iter(self._identities.values()))
        headers = ident.retrying(lambda i: verify_signed(i.directory, record))
        if headers.get("rb-kind") != DECISION_KIND.encode() or headers.get("rb-sender") != self.hub.encode():
            return None
        if record.value is None:
            return None
        return codec.decode(record.value)

    def seal_text(self, team: str, referral_id: str, text: str) -> bytes:
        message = self._retrying(
            team,
            lambda ident: ident.sealer.seal(
                {"referral_id": referral_id, "text": text},
                CASE_TEXT_SCHEMA,
                topic=f"inbox.text.{team}",  # never produced: names what the signature covers
                recipient=team,
                referral_id=referral_id,
                referral_version=1,
                kind=TEXT_KIND,
                case_id=referral_id,
            ),
        )
        stored = {
            "topic": message.topic,
            "headers": [[k, base64.b64encode(v).decode("ascii")] for k, v in message.headers],
            "value": base64.b64encode(message.value or b"").decode("ascii"),
        }
        return json.dumps(stored).encode("utf-8")

    def open_text(self, team: str, referral_id: str, sealed: bytes) -> str:
        stored = json.loads(sealed)
        record = Record(
            stored["topic"],
            0,
            0,
            referral_id.encode("utf-8"),
            base64.b64decode(stored["value"]),
            [(k, base64.b64decode(v)) for k, v in stored["headers"]],
            int(time.time() * 1000),
        )
        ident = self.identity(team)
        opener = MessageOpener(
            ident.keystore,
            ident.directory,
            schema_book(CASE_TEXT_SCHEMA),
            case_keys=ident.case_keys.lookup if ident.case_keys is not None else None,
        )
        opened = opener.open(record)
        if opened.sender != team or opened.kind != TEXT_KIND or opened.record["referral_id"] != referral_id:
            raise SealingError("sealed text is not this team's text about this referral; refused")
        return str(opened.record["text"])
