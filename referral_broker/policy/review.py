"""What a Data Protection Officer reads: the policy explained per recipient, and the
difference two versions of the policy would make to what each recipient receives."""

from __future__ import annotations

from typing import Any

from referral_broker.errors import PolicyError
from referral_broker.parties import get_party
from referral_broker.policy.model import (
    GROUNDS,
    OVERRIDE_GROUNDS,
    RECIPIENT_RULES,
    SPECIAL_CATEGORY_CONDITIONS,
    SharingPolicy,
)


def explain(policy: SharingPolicy, recipient: str) -> dict[str, Any]:
    """Every field the recipient may get (by which purposes, on which ground, under which
    conditions) and every field it never gets. ``recipient`` is a recipient rule
    (``child_school``) or an organisation (``school:110123``): for an organisation, the
    purposes whose rule can resolve to it, when a referral names it."""
    if recipient in RECIPIENT_RULES:
        who = {"recipient": recipient, "rule": RECIPIENT_RULES[recipient]}
    else:
        party = get_party(recipient)  # unknown recipients are an error, not an empty answer
        who = {"recipient": party.name, "name": party.description}
    purposes = policy.purposes_for(recipient)
    fields = []
    for unit in policy.units:
        by = [p for p in purposes if unit in p.granted]
        if by:
            fields.append(
                {
                    "path": unit,
                    "data_class": policy.unit_classes[unit],
                    "purposes": [p.name for p in by],
                    "no_onward_sharing": any(unit in p.no_onward_sharing for p in by),
                }
            )
    return {
        **who,
        "policy": policy.source,
        "policy_version": policy.version,
        "purposes": [
            {
                "name": p.name,
                "recipient_rule": p.recipient,
                "description": p.description,
                "ground": GROUNDS[p.ground],
                "special_category_condition": SPECIAL_CATEGORY_CONDITIONS.get(
                    p.special_category_condition or ""
                ),
                "consent": p.consent,
                "override_grounds": [OVERRIDE_GROUNDS[g] for g in p.override_grounds],
                "when_all": list(p.when_all),
                "when_any": list(p.when_any),
                "provides": list(p.provides),
                "line": p.line,
            }
            for p in purposes
        ],
        "fields": fields,
        "not_shared": [
            {"path": u, "data_class": policy.unit_classes[u]}
            for u in policy.units
            if not any(u in p.granted for p in purposes)
        ],
    }


def granted_fields(policy: SharingPolicy, recipient: str) -> list[str]:
    """Every field path any purpose could grant the recipient (the widest possible view)."""
    return [f["path"] for f in explain(policy, recipient)["fields"]]


def diff(old: SharingPolicy, new: SharingPolicy) -> dict[str, Any]:
    """Per recipient: fields a change would start or stop sharing, and purposes whose terms
    (ground, conditions, consent) changed."""
    if old.units != new.units:
        raise PolicyError("the two policies were checked against different schemas")
    recipients = list(dict.fromkeys(old.recipients() + new.recipients()))
    changes: dict[str, Any] = {}
    for recipient in recipients:
        before = {f["path"]: f["purposes"] for f in explain(old, recipient)["fields"]}
        after = {f["path"]: f["purposes"] for f in explain(new, recipient)["fields"]}
        old_terms = {p["name"]: p for p in explain(old, recipient)["purposes"]}
        new_terms = {p["name"]: p for p in explain(new, recipient)["purposes"]}
        terms = []
        for name in sorted(set(old_terms) | set(new_terms)):
            a, b = old_terms.get(name), new_terms.get(name)
            if a is None or b is None:
                terms.append({"purpose": name, "change": "added" if a is None else "removed"})
                continue
            changed = sorted(k for k in a if k != "line" and a[k] != b[k])
            if changed:
                terms.append({"purpose": name, "change": "modified", "keys": changed})
        entry = {
            "starts_sharing": sorted(set(after) - set(before)),
            "stops_sharing": sorted(set(before) - set(after)),
            "purpose_changes": terms,
        }
        if any(entry.values()):
            changes[recipient] = entry
    return {"old": old.source, "new": new.source, "recipients": changes}
