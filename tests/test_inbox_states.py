"""The referral state machine, over every (state, action) pair: what is allowed, what it leads
to, what is refused, and that the clock is the one passed in."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone

import pytest

from referral_broker.consumers.inbox.states import (
    FINISHED,
    LIVE,
    MEMBER_ACTIONS,
    NEEDS_REASON,
    UNDECIDED,
    Action,
    InvalidTransitionError,
    ReferralState,
    allowed_actions,
    transition,
)
from referral_broker.errors import ReferralBrokerError

S, A = ReferralState, Action
AT = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)

# The whole table, written out independently of the module's own: anything absent is refused.
EXPECTED: dict[tuple[ReferralState, Action], ReferralState] = {
    (S.NEW, A.OPEN): S.OPENED,
    (S.NEW, A.ACCEPT): S.ACCEPTED,
    (S.NEW, A.DECLINE): S.DECLINED,
    (S.NEW, A.REQUEST_INFORMATION): S.MORE_INFORMATION_NEEDED,
    (S.NEW, A.ALLOCATE): S.NEW,
    (S.OPENED, A.ACCEPT): S.ACCEPTED,
    (S.OPENED, A.DECLINE): S.DECLINED,
    (S.OPENED, A.REQUEST_INFORMATION): S.MORE_INFORMATION_NEEDED,
    (S.OPENED, A.ALLOCATE): S.OPENED,
    (S.ACCEPTED, A.ALLOCATE): S.ACCEPTED,
    (S.MORE_INFORMATION_NEEDED, A.ALLOCATE): S.MORE_INFORMATION_NEEDED,
    (S.MORE_INFORMATION_NEEDED, A.RECORD_INFORMATION): S.OPENED,
    (S.ACCEPTED, A.CLOSE): S.CLOSED,
    (S.MORE_INFORMATION_NEEDED, A.CLOSE): S.CLOSED,
    (S.NEW, A.RECEIVE_UPDATE): S.NEW,
    (S.OPENED, A.RECEIVE_UPDATE): S.OPENED,
    (S.ACCEPTED, A.RECEIVE_UPDATE): S.ACCEPTED,
    (S.DECLINED, A.RECEIVE_UPDATE): S.DECLINED,
    (S.MORE_INFORMATION_NEEDED, A.RECEIVE_UPDATE): S.NEW,
    (S.CLOSED, A.RECEIVE_UPDATE): S.CLOSED,
    **{(s, A.NOTE): s for s in ReferralState},
    **{(s, A.RESEARCH_OBJECTION): s for s in ReferralState},
}
ALL_PAIRS = list(itertools.product(ReferralState, Action))


@pytest.mark.parametrize(("state", "action"), ALL_PAIRS, ids=lambda x: x.value)
def test_every_pair_is_decided_as_the_table_says(state: ReferralState, action: Action) -> None:
    expected = EXPECTED.get((state, action))
    if expected is None:
        with pytest.raises(InvalidTransitionError) as refused:
            transition(state, action, at=AT)
        assert refused.value.state is state and refused.value.action is action
        assert isinstance(refused.value, ReferralBrokerError)
        assert state.label.lower() in str(refused.value)
    else:
        decided = transition(state, action, at=AT)
        assert (decided.before, decided.action, decided.after, decided.at) == (state, action, expected, AT)


def test_the_table_covers_the_issue_path() -> None:
    """new -> acknowledged -> more information needed -> information recorded (re-opened) ->
    accepted -> closed; a decision needs no acknowledgement first; declined is final."""
    state = S.NEW
    for action in (A.OPEN, A.REQUEST_INFORMATION, A.RECORD_INFORMATION, A.ACCEPT, A.CLOSE):
        state = transition(state, action, at=AT).after
    assert state is S.CLOSED
    assert transition(S.NEW, A.ACCEPT, at=AT).after is S.ACCEPTED
    assert allowed_actions(S.DECLINED) == ()


@pytest.mark.parametrize("state", list(ReferralState), ids=lambda s: s.value)
def test_allowed_actions_are_exactly_the_member_actions_that_succeed(state: ReferralState) -> None:
    succeed = []
    for action in MEMBER_ACTIONS:
        try:
            transition(state, action, at=AT)
            succeed.append(action)
        except InvalidTransitionError:
            pass
    assert list(allowed_actions(state)) == succeed


def test_closed_is_final_for_members() -> None:
    assert allowed_actions(S.CLOSED) == ()
    # a new referral is acknowledged or decided by a member, never by being read
    assert allowed_actions(S.NEW) == (A.OPEN, A.ACCEPT, A.REQUEST_INFORMATION, A.DECLINE, A.ALLOCATE)


@pytest.mark.parametrize(("state", "action"), list(EXPECTED), ids=lambda x: x.value)
def test_status_codes_follow_the_status_schema(state: ReferralState, action: Action) -> None:
    from referral_broker.schemas.registry import status_schema

    symbols = next(f for f in status_schema()["fields"] if f["name"] == "status")["type"]["symbols"]
    decided = transition(state, action, at=AT)
    if action in (A.RECEIVE_UPDATE, A.NOTE, A.RECORD_INFORMATION, A.RESEARCH_OBJECTION):
        assert not decided.notifies_referrer
    else:
        assert decided.notifies_referrer and decided.status_code in symbols


def test_actions_that_need_a_reason_are_the_schema_ones() -> None:
    assert {A.DECLINE, A.REQUEST_INFORMATION} == NEEDS_REASON


def test_the_clock_is_explicit_and_must_be_aware() -> None:
    later = AT + timedelta(days=3)
    assert transition(S.NEW, A.OPEN, at=later).at == later
    other_zone = datetime(2026, 11, 26, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert transition(S.NEW, A.OPEN, at=other_zone).at == other_zone
    with pytest.raises(ValueError, match="timezone-aware"):
        transition(S.NEW, A.OPEN, at=datetime(2026, 11, 26, 10, 0))


def test_string_values_are_accepted_as_the_enum() -> None:
    assert transition("new", "open", at=AT).after is S.OPENED  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        transition("archived", "open", at=AT)  # type: ignore[arg-type]


@pytest.mark.parametrize("state", list(ReferralState), ids=lambda s: s.value)
def test_every_state_is_live_or_finished_and_undecided_is_live(state: ReferralState) -> None:
    assert (state in LIVE) != (state in FINISHED)
    assert set(UNDECIDED) <= set(LIVE)
