"""The one place a party seals what it sends to the council's hub: referrals on its intake
topic and status messages on its status topic. Only the hub can open them; the router re-seals
per recipient.

:func:`seal_status` is the one status sealer: a partner's ``send_status`` and the inbox's
status messages both go through it, so a status is validated (with the deployment's parties)
and sealed the same way whoever sends it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.errors import ValidationError
from referral_broker.identity import H_PRIORITY
from referral_broker.parties import HUB, all_parties
from referral_broker.sealing import MessageSealer
from referral_broker.sealing.envelope import OutgoingMessage, sign_messages

REFERRAL_KIND = "referral"
STATUS_KIND = "status"


def seal_for_hub(
    sealer: MessageSealer,
    record: Mapping[str, Any],
    schema: dict[str, Any],
    *,
    topic: str,
    kind: str,
    hub: str = HUB,
    case_id: str | None = None,
    extra_headers: tuple[tuple[str, bytes], ...] = (),
    sign: bool = True,
) -> OutgoingMessage:
    """Seal ``record`` for the hub alone and sign it for ``topic`` (keyed by its referral id);
    under the key of ``case_id`` too when given (the council's own inbox: its statuses die with
    the case, see ``retention shred``). ``sign=False``: it awaits :meth:`HubSealer.sign_batch`."""
    return sealer.seal(
        dict(record),
        schema,
        topic=topic,
        recipient=hub,
        referral_id=str(record["referral_id"]),
        referral_version=int(record["version"]),
        kind=kind,
        case_id=case_id,
        extra_headers=extra_headers,
        sign=sign,
    )


class HubSealer:
    """Seals as ``party`` for the hub: referrals for its intake topic, statuses for its status
    topic. Holds the schemas once (the registry hands out a fresh copy per call)."""

    def __init__(self, sealer: MessageSealer, settings: Settings, party: str, *, hub: str = HUB) -> None:
        from referral_broker.schemas.registry import referral_schema, status_schema

        self.sealer = sealer
        self.settings = settings
        self.party = party
        self.hub = hub
        self.referral_schema = referral_schema()
        self.status_schema = status_schema()
        self.intake_topic = topic_name(settings, "intake", party)

    def referral(self, record: Mapping[str, Any], *, sign: bool = True) -> OutgoingMessage:
        """An already validated canonical referral (the caller validated it, once), with its
        priority in a signed header: the router routes urgent referrals first. ``sign=False``
        for one of many sent together: :meth:`sign_batch` then signs them all at once."""
        return seal_for_hub(
            self.sealer,
            record,
            self.referral_schema,
            topic=self.intake_topic,
            kind=REFERRAL_KIND,
            hub=self.hub,
            extra_headers=((H_PRIORITY, str(record["priority"]).encode()),),
            sign=sign,
        )

    def sign_batch(self, messages: Sequence[OutgoingMessage]) -> list[OutgoingMessage]:
        """Messages built with ``sign=False``, signed in order under one signature (a Merkle
        tree, each with its proof): the router then verifies one signature for all of them."""
        return sign_messages(self.sealer.keystore, messages)

    def status(self, status: Mapping[str, Any], *, now: dt.datetime | None = None) -> OutgoingMessage:
        return seal_status(
            self.sealer, self.settings, status, party=self.party, hub=self.hub, now=now, schema=self.status_schema
        )


def seal_status(
    sealer: MessageSealer,
    settings: Settings,
    status: Mapping[str, Any],
    *,
    party: str,
    hub: str = HUB,
    now: dt.datetime | None = None,
    schema: dict[str, Any] | None = None,
    case_id: str | None = None,
) -> OutgoingMessage:
    """Validate a ``status.v1`` record (ValidationError lists every problem), seal it for the hub
    (under ``case_id``'s key too when given) and sign it as ``party`` for ``referrals.status.<party>``."""
    from referral_broker.schemas.registry import shared_schema
    from referral_broker.schemas.validation import validate

    schema = schema if schema is not None else shared_schema("status")  # the inbox's: one for all
    problems = validate(dict(status), schema, now=now, known_parties=all_parties())
    if problems:
        raise ValidationError(problems, "status message")
    topic = topic_name(settings, "status", party)
    return seal_for_hub(sealer, status, schema, topic=topic, kind=STATUS_KIND, hub=hub, case_id=case_id)
