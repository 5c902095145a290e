"""Reading the audit trail (``audit.decisions``): every sharing decision the router made, as
the Avro records it wrote (paths, reasons and organisations; never a value from a referral)."""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import secrets
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from referral_broker.cluster.clients import Record, build_consumer, drain
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, ConfigError, ContractError, ReferralBrokerError
from referral_broker.schemas import codec
from referral_broker.schemas.registry import SINGLE_OBJECT_MAGIC, audit_decision_schema


def decisions(settings: Settings, bootstrap: str, *, idle_s: float = 2.0) -> Iterator[dict[str, Any]]:
    """Every decision on the audit topic, oldest first, in today's audit schema (older
    versions resolved into it: fields they lack read as their defaults)."""
    from kafka.errors import KafkaError

    schema = audit_decision_schema()
    topic = topic_name(settings, "audit")
    consumer = build_consumer(settings, bootstrap, [topic], group_id=None)
    try:
        if not consumer.assignment():
            raise BrokerError(f"the audit topic {topic} does not exist; run 'referral-broker topics ensure'")
        for batch in drain(consumer, idle_s=idle_s):
            for record in batch:
                if record.value is None:  # the audit topic is never compacted; be safe anyway
                    continue
                kind = next((bytes(v) for n, v in record.headers if n == "rb-kind"), b"")
                if kind == b"audit.decision":  # not inbox events, retention, checkpoints
                    yield codec.decode(record.value, schema)
    except KafkaError as exc:
        raise BrokerError(f"reading the audit trail failed: {type(exc).__name__}") from exc
    finally:
        consumer.close()


def unresolved(settings: Settings, bootstrap: str) -> list[dict[str, Any]]:
    """Decisions whose recipient rule found no organisation, for follow-up: the referral,
    the rule, the reason, when. A later version of the same referral that resolved the rule
    does not hide the earlier one: each is a decision that was made."""
    return [
        {
            "referral_id": str(d["referral_id"]),
            "version": d["version"],
            "rule": d["recipient"],
            "reason": d["unresolved_reason"],
            "purposes": (d.get("purpose") or "").split(",") if d.get("purpose") else [],
            "decided_at": d["decided_at"].isoformat() if hasattr(d["decided_at"], "isoformat") else d["decided_at"],
        }
        for d in decisions(settings, bootstrap)
        if d.get("unresolved_reason")
    ]


# -- a family's sharing history (issue 16, Build 2) ---------------------------------------------
# Each decision names its referral's child and household by keyed hashes of their normalised
# identifiers (HMAC-SHA256 under a secret only the hub holds, in its key store, never on Kafka):
# a lookup hashes the query and scans the audit; no identifier is ever stored in clear.
SUBJECT_SECRET_FILE = "subject-hmac.key"
SUBJECT_KINDS = ("nhs_number", "upn", "ni_number")
_LABELS = {"nhs_number": "NHS number", "upn": "UPN", "ni_number": "NI number"}


def subject_secret(keys_root: Path) -> bytes:
    """The hub's subject-hash secret in its key store folder (``keys_root``, 0700), made on
    first use (0600, 32 random bytes). Losing it makes older decisions unfindable by identifier
    (a ``--case`` lookup still works): back it up with the hub's keys."""
    from referral_broker.sealing.keystore import locked, read_private, write_private

    path = keys_root / SUBJECT_SECRET_FILE
    if not path.exists():
        with locked(keys_root):
            if not path.exists():
                write_private(path, secrets.token_bytes(32))
    secret = read_private(path)
    if len(secret) != 32:
        raise ConfigError(f"the subject-hash secret {path} is damaged (not 32 bytes)")
    return secret


def hub_subject_secret(settings: Settings) -> bytes:
    from referral_broker.parties import HUB
    from referral_broker.sealing.keystore import KeyStore

    root = KeyStore.path_for(settings.keys_dir, HUB)
    if not (root / "keyring.json").exists():
        raise ConfigError(f"no key store for {HUB}; run this where the hub's keys are ('keys init')")
    return subject_secret(root)


def _normalise(kind: str, value: str) -> str | None:
    """The stored form of an identifier, or None when it is not a valid one."""
    from referral_broker.schemas import identifiers as ids

    compact = {"nhs_number": ids.compact_nhs_number, "upn": ids.compact_upn, "ni_number": ids.compact_ni_number}
    problem = {"nhs_number": ids.nhs_number_problem, "upn": ids.upn_problem, "ni_number": ids.ni_number_problem}
    try:
        normal = compact[kind](value)
    except Exception:  # stdnum's compact on odd input
        return None
    return None if problem[kind](normal) else normal


def subject_key(secret: bytes, kind: str, normalised: str) -> str:
    return hmac.new(secret, f"{kind}:{normalised}".encode(), hashlib.sha256).hexdigest()


def query_subject_key(secret: bytes, kind: str, value: str) -> str:
    """The key a query for ``value`` looks up; a ContractError that never echoes the value."""
    if kind not in SUBJECT_KINDS:
        raise ContractError(f"unknown identifier kind {kind[:20]!r}")
    normal = _normalise(kind, value)
    if normal is None:
        raise ContractError(f"the {_LABELS[kind]} given is not a valid {_LABELS[kind]} (not shown)")
    return subject_key(secret, kind, normal)


def referral_subject_keys(secret: bytes, referral: dict[str, Any]) -> list[str]:
    """Keyed hashes of every valid identifier of the referral's child and household members."""
    found: set[str] = set()
    ids = referral.get("identifiers") or {}
    for kind in SUBJECT_KINDS:
        value = ids.get(kind)
        if isinstance(value, str) and (normal := _normalise(kind, value)):
            found.add(subject_key(secret, kind, normal))
    for member in referral.get("household") or []:
        value = member.get("ni_number") if isinstance(member, dict) else None
        if isinstance(value, str) and (normal := _normalise("ni_number", value)):
            found.add(subject_key(secret, "ni_number", normal))
    return sorted(found)


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="seconds")
    return str(value) if value is not None else None


def _decision_event(d: dict[str, Any]) -> dict[str, Any]:
    status = "status-to-referrer" in (d.get("purpose") or "")
    if status:
        what = "status relayed"
    elif d.get("unresolved_reason"):
        what = "recipient not found"
    else:
        what = "shared" if d.get("delivered") is not False else "not shared"
    return {
        "at": _iso(d["decided_at"]),
        "event": what,
        "referral_id": str(d["referral_id"]),
        "version": d["version"],
        "from": d.get("referrer"),
        "to": d["recipient"],
        "to_name": d.get("recipient_name"),
        "purpose": d.get("purpose"),
        "ground": d.get("ground"),
        "basis": d.get("basis"),
        "override_reference": d.get("override_reference"),
        "fields_shared": list(d.get("fields_shared") or []),
        "fields_withheld": [{"path": w["path"], "reason": w["reason"]} for w in d.get("fields_withheld") or []],
        "no_onward_sharing": list(d.get("no_onward_sharing") or []),
        "unresolved_reason": d.get("unresolved_reason"),
        "policy_version": d.get("policy_version"),
    }


def read_event_value(value: bytes) -> dict[str, Any]:
    """An audit event's fields: Avro single-object encoded (``audit_access`` from the inbox,
    ``audit_admin`` from the hub's own actions, its details flattened), or the JSON written
    before them; a timestamp comes back as ISO text either way."""
    if value[:2] == SINGLE_OBJECT_MAGIC:
        from referral_broker.admin_audit import flatten

        doc = flatten(codec.decode(value))
        return {k: v.astimezone(UTC).isoformat(timespec="milliseconds") if isinstance(v, datetime) else v for k, v in doc.items()}
    return dict(json.loads(value))


def _json_event(kind: str, doc: dict[str, Any]) -> dict[str, Any] | None:
    if kind == "inbox.access":
        return {
            "at": doc.get("at"),
            "event": f"inbox: {doc.get('kind')}",
            "referral_id": doc.get("referral_id"),
            "version": doc.get("version"),
            "team": doc.get("team"),
            "member": doc.get("member"),
        }
    if kind == "audit.retention":
        return {
            "at": doc.get("at"),
            "event": str(doc.get("type") or "retention"),
            "referral_id": doc.get("case_id"),
            "reason": doc.get("reason"),
        }
    return None


def subject_history(
    settings: Settings,
    bootstrap: str,
    *,
    key: str | None = None,
    case: str | None = None,
    records: Iterable[Record] | None = None,
    verify: Callable[[Record], dict[str, bytes]] | None = None,
) -> dict[str, Any]:
    """Every audit event about one subject: the decisions whose subject keys hold ``key`` (or
    the referral ``case``), and every later event about those referrals (statuses relayed,
    inbox views and actions, retention), in time order. An empty report when there are none.

    One pass over the audit topic: every record about a referral is keyed by its referral id,
    so it sits in the same partition after the decision that names the subject. Records are
    pre-filtered on the raw bytes (the hex key is in a decision's Avro value as written)
    before anything is decoded. With ``verify`` (the CLI passes the hub's), a candidate whose
    signature fails, or whose signer may not write that kind (decisions and retention: the hub;
    inbox events: the team they name), is left out and counted as ``refused``."""
    from referral_broker.audit_chain import CHECKPOINT_KIND, read_topic
    from referral_broker.parties import HUB

    schema = audit_decision_schema()
    needle = key.encode() if key else None
    referrals: set[str] = {case} if case else set()
    events: list[dict[str, Any]] = []
    scanned = refused = 0
    for record in records if records is not None else read_topic(settings, bootstrap, "audit"):
        scanned += 1
        if record.value is None:
            continue
        kind = next((bytes(v).decode("utf-8", "replace") for n, v in record.headers if n == "rb-kind"), "")
        if kind == CHECKPOINT_KIND:
            continue
        rid = (record.key or b"").decode("utf-8", "replace")
        if rid not in referrals and not (needle and kind == "audit.decision" and needle in record.value):
            continue
        event: dict[str, Any] | None
        try:
            signer = verify(record).get("rb-sender", b"").decode() if verify is not None else None
            if verify is not None and kind != "inbox.access" and signer != HUB:
                raise ValueError("not signed by the hub")
            if kind == "audit.decision":
                d = codec.decode(record.value, schema)
                if rid not in referrals and key not in (d.get("subject_keys") or []):
                    continue
                referrals.add(str(d["referral_id"]))
                event = _decision_event(d)
            else:
                event = _json_event(kind, read_event_value(record.value))
            if verify is not None and kind == "inbox.access" and event is not None and signer != event.get("team"):
                raise ValueError("an inbox event not signed by the team it names")
        except (ReferralBrokerError, ValueError, KeyError, TypeError):
            refused += 1 if verify is not None else 0
            continue
        if event is not None and event.get("referral_id") in referrals:
            events.append(event | {"partition": record.partition, "offset": record.offset})
    events.sort(key=lambda e: (str(e.get("at") or ""), e["partition"], e["offset"]))
    return {
        "referrals": sorted({str(e["referral_id"]) for e in events}),
        "events": events,
        "count": len(events),
        "scanned": scanned,
        "refused": refused,
    }


def subject_lookup(
    settings: Settings,
    bootstrap: str,
    *,
    secret: bytes,
    key: str | None = None,
    case: str | None = None,
    verify: Callable[[Record], dict[str, bytes]] | None = None,
    use_index: bool = True,
    note: Callable[[str], object] = lambda message: None,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """:func:`subject_history` through the hub's local audit index
    (:mod:`referral_broker.audit_index`): the index is brought up to date, then only the records
    of the referrals it names are read, by offset, and judged exactly as a full scan judges
    them. ``use_index=False`` scans the whole topic instead. The report says what the index did
    (``index``; None for a scan)."""
    if not use_index:
        return subject_history(settings, bootstrap, key=key, case=case, verify=verify) | {"index": None}
    from referral_broker.audit_index import indexed_records

    records, info = indexed_records(settings, bootstrap, secret, key=key, case=case, note=note, progress=progress)
    return subject_history(settings, bootstrap, key=key, case=case, records=records, verify=verify) | {"index": info}


def _event_lines(e: dict[str, Any]) -> tuple[str, list[str]]:
    """One event as plain text for a letter: a heading and its lines (no escaping)."""
    lines = []
    if e.get("to"):
        who = e.get("to_name") or e["to"]
        lines.append(f"To: {who}" + (f" ({e['to']})" if e.get("to_name") else ""))
    if e.get("from"):
        lines.append(f"From: {e['from']}")
    if e.get("team"):
        lines.append(f"Team: {e['team']}" + (f", by {e['member']}" if e.get("member") else ""))
    if e.get("purpose"):
        lines.append(f"Purpose: {e['purpose']}")
    if e.get("ground"):
        lines.append(f"Legal ground: {e['ground']}")
    if e.get("basis"):
        lines.append(f"Basis: {e['basis']}")
    if e.get("override_reference"):
        lines.append(f"Shared without consent under override {e['override_reference']}")
    if e.get("fields_shared"):
        lines.append("Information shared: " + ", ".join(e["fields_shared"]))
    if e.get("fields_withheld"):
        lines.append("Information withheld: " + ", ".join(f"{w['path']} ({w['reason']})" for w in e["fields_withheld"]))
    if e.get("unresolved_reason"):
        lines.append(f"Not sent: {e['unresolved_reason']}")
    if e.get("reason"):
        lines.append(f"Reason: {e['reason']}")
    lines.append(f"Referral {e.get('referral_id')}, version {e.get('version') or '-'}")
    return str(e["event"]).capitalize(), lines


NO_EVENTS = "No sharing of information about this person is recorded."
DEFAULT_TITLE = "Your family's sharing history"


def history_html(report: dict[str, Any], *, title: str = DEFAULT_TITLE) -> str:
    """A readable document of a subject's history for a letter: a timeline, one entry per event."""
    esc = html.escape
    items = []
    for e in report["events"]:
        heading, lines = _event_lines(e)
        shown = [f"<strong>{esc(heading)}</strong>", *(esc(line) for line in lines)]
        items.append(
            f'<li class="event"><time datetime="{esc(str(e.get("at") or ""))}">{esc(str(e.get("at") or ""))}</time>'
            f"<p>{'<br>'.join(shown)}</p></li>"
        )
    body = "\n".join(items) if items else f"<p>{NO_EVENTS}</p>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>"
        "body{font-family:Arial,sans-serif;max-width:48em;margin:2em auto;color:#0b0c0c}"
        "ol.timeline{list-style:none;border-left:4px solid #1d70b8;padding-left:1.5em}"
        ".event{margin-bottom:1.2em}.event time{font-weight:bold;display:block;color:#505a5f}"
        "@media print{body{margin:0}}</style></head><body>"
        f"<h1>{esc(title)}</h1><p>{report['count']} recorded event(s), oldest first.</p>"
        f'<ol class="timeline">\n{body}\n</ol></body></html>\n'
    )


def _latin1(text: str) -> str:
    """The PDF's built-in fonts carry Latin-1 only: other characters become '?'."""
    return text.replace("\u2019", "'").replace("\u2013", "-").encode("latin-1", "replace").decode("latin-1")


def history_pdf(report: dict[str, Any], *, title: str = DEFAULT_TITLE) -> bytes:
    """The same document as :func:`history_html` as a PDF (A4, a timeline down the left: a
    line and a dot per event), for printing or attaching to a letter. Built-in fonts only, so
    nothing is read from the machine."""
    from fpdf import FPDF

    pdf = FPDF(format="A4", unit="mm")
    pdf.set_title(_latin1(title))
    pdf.set_creator("referral-broker audit subject")
    pdf.set_auto_page_break(auto=True, margin=18)
    pdf.set_margins(20, 18, 20)
    pdf.add_page()
    pdf.set_text_color(11, 12, 12)
    pdf.set_font("Helvetica", "B", 18)
    pdf.multi_cell(0, 9, _latin1(title), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 11)
    pdf.ln(2)
    pdf.multi_cell(0, 6, f"{report['count']} recorded event(s), oldest first.", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    if not report["events"]:
        pdf.multi_cell(0, 6, NO_EVENTS, new_x="LMARGIN", new_y="NEXT")
    rail = pdf.l_margin + 2
    text_x = pdf.l_margin + 8
    width = pdf.w - pdf.r_margin - text_x
    for e in report["events"]:
        heading, lines = _event_lines(e)
        wrapped = sum(1 + len(line) // 95 for line in lines)  # about 95 characters a line
        if pdf.get_y() + 11 + 5 * wrapped > pdf.h - pdf.b_margin:  # keep an event on one page
            pdf.add_page()
        page, top = pdf.page, pdf.get_y()
        pdf.set_fill_color(29, 112, 184)
        pdf.circle(x=rail, y=top + 2.5, radius=1.8, style="F")
        pdf.set_x(text_x)
        pdf.set_font("Helvetica", "B", 10)
        pdf.set_text_color(80, 90, 95)
        pdf.multi_cell(width, 5, _latin1(str(e.get("at") or "")), new_x="LMARGIN", new_y="NEXT")
        pdf.set_text_color(11, 12, 12)
        pdf.set_font("Helvetica", "B", 11)
        pdf.set_x(text_x)
        pdf.multi_cell(width, 6, _latin1(heading), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 10)
        for line in lines:
            pdf.set_x(text_x)
            pdf.multi_cell(width, 5, _latin1(line), new_x="LMARGIN", new_y="NEXT")
        pdf.set_draw_color(29, 112, 184)
        pdf.set_line_width(1.2)
        # the rail beside the event (from the top of the page it went on to, if it was long)
        pdf.line(rail, top if pdf.page == page else pdf.t_margin, rail, pdf.get_y() + 2)
        pdf.ln(5)
    return bytes(pdf.output())
