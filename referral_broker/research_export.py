"""The research export (issue 16, Build 4): the Supporting Families evaluation extract for one
period, in split form, for the research recipient (the party ``ons``) alone.

``export(settings, bootstrap, period="2026-Q3", out=DIR)`` reads the council's archive (every
referral, sealed for the hub under its case key; the hub opens it), keeps the latest version of
each referral created in the period, groups them by child (a keyed hash of the child's
identifiers, or name and date of birth), leaves out every child with an objection
(:mod:`referral_broker.objections`), and writes into ``DIR`` (which must be new or empty):

``identifiers.sealed.jsonl``
    one line per family: a signed message sealed by the hub for the research recipient, exactly
    as the broker seals a referral (:class:`~referral_broker.sealing.MessageSealer`, the
    recipient's X25519 key wraps the data key; every field but the link key is sealed): given
    and family name, date of birth, sex, last address, NI number where held. Only that
    recipient's private key opens it (:func:`open_identifiers`). The line is the message's
    topic (a label naming the export), key (the link key), value and headers, base64.
``attributes.csv``
    one row per family, in the clear and coarse: the link key, an age band at the period's
    end, the district, the number of referrals in the period and one 0/1 column per Supporting
    Families heading (a need recorded at referral under that heading). No name, date, address,
    identifier, referral id or free text.
``manifest.json``
    the export id, the period, the recipient and its key id, the file names and SHA-256s, the
    row counts, the objectors left out, referrals read and unreadable (shredded), and counts by
    district, age band and heading with every cell of 1 to 9 families suppressed (``"<10"``)
    and listed as suppressed.

The two parts share only the link key: a random 128-bit value made for this export, never
reused, never derived from the child; the rows of each part are shuffled independently. The
export is audited on the audit topic (a hub-signed, chained JSON event: export id, period,
recipient and counts, never a value).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from referral_broker.config import Settings
from referral_broker.errors import BrokerError, ConfigError, ContractError, ReferralBrokerError, SealingError
from referral_broker.structured_log import get_logger

log = get_logger(__name__)

AUDIT_KIND = "audit.research"
AUDIT_CHAIN = "research"
RESEARCH_RECIPIENT = "ons"
IDENTIFIERS_FILE = "identifiers.sealed.jsonl"
ATTRIBUTES_FILE = "attributes.csv"
MANIFEST_FILE = "manifest.json"
MESSAGE_KIND = "research.identifiers"
SMALL_CELL = 10  # fewer families than this in a group: the count is suppressed when printed
SUPPRESSED = "<10"

# The ten Supporting Families headline outcome areas (../shared/research/domain-anchors.md).
HEADINGS = (
    "education",
    "early_years",
    "health",
    "substance_use",
    "crime",
    "domestic_abuse",
    "safeguarding",
    "financial_stability",
    "employment",
    "housing",
)
AGE_BANDS = ((0, 4, "0-4"), (5, 10, "5-10"), (11, 15, "11-15"), (16, 17, "16-17"), (18, 200, "18+"))
ATTRIBUTE_COLUMNS = ("link_key", "age_band", "area", "referrals", *HEADINGS)

IDENTIFIERS_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "ResearchIdentifiers",
    "namespace": "uk.gov.cambridgeshire.earlyhelp.research",
    "doc": "One family's identifiers in a research export, for the research recipient alone.",
    "fields": [
        {"name": "link_key", "type": "string", "doc": "The export's random link key.", "data_class": "operational"},
        {"name": "given_name", "type": "string", "doc": "Child's given name.", "data_class": "personal"},
        {"name": "family_name", "type": "string", "doc": "Child's family name.", "data_class": "personal"},
        {
            "name": "date_of_birth",
            "type": {"type": "int", "logicalType": "date"},
            "doc": "Child's date of birth.",
            "data_class": "personal",
        },
        {"name": "sex", "type": "string", "doc": "Sex as recorded.", "data_class": "personal"},
        {
            "name": "last_address",
            "type": {"type": "array", "items": "string"},
            "doc": "Last known address, line by line, postcode last.",
            "data_class": "personal",
        },
        {
            "name": "ni_number",
            "type": ["null", "string"],
            "default": None,
            "doc": "The child's NI number, where held.",
            "data_class": "identifier",
        },
    ],
}

_PERIOD = re.compile(r"^([0-9]{4})-Q([1-4])$")


# -- periods, bands, headings -------------------------------------------------------------------
def parse_period(period: str) -> tuple[date, date]:
    """``2026-Q3`` -> (2026-07-01, 2026-09-30), inclusive."""
    match = _PERIOD.match(period or "")
    if not match:
        raise ContractError("the period must be a quarter: YYYY-Qn (e.g. 2026-Q3)")
    year, quarter = int(match.group(1)), int(match.group(2))
    start = date(year, 3 * quarter - 2, 1)
    end = date(year + 1, 1, 1) if quarter == 4 else date(year, 3 * quarter + 1, 1)
    return start, date.fromordinal(end.toordinal() - 1)


def age_band(date_of_birth: date, on: date) -> str:
    age = on.year - date_of_birth.year - ((on.month, on.day) < (date_of_birth.month, date_of_birth.day))
    for low, high, label in AGE_BANDS:
        if low <= age <= high:
            return label
    return "0-4"  # born after the period's end: cannot happen for a validated referral


def headings_of(referral: dict[str, Any], *, on: date) -> dict[str, bool]:
    """Which Supporting Families headings the referral records a need under (coarse, 0/1)."""
    concerns = set(referral.get("concern_types") or [])
    concerns |= {c.get("type") for c in referral.get("concerns") or [] if isinstance(c, dict)}
    flags = referral.get("flags") or {}
    home = referral.get("home_circumstances") or {}
    school = referral.get("school") or {}
    health = referral.get("health_and_development")
    dob = (referral.get("child") or {}).get("date_of_birth")
    attendance = school.get("attendance") or {}
    possible = attendance.get("possible_sessions") or 0
    low_attendance = bool(possible) and attendance.get("present_sessions", possible) / possible < 0.9
    services = set(referral.get("services_requested") or [])
    return {
        "education": "attendance" in concerns or low_attendance or bool(school.get("exclusions")),
        "early_years": (isinstance(dob, date) and age_band(dob, on) == "0-4") or "development" in concerns,
        "health": "mental_health" in concerns or health is not None or referral.get("send") is not None,
        "substance_use": "substance_misuse" in concerns,
        "crime": "crime_prevention" in concerns or bool(flags.get("crime_prevention")),
        "domestic_abuse": "domestic_abuse" in concerns,
        "safeguarding": "safeguarding" in concerns or bool(flags.get("safeguarding_concern")),
        "financial_stability": "financial" in concerns or bool(home.get("financial_hardship")),
        # no employment field in a referral: NEET support asked for, or a DWP work coach referring
        "employment": "neet_support" in services or (referral.get("referrer") or {}).get("partner") == "dwp",
        "housing": "housing" in concerns
        or home.get("housing") in ("temporary_accommodation", "no_fixed_abode")
        or bool(home.get("overcrowded")),
    }


def suppress(count: int) -> int | str:
    """A count fit to print: 1 to 9 families is ``"<10"`` (0 and 10 or more are shown)."""
    return SUPPRESSED if 0 < count < SMALL_CELL else count


# -- reading the archive ------------------------------------------------------------------------
@dataclass
class _Read:
    latest: dict[str, tuple[int, dict[str, Any]]]
    records: int = 0
    unreadable: int = 0


def read_archive(settings: Settings, bootstrap: str) -> _Read:
    """The latest opened version of every referral on the archive topic. A record that does not
    open (its case key shredded) is counted, never exported."""
    from kafka.errors import KafkaError

    from referral_broker.cluster.clients import build_consumer, drain
    from referral_broker.cluster.topics import topic_name
    from referral_broker.identity import load_identity
    from referral_broker.parties import HUB

    hub = load_identity(settings, bootstrap, HUB)
    topic = topic_name(settings, "archive")
    read = _Read({})
    consumer = build_consumer(settings, bootstrap, [topic], group_id=None)
    try:
        if not consumer.assignment():
            raise BrokerError(f"the archive topic {topic} does not exist; run 'referral-broker topics ensure'")
        for batch in drain(consumer, idle_s=2.0):
            for record in batch:
                if record.value is None:
                    continue
                read.records += 1
                try:
                    opened = hub.open(record)
                except ReferralBrokerError:
                    read.unreadable += 1
                    continue
                rid = opened.referral_id
                have = read.latest.get(rid)
                if have is None or opened.referral_version > have[0]:
                    read.latest[rid] = (opened.referral_version, opened.record)
    except KafkaError as exc:
        raise BrokerError(f"reading the archive failed: {type(exc).__name__}") from exc
    finally:
        consumer.close()
    return read


def _created_on(referral: dict[str, Any]) -> date | None:
    created = referral.get("created_at")
    if isinstance(created, datetime):
        return created.astimezone(UTC).date()
    return None


# -- the families -------------------------------------------------------------------------------
@dataclass
class _Family:
    keys: set[str]
    referral: dict[str, Any]  # the latest referral about this child in the period
    referrals: int
    headings: dict[str, bool]


def _families(referrals: list[dict[str, Any]], secret: bytes, *, on: date) -> list[_Family]:
    """Referrals grouped by child: two referrals share a family when any keyed hash of the
    child (an identifier, or name and date of birth) is the same."""
    from referral_broker.objections import child_keys

    families: list[_Family] = []
    by_key: dict[str, _Family] = {}
    for referral in sorted(referrals, key=lambda r: r["created_at"]):
        keys = child_keys(secret, referral)
        heads = headings_of(referral, on=on)
        family = next((by_key[k] for k in keys if k in by_key), None)
        if family is None:
            family = _Family(set(), referral, 0, dict.fromkeys(HEADINGS, False))
            families.append(family)
        family.keys |= keys
        family.referral = referral
        family.referrals += 1
        family.headings = {h: family.headings[h] or heads[h] for h in HEADINGS}
        for k in keys:
            by_key[k] = family
    return families


def _identifiers_row(link_key: str, referral: dict[str, Any]) -> dict[str, Any]:
    child = referral["child"]
    address = child.get("address") or {}
    lines = [str(address[k]) for k in ("line1", "line2", "town", "postcode") if address.get(k)]
    return {
        "link_key": link_key,
        "given_name": child["given_name"],
        "family_name": child["family_name"],
        "date_of_birth": child["date_of_birth"],
        "sex": str(child.get("sex") or "not_known"),
        "last_address": lines,
        "ni_number": (referral.get("identifiers") or {}).get("ni_number"),
    }


def _attributes_row(link_key: str, family: _Family, *, on: date) -> dict[str, Any]:
    referral = family.referral
    return {
        "link_key": link_key,
        "age_band": age_band(referral["child"]["date_of_birth"], on),
        "area": str(referral.get("district") or "not_known"),
        "referrals": family.referrals,
        **{h: int(family.headings[h]) for h in HEADINGS},
    }


# -- files --------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _message_line(message: Any) -> str:
    return json.dumps(
        {
            "topic": message.topic,
            "key": _b64(message.key),
            "value": _b64(message.value),
            "headers": [[name, _b64(bytes(value))] for name, value in message.headers],
        },
        sort_keys=True,
    )


@dataclass(frozen=True)
class _LineRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def _parse_line(raw: str, number: int) -> _LineRecord:
    try:
        doc = json.loads(raw)
        return _LineRecord(
            str(doc["topic"]),
            base64.b64decode(doc["key"], validate=True),
            base64.b64decode(doc["value"], validate=True),
            [(str(n), base64.b64decode(v, validate=True)) for n, v in doc["headers"]],
        )
    except (ValueError, KeyError, TypeError):
        raise ContractError(f"line {number} of the identifiers part is not a sealed message") from None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"{out} exists and is not a folder")
        if any(out.iterdir()):
            raise ConfigError(f"{out} is not empty: an export never overwrites or mixes with another")
    else:
        out.mkdir(parents=True, mode=0o700)


# -- audit --------------------------------------------------------------------------------------
def audit_event(settings: Settings, bootstrap: str, event: dict[str, Any], *, key: str, now: float) -> None:
    """Sign ``event`` (ids and counts only) as the hub and append it to the ``research`` audit
    chain on the audit topic (``audit_admin`` Avro); returns once durable."""
    from referral_broker.admin_audit import write_event

    write_event(settings, bootstrap, event, key=key, chain=AUDIT_CHAIN, kind=AUDIT_KIND, now=now)


def audit_events(settings: Settings, bootstrap: str) -> list[dict[str, Any]]:
    """Every research audit event (exports, objections) on the audit topic, oldest first."""
    from referral_broker.audit_log import read_event_value
    from referral_broker.cluster.clients import build_consumer, drain
    from referral_broker.cluster.topics import topic_name

    consumer = build_consumer(settings, bootstrap, [topic_name(settings, "audit")], group_id=None)
    try:
        return [
            read_event_value(record.value)
            for batch in drain(consumer, idle_s=2.0)
            for record in batch
            if record.value is not None and dict(record.headers).get("rb-kind") == AUDIT_KIND.encode()
        ]
    finally:
        consumer.close()


# -- the export ---------------------------------------------------------------------------------
def _counts_by(rows: list[dict[str, Any]], column: str, values: Iterator[str] | tuple[str, ...]) -> dict[str, int]:
    return {v: sum(1 for r in rows if r[column] == v) for v in values}


def _suppressed_cells(groups: dict[str, dict[str, int]]) -> tuple[dict[str, dict[str, int | str]], list[str]]:
    shown: dict[str, dict[str, int | str]] = {}
    hidden: list[str] = []
    for group, cells in groups.items():
        shown[group] = {}
        for cell, count in cells.items():
            shown[group][cell] = suppress(count)
            if shown[group][cell] == SUPPRESSED:
                hidden.append(f"{group}:{cell}")
    return shown, hidden


def export(
    settings: Settings,
    bootstrap: str,
    *,
    period: str,
    out: Path,
    recipient: str = RESEARCH_RECIPIENT,
    now: float | None = None,
) -> dict[str, Any]:
    """Write the split extract for ``period`` into ``out``; returns the manifest (exact
    totals; every breakdown cell of 1-9 families suppressed). Audited."""
    from referral_broker.audit_log import hub_subject_secret
    from referral_broker.identity import load_directory
    from referral_broker.objections import load as load_objections
    from referral_broker.objections import objected_keys, sync_inbox
    from referral_broker.parties import HUB, get_party
    from referral_broker.sealing.envelope import MessageSealer
    from referral_broker.sealing.keystore import KeyStore

    now = time.time() if now is None else now
    start, end = parse_period(period)
    if get_party(recipient).kind != "research":
        raise ConfigError(f"{recipient} is not a research recipient; the export goes to a research organisation only")
    out = Path(out)
    _prepare_out(out)
    secret = hub_subject_secret(settings)
    directory = load_directory(settings, bootstrap)
    target = directory.encryption_key_for(recipient, now)  # refuses before reading anything
    read = read_archive(settings, bootstrap)
    synced = sync_inbox(settings, bootstrap, read.latest, now=now)  # the inbox's objections first
    objected = objected_keys(load_objections(settings))
    in_period = [r for _, r in read.latest.values() if (d := _created_on(r)) is not None and start <= d <= end]
    families = _families(in_period, secret, on=end)
    kept = [f for f in families if not (f.keys & objected)]
    left_out = len(families) - len(kept)

    export_id = str(uuid.uuid4())
    sealer = MessageSealer(KeyStore.open(settings.keys_dir, HUB), directory)
    label = f"{settings.kafka_topic_prefix}research-export.{export_id}"
    rng = secrets.SystemRandom()
    pairs = [(secrets.token_hex(16), f) for f in kept]
    ident_lines: list[str] = []
    attr_rows: list[dict[str, Any]] = []
    for link_key, family in pairs:
        message = sealer.seal(
            _identifiers_row(link_key, family.referral),
            IDENTIFIERS_SCHEMA,
            topic=label,
            recipient=recipient,
            referral_id=link_key,
            referral_version=1,
            kind=MESSAGE_KIND,
            now=now,
        )
        ident_lines.append(_message_line(message))
        attr_rows.append(_attributes_row(link_key, family, on=end))
    rng.shuffle(ident_lines)
    rng.shuffle(attr_rows)  # each part in its own random order: rows pair only by link key

    _write_private(out / IDENTIFIERS_FILE, "".join(line + "\n" for line in ident_lines))
    with open(os.open(out / ATTRIBUTES_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ATTRIBUTE_COLUMNS))
        writer.writeheader()
        writer.writerows(attr_rows)

    from referral_broker.schemas.registry import referral_schema

    districts = next(f["type"]["symbols"] for f in referral_schema()["fields"] if f["name"] == "district")
    groups = {
        "area": _counts_by(attr_rows, "area", tuple(districts)),
        "age_band": _counts_by(attr_rows, "age_band", tuple(b[2] for b in AGE_BANDS)),
        "heading": {h: sum(r[h] for r in attr_rows) for h in HEADINGS},
    }
    cells, hidden = _suppressed_cells(groups)
    counts = {
        "families_exported": len(kept),
        "objectors_left_out": left_out,
        "families_in_period": len(families),
        "referrals_in_period": len(in_period),
        "archive_records_read": read.records,
        "archive_records_unreadable": read.unreadable,
        "inbox_objections_taken_in": len(synced.taken_in),
        "inbox_objections_waiting": len(synced.waiting or []),
    }
    manifest = {
        "export_id": export_id,
        "period": period,
        "period_start": start.isoformat(),
        "period_end": end.isoformat(),
        "made_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "made_by": HUB,
        "recipient": recipient,
        "recipient_key_id": target.key_id,
        "link_key": "random per family, made for this export only; the parts share nothing else",
        "files": {
            "identifiers": {"name": IDENTIFIERS_FILE, "rows": len(ident_lines), "sha256": _sha256(out / IDENTIFIERS_FILE)},
            "attributes": {
                "name": ATTRIBUTES_FILE,
                "rows": len(attr_rows),
                "columns": list(ATTRIBUTE_COLUMNS),
                "sha256": _sha256(out / ATTRIBUTES_FILE),
            },
        },
        "counts": counts,
        "cells": cells,
        "small_cell_threshold": SMALL_CELL,
        "suppressed_cells": hidden,
    }
    _write_private(out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    audit_event(
        settings,
        bootstrap,
        {
            "type": "research.export",
            "export_id": export_id,
            "period": period,
            "recipient": recipient,
            "recipient_key_id": target.key_id,
            "counts": counts,
            "suppressed_cells": len(hidden),
        },
        key=export_id,
        now=now,
    )
    log.info("research export written", export_id=export_id, period=period, families=len(kept), left_out=left_out)
    return manifest


def printable(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as printed: every count of 1-9 families suppressed, totals included."""
    shown = dict(manifest)
    shown["counts"] = {k: suppress(v) for k, v in manifest["counts"].items()}
    shown["files"] = {
        name: {**f, "rows": suppress(f["rows"])} for name, f in manifest["files"].items()
    }
    return shown


def open_identifiers(settings: Settings, bootstrap: str, path: Path, *, party: str) -> list[dict[str, Any]]:
    """Open every line of an identifiers part with ``party``'s private key (the research
    recipient's machine). Any line that does not verify or open raises: nothing partial."""
    from referral_broker.identity import load_directory
    from referral_broker.sealing.envelope import MessageOpener, schema_book
    from referral_broker.sealing.keystore import KeyStore

    opener = MessageOpener(
        KeyStore.open(settings.keys_dir, party), load_directory(settings, bootstrap), schema_book(IDENTIFIERS_SCHEMA)
    )
    rows: list[dict[str, Any]] = []
    for number, raw in enumerate(Path(path).read_text("utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        opened = opener.open(_parse_line(raw, number))
        if opened.kind != MESSAGE_KIND:
            raise SealingError(f"line {number} of the identifiers part is not a research identifiers message")
        rows.append(opened.record)
    return rows
