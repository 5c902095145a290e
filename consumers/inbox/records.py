"""What the inbox keeps of a routed referral, and the one seam where the sealed format plugs in.

A record arrives on ``referrals.out.<team>`` sealed for that team. The inbox keeps it exactly as
it arrived (the shared :class:`~referral_broker.cluster.clients.Record`: key, headers and value bytes) so crypto-shredding the case key
makes the inbox copy unreadable too. The operations that need to understand the format all
sit behind :class:`RecordFormat` so the inbox never depends on how sealing works inside:

- ``summarise``: verify the record and read its clear, operational part (ids, referrer, concern
  types, priority, district, which fields were withheld and why). No keys, no personal values.
- ``open``: open the fields sealed for the team, in memory, for one signed-in member's view.
- ``seal_status``: seal and sign a status message (its reason in words is sealed) for the
  router to carry back to the referrer.
- ``sign_event``: sign an access audit event (ids and outcomes only) as the team.
- ``seal_text`` / ``open_text``: a case note, information recorded, or the words sent to the
  referrer, sealed for the team itself under the case key, so the inbox database keeps them
  sealed at rest and they die with the case like the referral.

This module must never hold an opened value longer than one call, and never log one.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from referral_broker.cluster.clients import Record
from referral_broker.sealing import OutgoingMessage

Headers = list[tuple[str, bytes]]


def headers_to_json(headers: Headers) -> str:
    """Headers as stored: names in clear, values base64 (they are bytes and may be binary)."""
    return json.dumps([[k, base64.b64encode(v).decode("ascii")] for k, v in headers])


def headers_from_json(text: str) -> Headers:
    return [(k, base64.b64decode(v)) for k, v in json.loads(text)]


@dataclass(frozen=True)
class WithheldField:
    """A field the policy did not grant this team: named, with the reason, never with a value."""

    path: str
    reason: str


@dataclass(frozen=True)
class ReferralSummary:
    """The operational part of a referral the list needs; it holds no personal value."""

    referral_id: str
    version: int
    referrer: str  # the referring party (parties.toml name)
    concern_types: tuple[str, ...]
    priority: str
    referrer_organisation: str | None = None  # operational in referral.v1 (a school, a practice)
    district: str | None = None
    withheld: tuple[WithheldField, ...] = ()
    no_onward: tuple[str, ...] = ()  # granted paths the team must not pass on
    created_at: datetime | None = None  # when the referrer made it (operational, clear)
    flags: tuple[str, ...] = ()  # the risk flags set (operational, clear)
    decision_id: str | None = None  # the router's audited sharing decision (rb-decision)


@dataclass(frozen=True)
class OpenedReferral:
    """The fields granted to the team, opened for one view: dotted field path -> value.

    ``granted`` is ordered as the referral's schema orders it. It lives only as long as the
    request that rendered it.
    """

    granted: Mapping[str, Any] = field(default_factory=dict)


class RecordFormat(Protocol):
    """How the inbox reads routed records and writes status messages: the seam where the
    sealing package plugs in. The implementation owns verification: ``summarise`` must refuse
    (raise a :class:`~referral_broker.errors.ReferralBrokerError`) a record that does not verify,
    and ``open`` must refuse rather than return partial plaintext."""

    def summarise(self, record: Record, team: str) -> ReferralSummary:
        """Verify ``record`` and read its clear, operational part."""
        ...

    def open(self, record: Record, team: str) -> OpenedReferral:
        """Open the fields sealed for ``team`` (needs the team's private key)."""
        ...

    def seal_status(self, status: Mapping[str, Any], team: str) -> OutgoingMessage:
        """A ``status.v1`` record from ``team``, sealed and signed, keyed by referral id, ready
        for ``referrals.status.<team>`` (the router carries it back to the referrer)."""
        ...

    def signer(self, team: str | None) -> str:
        """The team that signs an event about ``team``: itself, or this inbox's first team when
        the event has none (a refused sign-in by no known member)."""
        ...

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
        """A plain (unsealed, value-free by construction) event signed as :meth:`signer`."""
        ...

    def delivered_status(self, record: Record) -> tuple[str, str] | None:
        """For a message on a referrer's out topic: (from party, status id) when it is a status
        message the hub signed, else None; raise when its signature does not verify."""
        ...

    def sharing_decision(self, record: Record) -> dict[str, Any] | None:
        """For a record on the audit topic: the router's decision (``audit_decision`` fields)
        when it is one the hub signed, else None; raise when its signature does not verify."""
        ...

    def seal_text(self, team: str, referral_id: str, text: str) -> bytes:
        """``text`` sealed for ``team`` under the referral's case key, signed by the team."""
        ...

    def open_text(self, team: str, referral_id: str, sealed: bytes) -> str:
        """What :meth:`seal_text` sealed, verified and opened (or an exception)."""
        ...
