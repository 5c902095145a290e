"""How inbox values read on screen: ages, labels, tags and opened field values.

Pure functions of their inputs (the clock is passed in), used by the templates as filters.
Opened values are formatted for the response being rendered and go nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Any

from referral_broker.consumers.inbox.states import ReferralState

# Words that read better in capitals or a set form when a code becomes a label.
_WORDS = {
    "nhs": "NHS",
    "ni": "NI",
    "upn": "UPN",
    "urn": "URN",
    "gp": "GP",
    "send": "SEND",
    "ehc": "EHC",
    "eyfs": "EYFS",
    "neet": "NEET",
    "dwp": "DWP",
    "cambs": "Cambridgeshire",
}

STATE_TAG_CLASSES = {
    ReferralState.NEW: "govuk-tag--blue",
    ReferralState.OPENED: "govuk-tag--light-blue",
    ReferralState.ACCEPTED: "govuk-tag--green",
    ReferralState.DECLINED: "govuk-tag--red",
    ReferralState.MORE_INFORMATION_NEEDED: "govuk-tag--yellow",
    ReferralState.CLOSED: "govuk-tag--grey",
}

PRIORITY_TAG_CLASSES = {
    "urgent": "govuk-tag--red",
    "high": "govuk-tag--orange",
    "routine": "govuk-tag--grey",
}


def humanise(code: str | None) -> str:
    """``east_cambs`` -> ``East Cambridgeshire``; ``nhs_number`` -> ``NHS number``."""
    if not code:
        return ""
    words = code.replace("-", " ").replace("_", " ").split()
    out = [_WORDS.get(w.lower(), w) for w in words]
    if out and out[0] == words[0]:
        out[0] = out[0][:1].upper() + out[0][1:]
    return " ".join(out)


def field_label(path: str) -> str:
    """A field path as a label: ``child.address.postcode`` -> ``Child › Address › Postcode``."""
    return " › ".join(humanise(p) for p in path.split("."))


def age(since: datetime, now: datetime) -> str:
    """How long ago, in the largest whole unit: '3 days', '5 hours', 'less than an hour'."""
    delta = max(now - since, timedelta(0))
    days = delta.days
    if days >= 14:
        weeks = days // 7
        return f"{weeks} weeks"
    if days >= 1:
        return "1 day" if days == 1 else f"{days} days"
    hours = delta.seconds // 3600
    if hours >= 1:
        return "1 hour" if hours == 1 else f"{hours} hours"
    return "less than an hour"


def when(at: datetime | None) -> str:
    """GOV.UK style date and time: '26 November 2026 at 10:25am' (UTC)."""
    if at is None:
        return ""
    hour = at.hour % 12 or 12
    return f"{at.day} {at:%B %Y} at {hour}:{at:%M}{'am' if at.hour < 12 else 'pm'}"


def display_value(value: Any) -> str | list[Any] | dict[str, Any]:
    """An opened value as text, or as a list/dict of texts for nested values."""
    if value is None:
        return "Not given"
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if isinstance(value, datetime):
        return when(value)
    if isinstance(value, date):
        return f"{value.day} {value:%B %Y}"
    if isinstance(value, Mapping):
        return {humanise(k): display_value(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [display_value(v) for v in value] if value else "None"
    if isinstance(value, bytes):
        return "(sealed)"
    return str(value)
