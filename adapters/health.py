"""Health: HL7 FHIR R4 (``fhir.resources.R4B``), a ServiceRequest referral and its Patient.

A file is a Bundle (each ServiceRequest entry is one record, numbered by its entry position;
its Patient is another entry or contained), or a single ServiceRequest with a contained
Patient. Every resource is validated with the library's ``model_validate``; the library does
not check code bindings, so the ones relied on are checked here (status, intent, priority,
gender, Task status). The NHS number is the Patient identifier with the UK Core system
``https://fhir.nhs.uk/Id/nhs-number``. What FHIR has no element for (flags, consent, the
sharing override, the district) travels in extensions under this project's own base URL.
On receipt a Bundle (type collection) of ServiceRequest + Patient entries is rendered; status
messages are FHIR Tasks. Elements and their canonical paths: ``FORMATS.md``.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import IO, Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.organization import Organization
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.practitioner import Practitioner
from fhir.resources.R4B.practitionerrole import PractitionerRole
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.task import Task
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from referral_broker.errors import EmptyInputError, PartnerInputError

from .base import NOT_OBTAINED_ETHNICITY, JsonAdapter, NativeRecord, register, shown_path
from .fhir_files import Entry, model_problems, read_fhir, write_fhir
from .field_map import (
    BOOL,
    INT,
    ISO_DATE,
    NHS_NUMBER,
    ODS_CODE,
    POSTCODE,
    TIMESTAMP,
    URN_UUID,
    Codec,
    Const,
    Field,
    FieldMap,
    Items,
    MappingProblem,
    codes,
    get_path,
)
from .native_files import Source, source_name
from .uk_core import (
    ETHNIC_CATEGORY_EXTENSION,
    ETHNICITY,
    LANGUAGE,
    NHS_COMMUNICATION_EXTENSION,
    PROFILES,
    RELATIONSHIP,
)

NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
ODS_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"
UUID_SYSTEM = "urn:ietf:rfc:3986"
SNOMED = "http://snomed.info/sct"
INTERPRETER_REQUIRED = "http://hl7.org/fhir/StructureDefinition/patient-interpreterRequired"
LOCAL = "https://fhir.early-help.example"
EXT = f"{LOCAL}/StructureDefinition"
DISTRICT_SYSTEM = f"{LOCAL}/Id/district"
PARTY_SYSTEM = f"{LOCAL}/Id/party"
CONCERN_SYSTEM = f"{LOCAL}/CodeSystem/concern-type"
SERVICE_SYSTEM = f"{LOCAL}/CodeSystem/service"
RELATIONSHIP_SYSTEM = f"{LOCAL}/CodeSystem/relationship"
REQUEST_INTENTS = frozenset(
    {
        "proposal",
        "plan",
        "directive",
        "order",
        "original-order",
        "reflex-order",
        "filler-order",
        "instance-order",
        "option",
    }
)

PRIORITY = codes({"routine": "routine", "urgent": "high", "asap": "urgent", "stat": "urgent"})
GENDER = codes({"female": "female", "male": "male", "unknown": "not_known", "other": "not_specified"})
TASK_STATUS = codes(
    {
        "received": "opened",
        "accepted": "accepted",
        "rejected": "declined",
        "on-hold": "more_information_needed",
        "in-progress": "allocated",
        "completed": "closed",
    }
)
FHIR_ID = Codec(INT.parse, str)  # meta.versionId is a FHIR id: text


def _ods_identifier(value: Any) -> str | None:
    """The ODS code of an Identifier with the ODS system; another system (a GP's own GMP
    number, say) is not a practice code and reads as absent."""
    if not isinstance(value, dict):
        raise ValueError("expected an Identifier (an object with system and value)")
    if value.get("system") != ODS_SYSTEM:
        return None
    return ODS_CODE.parse(value.get("value"))


# Patient.generalPractitioner[0].identifier <-> the GP practice's ODS code.
ODS_IDENTIFIER = Codec(_ods_identifier, lambda code: {"system": ODS_SYSTEM, "value": code})

SR = "ServiceRequest."
PT = "Patient."
ROLE = "PractitionerRole."
PRAC = "Practitioner."
ORG = "Organization."


def _ext(name: str, inner: str, value: str) -> str:
    return f"{SR}extension[url={EXT}/{name}].extension[url={inner}].{value}"


REFERRAL_MAP = FieldMap(
    (
        Const(f"{SR}meta.profile[0]", PROFILES["ServiceRequest"]),
        Const(f"{SR}status", "active", frozenset({"active"})),
        Const(f"{SR}intent", "order", REQUEST_INTENTS),
        Const(f"{SR}code.coding[0].system", SNOMED),
        Const(f"{SR}code.coding[0].code", "3457005"),
        Const(f"{SR}code.coding[0].display", "Patient referral"),
        Field(f"{SR}identifier[system={UUID_SYSTEM}].value", "referral_id", URN_UUID),
        Field(f"{SR}meta.versionId", "version", FHIR_ID),
        Field(f"{SR}authoredOn", "created_at", TIMESTAMP),
        Field(f"{SR}priority", "priority", PRIORITY),
        Const(f"{SR}performer[0].identifier.system", DISTRICT_SYSTEM),
        Field(f"{SR}performer[0].identifier.value", "district"),
        Field(_ext("flags", "safeguardingConcern", "valueBoolean"), "flags.safeguarding_concern", BOOL),
        Field(_ext("flags", "crimePrevention", "valueBoolean"), "flags.crime_prevention", BOOL),
        Field(_ext("flags", "earlySupportPathway", "valueBoolean"), "flags.early_support_pathway", BOOL),
        Field(f"{SR}extension[url={EXT}/referred-by].valueCode", "referrer.partner"),
        Const(f"{ORG}meta.profile[0]", PROFILES["Organization"]),
        Field(f"{ORG}name", "referrer.organisation"),
        Const(f"{PRAC}meta.profile[0]", PROFILES["Practitioner"]),
        Field(f"{PRAC}name[0].text", "referrer.practitioner.name"),
        Const(f"{ROLE}meta.profile[0]", PROFILES["PractitionerRole"]),
        Field(f"{ROLE}code[0].text", "referrer.practitioner.role"),
        Field(f"{ROLE}telecom[system=email].value", "referrer.practitioner.email"),
        Field(f"{ROLE}telecom[system=phone].value", "referrer.practitioner.phone"),
        Const(f"{PT}meta.profile[0]", PROFILES["Patient"]),
        Field(f"{PT}identifier[system={NHS_NUMBER_SYSTEM}].value", "identifiers.nhs_number", NHS_NUMBER),
        Field(f"{PT}name[use=official].family", "child.family_name"),
        Field(f"{PT}name[use=official].given[0]", "child.given_name"),
        Field(f"{PT}name[use=usual].given[0]", "child.preferred_name"),
        Field(f"{PT}birthDate", "child.date_of_birth", ISO_DATE),
        Field(f"{PT}gender", "child.sex", GENDER),
        Field(f"{PT}extension[url={ETHNIC_CATEGORY_EXTENSION}].valueCodeableConcept", "child.ethnicity", ETHNICITY),
        Field(f"{PT}communication[0].language", "child.first_language", LANGUAGE),
        Field(f"{PT}extension[url={INTERPRETER_REQUIRED}].valueBoolean", "child.interpreter_needed", BOOL),
        Field(f"{PT}address[0].line[0]", "child.address.line1"),
        Field(f"{PT}address[0].line[1]", "child.address.line2"),
        Field(f"{PT}address[0].city", "child.address.town"),
        Field(f"{PT}address[0].postalCode", "child.address.postcode", POSTCODE),
        Field(f"{PT}telecom[system=phone].value", "child.contact.phone"),
        Field(f"{PT}telecom[system=email].value", "child.contact.email"),
        Items(
            f"{PT}contact",
            "household",
            (
                Field("name.given[0]", "given_name"),
                Field("name.family", "family_name"),
                Field("relationship", "relationship", RELATIONSHIP),
                Field(
                    f"extension[url={EXT}/parental-responsibility].valueBoolean",
                    "parental_responsibility",
                    BOOL,
                ),
                Field("telecom[system=phone].value", "contact.phone"),
                Field("telecom[system=email].value", "contact.email"),
            ),
        ),
        Field(f"{PT}generalPractitioner[0].display", "health_and_development.gp_practice"),
        Field(f"{PT}generalPractitioner[0].identifier", "health_and_development.gp_practice_ods", ODS_IDENTIFIER),
        Field(
            _ext("health", "mentalHealthConcern", "valueBoolean"),
            "health_and_development.mental_health_concern",
            BOOL,
        ),
        Field(
            _ext("health", "developmentConcern", "valueBoolean"),
            "health_and_development.development_concern",
            BOOL,
        ),
        Field(_ext("health", "disability", "valueBoolean"), "health_and_development.disability", BOOL),
        Items(f"{SR}supportingInfo", "health_and_development.conditions", (Field("display", ""),)),
        Field(f"{SR}note[0].text", "health_and_development.summary"),
        Items(
            f"{SR}reasonCode",
            "concerns",
            (
                Field(f"coding[system={CONCERN_SYSTEM}].code", "type"),
                Field("text", "detail"),
                Field(f"extension[url={EXT}/concern-since].valueDate", "since", ISO_DATE),
            ),
        ),
        Items(
            f"{SR}orderDetail", "services_requested", (Field(f"coding[system={SERVICE_SYSTEM}].code", ""),)
        ),
        Field(_ext("home-circumstances", "housing", "valueCode"), "home_circumstances.housing"),
        Field(
            _ext("home-circumstances", "overcrowded", "valueBoolean"), "home_circumstances.overcrowded", BOOL
        ),
        Field(
            _ext("home-circumstances", "financialHardship", "valueBoolean"),
            "home_circumstances.financial_hardship",
            BOOL,
        ),
        Field(
            _ext("home-circumstances", "receivesBenefits", "valueBoolean"),
            "home_circumstances.receives_benefits",
            BOOL,
        ),
        Field(
            _ext("home-circumstances", "youngCarer", "valueBoolean"), "home_circumstances.young_carer", BOOL
        ),
        Field(_ext("home-circumstances", "summary", "valueString"), "home_circumstances.summary"),
        Field(_ext("send", "status", "valueCode"), "send.status"),
        Field(_ext("send", "primaryNeed", "valueCode"), "send.primary_need"),
        Field(_ext("send", "details", "valueString"), "send.details"),
        Field(_ext("consent", "state", "valueCode"), "consent.state"),
        Field(_ext("consent", "recordedAt", "valueDateTime"), "consent.recorded_at", TIMESTAMP),
        Field(_ext("consent", "recordedBy", "valueString"), "consent.recorded_by"),
        Field(_ext("sharing-override", "id", "valueUuid"), "sharing_override.override_id", URN_UUID),
        Field(_ext("sharing-override", "ground", "valueCode"), "sharing_override.ground"),
        Field(_ext("sharing-override", "reason", "valueString"), "sharing_override.reason"),
        Field(_ext("sharing-override", "approverRole", "valueString"), "sharing_override.approved_by.role"),
        Field(_ext("sharing-override", "approverName", "valueString"), "sharing_override.approved_by.name"),
        Field(
            _ext("sharing-override", "approvedAt", "valueDateTime"), "sharing_override.approved_at", TIMESTAMP
        ),
    )
)

STATUS_MAP = FieldMap(
    (
        Const("meta.profile[0]", PROFILES["Task"]),
        Const("intent", "order", REQUEST_INTENTS),
        Field(f"identifier[system={UUID_SYSTEM}].value", "status_id", URN_UUID),
        Const("focus.identifier.system", UUID_SYSTEM),
        Field("focus.identifier.value", "referral_id", URN_UUID),
        Field("input[type.text=referral-version].valueInteger", "version", INT),
        Const("owner.identifier.system", PARTY_SYSTEM),
        Field("owner.identifier.value", "from_party"),
        Const("requester.identifier.system", PARTY_SYSTEM),
        Field("requester.identifier.value", "to_party"),
        Field("status", "status", TASK_STATUS),
        Field("statusReason.text", "reason"),
        Field("lastModified", "at", TIMESTAMP),
        Field("performerType[0].text", "actor_role"),
    )
)

_MODELS: dict[str, type[BaseModel]] = {
    "ServiceRequest": ServiceRequest,
    "Patient": Patient,
    "Task": Task,
    "PractitionerRole": PractitionerRole,
    "Practitioner": Practitioner,
    "Organization": Organization,
}
# The resources a referral is made of, besides the ServiceRequest, in the order they are rendered.
PARTS = ("Patient", "Organization", "Practitioner", "PractitionerRole")
BUNDLE_TYPES = frozenset({"collection", "transaction", "message", "batch", "searchset"})
# Said (once per file, with a count) when UK Core leaves out a yes/no the referral holds: it is
# read as not known (null, referral schema v3), never as no.
_NOT_GIVEN = {
    "child.interpreter_needed": "interpreterRequired",
    "household.parental_responsibility": "parental responsibility",
}


def _fhir_problems(resource: Any, type_name: str) -> list[MappingProblem]:
    """The library's findings for one resource, by element path; never the offending value."""
    if not isinstance(resource, dict):
        return [MappingProblem(type_name, "", "expected a FHIR resource (a JSON object)")]
    try:
        _MODELS[type_name].model_validate(resource)
    except PydanticValidationError as exc:
        return [MappingProblem(where, "", reason) for where, reason in model_problems(exc, type_name)]
    return []


def _reference(node: Any) -> str | None:
    """What a Reference names: its ``reference``, or else its ``identifier`` (a logical reference:
    NHS messages often name the patient only by NHS number), as a key of :class:`_Store`."""
    if not isinstance(node, dict):
        return None
    reference = node.get("reference")
    if reference is not None:
        return reference if isinstance(reference, str) else None  # a list, say, names nothing
    return _logical(node.get("identifier"))


_LOGICAL = "identifier|"


def _logical(identifier: Any) -> str | None:
    """The store key of an Identifier: its system and its value without spaces (an NHS number is
    often written 943 476 5919)."""
    if not isinstance(identifier, dict):
        return None
    system, value = identifier.get("system"), identifier.get("value")
    if not (isinstance(system, str) and isinstance(value, str) and value.strip()):
        return None
    return f"{_LOGICAL}{system}|{''.join(value.split())}"


def _display(node: Any) -> str | None:
    display = node.get("display") if isinstance(node, dict) else None
    return display if isinstance(display, str) and display.strip() else None


class _Store:
    """The Bundle's other resources, kept compact (JSON bytes) by fullUrl and Type/id, so a large
    Bundle is not held as objects while its referrals are read."""

    def __init__(self) -> None:
        self.kept: dict[str, tuple[bytes, tuple[tuple[str, str], ...], str]] = {}

    def add(self, entry: Entry) -> None:
        resource = entry.resource
        kind, rid = (resource.get("resourceType"), resource.get("id")) if isinstance(resource, dict) else (None, None)
        if entry.refused is not None:
            kind, rid = entry.refused  # refused by the library: referring to it names its problems
        packed = json.dumps(resource, separators=(",", ":")).encode() if resource is not None else b"null"
        value = (packed, entry.problems, str(kind))
        if entry.full_url:
            self.kept[entry.full_url] = value
        if rid:
            self.kept[f"{kind}/{rid}"] = value
        identifiers = resource.get("identifier") if isinstance(resource, dict) else None
        for identifier in identifiers if isinstance(identifiers, list) else ():
            key = _logical(identifier)
            if key is not None:
                self.kept.setdefault(key, value)  # the first resource to carry it, as in file order

    def has(self, reference: str | None) -> bool:
        return reference is not None and (reference in self.kept or self._tail(reference) in self.kept)

    def get(self, reference: str | None) -> tuple[Any, tuple[tuple[str, str], ...]]:
        if reference is None:
            return None, ()
        found = self.kept.get(reference) or self.kept.get(self._tail(reference))
        if found is None:
            return None, ()
        return json.loads(found[0]), found[1]

    @staticmethod
    def _tail(reference: str) -> str:
        if reference.startswith(_LOGICAL):
            return reference  # an identifier's system is a URL too, but names no resource
        return "/".join(reference.rstrip("/").split("/")[-2:])  # an absolute URL ending Type/id


@register
class HealthAdapter(JsonAdapter):
    kind = "health"
    referral_map = REFERRAL_MAP
    status_map = STATUS_MAP
    strict_keys = False  # the FHIR library rejects unknown elements itself
    defaults_when_absent = NOT_OBTAINED_ETHNICITY
    formats = MappingProxyType({"xml": ".xml"})

    def __init__(self) -> None:
        super().__init__()
        self._not_given: dict[str, int] = {}

    def read_native(self, source: Source, field_map: FieldMap) -> Iterator[NativeRecord]:
        name = source_name(source)
        wanted = "Task" if field_map is STATUS_MAP else "ServiceRequest"
        syntax, head, repeated, entries = read_fhir(source)
        kind = head.get("resourceType") if isinstance(head, dict) else None
        if kind == wanted or (syntax == "xml" and kind == wanted):
            resource = head.get("__resource__", head) if syntax == "xml" else head
            problems = [MappingProblem(w, "", r) for w, r in head.get("__problems__", ())]
            problems += [MappingProblem(shown_path(p), "", _REPEATED) for p in repeated]
            yield self._record(1, resource, wanted, _Store(), problems)
            return
        if not isinstance(head, dict):
            raise PartnerInputError(f"{name}: expected a FHIR Bundle or {wanted}, found a JSON list")
        if kind != "Bundle":
            raise PartnerInputError(f"{name}: expected a FHIR Bundle or {wanted} (resourceType)")
        if repeated:
            raise PartnerInputError(f"{name}: the Bundle repeats the key(s) {', '.join(map(shown_path, repeated))}")
        try:
            Bundle.model_validate({k: v for k, v in head.items() if k != "entry"} | {"entry": []})
        except PydanticValidationError as exc:
            where = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
            raise PartnerInputError(f"{name}: the Bundle fails FHIR R4 validation at {where}") from None
        if head.get("type") not in BUNDLE_TYPES:
            raise PartnerInputError(
                f"{name}: a Bundle of type {head.get('type')!r} holds no referrals; "
                f"use one of {', '.join(sorted(BUNDLE_TYPES))}"
            )
        store = _Store()
        waiting: collections.deque[Entry] = collections.deque()
        count = 0
        for entry in entries:
            resource = entry.resource
            if (isinstance(resource, dict) and resource.get("resourceType") == wanted) or (
                resource is None and entry.problems and entry.problems[0][0].startswith(wanted)
            ):
                waiting.append(entry)
                count += 1
            else:
                store.add(entry)
            # In file order, each referral once what it refers to has been read.
            while waiting and self._ready(waiting[0], store):
                yield self._entry_record(waiting.popleft(), wanted, store)
        while waiting:
            yield self._entry_record(waiting.popleft(), wanted, store)
        if count == 0:
            raise EmptyInputError(f"{name}: the Bundle holds no {wanted}: no records")

    def _ready(self, entry: Entry, store: _Store) -> bool:
        resource = entry.resource
        if resource is None or resource.get("resourceType") == "Task":
            return True
        needed = [_reference(resource.get("subject")), _reference(resource.get("requester"))]
        role, _ = store.get(needed[1])
        if isinstance(role, dict):
            needed += [_reference(role.get("practitioner")), _reference(role.get("organization"))]
        patient, _ = store.get(needed[0])
        if isinstance(patient, dict) and isinstance(patient.get("generalPractitioner"), list):
            # a GP practice in the Bundle; one on another server (an absolute URL) is not waited for
            needed += [
                ref
                for ref in map(_reference, patient["generalPractitioner"])
                if ref is not None and "://" not in ref
            ]
        return all(ref is None or ref.startswith("#") or store.has(ref) for ref in needed)

    def _entry_record(self, entry: Entry, wanted: str, store: _Store) -> NativeRecord:
        problems = [MappingProblem(where, "", reason) for where, reason in entry.problems]
        if entry.resource is None:
            return NativeRecord(entry.number, None, tuple(problems))
        return self._record(entry.number, entry.resource, wanted, store, problems)

    def _record(
        self, number: int, resource: Any, wanted: str, store: _Store, problems: list[MappingProblem]
    ) -> NativeRecord:
        if not isinstance(resource, dict):
            return NativeRecord(number, None, tuple(problems) or ((MappingProblem(wanted, "", "not readable")),))
        problems += _fhir_problems(resource, wanted)
        if wanted == "Task":
            return NativeRecord(number, resource, tuple(problems))
        contained = {f"#{r.get('id')}": r for r in resource.get("contained") or [] if isinstance(r, dict)}

        refused: set[str] = set()

        def resolve(reference: str | None, expected: tuple[str, ...]) -> dict[str, Any] | None:
            if reference is None:
                return None
            found, found_problems = (contained.get(reference), ()) if reference.startswith("#") else store.get(reference)
            problems.extend(MappingProblem(w, "", r) for w, r in found_problems)
            if found_problems:
                refused.add(reference)
            if isinstance(found, dict) and found.get("resourceType") in expected:
                return found
            return None

        subject = _reference(resource.get("subject"))
        patient = resolve(subject, ("Patient",))
        if patient is None and subject not in refused:
            problems.append(MappingProblem(f"{SR}subject", "child", "does not refer to a Patient in the file"))
        parts = _requester(resource.get("requester"), resolve)
        document: dict[str, Any] = {"ServiceRequest": resource, "Patient": patient or {}, **parts}
        for part in ("Patient", *PARTS[1:]):
            if document[part] and "resourceType" in document[part]:
                problems.extend(_fhir_problems(document[part], part))
        if patient is not None:
            if not _read_current_details(patient, _authored_on(resource)):
                problems.append(
                    MappingProblem(
                        f"{PT}address",
                        "child.address",
                        "no address in use the day the referral was made (each is use old or outside its period)",
                    )
                )
            _read_nhs_communication(patient)
            own = {f"#{r.get('id')}": r for r in patient.get("contained") or [] if isinstance(r, dict)}
            _read_general_practice(
                patient,
                lambda ref: own.get(ref) if ref in own else resolve(ref, ("Organization",)),
            )
        return NativeRecord(number, document, tuple(problems))

    def extra_problems(self, native: Any, record: dict[str, Any]) -> list[MappingProblem]:
        patient = native.get("Patient") or {}
        interpreter = get_path(patient, f"extension[url={INTERPRETER_REQUIRED}].valueBoolean")
        if interpreter is None:
            self._note("child.interpreter_needed")
        for member in record.get("household") or []:
            if isinstance(member, dict) and member.get("parental_responsibility") is None:
                self._note("household.parental_responsibility")
        return []

    def _note(self, path: str) -> None:
        self._not_given[path] = self._not_given.get(path, 0) + 1
        self.warnings[:] = [
            f"{count} time(s) no {_NOT_GIVEN[p]} given ({p}): read as not known"
            for p, count in self._not_given.items()
        ]

    def finish_native(self, document: dict[str, Any], record: Mapping[str, Any]) -> None:
        practice = get_path(document, f"{PT}generalPractitioner[0]")
        if isinstance(practice, dict) and "identifier" in practice:
            # as PDS and UK Core name a registered GP practice: a logical reference by ODS code
            document["Patient"]["generalPractitioner"][0] = {"type": "Organization", **practice}

    def write_native(self, documents: Iterable[dict[str, Any]], field_map: FieldMap, out: IO[str]) -> None:
        entries: list[dict[str, Any]] = []
        for document in documents:
            if field_map is STATUS_MAP:
                task = {"resourceType": "Task", **document}
                entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": task})
                continue
            urls: dict[str, str] = {}
            for part in PARTS:
                body = document.get(part) or {}
                if part != "Patient" and not any(k != "meta" for k in body):
                    if not (part == "PractitionerRole" and {"Practitioner", "Organization"} <= set(urls)):
                        continue  # nothing of this resource in the view
                    # A view with the practitioner and the organisation but no role detail still
                    # needs the role that ties them: the requester can name only one of them.
                    body = {"meta": {"profile": [PROFILES["PractitionerRole"]]}, **body}
                urls[part] = f"urn:uuid:{uuid.uuid4()}"
                entries.append({"fullUrl": urls[part], "resource": {"resourceType": part, **body}})
            role = entries[-1]["resource"] if "PractitionerRole" in urls else None
            if role is not None:
                for part, element in (("Practitioner", "practitioner"), ("Organization", "organization")):
                    if part in urls:
                        role[element] = {"reference": urls[part]}
            request = {"resourceType": "ServiceRequest", **document.get("ServiceRequest", {})}
            request["subject"] = {"reference": urls["Patient"]}
            requester = urls.get("PractitionerRole") or urls.get("Practitioner") or urls.get("Organization")
            if requester:
                request["requester"] = {"reference": requester}
            entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": request})
        write_fhir({"resourceType": "Bundle", "type": "collection", "entry": entries}, out, self.syntax or "json")


_REPEATED = "the key appears more than once in its object; keep one"


def _requester(requester: Any, resolve: Any) -> dict[str, Any]:
    """The referrer's PractitionerRole, Practitioner and Organization, whether Bundle entries or
    contained, and whether referenced or only named (``display``)."""
    parts: dict[str, Any] = {part: {} for part in PARTS[1:]}
    target = resolve(_reference(requester), ("PractitionerRole", "Practitioner", "Organization"))
    if target is not None:
        parts[target["resourceType"]] = target
    role = parts["PractitionerRole"]
    for part, element in (("Practitioner", "practitioner"), ("Organization", "organization")):
        if not parts[part] and isinstance(role.get(element), dict):
            found = resolve(_reference(role[element]), (part,))
            named = _display(role[element])
            if found is not None:
                parts[part] = found
            elif named is not None:
                parts[part] = {"name": [{"text": named}]} if part == "Practitioner" else {"name": named}
    if not parts["Practitioner"] and _display(requester):
        parts["Practitioner"] = {"name": [{"text": _display(requester)}]}
    practitioner = parts["Practitioner"]
    names = practitioner.get("name") if isinstance(practitioner.get("name"), list) else []
    if names and isinstance(names[0], dict) and not names[0].get("text"):
        first = names[0]
        words = [*(first.get("prefix") or []), *(first.get("given") or []), first.get("family") or ""]
        text = " ".join(w for w in words if isinstance(w, str) and w.strip())
        if text:
            practitioner = {**practitioner, "name": [{**first, "text": text}, *names[1:]]}
            parts["Practitioner"] = practitioner
    return parts


def _read_general_practice(patient: dict[str, Any], resolve: Any) -> None:
    """UK Core names the child's GP practice in ``Patient.generalPractitioner``: a logical
    reference (``type`` Organization, an ODS ``identifier``, as PDS gives it) or a reference to
    an Organization (contained, or a Bundle entry) whose identifiers hold the ODS code. The
    first such practice is put first, as ``{type, identifier, display}``, for the table to read;
    a GP (a Practitioner) listed before it is kept after it. Nothing is invented: a practice
    with no ODS code keeps only its name."""
    entries = patient.get("generalPractitioner")
    if not isinstance(entries, list):
        return
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        reference = _reference(entry)
        target = resolve(reference) if reference is not None else None
        target = target if isinstance(target, dict) and target.get("resourceType") == "Organization" else None
        identifier = entry.get("identifier")
        if target is not None and not (isinstance(identifier, dict) and identifier.get("system") == ODS_SYSTEM):
            ods = [i for i in target.get("identifier") or [] if isinstance(i, dict) and i.get("system") == ODS_SYSTEM]
            identifier = ods[0] if ods else identifier
        ods_code = identifier.get("value") if isinstance(identifier, dict) and identifier.get("system") == ODS_SYSTEM else None
        if not (ods_code is not None or target is not None or entry.get("type") == "Organization"):
            continue
        practice: dict[str, Any] = {"type": "Organization"}
        if ods_code is not None:
            practice["identifier"] = {"system": ODS_SYSTEM, "value": ods_code}
        name = _display(entry) or (target.get("name") if target is not None else None)
        if isinstance(name, str) and name.strip():
            practice["display"] = name
        patient["generalPractitioner"] = [practice, *entries[:position], *entries[position + 1 :]]
        return


# Which of a Patient's addresses and telecoms the referral reads first, by ``use``: the home.
_ADDRESS_USES = {"home": 0, "temp": 1, None: 2, "work": 3, "billing": 4}
_TELECOM_USES = {"home": 0, "mobile": 1, None: 2, "temp": 3, "work": 4}


def _authored_on(request: dict[str, Any]) -> dt.date:
    """The day the referral was made (``authoredOn``), else today: the day whose details count."""
    authored = request.get("authoredOn")
    with contextlib.suppress(TypeError, ValueError):
        return dt.date.fromisoformat(str(authored)[:10])
    return dt.datetime.now(dt.UTC).date()


def _in_use(item: dict[str, Any], on: dt.date) -> bool:
    """Not ``use`` old, and ``on`` within its ``period`` (a partial date counts as its first day
    for a start and its last for an end: an address ended "2024-05" was in use in May)."""
    if item.get("use") == "old":
        return False
    period = item.get("period")
    if not isinstance(period, dict):
        period = {}
    day = on.isoformat()
    start, end = (str(period.get(k) or "")[:10] for k in ("start", "end"))
    return (not start or day[: len(start)] >= start) and (not end or day[: len(end)] <= end)


def _current(items: Any, on: dt.date, uses: Mapping[str | None, int]) -> Any:
    if not isinstance(items, list):
        return items
    kept = [i for i in items if isinstance(i, dict) and _in_use(i, on)]
    return sorted(kept, key=lambda i: uses.get(i.get("use"), len(uses)))


def _read_current_details(patient: dict[str, Any], on: dt.date) -> bool:
    """PDS and GP systems keep a child's past addresses and numbers beside the current ones
    (``use`` old, or a ``period`` that has ended), in any order: the referral reads only those
    in use the day it was made, the home first. The same for each contact's telecoms. False
    when the Patient has addresses but none of them in use."""
    had_address = bool(patient.get("address"))
    for key, uses in (("address", _ADDRESS_USES), ("telecom", _TELECOM_USES)):
        if key in patient:
            patient[key] = _current(patient[key], on, uses)
    for contact in patient.get("contact") or []:
        if isinstance(contact, dict) and "telecom" in contact:
            contact["telecom"] = _current(contact["telecom"], on, _TELECOM_USES)
    return not had_address or bool(patient.get("address"))


def _read_nhs_communication(patient: dict[str, Any]) -> None:
    """UK Core's NHS Communication extension also says whether an interpreter is required."""
    if get_path(patient, f"extension[url={INTERPRETER_REQUIRED}].valueBoolean") is not None:
        return
    for extension in patient.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == NHS_COMMUNICATION_EXTENSION:
            value = get_path(extension, "extension[url=interpreterRequired].valueBoolean")
            if isinstance(value, bool):
                patient.setdefault("extension", []).append({"url": INTERPRETER_REQUIRED, "valueBoolean": value})
                return
