"""The organisation registry: identifiers and party names, the shipped county, resolution per
referral, and the registry topic on the real broker (``orgs`` commands, import, readers)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import delete_test_topics

from referral_broker import organisations as o
from referral_broker.cli.main import main
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, RegistryError
from referral_broker.organisations import OrgKind, OrgStatus, Registry, Unresolved
from referral_broker.sealing.directory import KEY_ID


def test_registry_error_has_its_own_exit_code() -> None:
    assert RegistryError.exit_code == 14


# -- identifiers and party names ------------------------------------------------------------
@pytest.mark.parametrize(
    ("ref", "party", "kind"),
    [
        ("school:110123", "school-110123", OrgKind.SCHOOL),
        ("school-110123", "school-110123", OrgKind.SCHOOL),
        ("nhs:A81001", "nhs-a81001", OrgKind.NHS_ORGANISATION),
        ("nhs_organisation:a81001", "nhs-a81001", OrgKind.NHS_ORGANISATION),
        ("nhs-A81001", "nhs-a81001", OrgKind.NHS_ORGANISATION),
        ("nhs:RGT", "nhs-rgt", OrgKind.NHS_ORGANISATION),
        ("nhs:RGT01", "nhs-rgt01", OrgKind.NHS_ORGANISATION),
        ("police:35", "police-35", OrgKind.POLICE_FORCE),
        ("police_force:35", "police-35", OrgKind.POLICE_FORCE),
        ("charity:1234567", "charity-1234567", OrgKind.CHARITY),
        ("charity:1234567-1", "charity-1234567-1", OrgKind.CHARITY),
        ("charity:202918", "charity-202918", OrgKind.CHARITY),
        ("dwp", "dwp", OrgKind.DWP),
        ("dwp:dwp", "dwp", OrgKind.DWP),
        ("district:fenland", "district-fenland", OrgKind.DISTRICT_TEAM),
        ("district:east_cambs", "district-east-cambs", OrgKind.DISTRICT_TEAM),
        ("district-east-cambs", "district-east-cambs", OrgKind.DISTRICT_TEAM),
        ("ons", "ons", OrgKind.RESEARCH),
        ("research:ons", "ons", OrgKind.RESEARCH),
    ],
)
def test_references_name_one_party(ref: str, party: str, kind: OrgKind) -> None:
    assert o.ref_party(ref) == party
    assert o.parse_ref(ref)[0] is kind
    # a party name is a valid key-id party and a topic-name suffix: lower-case, digits, '-'
    assert KEY_ID.match(f"{party}.0123456789ab")
    assert re.fullmatch(r"[a-z][a-z0-9-]+", party)
    assert o.ref_party(party) == party  # the party name is itself a reference


@pytest.mark.parametrize(
    ("kind", "identifier", "expected"),
    [
        ("school", "12345", "DfE URN"),
        ("school", "1101234", "DfE URN"),
        ("school", "11012A", "DfE URN"),
        ("nhs_organisation", "A8-001", "ODS code"),
        ("nhs_organisation", "A810011", "ODS code"),
        ("nhs_organisation", "1234", "ODS code"),
        ("nhs_organisation", "12345", "ODS code"),  # a 5-character code has a letter
        ("police_force", "3", "force code"),
        ("police_force", "00", "force code"),
        ("police_force", "351", "force code"),
        ("charity", "12345", "charity number"),
        ("charity", "123456789", "charity number"),
        ("charity", "1234567-", "charity number"),
        ("dwp", "hmrc", "'dwp'"),
        ("district_team", "narnia", "district"),
        ("research", "council", "project's own id"),
        ("research", "schools", "project's own id"),
        ("research", "school-110123", "project's own id"),
    ],
)
def test_malformed_identifiers_are_refused(kind: str, identifier: str, expected: str) -> None:
    with pytest.raises(RegistryError, match=f"malformed {kind} identifier .*{re.escape(expected)}"):
        o.organisation(kind=kind, identifier=identifier, name="X", districts=["all"])


def test_unknown_kind_district_service_and_format_are_refused() -> None:
    with pytest.raises(RegistryError, match="unknown organisation kind 'academy'"):
        o.organisation(kind="academy", identifier="110123", name="X", districts=["fenland"])
    with pytest.raises(RegistryError, match="unknown district 'peterborough'"):
        o.organisation(kind="school", identifier="110123", name="X", districts=["peterborough"])
    with pytest.raises(RegistryError, match="unknown service 'astrology'"):
        o.organisation(kind="school", identifier="110123", name="X", districts=["fenland"], services=["astrology"])
    with pytest.raises(RegistryError, match="unknown partner format 'fax'"):
        o.organisation(kind="school", identifier="110123", name="X", districts=["fenland"], partner_format="fax")
    with pytest.raises(RegistryError, match="at least one district"):
        o.organisation(kind="school", identifier="110123", name="X")
    with pytest.raises(RegistryError, match="serves its own district only"):
        o.organisation(kind="district_team", identifier="fenland", name="X", districts=["cambridge"])
    with pytest.raises(RegistryError, match="'schools' is not an organisation"):
        o.parse_ref("schools")


def test_districts_and_services_are_the_referral_schemas_symbols() -> None:
    assert o.districts() == ("cambridge", "east_cambs", "fenland", "huntingdonshire", "south_cambs")
    assert "health_visitor" in o.services() and "citizens_advice" in o.services()
    org = o.organisation(
        kind="nhs", identifier="zhv02", name="  Spaced   Name ", districts=["east-cambs", "fenland"], services=["health-visitor"]
    )
    assert (org.identifier, org.name, org.districts, org.services) == (
        "ZHV02",
        "Spaced Name",
        ("east_cambs", "fenland"),
        ("health_visitor",),
    )
    assert org.partner_format == "health"
    assert o.organisation(kind="research", identifier="ons", name="X", districts=["all"]).partner_format is None


def test_json_round_trip_and_strict_reading() -> None:
    org = o.organisation(kind="charity", identifier="1234567-1", name="Linked", districts=["fenland"], services=["citizens_advice"], updated_at=1_700_000_000)
    doc = org.to_json()
    assert doc["party"] == "charity-1234567-1"
    assert o.Organisation.from_json(json.loads(json.dumps(doc))) == org
    with pytest.raises(RegistryError, match="unknown entry fields secret"):
        o.Organisation.from_json({**doc, "secret": 1})
    with pytest.raises(RegistryError, match="names party"):
        o.Organisation.from_json({**doc, "party": "charity-7654321"})
    with pytest.raises(RegistryError, match="malformed charity identifier"):
        o.Organisation.from_json({**doc, "id": "12"})


# -- the shipped county ---------------------------------------------------------------------
def shipped() -> Registry:
    return Registry(o.load_file())


def test_shipped_county_is_a_small_realistic_county() -> None:
    registry = shipped()
    count = {k: len(registry.organisations(k)) for k in OrgKind}
    assert count[OrgKind.SCHOOL] >= 6
    gp = [x for x in registry.organisations(OrgKind.NHS_ORGANISATION) if re.fullmatch(r"[A-Z]\d{5}", x.identifier)]
    assert len(gp) >= 2
    assert count[OrgKind.POLICE_FORCE] >= 1 and count[OrgKind.DWP] == 1 and count[OrgKind.CHARITY] >= 3
    assert [x.party for x in registry.organisations(OrgKind.DISTRICT_TEAM)] == [
        "district-cambridge",
        "district-east-cambs",
        "district-fenland",
        "district-huntingdonshire",
        "district-south-cambs",
    ]
    assert registry.get("ons") is not None and registry.require("ons").kind is OrgKind.RESEARCH
    for district in o.districts():
        assert isinstance(registry.service_for_district("health_visitor", district), o.Organisation)
        assert isinstance(registry.service_for_district("school_nurse", district), o.Organisation)
    assert all(x.active for x in registry)
    assert len({x.party for x in registry}) == len(registry) == len(o.load_file())


def test_resolution_on_the_shipped_county() -> None:
    r = shipped()
    assert r.school_by_urn("110123").party == "school-110123"  # type: ignore[union-attr]
    assert r.school_by_urn("999999") == Unresolved("school not registered")
    assert r.school_by_urn("11012") == Unresolved("school identifier malformed")
    assert r.school_by_urn(None) == Unresolved("no school identifier in the referral")
    assert r.nhs_by_ods("z90001").party == "nhs-z90001"  # type: ignore[union-attr]
    assert r.nhs_by_ods("Z99999", noun="GP practice") == Unresolved("GP practice not registered")
    assert r.service_for_district("health_visitor", "fenland").party == "nhs-zhv01"  # type: ignore[union-attr]
    assert r.service_for_district("school_nurse", "east_cambs").party == "nhs-zsn01"  # type: ignore[union-attr]
    assert r.service_for_district("family_support", "fenland", kind="district_team").party == "district-fenland"  # type: ignore[union-attr]
    assert r.service_for_district("health_visitor", "fenland", kind="charity") == Unresolved(
        "no health visiting service for fenland"
    )
    assert r.service_for_district("drug_alcohol_support", "fenland") == Unresolved(
        "no drug and alcohol support service for fenland"
    )
    assert r.district_team("east_cambs").party == "district-east-cambs"  # type: ignore[union-attr]
    # the named charity only, when it provides the service in the family's district
    assert r.charity_for("citizens_advice", "fenland", "1190001").party == "charity-1190001"  # type: ignore[union-attr]
    assert r.charity_for("citizens_advice", "cambridge", "charity:1190004").party == "charity-1190004"  # type: ignore[union-attr]
    assert r.charity_for("citizens_advice", "cambridge", "1190001") == Unresolved("charity does not serve cambridge")
    assert r.charity_for("parenting_programme", "fenland", "1190001") == Unresolved(
        "charity does not provide parenting programme"
    )
    assert r.charity_for("citizens_advice", "fenland", "1999999") == Unresolved("charity not registered")
    assert r.charity_for("citizens_advice", "fenland", None) == Unresolved("no charity named as provider of Citizens Advice")
    assert r.charity_for("citizens_advice", "fenland", "school:110123") == Unresolved("named provider is not a charity")
    assert r.charity_for("citizens_advice", "fenland", "Citizens Advice!") == Unresolved("named provider malformed")


def test_disabled_and_ambiguous_organisations_resolve_to_nobody() -> None:
    base = o.load_file()
    disabled = [replace(x, status=OrgStatus.DISABLED, disabled_at=1.0) if x.party in ("school-110123", "nhs-zhv01", "charity-1190001", "district-fenland") else x for x in base]
    r = Registry(disabled)
    assert r.school_by_urn("110123") == Unresolved("school disabled")
    assert r.school_by_urn("110245").party == "school-110245"  # type: ignore[union-attr]  # no other school stands in
    assert r.service_for_district("health_visitor", "fenland") == Unresolved("health visiting service for fenland disabled")
    assert r.charity_for("citizens_advice", "fenland", "1190001") == Unresolved("charity disabled")
    assert r.district_team("fenland") == Unresolved("district team for fenland disabled")
    second = o.organisation(kind="nhs", identifier="ZHV02", name="Fens Health Visiting", districts=["fenland"], services=["health_visitor"])
    two = Registry([*base, second])
    assert two.service_for_district("health_visitor", "fenland") == Unresolved("more than one health visiting service for fenland")
    assert two.service_for_district("health_visitor", "cambridge").party == "nhs-zhv01"  # type: ignore[union-attr]


def test_duplicate_identifier_checks() -> None:
    r = shipped()
    same = o.organisation(kind="school", identifier="110123", name="Fenland Fields Primary School", districts=["fenland"])
    assert r.check_add(same) == "unchanged"
    other = replace(same, name="Fenland Fields Infant School")
    with pytest.raises(RegistryError, match=r"school:110123 is already registered .*\(name\)"):
        r.check_add(other)
    off = Registry([replace(same, status=OrgStatus.DISABLED)])
    with pytest.raises(RegistryError, match="disabled"):
        off.check_add(same)
    # a sender must be registered and active
    assert r.require_active("school:110123").party == "school-110123"
    with pytest.raises(RegistryError, match="school-110123 is disabled"):
        off.require_active("school:110123")
    with pytest.raises(RegistryError, match="school-999999 is not registered"):
        r.require_active("school:999999")


def test_county_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "county.toml"
    path.write_text('[[organisation]]\nkind = "school"\nid = "110123"\nname = "A"\ndistricts = ["fenland"]\nurl = "x"\n')
    with pytest.raises(RegistryError, match="organisation 1: unknown key"):
        o.load_file(path)
    entry = '[[organisation]]\nkind = "school"\nid = "110123"\nname = "A"\ndistricts = ["fenland"]\n'
    path.write_text(entry + entry.replace('"A"', '"B"'))
    with pytest.raises(RegistryError, match="organisation 2: school:110123 appears twice"):
        o.load_file(path)
    path.write_text(entry.replace("110123", "11O123"))
    with pytest.raises(RegistryError, match="organisation 1: malformed school identifier"):
        o.load_file(path)


# -- on the real broker ---------------------------------------------------------------------
@pytest.fixture
def cli_env(settings: Settings, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """A namespace whose registry topic exists and is still empty (a cluster before its first
    ``orgs import``; the ``topics`` fixture would have registered the shipped county)."""
    from referral_broker.cluster.topics import ensure_topics

    ensure_topics(settings, kafka_bootstrap, read_registry=False)
    monkeypatch.delenv("REFERRAL_BROKER_CONFIG", raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", settings.bootstrap_servers)
    monkeypatch.setenv("REFERRAL_BROKER_TOPIC_PREFIX", settings.kafka_topic_prefix)
    monkeypatch.setenv("REFERRAL_BROKER_TOPIC_PROFILE", settings.kafka_topic_profile)
    monkeypatch.setenv("REFERRAL_BROKER_DATA_DIR", str(settings.paths_data_dir))
    yield settings
    delete_test_topics(settings, kafka_bootstrap)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def registry_records(settings: Settings) -> int:
    from kafka import TopicPartition

    from referral_broker.cluster.clients import build_consumer
    from referral_broker.cluster.topics import topic_name

    topic = topic_name(settings, "orgs")
    consumer = build_consumer(settings, settings.bootstrap_servers, [topic], group_id=None)
    try:
        return sum(consumer.end_offsets([TopicPartition(topic, 0)]).values())
    finally:
        consumer.close()


def test_orgs_commands_add_list_disable(cli_env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    add = ("orgs", "add", "--kind", "school", "--id", "120001", "--name", "New Town Primary", "--district", "fenland")
    code, out, _ = run(capsys, *add, "--json")
    assert code == 0 and json.loads(out)["outcome"] == "added" and json.loads(out)["party"] == "school-120001"
    code, out, _ = run(capsys, *add, "--json")  # identical again: nothing written
    assert code == 0 and json.loads(out)["outcome"] == "unchanged"
    assert registry_records(cli_env) == 1

    code, out, _ = run(capsys, "orgs", "list", "--kind", "school", "--json")
    listed = json.loads(out)
    assert code == 0 and [(x["party"], x["status"]) for x in listed] == [("school-120001", "active")]

    code, _, err = run(capsys, "orgs", "add", "--kind", "school", "--id", "120001", "--name", "Old Town Primary", "--district", "fenland")
    assert code == RegistryError.exit_code == 14
    assert "school:120001 is already registered as school-120001 with other details (name)" in err
    code, _, err = run(capsys, "orgs", "add", "--kind", "school", "--id", "12001", "--name", "X", "--district", "fenland")
    assert code == 14 and "malformed school identifier '12001': expected DfE URN (6 digits)" in err
    code, _, err = run(capsys, "orgs", "add", "--kind", "nhs_organisation", "--id", "A8100-1", "--name", "X", "--district", "all")
    assert code == 14 and "malformed nhs_organisation identifier" in err and "ODS code" in err
    code, _, err = run(capsys, "orgs", "add", "--kind", "school", "--id", "120002", "--name", "X", "--district", "narnia")
    assert code == 14 and "unknown district 'narnia'" in err
    code, _, err = run(capsys, "orgs", "add", "--kind", "academy", "--id", "120002", "--name", "X", "--district", "fenland")
    assert code == 14 and "unknown organisation kind 'academy'" in err
    assert registry_records(cli_env) == 1  # no refused command wrote anything

    code, out, _ = run(capsys, "orgs", "disable", "school:120001", "--json")
    assert code == 0 and json.loads(out)["outcome"] == "disabled"
    code, out, _ = run(capsys, "orgs", "list", "--json")
    (entry,) = json.loads(out)
    assert entry["status"] == "disabled" and entry["disabled_at"] is not None and entry["name"] == "New Town Primary"
    assert registry_records(cli_env) == 2  # a new version; the first is not deleted
    code, out, _ = run(capsys, "orgs", "show", "school-120001")
    assert code == 0 and re.search(r"^status\s+disabled$", out, flags=re.M)
    code, _, err = run(capsys, *add)
    assert code == 14 and "disabled" in err
    code, out, _ = run(capsys, "orgs", "enable", "school-120001", "--json")
    assert code == 0 and json.loads(out)["status"] == "active" and json.loads(out)["disabled_at"] is None
    code, _, err = run(capsys, "orgs", "show", "school:999999")
    assert code == 14 and "school-999999 is not registered" in err


def test_import_is_idempotent(cli_env: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "orgs", "import", "--json")
    first = json.loads(out)
    assert code == 0 and len(first["added"]) == len(o.load_file()) and first["unchanged"] == []
    after_first = o.load_registry(cli_env, cli_env.bootstrap_servers)
    records = registry_records(cli_env)

    code, out, _ = run(capsys, "orgs", "import")
    assert code == 0 and out.strip() == f"0 added, {len(o.load_file())} unchanged, 0 kept disabled"
    assert o.load_registry(cli_env, cli_env.bootstrap_servers) == after_first
    assert registry_records(cli_env) == records

    # an operator's disable survives a re-import; a contradicting file writes nothing
    o.disable(cli_env, cli_env.bootstrap_servers, "school:110123")
    report = o.import_file(cli_env, cli_env.bootstrap_servers)
    assert report.kept_disabled == ["school-110123"] and report.added == []
    county = tmp_path / "county.toml"
    county.write_text(
        '[[organisation]]\nkind = "school"\nid = "130001"\nname = "New"\ndistricts = ["fenland"]\n'
        '[[organisation]]\nkind = "police_force"\nid = "35"\nname = "Renamed Constabulary"\ndistricts = ["all"]\n'
    )
    records = registry_records(cli_env)
    code, _, err = run(capsys, "orgs", "import", str(county))
    assert code == 14 and "police:35 (name)" in err and "nothing was written" in err
    assert registry_records(cli_env) == records


def test_a_reader_sees_changes_at_its_next_catch_up(topics: Settings) -> None:
    bootstrap = topics.bootstrap_servers
    o.import_file(topics, bootstrap)
    with o.RegistryReader(topics, bootstrap) as reader:
        before = reader.catch_up()
        assert before.school_by_urn("130002") == Unresolved("school not registered")
        new = o.organisation(kind="school", identifier="130002", name="Late Addition Primary", districts=["huntingdonshire"])
        assert o.add(topics, bootstrap, new).outcome == "added"
        assert reader.registry is before  # nothing read until it catches up
        after = reader.catch_up()
        assert after.school_by_urn("130002").party == "school-130002"  # type: ignore[union-attr]
        assert before.school_by_urn("130002") == Unresolved("school not registered")  # a snapshot does not move
        assert reader.catch_up() is after  # nothing new: the same snapshot
        o.disable(topics, bootstrap, "school-130002")
        assert reader.catch_up().school_by_urn("130002") == Unresolved("school disabled")
    assert o.load_registry(topics, bootstrap).require("school:130002").status is OrgStatus.DISABLED


def test_missing_registry_topic_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(BrokerError, match="does not exist; run 'referral-broker topics ensure'"):
        o.load_registry(settings, settings.bootstrap_servers)
