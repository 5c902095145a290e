"""A referral's life in a district team's inbox: one enum of states, one pure transition function.

    new --open (Acknowledge)--> opened ("Acknowledged")
    new | opened --accept--> accepted --close--> closed
                 --decline--> declined                      (final: a decision, nothing to close)
                 --request_information--> more_information_needed --close--> closed
    more_information_needed --record_information--> opened  (the answer came by phone, e-mail...)
    more_information_needed --receive_update--> new         (the referrer answered with a new version)

Reading a referral changes nothing: triage is separate from working. A member acknowledges it
explicitly (``open``, shown as "Acknowledge"), or decides it straight away. ``allocate`` names
the worker who holds the case; it keeps the state (allocation is a separate field) and is
allowed while the case is live. ``note`` (a case note) is allowed in every state and keeps it.
Acknowledging and every decision are reported to the referrer (``Transition.status_code``, the
``StatusCode`` of ``schemas/status.v1.avsc``); notes, recorded information and new versions are
not. ``receive_update`` records a new version arriving; only a referral waiting for information
changes state (back to new, so the team sees the answer), every other state keeps its place.

The function decides and never stores: the store writes a transition only after this function
returned one, so an invalid transition cannot reach the database or Kafka. The clock is passed
in (``at``) so the decision is reproducible and testable without patching time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from referral_broker.errors import InvalidTransitionError


class ReferralState(StrEnum):
    NEW = "new"
    OPENED = "opened"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    MORE_INFORMATION_NEEDED = "more_information_needed"
    CLOSED = "closed"

    @property
    def label(self) -> str:
        return _STATE_LABELS[self]


class Action(StrEnum):
    OPEN = "open"
    ACCEPT = "accept"
    DECLINE = "decline"
    REQUEST_INFORMATION = "request_information"
    ALLOCATE = "allocate"
    CLOSE = "close"
    RECEIVE_UPDATE = "receive_update"
    RECORD_INFORMATION = "record_information"
    NOTE = "note"
    RESEARCH_OBJECTION = "research_objection"

    @property
    def label(self) -> str:
        return _ACTION_LABELS[self]


_STATE_LABELS = {
    ReferralState.NEW: "New",
    ReferralState.OPENED: "Acknowledged",
    ReferralState.ACCEPTED: "Accepted",
    ReferralState.DECLINED: "Declined",
    ReferralState.MORE_INFORMATION_NEEDED: "More information needed",
    ReferralState.CLOSED: "Closed",
}

_ACTION_LABELS = {
    Action.OPEN: "Acknowledged",
    Action.ACCEPT: "Accepted",
    Action.DECLINE: "Declined",
    Action.REQUEST_INFORMATION: "Asked for more information",
    Action.ALLOCATE: "Allocated",
    Action.CLOSE: "Closed",
    Action.RECEIVE_UPDATE: "New version received",
    Action.RECORD_INFORMATION: "Information received, re-opened",
    Action.NOTE: "Case note",
    Action.RESEARCH_OBJECTION: "Family objects to research use",
}

S, A = ReferralState, Action

# (state, action) -> next state. Anything absent is refused.
_NEXT: dict[tuple[ReferralState, Action], ReferralState] = {
    (S.NEW, A.OPEN): S.OPENED,
    # The decision itself acknowledges: from new or acknowledged.
    **{(s, A.ACCEPT): S.ACCEPTED for s in (S.NEW, S.OPENED)},
    **{(s, A.DECLINE): S.DECLINED for s in (S.NEW, S.OPENED)},
    **{(s, A.REQUEST_INFORMATION): S.MORE_INFORMATION_NEEDED for s in (S.NEW, S.OPENED)},
    (S.MORE_INFORMATION_NEEDED, A.RECORD_INFORMATION): S.OPENED,
    (S.ACCEPTED, A.CLOSE): S.CLOSED,
    (S.MORE_INFORMATION_NEEDED, A.CLOSE): S.CLOSED,
    # Allocation keeps the state: a worker holds the case while it is live.
    **{(s, A.ALLOCATE): s for s in (S.NEW, S.OPENED, S.ACCEPTED, S.MORE_INFORMATION_NEEDED)},
    # A case note never changes the state, whatever it is.
    **{(s, A.NOTE): s for s in ReferralState},
    # So does recording that the family objects to their data going to the national evaluation.
    **{(s, A.RESEARCH_OBJECTION): s for s in ReferralState},
    # A new version of the referral is never refused (nothing is dropped); it only moves a
    # referral that was waiting for it.
    **{(s, A.RECEIVE_UPDATE): s for s in ReferralState if s is not S.MORE_INFORMATION_NEEDED},
    (S.MORE_INFORMATION_NEEDED, A.RECEIVE_UPDATE): S.NEW,
}

# Actions a team member chooses on the referral page, in the order it offers them (a case
# note has its own form and is always allowed).
MEMBER_ACTIONS: tuple[Action, ...] = (
    A.OPEN,
    A.ACCEPT,
    A.REQUEST_INFORMATION,
    A.RECORD_INFORMATION,
    A.DECLINE,
    A.ALLOCATE,
    A.CLOSE,
)

# Where a referral stands, for the inbox's views.
UNDECIDED: tuple[ReferralState, ...] = (S.NEW, S.OPENED)
LIVE: tuple[ReferralState, ...] = (S.NEW, S.OPENED, S.ACCEPTED, S.MORE_INFORMATION_NEEDED)
FINISHED: tuple[ReferralState, ...] = (S.DECLINED, S.CLOSED)


_STATUS_CODES = {
    A.OPEN: "opened",
    A.ACCEPT: "accepted",
    A.DECLINE: "declined",
    A.REQUEST_INFORMATION: "more_information_needed",
    A.ALLOCATE: "allocated",
    A.CLOSE: "closed",
}

# Actions whose status message must say why, in words (status.v1: reason).
NEEDS_REASON: frozenset[Action] = frozenset({A.DECLINE, A.REQUEST_INFORMATION})

# Actions that stay inside the team: nothing is sent to the referrer.
_INTERNAL: frozenset[Action] = frozenset({A.RECEIVE_UPDATE, A.RECORD_INFORMATION, A.NOTE, A.RESEARCH_OBJECTION})


@dataclass(frozen=True)
class Transition:
    """One decided change: what the referral was, what was done, what it is now, and when."""

    before: ReferralState
    action: Action
    after: ReferralState
    at: datetime

    @property
    def notifies_referrer(self) -> bool:
        """Acknowledging and every decision go back to the referrer as a status message; a new
        version arriving from the referrer (the referrer sent it), a case note and information
        recorded by the team do not."""
        return self.action not in _INTERNAL

    @property
    def status_code(self) -> str | None:
        """The ``StatusCode`` symbol of ``status.v1.avsc`` this transition reports, if any."""
        return _STATUS_CODES.get(self.action)


def transition(state: ReferralState, action: Action, *, at: datetime) -> Transition:
    """Decide ``action`` on a referral in ``state`` at time ``at``; raise if it is not allowed."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("transition time must be timezone-aware")
    state, action = ReferralState(state), Action(action)
    try:
        after = _NEXT[(state, action)]
    except KeyError:
        allowed = [a.value for a in allowed_actions(state)]
        raise InvalidTransitionError(state, action, state_label=state.label, allowed=allowed) from None
    return Transition(before=state, action=action, after=after, at=at)


def allowed_actions(state: ReferralState) -> tuple[Action, ...]:
    """The actions a member may take now, in the order the page offers them."""
    return tuple(a for a in MEMBER_ACTIONS if (ReferralState(state), a) in _NEXT)
