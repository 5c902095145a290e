"""Schools' second format, the DfE Common Transfer File: chosen by content, round trips what
the schema holds, reads a CTF straight from an MIS (older ``Gender``, language by DfE code, the
school from the header) and names what the referral then lacks. All pupils are synthetic."""

from __future__ import annotations

import datetime as dt
import io
import re
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from referral_broker import adapters
from referral_broker.adapters import ctf
from referral_broker.adapters.field_map import Items
from referral_broker.errors import EmptyInputError, PartnerInputError, ValidationError
from referral_broker.schemas.synth import synthetic_referrals

NOW = dt.datetime(2025, 10, 1, tzinfo=dt.UTC)
FORMATS_MD = Path(adapters.__file__).parent / "FORMATS.md"


def flat(value: Any, path: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(flat(item, f"{path}.{key}" if path else key))
    elif isinstance(value, list) and value and all(isinstance(i, dict) for i in value):
        for index, item in enumerate(value):
            out.update(flat(item, f"{path}[{index}]"))
    elif value not in (None, [], ""):
        out[path] = value
    return out


def carried(record: dict[str, Any]) -> dict[str, Any]:
    paths = ctf.ctf_map().carried_paths() | {"concern_types"}
    return {
        path: value
        for path, value in flat(record).items()
        if any(re.sub(r"\[\d+\]", "", path) == p or re.sub(r"\[\d+\]", "", path).startswith(f"{p}.") for p in paths)
    }


def test_the_example_round_trips_through_a_ctf(tmp_path: Path) -> None:
    referrals = adapters.load_file("schools", adapters.example_file("schools"), now=NOW).referrals
    rendered = adapters.render_file("schools", referrals, tmp_path, fmt="ctf")
    assert rendered.path is not None and rendered.path.name == "referrals.xml"
    root = etree.parse(str(rendered.path)).getroot()
    assert root.tag == "CTfile"
    assert [e.tag for e in root] == ["Header", "CTFpupilData"]
    assert root.findtext("Header/DocumentName") == "Common Transfer File"
    assert len(root.findall("CTFpupilData/Pupil")) == len(referrals)
    assert adapters.load_file("schools", rendered.path, now=NOW).referrals == referrals


def test_synthetic_referrals_survive_a_ctf_and_back() -> None:
    originals = [{**r, "referrer": {**r["referrer"], "partner": "schools"}} for r in synthetic_referrals(150, seed=11)]
    out = io.StringIO()
    adapters.render_file("schools", originals, out, fmt="ctf")
    parsed = list(adapters.get_adapter("schools").parse(io.BytesIO(out.getvalue().encode()), now=NOW))
    assert [p.problems for p in parsed if not p.ok] == []
    for original, back in zip(originals, parsed, strict=True):
        assert back.record is not None
        assert carried(back.record) == carried(original)


def mis_ctf() -> bytes:
    """A CTF as an MIS exports it (CTF element names; older ``Gender``), no referral block."""
    return b"""<?xml version="1.0" encoding="UTF-8"?>
<CTfile>
  <Header>
    <DocumentName>Common Transfer File</DocumentName>
    <CTFversion>21.0</CTFversion>
    <DateTime>2025-09-20T10:15:00</DateTime>
    <DocumentQualifier>full</DocumentQualifier>
    <SupplierID>Example MIS</SupplierID>
    <SourceSchool><LEA>873</LEA><Estab>2001</Estab><URN>110001</URN><SchoolName>Example Primary School</SchoolName><AcademicYear>2025</AcademicYear></SourceSchool>
    <DestSchool><LEA>873</LEA><Estab>LLLL</Estab></DestSchool>
  </Header>
  <CTFpupilData>
    <Pupil>
      <UPN>U873449213302</UPN>
      <UniqueLearnerNumber/>
      <Surname>Pupil</Surname>
      <Forename>Sam</Forename>
      <DOB>2016-05-01</DOB>
      <Gender>F</Gender>
      <BasicDetails>
        <NCyearActual>4</NCyearActual>
        <Ethnicity>BAFR</Ethnicity>
        <EthnicitySource>P</EthnicitySource>
        <Languages><Type><LanguageType>F</LanguageType><Language>SOM</Language></Type></Languages>
        <MedicalFlag>false</MedicalFlag>
        <EnrolStatus>C</EnrolStatus>
      </BasicDetails>
      <Address>
        <AddressLines><AddressLine1>2 Sample Street</AddressLine1><AddressLine3>Wisbech</AddressLine3></AddressLines>
        <PostCode>pe13 1aa</PostCode>
      </Address>
      <Contacts>
        <Contact><Order>1</Order><Surname>Pupil</Surname><Forename>Jo</Forename><Relationship>PAM</Relationship><Responsibility>true</Responsibility></Contact>
      </Contacts>
      <Attendance>
        <YearData><Year>2025</Year><SessionsPossible>120</SessionsPossible><SessionsAuthorised>6</SessionsAuthorised><SessionsAttended>100</SessionsAttended><SessionsUnauthorised>14</SessionsUnauthorised><AttendanceStartDate>2025-09-03</AttendanceStartDate></YearData>
      </Attendance>
    </Pupil>
  </CTFpupilData>
</CTfile>
"""


def test_a_ctf_from_an_mis_reads_the_pupil_and_names_what_the_referral_lacks(tmp_path: Path) -> None:
    path = tmp_path / "schools.xml"
    path.write_bytes(mis_ctf())
    with pytest.raises(ValidationError) as raised:
        adapters.load_file("schools", path, now=NOW)
    problems = {p.path: p.reason for p in raised.value.problems}
    # the referral's own fields are missing, named by the element that would carry them ...
    assert problems['"EarlyHelpReferral.District" (district)'] == "required field is missing"
    assert problems['"EarlyHelpReferral.AttendanceEndDate" (school.attendance.period_end)'] == (
        "required field is missing"
    )
    # ... and nothing about the pupil's DfE data, which was read
    assert not any(p.startswith(('"UPN"', '"Gender"', '"Sex"', '"BasicDetails', '"Contacts', '"Address')) for p in problems)
    assert "U873449213302" not in str(raised.value)


def test_the_pupils_dfe_data_arrives(tmp_path: Path) -> None:
    referral = adapters.load_file("schools", adapters.example_file("schools"), now=NOW).referrals[0]
    out = io.StringIO()
    adapters.render_file("schools", [referral], out, fmt="ctf")
    block = etree.fromstring(out.getvalue().encode()).find("CTFpupilData/Pupil/EarlyHelpReferral")
    assert block is not None
    pupil = etree.fromstring(mis_ctf()).find("CTFpupilData/Pupil")
    assert pupil is not None
    added = etree.SubElement(pupil, "EarlyHelpReferral")  # the block a tool adds to the MIS's CTF
    for element in list(block):
        if element.tag not in ("FirstLanguage", "School", "AttendanceEndDate", "AttendanceCodes"):
            added.append(element)
    etree.SubElement(added, "AttendanceEndDate").text = "2025-09-26"
    root = etree.fromstring(mis_ctf())
    pupils = root.find("CTFpupilData")
    assert pupils is not None
    pupils.remove(pupils[0])
    pupils.append(pupil)
    path = tmp_path / "schools.xml"
    path.write_bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))
    [got] = adapters.load_file("schools", path, now=NOW).referrals
    assert got["identifiers"]["upn"] == "U873449213302"
    assert got["child"]["sex"] == "female"  # <Gender> as older CTFs write it
    assert got["child"]["ethnicity"] == "black_african"
    assert got["child"]["first_language"] == "Somali"  # DfE code SOM
    assert got["child"]["address"]["postcode"] == "PE13 1AA"
    assert got["school"]["school_name"] == "Example Primary School"  # from the header
    assert got["school"]["urn"] == "110001"
    assert got["school"]["year_group"] == 4
    assert [(m["given_name"], m["relationship"], m["parental_responsibility"]) for m in got["household"]] == [
        ("Jo", "mother", True)
    ]
    attendance = got["school"]["attendance"]
    assert (attendance["possible_sessions"], attendance["present_sessions"]) == (120, 100)
    assert attendance["period_start"] == dt.date(2025, 9, 3)


def test_a_ctf_without_pupils_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "schools.xml"
    path.write_bytes(b"<CTfile><Header><DocumentName>Common Transfer File</DocumentName></Header><CTFpupilData/></CTfile>")
    with pytest.raises(EmptyInputError) as raised:
        adapters.load_file("schools", path, now=NOW)
    assert str(raised.value) == "schools.xml: the CTF holds no Pupil: no records"


def test_other_xml_is_not_taken_for_a_ctf(tmp_path: Path) -> None:
    path = tmp_path / "schools.xml"
    path.write_bytes(b'<?xml version="1.0"?><Bundle xmlns="http://hl7.org/fhir"><type value="collection"/></Bundle>')
    with pytest.raises(PartnerInputError) as raised:
        adapters.load_file("schools", path, now=NOW)
    assert str(raised.value) == "schools.xml: the XML is not a Common Transfer File (its root is not CTfile)"


def test_an_element_twice_is_refused_by_record(tmp_path: Path) -> None:
    path = tmp_path / "schools.xml"
    path.write_bytes(mis_ctf().replace(b"<Surname>Pupil</Surname>", b"<Surname>Pupil</Surname><Surname>X</Surname>", 1))
    with pytest.raises(ValidationError) as raised:
        adapters.load_file("schools", path, now=NOW)
    assert 'record 1: "Surname": the element appears more than once; keep one' in [str(p) for p in raised.value.problems]


def test_formats_md_documents_every_ctf_element() -> None:
    section = FORMATS_MD.read_text("utf-8").split("<!-- schools-ctf -->")[1].split("<!-- end -->")[0]
    names = []
    for entry in ctf.ctf_map().entries:
        if isinstance(entry, Items):
            names += [(f.native, f.canonical) for f in entry.fields]
        names.append((entry.native, getattr(entry, "canonical", "")))
    missing = [(n, c) for n, c in names if f"`{n}`" not in section or (c and f"`{c}`" not in section)]
    assert missing == []


def ctf_with(pupil_xml: bytes, tmp_path: Path) -> Path:
    """The example referral as a full CTF (pupil data and referral block), with ``pupil_xml``
    (DfE elements) put into its Pupil in place of its own of the same names."""
    referral = adapters.load_file("schools", adapters.example_file("schools"), now=NOW).referrals[0]
    out = io.StringIO()
    adapters.render_file("schools", [referral], out, fmt="ctf")
    root = etree.fromstring(out.getvalue().encode())
    pupil = root.find("CTFpupilData/Pupil")
    assert pupil is not None
    for element in etree.fromstring(b"<x>" + pupil_xml + b"</x>"):
        for old in pupil.findall(element.tag):
            pupil.remove(old)
        pupil.insert(5, element)
    path = tmp_path / "schools.xml"
    path.write_bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))
    return path


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("N", "no_sen"),
        ("K", "sen_support"),
        ("E", "ehc_plan"),
        # CBDS codes from before the 2014 reforms, still in older records
        ("A", "sen_support"),  # School Action: not "EHC assessment requested"
        ("P", "sen_support"),  # School Action Plus
        ("S", "ehc_plan"),  # statement, converted to an EHC plan by 2018
    ],
)
def test_sen_provision_reads_the_cbds_codes(code: str, status: str, tmp_path: Path) -> None:
    path = ctf_with(f"<SENhistory><SEN><SENprovision>{code}</SENprovision></SEN></SENhistory>".encode(), tmp_path)
    [got] = adapters.load_file("schools", path, now=NOW).referrals
    assert got["send"]["status"] == status


def test_an_ehc_assessment_request_is_written_as_k_with_the_referral_block_saying_so() -> None:
    referral = adapters.load_file("schools", adapters.example_file("schools"), now=NOW).referrals[0]
    rows = []
    for status in ("no_sen", "sen_support", "ehc_assessment_requested", "ehc_plan"):
        record = {**referral, "send": {**(referral["send"] or {}), "status": status}}
        out = io.StringIO()
        adapters.render_file("schools", [record], out, fmt="ctf")
        pupil = etree.fromstring(out.getvalue().encode()).find("CTFpupilData/Pupil")
        assert pupil is not None
        [back] = adapters.get_adapter("schools").parse(io.BytesIO(out.getvalue().encode()), now=NOW)
        assert back.record is not None
        rows.append(
            (
                pupil.findtext("SENhistory/SEN/SENprovision"),
                pupil.findtext("EarlyHelpReferral/EHCAssessmentRequested"),
                back.record["send"]["status"],
            )
        )
    assert rows == [
        ("N", None, "no_sen"),
        ("K", None, "sen_support"),
        ("K", "true", "ehc_assessment_requested"),  # only DfE codes in SENprovision
        ("E", None, "ehc_plan"),
    ]


def test_a_lunchtime_exclusion_reads_as_a_suspension(tmp_path: Path) -> None:
    path = ctf_with(
        b"<Exclusions><Exclusion><Category>LNCH</Category><StartDate>2025-09-10</StartDate>"
        b"<Sessions>1</Sessions><Reason>DB</Reason></Exclusion></Exclusions>",
        tmp_path,
    )
    [got] = adapters.load_file("schools", path, now=NOW).referrals
    assert got["school"]["exclusions"] == [
        {"kind": "suspension", "start_date": dt.date(2025, 9, 10), "sessions": 1,
         "reason": "persistent_disruptive_behaviour"}
    ]  # fmt: skip


# --- the DfE code lists (sources: FORMATS.md, CTF section) --------------------------------------


def edited_ctf(tmp_path: Path, edit: Any) -> Path:
    """The example's first referral as a full CTF, its Pupil element changed by ``edit``."""
    referral = adapters.load_file("schools", adapters.example_file("schools"), now=NOW).referrals[0]
    out = io.StringIO()
    adapters.render_file("schools", [referral], out, fmt="ctf")
    root = etree.fromstring(out.getvalue().encode())
    pupil = root.find("CTFpupilData/Pupil")
    assert pupil is not None
    edit(pupil)
    path = tmp_path / "schools.xml"
    path.write_bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))
    return path


def with_contact(code: str, word: str | None = None) -> Any:
    def edit(pupil: Any) -> None:
        contacts = pupil.find("Contacts")
        if contacts is not None:
            pupil.remove(contacts)
        extra = f"<EarlyHelpRelationship>{word}</EarlyHelpRelationship>" if word else ""
        pupil.insert(
            5,
            etree.fromstring(
                f"<Contacts><Contact><Forename>Jo</Forename><Surname>Example</Surname>"
                f"<Relationship>{code}</Relationship>{extra}<Responsibility>true</Responsibility></Contact></Contacts>"
            ),
        )

    return edit


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ValidationError) as raised:
        adapters.load_file("schools", path, now=NOW)
    return [str(p) for p in raised.value.problems]


@pytest.mark.parametrize(
    ("code", "word"),
    [
        ("PAM", "mother"),
        ("PAF", "father"),
        ("STM", "step_parent"),
        ("STF", "step_parent"),
        ("FOM", "foster_carer"),
        ("FOF", "foster_carer"),
        ("CAR", "other"),  # "Carer": not necessarily a kinship carer
        ("FAM", "other_relative"),
        ("REL", "other_relative"),
        ("OTH", "other"),
        ("CHM", "other"),
        ("DOC", "other"),
        ("HTC", "other"),
        ("RLG", "other"),
        ("SWR", "other"),
        ("TCH", "other"),
        ("pam", "mother"),  # as the CSV's codes, any case
    ],
)
def test_contact_relationship_reads_the_cbds_codes(code: str, word: str, tmp_path: Path) -> None:
    [got] = adapters.load_file("schools", edited_ctf(tmp_path, with_contact(code)), now=NOW).referrals
    assert [m["relationship"] for m in got["household"]] == [word]


# What the earlier table read that is not a DfE code, and a mistyped code.
@pytest.mark.parametrize("code", ["PAO", "GRD", "GRM", "GRF", "SIB", "HSB", "SSB", "Mother", "PA"])
def test_a_relationship_code_outside_the_cbds_is_refused_by_name(code: str, tmp_path: Path) -> None:
    assert problems_of(edited_ctf(tmp_path, with_contact(code))) == [
        'record 1: "Contacts.Contact[0].Relationship" (household[0].relationship): not one of the codes '
        "CAR, CHM, DOC, FAM, FOF, FOM, HTC, OTH, PAF, PAM, REL, RLG, STF, STM, SWR, TCH"
    ]


def test_every_relationship_is_written_as_a_true_dfe_code_and_reads_back() -> None:
    referral = adapters.load_file("schools", adapters.example_file("schools"), now=NOW).referrals[0]
    member = referral["household"][0]
    from referral_broker.adapters.base import _REFERRAL, enum_symbols

    assert enum_symbols(_REFERRAL.schema)["household.relationship"] == ctf._RELATIONSHIP_SYMBOLS
    rows = []
    for word in ctf._RELATIONSHIP_SYMBOLS:
        record = {**referral, "household": [{**member, "relationship": word}]}
        out = io.StringIO()
        adapters.render_file("schools", [record], out, fmt="ctf")
        contact = etree.fromstring(out.getvalue().encode()).find("CTFpupilData/Pupil/Contacts/Contact")
        assert contact is not None
        [back] = adapters.get_adapter("schools").parse(io.BytesIO(out.getvalue().encode()), now=NOW)
        assert back.record is not None
        rows.append(
            (word, contact.findtext("Relationship"), contact.findtext("EarlyHelpRelationship"),
             back.record["household"][0]["relationship"])
        )  # fmt: skip
    assert rows == [
        ("mother", "PAM", None, "mother"),
        ("father", "PAF", None, "father"),
        ("step_parent", "FAM", "step_parent", "step_parent"),  # no sex: not Step Mother/Father
        ("parent_partner", "OTH", "parent_partner", "parent_partner"),
        ("guardian", "OTH", "guardian", "guardian"),
        ("foster_carer", "CAR", "foster_carer", "foster_carer"),  # not Foster Mother/Father
        ("kinship_carer", "CAR", "kinship_carer", "kinship_carer"),
        ("grandparent", "REL", "grandparent", "grandparent"),
        ("sibling", "REL", "sibling", "sibling"),
        ("half_sibling", "REL", "half_sibling", "half_sibling"),
        ("step_sibling", "FAM", "step_sibling", "step_sibling"),
        ("other_relative", "REL", None, "other_relative"),
        ("other", "OTH", None, "other"),
    ]


def test_the_projects_relationship_word_must_agree_with_the_dfe_code(tmp_path: Path) -> None:
    [got] = adapters.load_file("schools", edited_ctf(tmp_path, with_contact("STF", "step_parent")), now=NOW).referrals
    assert got["household"][0]["relationship"] == "step_parent"
    assert problems_of(edited_ctf(tmp_path, with_contact("PAM", "grandparent"))) == [
        'record 1: "Contacts.Contact[0].EarlyHelpRelationship" (household[0].relationship): '
        "'grandparent' contradicts the DfE Relationship PAM, which allows mother"
    ]
    assert problems_of(edited_ctf(tmp_path, with_contact("REL", "granny"))) == [
        'record 1: "Contacts.Contact[0].EarlyHelpRelationship" (household[0].relationship): '
        "not one of the allowed values: mother, father, step_parent, parent_partner, guardian, foster_carer, "
        "kinship_carer, grandparent, sibling, half_sibling, step_sibling, other_relative, other"
    ]


def with_first_language(code: str, name: str | None = None) -> Any:
    def edit(pupil: Any) -> None:
        details = pupil.find("BasicDetails")
        assert details is not None
        for old in details.findall("Languages"):
            details.remove(old)
        details.append(
            etree.fromstring(f"<Languages><Type><LanguageType>F</LanguageType><Language>{code}</Language></Type></Languages>")
        )
        block = pupil.find("EarlyHelpReferral")
        assert block is not None
        for old in block.findall("FirstLanguage"):
            block.remove(old)
        if name is not None:
            etree.SubElement(block, "FirstLanguage").text = name

    return edit


@pytest.mark.parametrize(("code", "name"), [("CYM", "Welsh"), ("SOM", "Somali"), ("pnj", "Panjabi"), ("ENG", "English")])
def test_the_first_language_is_read_by_name_from_its_dfe_code(code: str, name: str, tmp_path: Path) -> None:
    [got] = adapters.load_file("schools", edited_ctf(tmp_path, with_first_language(code)), now=NOW).referrals
    assert got["child"]["first_language"] == name


def test_a_dfe_language_code_without_a_name_here_needs_the_name_and_another_code_is_refused(tmp_path: Path) -> None:
    # YOR (Yoruba) and PNJG (a variety of Panjabi) are DfE codes this adapter does not name
    for code in ("YOR", "PNJG"):
        [got] = adapters.load_file(
            "schools", edited_ctf(tmp_path, with_first_language(code, "Yoruba")), now=NOW
        ).referrals
        assert got["child"]["first_language"] == "Yoruba"
        assert problems_of(edited_ctf(tmp_path, with_first_language(code))) == [
            'record 1: "EarlyHelpReferral.FirstLanguage" (child.first_language): required field is missing'
        ]
    # WEL was read as Welsh before issue 17; the DfE's code for Welsh is CYM
    for code in ("WEL", "XXX", "PNJGX"):
        assert problems_of(edited_ctf(tmp_path, with_first_language(code, "Welsh"))) == [
            'record 1: "BasicDetails.Languages.Type[LanguageType=F].Language" (child.first_language): '
            "not a DfE language code: one of the CBDS language codes listed in adapters/FORMATS.md "
            "(three letters, or four for a variety)"
        ]


def test_welsh_is_written_as_cym() -> None:
    referral = adapters.load_file("schools", adapters.example_file("schools"), now=NOW).referrals[0]
    out = io.StringIO()
    adapters.render_file("schools", [{**referral, "child": {**referral["child"], "first_language": "Welsh"}}], out, fmt="ctf")
    pupil = etree.fromstring(out.getvalue().encode()).find("CTFpupilData/Pupil")
    assert pupil is not None
    assert pupil.findtext("BasicDetails/Languages/Type/Language") == "CYM"


@pytest.mark.parametrize(
    ("code", "word"),
    [
        ("WBRI", "white_british"),
        ("WENG", "white_british"),  # extended codes, as an MIS exports them, read as their main group
        ("WWEL", "white_british"),
        ("WALB", "white_other"),
        ("WROM", "white_gypsy_roma"),
        ("MWAP", "mixed_white_asian"),
        ("AMPK", "asian_pakistani"),
        ("CHKC", "asian_chinese"),
        ("BSOM", "black_african"),
        ("BEUR", "black_other"),
        ("OARA", "arab"),
        ("OKRD", "other_ethnic_group"),
        ("REFU", "refused"),
    ],
)
def test_ethnicity_reads_main_and_extended_dfe_codes(code: str, word: str, tmp_path: Path) -> None:
    def edit(pupil: Any) -> None:
        details = pupil.find("BasicDetails")
        assert details is not None
        ethnicity = details.find("Ethnicity")
        assert ethnicity is not None
        ethnicity.text = code

    [got] = adapters.load_file("schools", edited_ctf(tmp_path, edit), now=NOW).referrals
    assert got["child"]["ethnicity"] == word


def test_an_ethnicity_code_outside_the_dfe_list_is_refused_and_the_main_code_is_written(tmp_path: Path) -> None:
    def edit(pupil: Any) -> None:
        ethnicity = pupil.find("BasicDetails/Ethnicity")
        assert ethnicity is not None
        ethnicity.text = "UNCL"  # the DfE checking exercise's "unclassified", not a CBDS code

    [problem] = problems_of(edited_ctf(tmp_path, edit))
    assert problem.startswith(
        'record 1: "BasicDetails.Ethnicity" (child.ethnicity): not one of the codes WBRI, WIRI, WIRT, WROM, WOTH, '
    )
    assert problem.endswith(", OYEM")
    referral = adapters.load_file("schools", adapters.example_file("schools"), now=NOW).referrals[0]
    out = io.StringIO()
    adapters.render_file("schools", [{**referral, "child": {**referral["child"], "ethnicity": "asian_chinese"}}], out, fmt="ctf")
    assert etree.fromstring(out.getvalue().encode()).findtext("CTFpupilData/Pupil/BasicDetails/Ethnicity") == "CHNE"


def with_exclusion(category: str, reason: str) -> Any:
    def edit(pupil: Any) -> None:
        for old in pupil.findall("Exclusions"):
            pupil.remove(old)
        pupil.insert(
            5,
            etree.fromstring(
                f"<Exclusions><Exclusion><Category>{category}</Category><StartDate>2025-09-10</StartDate>"
                f"<Sessions>2</Sessions><Reason>{reason}</Reason></Exclusion></Exclusions>"
            ),
        )

    return edit


@pytest.mark.parametrize(
    ("category", "kind"),
    [("SUSP", "suspension"), ("PERM", "permanent_exclusion"), ("LNCH", "suspension"), ("FIXD", "suspension")],
)
def test_exclusion_category_reads_the_cbds_codes(category: str, kind: str, tmp_path: Path) -> None:
    [got] = adapters.load_file("schools", edited_ctf(tmp_path, with_exclusion(category, "DB")), now=NOW).referrals
    assert [e["kind"] for e in got["school"]["exclusions"]] == [kind]


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("PP", "physical_assault_against_pupil"),
        ("PH", "wilful_transgression_of_protective_measures"),
        ("DB", "persistent_disruptive_behaviour"),
        ("LD", "persistent_disruptive_behaviour"),  # the DfE's finer codes read as the reason they divide
        ("CB", "persistent_disruptive_behaviour"),
        ("DR", "drug_and_alcohol_related"),
        ("AR", "drug_and_alcohol_related"),
        ("BW", "other"),  # reasons the schema has no word for
        ("VR", "other"),
        ("MP", "other"),
        ("OT", "other"),
    ],
)
def test_exclusion_reason_reads_the_cbds_codes(code: str, reason: str, tmp_path: Path) -> None:
    [got] = adapters.load_file("schools", edited_ctf(tmp_path, with_exclusion("SUSP", code)), now=NOW).referrals
    assert [e["reason"] for e in got["school"]["exclusions"]] == [reason]


def test_exclusion_codes_outside_the_cbds_are_refused_by_name(tmp_path: Path) -> None:
    assert problems_of(edited_ctf(tmp_path, with_exclusion("FIXED", "DB"))) == [
        'record 1: "Exclusions.Exclusion[0].Category" (school.exclusions[0].kind): '
        "not one of the codes SUSP, PERM, LNCH, FIXD"
    ]
    # WT was this format's public-health code before issue 17; the CBDS's is PH
    assert problems_of(edited_ctf(tmp_path, with_exclusion("SUSP", "WT"))) == [
        'record 1: "Exclusions.Exclusion[0].Reason" (school.exclusions[0].reason): not one of the codes '
        "PP, PA, VP, VA, OW, BU, RA, LG, DS, MT, PH, DM, TH, DB, DA, SM, OT, LD, CB, DR, AR, BW, TB, SB, MB, AB, "
        "SR, VR, MP, OS"
    ]


def test_a_suspension_is_written_susp_and_every_reason_reads_back() -> None:
    referral = adapters.load_file("schools", adapters.example_file("schools"), now=NOW).referrals[0]
    from referral_broker.adapters.base import _REFERRAL, enum_symbols

    words = enum_symbols(_REFERRAL.schema)["school.exclusions.reason"]
    assert set(words) == ctf.EXCLUSION_REASON.symbols  # every word of the schema has a DfE code
    for word in words:
        exclusion = {"kind": "suspension", "start_date": dt.date(2025, 9, 10), "sessions": 2, "reason": word}
        record = {**referral, "school": {**referral["school"], "exclusions": [exclusion]}}
        out = io.StringIO()
        adapters.render_file("schools", [record], out, fmt="ctf")
        written = etree.fromstring(out.getvalue().encode()).find("CTFpupilData/Pupil/Exclusions/Exclusion")
        assert written is not None and written.findtext("Category") == "SUSP"
        [back] = adapters.get_adapter("schools").parse(io.BytesIO(out.getvalue().encode()), now=NOW)
        assert back.record is not None and back.record["school"]["exclusions"][0]["reason"] == word


def test_sen_provision_q_and_sen_type_ds(tmp_path: Path) -> None:
    path = ctf_with(b"<SENhistory><SEN><SENprovision>Q</SENprovision></SEN><SENneeds><SENneed><SENtypeRank>1</SENtypeRank>"
                    b"<SENtype>DS</SENtype></SENneed></SENneeds></SENhistory>", tmp_path)  # fmt: skip
    [got] = adapters.load_file("schools", path, now=NOW).referrals
    assert (got["send"]["status"], got["send"]["primary_need"]) == ("sen_support", "other_difficulty")
    path = ctf_with(b"<SENhistory><SEN><SENprovision>X</SENprovision></SEN></SENhistory>", tmp_path)
    assert problems_of(path) == [
        'record 1: "SENhistory.SEN.SENprovision" (send.status): not one of the codes N, K, E, A, P, Q, S'
    ]
