"""Objections to the research export (issue 16, Build 4): a family who objects to their data
going to the national evaluation is left out of every export made after the objection.

**What is kept.** An objection records keyed hashes of the child's identifiers, never the
identifiers: HMAC-SHA256 under the hub's subject-hash secret (the one the audit's
``subject_keys`` use, :func:`referral_broker.audit_log.subject_secret`, kept in the hub's key
store folder and never on Kafka) over the normalised NHS number, UPN or NI number, or over the
child's normalised name and date of birth (kind ``name_dob``: most referrals carry no national
identifier). The export hashes each child the same way and leaves out any child with a
matching hash. An objection also records when, by whom and from where (``cli``, or ``inbox``:
a district team's "Record that the family objects", which reaches the hub as a team-signed
event in the audit and is taken in by :func:`sync_inbox`), and an id; it is audited by id only.

**Where.** In the hub's data folder (``<data dir>/research/objections.jsonl``, folder 0700, file
0600, appended under a lock), not on a compacted topic, because:

* the only reader is the export, which runs where the hub's keys are (it must open the archive
  and hold the subject secret), so a topic would add readers (and ACLs) for no reader's sake;
* an objection must never be lost: a compacted topic keeps the latest value per key but is one
  misconfigured ``cleanup.policy``/retention away from dropping records, and the topic plan
  and ACLs are owned elsewhere; a file is backed up with the hub's keys, which it needs anyway
  (the hashes are useless without the secret);
* the records hold nothing a broker operator should see, not even hashes.

The cost: two hub machines do not share objections. The council runs one hub.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import unicodedata
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from referral_broker.admin_audit import actor
from referral_broker.audit_log import SUBJECT_KINDS, hub_subject_secret, query_subject_key, subject_key
from referral_broker.config import Settings
from referral_broker.errors import ConfigError, ContractError, ReferralBrokerError

OBJECTIONS_DIR = "research"
OBJECTIONS_FILE = "objections.jsonl"
NAME_DOB = "name_dob"
SOURCES = ("cli", "inbox")
_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class Objection:
    objection_id: str
    subject_keys: tuple[str, ...]
    kinds: tuple[str, ...]
    recorded_at: str
    recorded_by: str
    source: str

    def as_dict(self) -> dict[str, Any]:
        """What ``objections list`` shows: never the hashes (they are only for matching)."""
        return {
            "objection_id": self.objection_id,
            "identified_by": list(self.kinds),
            "recorded_at": self.recorded_at,
            "recorded_by": self.recorded_by,
            "source": self.source,
        }


def _fold(text: str) -> str:
    """A name as compared: accents removed, case folded, only letters kept."""
    plain = unicodedata.normalize("NFKD", text)
    return "".join(c for c in plain.casefold() if c.isalpha())


def name_dob_key(secret: bytes, given_name: str, family_name: str, date_of_birth: date) -> str | None:
    given, family = _fold(given_name or ""), _fold(family_name or "")
    if not given or not family:
        return None
    return subject_key(secret, NAME_DOB, f"{given}|{family}|{date_of_birth.isoformat()}")


def child_keys(secret: bytes, referral: dict[str, Any]) -> set[str]:
    """Every keyed hash of this referral's child (identifiers and name + date of birth)."""
    keys: set[str] = set()
    ids = referral.get("identifiers") or {}
    for kind in SUBJECT_KINDS:
        value = ids.get(kind)
        if isinstance(value, str):
            # an identifier that is not valid cannot match a valid one
            with contextlib.suppress(ContractError):
                keys.add(query_subject_key(secret, kind, value))
    child = referral.get("child") or {}
    dob = child.get("date_of_birth")
    if isinstance(dob, date):
        key = name_dob_key(secret, child.get("given_name", ""), child.get("family_name", ""), dob)
        if key:
            keys.add(key)
    return keys


def objections_path(settings: Settings) -> Path:
    return settings.paths_data_dir / OBJECTIONS_DIR / OBJECTIONS_FILE


def query_keys(
    secret: bytes,
    *,
    nhs_number: str | None = None,
    upn: str | None = None,
    ni_number: str | None = None,
    given_name: str | None = None,
    family_name: str | None = None,
    date_of_birth: str | None = None,
) -> tuple[list[str], list[str]]:
    """(keys, kinds) for the identifiers given; a ContractError that never echoes a value."""
    keys: list[str] = []
    kinds: list[str] = []
    for kind, value in (("nhs_number", nhs_number), ("upn", upn), ("ni_number", ni_number)):
        if value:
            keys.append(query_subject_key(secret, kind, value))
            kinds.append(kind)
    named = [given_name, family_name, date_of_birth]
    if any(named):
        if not all(named):
            raise ContractError("a name needs the given name, the family name and the date of birth together")
        try:
            dob = date.fromisoformat(str(date_of_birth))
        except ValueError:
            raise ContractError("the date of birth given is not a date (YYYY-MM-DD; not shown)") from None
        key = name_dob_key(secret, str(given_name), str(family_name), dob)
        if key is None:
            raise ContractError("the name given has no letters (not shown)")
        keys.append(key)
        kinds.append(NAME_DOB)
    if not keys:
        raise ContractError("an objection needs at least one identifier of the child (or name and date of birth)")
    return keys, kinds


def add(
    settings: Settings,
    bootstrap: str | None,
    identifiers: Mapping[str, str | None],
    *,
    source: str = "cli",
    recorded_by: str | None = None,
    now: float | None = None,
) -> Objection:
    """Record an objection for the child named by ``identifiers`` (see :func:`query_keys`),
    in the hub's data folder; audited (its id, kinds and source) when ``bootstrap`` is given."""
    if source not in SOURCES:
        raise ContractError(f"objection source must be one of {', '.join(SOURCES)}")
    now = time.time() if now is None else now
    allowed = {"nhs_number", "upn", "ni_number", "given_name", "family_name", "date_of_birth"}
    if set(identifiers) - allowed:
        raise ContractError(f"an objection names a child by {', '.join(sorted(allowed))} only")
    keys, kinds = query_keys(hub_subject_secret(settings), **identifiers)
    objection = Objection(
        objection_id=str(uuid.uuid4()),
        subject_keys=tuple(keys),
        kinds=tuple(kinds),
        recorded_at=datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        recorded_by=recorded_by or actor(),
        source=source,
    )
    _record(settings, bootstrap, objection, now=now)
    return objection


def _record(settings: Settings, bootstrap: str | None, objection: Objection, *, now: float) -> None:
    """Append ``objection`` to the hub's file (durably), then audit it when ``bootstrap`` is given."""
    from referral_broker.sealing.keystore import locked, make_private_dir

    path = objections_path(settings)
    make_private_dir(path.parent)
    line = json.dumps(
        {
            "objection_id": objection.objection_id,
            "subject_keys": list(objection.subject_keys),
            "kinds": list(objection.kinds),
            "recorded_at": objection.recorded_at,
            "recorded_by": objection.recorded_by,
            "source": objection.source,
        },
        sort_keys=True,
    )
    with locked(path.parent):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    if bootstrap is not None:
        from referral_broker.research_export import audit_event

        audit_event(
            settings,
            bootstrap,
            {
                "type": "research.objection_recorded",
                "objection_id": objection.objection_id,
                "identified_by": list(objection.kinds),
                "source": objection.source,
                "actor": objection.recorded_by,
            },
            key=objection.objection_id,
            now=now,
        )


@dataclass
class InboxSync:
    """What :func:`sync_inbox` did: objections taken in, already known, refused (not signed by
    the team they name), and waiting (their referral is not readable in the archive now)."""

    taken_in: list[str]
    known: int = 0
    refused: int = 0
    waiting: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"taken_in": self.taken_in, "known": self.known, "refused": self.refused, "waiting": self.waiting or []}


def sync_inbox(
    settings: Settings,
    bootstrap: str,
    latest: Mapping[str, tuple[int, dict[str, Any]]] | None = None,
    *,
    now: float | None = None,
) -> InboxSync:
    """Take in the objections district teams recorded in the inbox (``research_objection``
    access events on the audit topic, each signed by the team it names): the child of the
    referral the team objected on is hashed from the hub's archive copy (``latest``: referral id
    -> (version, referral), read when not given), and the objection is recorded with the
    event's id, so taking it in again changes nothing. An event whose referral the archive
    cannot open now is left waiting for the next sync, never dropped."""
    from referral_broker.audit_chain import read_topic
    from referral_broker.audit_log import read_event_value
    from referral_broker.identity import load_identity
    from referral_broker.parties import HUB

    now = time.time() if now is None else now
    hub = load_identity(settings, bootstrap, HUB)
    known_ids = {o.objection_id for o in load(settings)}
    result = InboxSync([], waiting=[])
    events: list[dict[str, Any]] = []
    for record in read_topic(settings, bootstrap, "audit"):
        if record.value is None or dict(record.headers).get("rb-kind") != b"inbox.access":
            continue
        try:
            doc = read_event_value(record.value)
            if doc.get("kind") != "research_objection":
                continue
            signer = hub.opener.verify(record).get("rb-sender", b"").decode()
            if signer != doc.get("team") or not _ID.match(str(doc.get("event_id"))):
                raise ValueError("not signed by the team it names")
        except (ReferralBrokerError, ValueError, KeyError, TypeError):
            result.refused += 1
            continue
        if doc["event_id"] in known_ids:
            result.known += 1
            continue
        known_ids.add(doc["event_id"])
        events.append(doc)
    if not events:
        return result
    if latest is None:
        from referral_broker.research_export import read_archive

        latest = read_archive(settings, bootstrap).latest
    secret = hub_subject_secret(settings)
    for doc in events:
        found = latest.get(str(doc.get("referral_id")))
        keys = child_keys(secret, found[1]) if found is not None else set()
        if not keys:
            assert result.waiting is not None
            result.waiting.append(doc["event_id"])
            continue
        objection = Objection(
            objection_id=doc["event_id"],
            subject_keys=tuple(sorted(keys)),
            kinds=("referral",),
            recorded_at=str(doc["at"]),
            recorded_by=f"{doc.get('member') or 'unknown'} ({doc['team']})",
            source="inbox",
        )
        _record(settings, bootstrap, objection, now=now)
        result.taken_in.append(objection.objection_id)
    return result


def load(settings: Settings) -> list[Objection]:
    """Every objection recorded on this hub, oldest first."""
    path = objections_path(settings)
    if not path.exists():
        return []
    out: list[Objection] = []
    for number, raw in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)
            if not _ID.match(doc["objection_id"]):
                raise ValueError("bad id")
            out.append(
                Objection(
                    str(doc["objection_id"]),
                    tuple(str(k) for k in doc["subject_keys"]),
                    tuple(str(k) for k in doc["kinds"]),
                    str(doc["recorded_at"]),
                    str(doc["recorded_by"]),
                    str(doc["source"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            # never skip silently: an unreadable objection could let an objector's data out
            raise ConfigError(f"the objections file {path} is damaged at line {number}") from None
    return out


def objected_keys(objections: Iterable[Objection]) -> frozenset[str]:
    return frozenset(k for o in objections for k in o.subject_keys)
