"""``kafka transactions``' judgement, without a broker: which open transactions hang, and where
a group's offsets live. The broker side (listing, aborting, the router resuming) is in
``test_faults_router.py``."""

from __future__ import annotations

import pytest
from kafka import TopicPartition
from kafka.admin._transactions import TransactionDescription, TransactionState

from referral_broker.cluster.transactions import (
    SWEEP_MARGIN_S,
    UNKNOWN_HANGS_AFTER_S,
    _verdict,
    offsets_partition,
)

TP = TopicPartition("__consumer_offsets", 3)


def described(state: TransactionState = TransactionState.ONGOING, epoch: int = 4, parts: set | None = None):
    return TransactionDescription(
        coordinator_id=1,
        state=state,
        producer_id=7,
        producer_epoch=epoch,
        transaction_timeout_ms=20_000,
        transaction_start_time_ms=1,
        topic_partitions={TP} if parts is None else parts,
    )


@pytest.mark.parametrize(
    ("open_s", "txn", "older_than", "hangs", "says"),
    [
        (5.0, described(), None, False, "within its 20s timeout"),
        (20 + SWEEP_MARGIN_S + 1, described(), None, True, "past its 20s timeout"),
        (5.0, described(), 2.0, True, "longer than the 2s asked"),
        (5.0, described(TransactionState.COMPLETE_ABORT), None, True, "CompleteAbort"),
        (5.0, described(epoch=5), None, True, "epoch 5: no marker will come"),
        (5.0, described(parts=set()), None, True, "does not include this partition"),
        (5.0, None, None, False, "may have just begun"),
        (UNKNOWN_HANGS_AFTER_S + 1, None, None, True, "no coordinator knows its producer"),
    ],
)
def test_which_open_transactions_hang(open_s, txn, older_than, hangs, says) -> None:
    hanging, why = _verdict(open_s, TP, txn, 4, older_than)
    assert hanging is hangs and says in why, why


def test_a_groups_offsets_partition_is_kafkas_own_choice() -> None:
    """Java's String.hashCode, made non-negative, modulo the partition count: "hello" hashes
    to 99162322 in Java; a group whose hash is negative, and one with a character beyond ASCII."""
    assert offsets_partition("hello", 50) == 99162322 % 50
    assert offsets_partition("polygenelubricants", 50) == 0  # hashCode is Integer.MIN_VALUE: Kafka takes 0
    assert offsets_partition("Aa", 7) == offsets_partition("BB", 7)  # a Java hash collision
    assert offsets_partition("zoë", 50) == (ord("z") * 31 * 31 + ord("o") * 31 + ord("ë")) % 50
