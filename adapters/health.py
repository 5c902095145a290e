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

import json
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.task import Task
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from referral_broker.errors import ContractError, PartnerInputError

from .base import NOT_OBTAINED_ETHNICITY, JsonAdapter, NativeRecord, register
from .field_map import (
    BOOL,
    INT,
    ISO_DATE,
    NHS_NUMBER,
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
)
from .native_files import Source, read_json, source_name

NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
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

SR = "ServiceRequest."
PT = "Patient."
ROLE = f"{SR}contained[resourceType=PractitionerRole]."


def _ext(name: str, inner: str, value: str) -> str:
    return f"{SR}extension[url={EXT}/{name}].extension[url={inner}].{value}"


REFERRAL_MAP = FieldMap(
    (
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
        Const(f"{SR}requester.reference", "#requester"),
        Const(f"{ROLE}id", "requester"),
        Field(f"{ROLE}organization.display", "referrer.organisation"),
        Field(f"{ROLE}practitioner.display", "referrer.practitioner.name"),
        Field(f"{ROLE}code[0].text", "referrer.practitioner.role"),
        Field(f"{ROLE}telecom[system=email].value", "referrer.practitioner.email"),
        Field(f"{ROLE}telecom[system=phone].value", "referrer.practitioner.phone"),
        Field(f"{PT}identifier[system={NHS_NUMBER_SYSTEM}].value", "identifiers.nhs_number", NHS_NUMBER),
        Field(f"{PT}name[use=official].family", "child.family_name"),
        Field(f"{PT}name[use=official].given[0]", "child.given_name"),
        Field(f"{PT}name[use=usual].given[0]", "child.preferred_name"),
        Field(f"{PT}birthDate", "child.date_of_birth", ISO_DATE),
        Field(f"{PT}gender", "child.sex", GENDER),
        Field(f"{PT}communication[0].language.text", "child.first_language"),
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
                Field(f"relationship[0].coding[system={RELATIONSHIP_SYSTEM}].code", "relationship"),
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

_MODELS: dict[str, type[BaseModel]] = {"ServiceRequest": ServiceRequest, "Patient": Patient, "Task": Task}


def _fhir_problems(resource: Any, type_name: str) -> list[MappingProblem]:
    """The library's findings for one resource, by element path; never the offending value."""
    if not isinstance(resource, dict):
        return [MappingProblem(type_name, "", "expected a FHIR resource (a JSON object)")]
    try:
        _MODELS[type_name].model_validate(resource)
    except PydanticValidationError as exc:
        problems = []
        for error in exc.errors():
            where = type_name + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
            shown = str(error.get("input", ""))
            reason = error["msg"] if not shown or shown not in error["msg"] else error["type"]
            problems.append(MappingProblem(where, "", f"fails FHIR R4 validation: {reason}"))
        return problems
    return []


@register
class HealthAdapter(JsonAdapter):
    kind = "health"
    referral_map = REFERRAL_MAP
    status_map = STATUS_MAP
    strict_keys = False  # the FHIR library rejects unknown elements itself
    defaults_when_absent = NOT_OBTAINED_ETHNICITY

    def read_native(self, source: Source, field_map: FieldMap) -> Iterator[NativeRecord]:
        name = source_name(source)
        document = read_json(source)
        wanted = "Task" if field_map is STATUS_MAP else "ServiceRequest"
        kind = document.get("resourceType") if isinstance(document, dict) else None
        if kind == wanted:
            yield self._record(1, document, wanted, {})
            return
        if kind != "Bundle":
            raise PartnerInputError(f"{name}: expected a FHIR Bundle or {wanted} (resourceType)")
        try:
            Bundle.model_validate({**document, "entry": []})
        except PydanticValidationError as exc:
            where = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
            raise PartnerInputError(f"{name}: the Bundle fails FHIR R4 validation at {where}") from None
        entries = [e for e in document.get("entry") or [] if isinstance(e, dict)]
        by_reference: dict[str, Any] = {}
        for entry in entries:
            resource = entry.get("resource")
            if isinstance(resource, dict):
                by_reference[str(entry.get("fullUrl"))] = resource
                by_reference[f"{resource.get('resourceType')}/{resource.get('id')}"] = resource
        for number, entry in enumerate(document.get("entry") or [], 1):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == wanted:
                yield self._record(number, resource, wanted, by_reference)

    def _record(
        self, number: int, resource: dict[str, Any], wanted: str, bundle: dict[str, Any]
    ) -> NativeRecord:
        problems = _fhir_problems(resource, wanted)
        if wanted == "Task":
            return NativeRecord(number, resource, tuple(problems))
        reference = (
            (resource.get("subject") or {}).get("reference")
            if isinstance(resource.get("subject"), dict)
            else None
        )
        contained = {f"#{r.get('id')}": r for r in resource.get("contained") or [] if isinstance(r, dict)}
        # a reference that is not text (a list, say) names no contained resource
        patient = (contained.get(reference) if isinstance(reference, str) else None) or bundle.get(
            str(reference)
        )
        if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
            problems.append(
                MappingProblem(f"{SR}subject", "child", "does not refer to a Patient in the file")
            )
        else:
            problems.extend(_fhir_problems(patient, "Patient"))
        return NativeRecord(number, {"ServiceRequest": resource, "Patient": patient}, tuple(problems))

    def write_native(self, documents: Iterable[dict[str, Any]], field_map: FieldMap, out: IO[str]) -> None:
        entries: list[dict[str, Any]] = []
        for document in documents:
            if field_map is STATUS_MAP:
                task = {"resourceType": "Task", **document}
                entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": task})
                continue
            request = {"resourceType": "ServiceRequest", **document.get("ServiceRequest", {})}
            patient = {"resourceType": "Patient", **document.get("Patient", {})}
            patient_url = f"urn:uuid:{uuid.uuid4()}"
            request["subject"] = {"reference": patient_url}
            entries.append({"fullUrl": patient_url, "resource": patient})
            entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": request})
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
        try:
            Bundle.model_validate(bundle)
        except PydanticValidationError as exc:  # our own output: a bug here, never partner data
            raise ContractError(
                f"rendered FHIR Bundle fails validation ({exc.error_count()} problem(s))"
            ) from None
        json.dump(bundle, out, indent=2, ensure_ascii=False)
        out.write("\n")
