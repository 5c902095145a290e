"""Health reads FHIR as NHS systems send it, following the UK Core profiles, in JSON and XML,
and writes UK Core back.

The Bundles here are synthetic (no real patient): a child with a valid (test-range) NHS number
referred for Early Help, shaped as UK Core's published profiles and code systems say
(https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient and the rest): coded language with
no text, the UK Core ethnic category, HL7 v3 and UK Core relationship codes, no
interpreter-required extension and no parental responsibility, the requester as
PractitionerRole/Practitioner/Organization entries or contained, in message (with a
MessageHeader), collection and transaction Bundles. Each is also sent as FHIR XML, converted
with fhir.resources, and must read the same.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import json
from pathlib import Path
from typing import Any

import pytest
from county import HEALTH_VISITING
from fhir.resources.R4B.bundle import Bundle

from referral_broker import adapters
from referral_broker.adapters import uk_core
from referral_broker.errors import EmptyInputError, PartnerInputError, ValidationError

NOW = dt.datetime(2025, 10, 1, tzinfo=dt.UTC)
LOCAL = "https://fhir.early-help.example"
EXT = f"{LOCAL}/StructureDefinition"
NHS_NUMBER = "9449305552"  # a test-range NHS number with a valid check digit
REFERRAL_ID = "0f3d7a52-6d7e-4b8e-9a34-1c2b9d0e5f61"
TEAM = "district-fenland"


def patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "child-1",
        "meta": {"profile": [uk_core.PROFILES["Patient"]]},
        "extension": [
            {
                "url": uk_core.ETHNIC_CATEGORY_EXTENSION,
                "valueCodeableConcept": {
                    "coding": [
                        {"system": uk_core.ETHNIC_CATEGORY_ENGLAND, "code": "N", "display": "Black or Black British - African"}
                    ]
                },
            }
        ],
        "identifier": [
            {
                "system": "https://fhir.nhs.uk/Id/nhs-number",
                "value": NHS_NUMBER,
                "extension": [
                    {
                        "url": f"{uk_core.PROFILE}/Extension-UKCore-NHSNumberVerificationStatus",
                        "valueCodeableConcept": {
                            "coding": [
                                {
                                    "system": f"{uk_core.UK_CORE}/CodeSystem/UKCore-NHSNumberVerificationStatusEngland",
                                    "code": "01",
                                    "display": "Number present and verified",
                                }
                            ]
                        },
                    }
                ],
            }
        ],
        "name": [{"use": "official", "family": "Testchild", "given": ["Ada"]}],
        "gender": "female",
        "birthDate": "2016-03-14",
        "address": [{"use": "home", "line": ["1 Example Road"], "city": "March", "postalCode": "PE15 8AA"}],
        # Coded as UK Core's HumanLanguage, with neither text nor display.
        "communication": [{"language": {"coding": [{"system": uk_core.HUMAN_LANGUAGE, "code": "so"}]}}],
        "contact": [
            {
                # next of kin (a role) first, then the relationship (HL7 v3 RoleCode)
                "relationship": [
                    {"coding": [{"system": uk_core.V2_CONTACT_ROLE, "code": "N", "display": "Next-of-Kin"}]},
                    {"coding": [{"system": uk_core.V3_ROLE_CODE, "code": "MTH", "display": "mother"}]},
                ],
                "name": {"family": "Testchild", "given": ["Beth"]},
                "telecom": [{"system": "phone", "value": "07700 900456"}],
            },
            {
                "relationship": [{"coding": [{"system": uk_core.V3_ROLE_CODE, "code": "GRMTH"}]}],
                "name": {"family": "Example", "given": ["Cora"]},
            },
            {
                "relationship": [{"coding": [{"system": uk_core.ADDITIONAL_RELATIONSHIP, "code": "Guardian"}]}],
                "name": {"family": "Sample", "given": ["Dev"]},
            },
        ],
        "generalPractitioner": [{"display": "March Medical Practice"}],
    }


def organization() -> dict[str, Any]:
    return {
        "resourceType": "Organization",
        "id": "org-1",
        "meta": {"profile": [uk_core.PROFILES["Organization"]]},
        "identifier": [{"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "RGT"}],
        "name": "Example Community Health Trust",
    }


def practitioner() -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "id": "prac-1",
        "meta": {"profile": [uk_core.PROFILES["Practitioner"]]},
        "name": [{"family": "Nurse", "given": ["Erin"], "prefix": ["Ms"]}],
    }


def practitioner_role(practitioner_ref: str, organization_ref: str) -> dict[str, Any]:
    return {
        "resourceType": "PractitionerRole",
        "id": "role-1",
        "meta": {"profile": [uk_core.PROFILES["PractitionerRole"]]},
        "practitioner": {"reference": practitioner_ref},
        "organization": {"reference": organization_ref},
        "code": [{"text": "School nurse"}],
        "telecom": [
            {"system": "email", "value": "erin.nurse@nhs.example"},
            {"system": "phone", "value": "01223 555001"},
        ],
    }


def service_request(subject: str, requester: str) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "id": "referral-1",
        "meta": {"profile": [uk_core.PROFILES["ServiceRequest"]], "versionId": "1"},
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{REFERRAL_ID}"}],
        "status": "active",
        "intent": "order",
        "priority": "urgent",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "3457005", "display": "Patient referral"}]},
        "subject": {"reference": subject},
        "requester": {"reference": requester},
        "authoredOn": "2025-09-20T10:15:00+01:00",
        "performer": [{"identifier": {"system": f"{LOCAL}/Id/district", "value": "fenland"}}],
        "extension": [
            {
                "url": f"{EXT}/flags",
                "extension": [
                    {"url": "safeguardingConcern", "valueBoolean": False},
                    {"url": "crimePrevention", "valueBoolean": False},
                    {"url": "earlySupportPathway", "valueBoolean": False},
                ],
            },
            {
                "url": f"{EXT}/health",
                "extension": [
                    {"url": "mentalHealthConcern", "valueBoolean": True},
                    {"url": "developmentConcern", "valueBoolean": False},
                    {"url": "disability", "valueBoolean": False},
                ],
            },
            {
                "url": f"{EXT}/consent",
                "extension": [
                    {"url": "state", "valueCode": "given"},
                    {"url": "recordedAt", "valueDateTime": "2025-09-19T14:00:00+01:00"},
                    {"url": "recordedBy", "valueString": "School nurse"},
                ],
            },
        ],
        "orderDetail": [{"coding": [{"system": f"{LOCAL}/CodeSystem/service", "code": "school_nurse"}]}],
        "reasonCode": [
            {
                "coding": [{"system": f"{LOCAL}/CodeSystem/concern-type", "code": "mental_health"}],
                "text": "Low mood and missed appointments.",
            }
        ],
    }


def message_bundle() -> dict[str, Any]:
    """An NHS referral message: MessageHeader first, every resource its own entry."""
    urls = {name: f"urn:uuid:00000000-0000-4000-8000-00000000000{n}" for n, name in enumerate(
        ("MessageHeader", "ServiceRequest", "Patient", "PractitionerRole", "Practitioner", "Organization"), 1
    )}
    header = {
        "resourceType": "MessageHeader",
        "meta": {"profile": [uk_core.PROFILES["MessageHeader"]]},
        "eventCoding": {
            "system": "https://fhir.nhs.uk/CodeSystem/message-events-bars",
            "code": "servicerequest-request",
        },
        "source": {"endpoint": "https://nhs.example/fhir"},
        "sender": {"reference": urls["Organization"]},
        "focus": [{"reference": urls["ServiceRequest"]}],
    }
    resources = {
        "MessageHeader": header,
        "ServiceRequest": service_request(urls["Patient"], urls["PractitionerRole"]),
        "Patient": patient(),
        "PractitionerRole": practitioner_role(urls["Practitioner"], urls["Organization"]),
        "Practitioner": practitioner(),
        "Organization": organization(),
    }
    return {
        "resourceType": "Bundle",
        "type": "message",
        "timestamp": "2025-09-20T10:15:00+01:00",
        "entry": [{"fullUrl": urls[name], "resource": resource} for name, resource in resources.items()],
    }


def collection_bundle() -> dict[str, Any]:
    """The referral before what it refers to (read once they arrive); the requester a
    Practitioner entry, referenced as Type/id."""
    request = service_request("Patient/child-1", "PractitionerRole/role-1")
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "https://nhs.example/fhir/ServiceRequest/referral-1", "resource": request},
            {"fullUrl": "https://nhs.example/fhir/Patient/child-1", "resource": patient()},
            {
                "fullUrl": "https://nhs.example/fhir/PractitionerRole/role-1",
                "resource": practitioner_role("Practitioner/prac-1", "Organization/org-1"),
            },
            {"fullUrl": "https://nhs.example/fhir/Practitioner/prac-1", "resource": practitioner()},
            {"fullUrl": "https://nhs.example/fhir/Organization/org-1", "resource": organization()},
        ],
    }


def transaction_bundle() -> dict[str, Any]:
    """A transaction: the requester contained in the ServiceRequest, named by display only."""
    request = service_request("urn:uuid:11111111-1111-4111-8111-111111111111", "#role")
    request["contained"] = [
        {
            "resourceType": "PractitionerRole",
            "id": "role",
            "practitioner": {"display": "Ms Erin Nurse"},
            "organization": {"display": "Example Community Health Trust"},
            "code": [{"text": "School nurse"}],
            "telecom": [{"system": "email", "value": "erin.nurse@nhs.example"}],
        }
    ]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
                "resource": patient(),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:22222222-2222-4222-8222-222222222222",
                "resource": request,
                "request": {"method": "POST", "url": "ServiceRequest"},
            },
        ],
    }


BUNDLES = {"message": message_bundle, "collection": collection_bundle, "transaction": transaction_bundle}


def as_xml(bundle: dict[str, Any]) -> bytes:
    return Bundle.model_validate(bundle).model_dump_xml(pretty_print=True)


def write(tmp_path: Path, bundle: dict[str, Any], syntax: str) -> Path:
    path = tmp_path / f"health.{syntax}"
    path.write_bytes(as_xml(bundle) if syntax == "xml" else json.dumps(bundle, indent=2).encode())
    return path


@pytest.mark.parametrize("syntax", ["json", "xml"])
@pytest.mark.parametrize("shape", list(BUNDLES))
def test_a_uk_core_bundle_arrives_in_the_canonical_referral(shape: str, syntax: str, tmp_path: Path) -> None:
    path = write(tmp_path, BUNDLES[shape](), syntax)
    result = adapters.load_file("health", path, now=NOW)
    [referral] = result.referrals
    assert str(referral["referral_id"]) == REFERRAL_ID
    assert referral["identifiers"]["nhs_number"] == NHS_NUMBER
    child = referral["child"]
    assert child["ethnicity"] == "black_african"  # UK Core ethnic category N, not "not_obtained"
    assert child["first_language"] == "Somali"  # UK Core HumanLanguage "so", no text, no display
    assert child["interpreter_needed"] is None  # absent: not known (schema v3), with a warning (below)
    assert [(m["given_name"], m["relationship"]) for m in referral["household"]] == [
        ("Beth", "mother"),
        ("Cora", "grandparent"),
        ("Dev", "guardian"),
    ]
    assert [m["parental_responsibility"] for m in referral["household"]] == [None, None, None]
    referrer = referral["referrer"]
    assert referrer["organisation"] == "Example Community Health Trust"
    assert referrer["practitioner"]["name"] == "Ms Erin Nurse"
    assert referrer["practitioner"]["role"] == "School nurse"
    assert referrer["practitioner"]["email"] == "erin.nurse@nhs.example"
    assert result.warnings == [
        "1 time(s) no interpreterRequired given (child.interpreter_needed): read as not known",
        "3 time(s) no parental responsibility given (household.parental_responsibility): read as not known",
    ]


def test_json_and_xml_of_the_same_bundle_read_the_same(tmp_path: Path) -> None:
    bundle = message_bundle()
    from_json = adapters.load_file("health", write(tmp_path, bundle, "json"), now=NOW).referrals
    from_xml = adapters.load_file("health", write(tmp_path, bundle, "xml"), now=NOW).referrals
    assert from_json == from_xml


def test_uk_core_interpreter_and_ethnicity_variants(tmp_path: Path) -> None:
    bundle = message_bundle()
    child = bundle["entry"][2]["resource"]
    child["extension"] = [
        {
            "url": uk_core.NHS_COMMUNICATION_EXTENSION,
            "extension": [
                {"url": "language", "valueCodeableConcept": {"coding": [{"system": uk_core.HUMAN_LANGUAGE, "code": "so"}]}},
                {"url": "interpreterRequired", "valueBoolean": True},
            ],
        },
        {
            "url": uk_core.ETHNIC_CATEGORY_EXTENSION,
            "valueCodeableConcept": {"coding": [{"system": uk_core.ETHNIC_CATEGORY_ENGLAND, "code": "Z"}]},
        },
    ]
    child["communication"][0]["language"]["text"] = "Somali (Maay)"
    result = adapters.load_file("health", write(tmp_path, bundle, "json"), now=NOW)
    [referral] = result.referrals
    assert referral["child"]["interpreter_needed"] is True
    assert referral["child"]["ethnicity"] == "refused"  # Z: not stated
    assert referral["child"]["first_language"] == "Somali (Maay)"  # text wins when present
    assert not any("interpreterRequired" in w for w in result.warnings)
    del child["extension"]
    [referral] = adapters.load_file("health", write(tmp_path, bundle, "json"), now=NOW).referrals
    assert referral["child"]["ethnicity"] == "not_obtained"  # no extension: not obtained


@pytest.mark.parametrize("syntax", ["json", "xml"])
def test_an_unknown_ethnic_code_and_relationship_are_refused_with_the_codes_allowed(
    syntax: str, tmp_path: Path
) -> None:
    bundle = message_bundle()
    child = bundle["entry"][2]["resource"]
    child["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] = "Q"
    child["contact"][1]["relationship"] = [{"coding": [{"system": uk_core.V3_ROLE_CODE, "code": "ZZZ"}]}]
    with pytest.raises(ValidationError) as raised:
        adapters.load_file("health", write(tmp_path, bundle, syntax), now=NOW)
    assert [str(p) for p in raised.value.problems] == [
        'record 2: "Patient.extension[url=https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-'
        'EthnicCategory].valueCodeableConcept" (child.ethnicity): not one of the UK Core ethnic category '
        "codes A, B, C, D, E, F, G, H, J, K, L, M, N, P, R, S, Z, 99",
        'record 2: "Patient.contact[1].relationship" (household[1].relationship): no code this adapter '
        "knows: use http://terminology.hl7.org/CodeSystem/v3-RoleCode (MTH, FTH, STPPRN, GUARD, PRNFOST, "
        "GRPRN, SIB, HSIB, STPSIB, FAMMEMB ...) or https://fhir.hl7.org.uk/CodeSystem/UKCore-"
        "AdditionalPersonRelationshipRole",
    ]


def test_a_referral_whose_patient_is_missing_is_refused_by_record(tmp_path: Path) -> None:
    bundle = message_bundle()
    del bundle["entry"][2]
    with pytest.raises(ValidationError) as raised:
        adapters.load_file("health", write(tmp_path, bundle, "json"), now=NOW)
    assert 'record 2: "ServiceRequest.subject" (child): does not refer to a Patient in the file' in [
        str(p) for p in raised.value.problems
    ]


@pytest.mark.parametrize("syntax", ["json", "xml"])
def test_past_and_future_addresses_and_numbers_are_not_the_childs(syntax: str, tmp_path: Path) -> None:
    """PDS keeps old addresses and numbers beside the current ones, in any order: the referral
    (authored 20 September 2025) reads those in use that day, the home first; with none in use,
    none at all (a district team must not be sent a family's old address as its home: that is refused)."""
    bundle = message_bundle()
    child = bundle["entry"][2]["resource"]
    assert child["resourceType"] == "Patient"
    home = child["address"][0]
    child["address"] = [
        {"use": "old", "line": ["9 Former Street"], "city": "Ely", "postalCode": "CB7 4AA"},
        {"line": ["2 Ended Lane"], "city": "Ely", "postalCode": "CB7 4AB", "period": {"end": "2025-08"}},
        {"use": "home", "line": ["3 Next Road"], "city": "Ely", "postalCode": "CB7 4AC", "period": {"start": "2025-10-01"}},
        {"use": "work", "line": ["4 Office Park"], "city": "Ely", "postalCode": "CB7 4AD"},
        {**home, "period": {"start": "2019", "end": "2025-09"}},
    ]
    child["telecom"] = [
        {"system": "phone", "value": "01632 960001", "use": "old"},
        {"system": "phone", "value": "01632 960002", "use": "work"},
        {"system": "phone", "value": "07700 900999", "use": "mobile"},
    ]
    guardian = child["contact"][0]
    guardian["telecom"].insert(0, {"system": "phone", "value": "01632 960003", "period": {"end": "2024-01-31"}})
    [referral] = adapters.load_file("health", write(tmp_path, bundle, syntax), now=NOW).referrals
    address = referral["child"]["address"]
    assert (address["line1"], address["postcode"]) == ("1 Example Road", "PE15 8AA")
    assert referral["child"]["contact"]["phone"] == "07700 900999"
    assert referral["household"][0]["contact"]["phone"] == "07700 900456"
    child["address"] = child["address"][:3]  # none in use that day: refused, saying so
    with pytest.raises(ValidationError) as raised:
        adapters.load_file("health", write(tmp_path, bundle, syntax), now=NOW)
    assert (
        'record 2: "Patient.address" (child.address): no address in use the day the referral was made '
        "(each is use old or outside its period)"
    ) in [str(p) for p in raised.value.problems]
    assert "Former Street" not in str(raised.value) and "CB7" not in str(raised.value)


@pytest.mark.parametrize("syntax", ["json", "xml"])
def test_a_patient_named_only_by_nhs_number_is_the_bundles_patient(syntax: str, tmp_path: Path) -> None:
    """A logical reference (``subject.identifier``, the NHS number as NHS messages often give
    it, here spaced) finds the Patient of the Bundle that carries it; one that no resource
    carries is refused as an unknown patient, with the record and the field."""
    bundle = message_bundle()
    literal = adapters.load_file("health", write(tmp_path, bundle, "json"), now=NOW).referrals
    request = bundle["entry"][1]["resource"]
    assert request["resourceType"] == "ServiceRequest"
    spaced = f"{NHS_NUMBER[:3]} {NHS_NUMBER[3:6]} {NHS_NUMBER[6:]}"
    request["subject"] = {"identifier": {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": spaced}}
    assert adapters.load_file("health", write(tmp_path, bundle, syntax), now=NOW).referrals == literal
    request["subject"]["identifier"]["value"] = "9434765919"  # valid, but no Patient here has it
    with pytest.raises(ValidationError) as raised:
        adapters.load_file("health", write(tmp_path, bundle, syntax), now=NOW)
    assert 'record 2: "ServiceRequest.subject" (child): does not refer to a Patient in the file' in [
        str(p) for p in raised.value.problems
    ]


@pytest.mark.parametrize("syntax", ["json", "xml"])
def test_a_bundle_without_referrals_is_empty(syntax: str, tmp_path: Path) -> None:
    bundle = message_bundle()
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "ServiceRequest"]
    bundle["entry"][0]["resource"]["focus"] = []
    with pytest.raises(EmptyInputError) as raised:
        adapters.load_file("health", write(tmp_path, bundle, syntax), now=NOW)
    assert str(raised.value) == f"health.{syntax}: the Bundle holds no ServiceRequest: no records"


def test_malformed_xml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "health.xml"
    text = as_xml(message_bundle()).decode()
    path.write_text(text.replace("</Patient>", "</Patent>", 1), "utf-8")
    with pytest.raises(PartnerInputError) as raised:
        adapters.load_file("health", path, now=NOW)
    line = text[: text.index("</Patient>")].count("\n") + 1
    assert str(raised.value).startswith(f"health.xml: line {line} column ")
    assert str(raised.value).endswith(": malformed XML")


def test_xml_entities_are_not_expanded(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("PE15 8AA", "utf-8")
    text = as_xml(message_bundle()).decode()
    doctype = f'<!DOCTYPE Bundle [<!ENTITY leak SYSTEM "file://{secret}">]>\n'
    text = text.replace("<Bundle", doctype + "<Bundle", 1).replace('value="March"', 'value="&leak;"', 1)
    path = tmp_path / "health.xml"
    path.write_text(text, "utf-8")
    try:
        referrals = adapters.load_file("health", path, now=NOW).referrals
    except (PartnerInputError, ValidationError):
        return  # refused outright is fine too
    assert referrals[0]["child"]["address"]["town"] != "PE15 8AA"


@pytest.mark.parametrize("syntax", ["json", "xml"])
def test_rendered_health_is_uk_core_and_parses_with_fhir_resources(syntax: str, tmp_path: Path) -> None:
    referrals = adapters.load_file("health", write(tmp_path, message_bundle(), "json"), now=NOW).referrals
    out = io.StringIO()
    adapters.render_file("health", referrals, out, fmt=syntax if syntax == "xml" else None)
    text = out.getvalue()
    parsed = Bundle.model_validate_xml(text.encode()) if syntax == "xml" else Bundle.model_validate_json(text)
    resources = {e.resource.get_resource_type(): e.resource for e in parsed.entry}
    assert set(resources) == {"Patient", "Organization", "Practitioner", "PractitionerRole", "ServiceRequest"}
    for name, resource in resources.items():
        assert resource.meta.profile == [f"https://fhir.hl7.org.uk/StructureDefinition/UKCore-{name}"]
    child = resources["Patient"]
    assert [(i.system, i.value) for i in child.identifier] == [("https://fhir.nhs.uk/Id/nhs-number", NHS_NUMBER)]
    [ethnic] = [e for e in child.extension if e.url == uk_core.ETHNIC_CATEGORY_EXTENSION]
    assert [(c.system, c.code) for c in ethnic.valueCodeableConcept.coding] == [
        ("https://fhir.hl7.org.uk/CodeSystem/UKCore-EthnicCategoryEngland", "N")
    ]
    language = child.communication[0].language
    assert [(c.system, c.code) for c in language.coding] == [
        ("https://fhir.hl7.org.uk/CodeSystem/UKCore-HumanLanguage", "so")
    ]
    assert [[(c.system, c.code) for c in r.coding] for contact in child.contact for r in contact.relationship] == [
        [("http://terminology.hl7.org/CodeSystem/v3-RoleCode", "MTH")],
        [("http://terminology.hl7.org/CodeSystem/v3-RoleCode", "GRPRN")],
        [("https://fhir.hl7.org.uk/CodeSystem/UKCore-AdditionalPersonRelationshipRole", "Guardian")],
    ]
    request = resources["ServiceRequest"]
    role_url = request.requester.reference
    assert [e.fullUrl for e in parsed.entry if e.resource.get_resource_type() == "PractitionerRole"] == [role_url]
    # and it reads back to the same referral
    again = adapters.load_file("health", io.BytesIO(text.encode()), now=NOW).referrals
    assert again == referrals


def test_every_schema_word_renders_as_uk_core_and_reads_back() -> None:
    from referral_broker.adapters.base import _REFERRAL, enum_symbols

    symbols = enum_symbols(_REFERRAL.schema)
    for symbol in symbols["child.ethnicity"]:
        concept = uk_core.ETHNICITY.render(symbol)
        assert concept["coding"][0]["system"] == uk_core.ETHNIC_CATEGORY_ENGLAND
        assert concept["coding"][0]["code"] in uk_core.ETHNIC_CATEGORY
        assert uk_core.ETHNICITY.parse(concept) == symbol
    # only where the England code is broader is the project's own coding added
    assert len(uk_core.ETHNICITY.render("white_british")["coding"]) == 1
    assert len(uk_core.ETHNICITY.render("white_gypsy_roma")["coding"]) == 2
    for word in symbols["household.relationship"]:
        assert uk_core.RELATIONSHIP.parse(uk_core.RELATIONSHIP.render(word)) == word
    for name in uk_core.LANGUAGES.values():
        concept = uk_core.LANGUAGE.render(name)
        [coding] = concept["coding"]
        assert uk_core.LANGUAGE.parse({"coding": [{"system": coding["system"], "code": coding["code"]}]}) == name
    assert uk_core.LANGUAGE.render("Kurmanji") == {"text": "Kurmanji"}


def test_the_example_reads_the_same_from_its_xml_rendering(tmp_path: Path) -> None:
    referrals = adapters.load_file("health", adapters.example_file("health"), now=NOW).referrals
    rendered = adapters.render_file("health", copy.deepcopy(referrals), tmp_path, fmt="xml")
    assert rendered.path is not None and rendered.path.name == "referrals.xml"
    assert rendered.path.read_bytes().startswith(b"<?xml")
    assert adapters.load_file("health", rendered.path, now=NOW).referrals == referrals


def test_health_statuses_travel_as_uk_core_tasks_in_xml_too(tmp_path: Path) -> None:
    status = {
        "status_id": "5b6f7d2e-1c3a-4e8b-9f0d-2a4c6e8b0d1f",
        "referral_id": REFERRAL_ID,
        "version": 1,
        "from_party": TEAM,
        "to_party": HEALTH_VISITING,
        "status": "accepted",
        "reason": None,
        "at": "2025-09-22T09:00:00Z",
        "actor_role": "Early Help coordinator",
    }
    rendered = adapters.render_statuses("health", [status], tmp_path, fmt="xml")
    assert rendered.path is not None and rendered.path.name == "statuses.xml"
    parsed = Bundle.model_validate_xml(rendered.path.read_bytes())
    [task] = [e.resource for e in parsed.entry]
    assert task.get_resource_type() == "Task" and task.meta.profile == [uk_core.PROFILES["Task"]]
    assert task.status == "accepted"
    # a Task file sent by a health organisation reads back as a canonical status (from it, as it sends it)
    reply = {**status, "from_party": HEALTH_VISITING, "to_party": TEAM}
    adapters.render_statuses("health", [reply], tmp_path, fmt="xml", name="reply.xml")
    [back] = adapters.load_statuses("health", tmp_path / "reply.xml", party=HEALTH_VISITING, now=NOW).records
    assert back.record is not None
    assert (back.record["status"], back.record["from_party"], str(back.record["referral_id"])) == (
        "accepted",
        HEALTH_VISITING,
        REFERRAL_ID,
    )


@pytest.mark.parametrize("syntax", ["json", "xml"])
def test_a_single_service_request_with_its_patient_contained(syntax: str, tmp_path: Path) -> None:
    from fhir.resources.R4B.servicerequest import ServiceRequest

    request = transaction_bundle()["entry"][1]["resource"]
    child = patient()
    child["id"] = "child"
    del child["meta"]
    request["contained"].append(child)
    request["subject"] = {"reference": "#child"}
    path = tmp_path / f"referral.{syntax}"
    model = ServiceRequest.model_validate(request)
    path.write_bytes(model.model_dump_xml() if syntax == "xml" else model.model_dump_json().encode())
    [referral] = adapters.load_file("health", path, now=NOW).referrals
    assert (referral["child"]["ethnicity"], referral["child"]["first_language"]) == ("black_african", "Somali")
    assert referral["referrer"]["practitioner"]["name"] == "Ms Erin Nurse"


def test_json_and_xml_give_the_same_problems(tmp_path: Path) -> None:
    bundle = message_bundle()
    xml = tmp_path / "health.xml"  # written valid, then broken: the library writes only valid XML
    xml.write_bytes(as_xml(bundle).replace(b'<birthDate value="2016-03-14"/>', b'<birthDate value="2016-02-30"/>'))
    bundle["entry"][2]["resource"]["birthDate"] = "2016-02-30"
    said = []
    for path in (write(tmp_path, bundle, "json"), xml):
        with pytest.raises(ValidationError) as raised:
            adapters.load_file("health", path, now=NOW)
        said.append([str(p) for p in raised.value.problems])
    assert said[0] == said[1] == [
        'record 2: "Patient.birthDate": fails FHIR R4 validation: Input should be a valid date or '
        "datetime, day value is outside expected range"
    ]
