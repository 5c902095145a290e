"""When the team's decision on a referral is due: working days from receipt, by priority.

The number of working days per priority is configuration (``[inbox] due_urgent_working_days``,
``due_high_working_days``, ``due_routine_working_days``; defaults 0, 3 and 10: an urgent
referral is due the working day it arrives). Working days are Monday to Friday in the council's
time zone (Europe/London); bank holidays are not known here and count as working days.

A referral is overdue when it still waits for a decision (new or acknowledged) after its due
date. Pure functions of their inputs: the clock is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from referral_broker.config import Settings

COUNCIL_TZ = ZoneInfo("Europe/London")

DEFAULT_WORKING_DAYS = {"urgent": 0, "high": 3, "routine": 10}


def local_date(at: datetime) -> date:
    """The council's calendar day at ``at``."""
    return at.astimezone(COUNCIL_TZ).date()


def next_working_day(day: date) -> date:
    """``day`` itself when it is a working day, else the Monday after."""
    while day.weekday() >= 5:
        day += timedelta(days=1)
    return day


def add_working_days(day: date, days: int) -> date:
    day = next_working_day(day)
    for _ in range(days):
        day = next_working_day(day + timedelta(days=1))
    return day


@dataclass(frozen=True)
class DuePolicy:
    """Working days to a decision, by priority; an unknown priority gets the routine time."""

    working_days: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_WORKING_DAYS))

    @classmethod
    def from_settings(cls, settings: Settings) -> DuePolicy:
        return cls(
            {
                "urgent": settings.inbox_due_urgent_working_days,
                "high": settings.inbox_due_high_working_days,
                "routine": settings.inbox_due_routine_working_days,
            }
        )

    def days_for(self, priority: str) -> int:
        return self.working_days.get(priority, self.working_days.get("routine", 10))

    def due_date(self, received: datetime, priority: str) -> date:
        return add_working_days(local_date(received), self.days_for(priority))


def is_overdue(due: date | None, now: datetime) -> bool:
    return due is not None and due < local_date(now)
