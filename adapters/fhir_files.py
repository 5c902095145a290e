"""FHIR files, JSON or XML (chosen by content), read one Bundle entry at a time.

``read_fhir`` returns the top-level resource's own fields (a Bundle's ``resourceType`` and
``type``; a single resource whole) and an iterator of entries, so a large Bundle is never held
in memory: JSON through ``ijson``, XML through ``lxml.etree.iterparse`` (entities and network
access off). An XML resource becomes the JSON form by way of ``fhir.resources``
(``model_validate_xml``), so both syntaxes meet the same checks and messages; a resource the
library refuses comes back as ``None`` with its problems. ``write_fhir`` writes a Bundle as
JSON or XML.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from lxml import etree
from pydantic import ValidationError as PydanticValidationError

from referral_broker.errors import ContractError, PartnerInputError

from .native_files import Source, _opened, iter_json, json_head, sniff, source_name

FHIR_NS = "http://hl7.org/fhir"
_NS = f"{{{FHIR_NS}}}"


@dataclass(frozen=True)
class Entry:
    """One Bundle entry: its position (from 1), fullUrl, resource (JSON form) and problems."""

    number: int
    full_url: str | None
    resource: dict[str, Any] | None
    problems: tuple[tuple[str, str], ...] = ()  # (element path, reason)
    # What a resource the library refused was (its type and id), so references to it resolve.
    refused: tuple[str, str | None] | None = None


def model_problems(error: PydanticValidationError, type_name: str) -> list[tuple[str, str]]:
    """The library's findings by element path; never the offending value."""
    found = []
    for item in error.errors():
        where = type_name + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"])
        shown = str(item.get("input", ""))
        reason = item["msg"] if not shown or shown not in item["msg"] else item["type"]
        found.append((where, f"fails FHIR R4 validation: {reason}"))
    return found


def read_fhir(source: Source) -> tuple[str, Any, tuple[str, ...], Iterator[Entry]]:
    """(syntax, top-level fields, keys repeated there, entries) of a FHIR JSON or XML file."""
    kind = sniff(source)
    if kind == "xml":
        head, entries = _read_xml(source)
        return "xml", head, (), entries
    head, repeated = json_head(source, "entry")
    if isinstance(head, dict) and head.get("resourceType") == "Bundle":
        return "json", head, repeated, _json_entries(source)
    return "json", head, repeated, iter(())


def _json_entries(source: Source) -> Iterator[Entry]:
    for item in iter_json(source, list_key="entry"):
        entry = item.value
        problems = tuple(
            (f"entry[{item.number - 1}].{path}", "the key appears more than once in its object; keep one")
            for path in item.duplicates
        )
        if not isinstance(entry, dict):
            yield Entry(item.number, None, None, (("entry", "expected an object"),))
            continue
        resource = entry.get("resource")
        url = entry.get("fullUrl")
        yield Entry(
            item.number,
            url if isinstance(url, str) else None,
            resource if isinstance(resource, dict) else None,
            problems,
        )


def _local(tag: Any) -> str | None:
    return tag[len(_NS) :] if isinstance(tag, str) and tag.startswith(_NS) else None


def _resource_from_xml(element: Any) -> tuple[dict[str, Any] | None, tuple[tuple[str, str], ...]]:
    name = _local(element.tag) or "<resource>"
    try:
        model = get_fhir_model_class(name)
    except (KeyError, ValueError):
        return None, ((name, "not a FHIR R4 resource type"),)
    try:
        parsed = model.model_validate_xml(etree.tostring(element))
    except PydanticValidationError as exc:
        return None, tuple(model_problems(exc, name))
    except (ValueError, TypeError, etree.LxmlError):
        return None, ((name, "fails FHIR R4 validation: not a valid XML resource"),)
    return json.loads(parsed.model_dump_json()), ()


def _xml_events(source: Source) -> Iterator[tuple[str, Any]]:
    name = source_name(source)
    with _opened(source) as handle:
        if isinstance(handle.read(0), str):
            raise PartnerInputError(f"{name}: FHIR XML must be read as bytes (open the file in binary mode)")
        events = etree.iterparse(
            handle, events=("start", "end"), resolve_entities=False, no_network=True, load_dtd=False
        )
        try:
            yield from events
        except etree.XMLSyntaxError as exc:
            line, column = exc.position
            raise PartnerInputError(f"{name}: line {line} column {column}: malformed XML") from None


def _read_xml(source: Source) -> tuple[Any, Iterator[Entry]]:
    name = source_name(source)
    events = _xml_events(source)
    root = None
    head: dict[str, Any] = {}
    for event, element in events:
        if root is None:
            root = element
            head["resourceType"] = _local(element.tag) or "<not FHIR>"
            if head["resourceType"] != "Bundle":
                break
            continue
        if event == "end" and element.getparent() is root and _local(element.tag) in ("type", "id"):
            head[_local(element.tag) or ""] = element.get("value")
        if event == "start" and element.getparent() is root and _local(element.tag) == "entry":
            return head, _xml_entries(events, root)
    if root is None:
        raise PartnerInputError(f"{name}: the XML has no root element")
    if head["resourceType"] != "Bundle":
        for _event, _element in events:
            pass  # read to the end: a single resource is small
        resource, problems = _resource_from_xml(root)
        return {"resourceType": head["resourceType"], "__resource__": resource, "__problems__": problems}, iter(())
    return head, iter(())


def _xml_entries(events: Iterator[tuple[str, Any]], root: Any) -> Iterator[Entry]:
    number = 0
    for event, element in events:
        if event != "end" or element.getparent() is not root or _local(element.tag) != "entry":
            continue
        number += 1
        url_element = element.find(f"{_NS}fullUrl")
        url = url_element.get("value") if url_element is not None else None
        holder = element.find(f"{_NS}resource")
        inner = [child for child in holder if isinstance(child.tag, str)] if holder is not None else []
        if not inner:
            yield Entry(number, url, None, ())
        else:
            resource, problems = _resource_from_xml(inner[0])
            id_element = inner[0].find(f"{_NS}id")
            refused = (
                (_local(inner[0].tag) or "", id_element.get("value") if id_element is not None else None)
                if resource is None
                else None
            )
            yield Entry(number, url, resource, problems, refused)
        element.clear()
        while element.getprevious() is not None:
            del root[0]  # entries already read: keep memory flat


def write_fhir(bundle: dict[str, Any], out: IO[str], syntax: str) -> None:
    """Validate a Bundle (our own output: a failure is a bug, never partner data) and write it."""
    try:
        model = Bundle.model_validate(bundle)
    except PydanticValidationError as exc:
        raise ContractError(f"rendered FHIR Bundle fails validation ({exc.error_count()} problem(s))") from None
    if syntax == "xml":
        # fhir.resources annotates model_dump_xml as str; it returns bytes
        xml: bytes | str = model.model_dump_xml(pretty_print=True)
        out.write(xml.decode("utf-8") if isinstance(xml, bytes) else xml)
    else:
        json.dump(bundle, out, indent=2, ensure_ascii=False)
        out.write("\n")
