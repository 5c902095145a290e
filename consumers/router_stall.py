"""A router that reads nothing while its partitions hold records: noticed, explained, acted on.

A read-committed consumer cannot start on a partition whose committed offset is held by a
transaction still open (the broker answers UNSTABLE_OFFSET_COMMIT, which kafka-python retries
without a word), and a consumer whose fetches stopped for any other reason looks the same from
outside: ``poll`` returns nothing, nothing is logged, the referrals wait. The first happens
whenever a router dies inside a batch (its transaction holds the group's offsets until its
timeout); a CI run once saw a router sit like this for 120 s after a broker restart, cause not
found. :class:`StallWatch` tells that apart from idleness (the
partitions' ends, as the cluster says now) and says which of the two it is, so the router can
warn, count it, and rebuild its clients once the wait is longer than any transaction may be open.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka.errors import KafkaError

STALL_AFTER_S = 30.0


@dataclass(frozen=True)
class Stall:
    """Partitions assigned to this router that it cannot read on, and for how long."""

    seconds: float
    assigned: int
    unpositioned: int  # no committed offset readable yet
    behind: int  # partitions with a position short of their end
    records: int  # records waiting on those

    @property
    def reason(self) -> str:
        if self.unpositioned:
            return (
                f"the committed offsets of {self.unpositioned} of {self.assigned} partition(s) cannot be read: "
                "a transaction that wrote them is still open (a router stopped inside a batch holds them "
                "until its transaction timeout; 'referral-broker kafka transactions' shows it, and ends "
                "one left hanging)"
            )
        return f"{self.behind} partition(s) hold {self.records} record(s) this router has not been able to fetch"

    def as_log(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "seconds": round(self.seconds, 1),
            "partitions": self.assigned,
            "unpositioned": self.unpositioned,
            "behind": self.behind,
            "records": self.records,
        }


class StallWatch:
    """Looks, at most once every ``after_s``, whether a router that has read nothing for that
    long has records waiting on its partitions it cannot get at."""

    def __init__(self, after_s: float = STALL_AFTER_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.after_s = after_s
        self._clock = clock
        self._since = clock()
        self._checked = self._since
        self._rebuilt = False

    def progress(self) -> None:
        """Records were read: any stall is over."""
        self._since = self._checked = self._clock()
        self._rebuilt = False

    def restarted(self) -> None:
        """New clients: give them ``after_s`` to join and fetch before looking again."""
        self._checked = self._clock()

    def rebuild_due(self, stall: Stall, longest_transaction_s: float) -> bool:
        """True once a stall: when it has lasted longer than any transaction of a fellow router
        may stay open (the same settings) and a look more. Rebuilding fences this router's own
        transactional id, which settles whatever it left open; it cannot end another's."""
        if self._rebuilt or stall.seconds < longest_transaction_s + self.after_s:
            return False
        self._rebuilt = True
        return True

    def check(self, consumer: Any) -> Stall | None:
        now = self._clock()
        if now - self._since < self.after_s or now - self._checked < self.after_s:
            return None
        self._checked = now
        owned = list(consumer.assignment())
        if not owned:
            return None  # a rebalance is the group's business, and records are not this router's yet
        try:
            ends = consumer.end_offsets(owned, timeout_ms=5_000)
        except KafkaError:
            return None  # the cluster is away: the router's failure handling waits for it
        unpositioned = behind = records = 0
        for tp in owned:
            # no wait: poll has just tried to find every position, and one that blocks here would
            # wait on each partition in turn
            try:
                position = consumer.position(tp, timeout_ms=0)
            except KafkaError:  # no longer assigned (a rebalance under way): not this router's now
                continue
            if position is None:
                unpositioned += ends[tp] > 0  # an empty partition has nothing waiting on it
            elif position < ends[tp]:
                behind += 1
                records += ends[tp] - position
        if not unpositioned and not behind:
            return None  # read to the end: idle, not stalled
        return Stall(now - self._since, len(owned), unpositioned, behind, records)
