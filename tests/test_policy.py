"""The sharing policy: loading checks with file and line, the pure decision, explain and diff."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from county import CHARITY, DWP, GP, HEALTH_VISITING, OTHER_SCHOOL, POLICE, SCHOOL, SCHOOL_NURSING

from referral_broker.errors import ConfigError, PolicyError
from referral_broker.organisations import OrgStatus, Registry, load_file
from referral_broker.policy import decide, default_policy_path, load_policy
from referral_broker.policy.decide import DEFAULT_DENY
from referral_broker.policy.review import diff, explain
from referral_broker.schemas.synth import synthetic_referrals

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
SHIPPED = default_policy_path().read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def policy():
    return load_policy()


def referral(**changes) -> dict:
    base = next(synthetic_referrals(1, seed=7))
    record = copy.deepcopy(base)
    record.update(
        flags={"safeguarding_concern": False, "crime_prevention": False, "early_support_pathway": False},
        concern_types=["parenting"],
        services_requested=["parenting_programme"],
        consent={**record["consent"], "state": "given"},
        sharing_override=None,
        district="fenland",
        service_providers=[{"service": "parenting_programme", "provider": "1190003"}],
    )
    record["referrer"] = {**record["referrer"], "partner": "schools"}
    record["school"] = {**(record.get("school") or {}), "urn": "110123"}  # Fenland Fields, fenland
    record.update(changes)
    return record


def decisions(policy, record, referrer=SCHOOL, registry=None):
    return {d.recipient: d for d in decide(policy, record, referrer_party=referrer, at=NOW, registry=registry)}


def county(**status: OrgStatus) -> Registry:
    """The shipped county, with some organisations' status changed (party name -> status)."""
    from dataclasses import replace

    return Registry(replace(o, status=status.get(o.party, o.status)) for o in load_file())


def override(**changes) -> dict:
    value = {
        "override_id": "8a1f7a52-0f0e-4f53-9c36-6b8f0e0b9d11",
        "ground": "risk_of_significant_harm",
        "reason": "Synthetic reason for a test",
        "approved_by": {"role": "Early Help team manager", "name": "Test Approver"},
        "approved_at": NOW,
    }
    value.update(changes)
    return value


def write_policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    return path


# -- loading -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            '"identifiers.upn", "school"',
            '"identifiers.upn", "school.nonexistent"',
            "unknown field 'school.nonexistent'",
        ),
        ('recipient = "dwp"', 'recipient = "the-press"', "unknown recipient rule 'the-press'"),
        ('recipient = "dwp"', 'recipient = "schools"', "unknown recipient rule 'schools'"),
        (
            'classes = ["operational"]\nfields = [\n  "child.given_name", "child.family_name", "child.date_of_birth",\n  "identifiers.upn"',
            'classes = ["secret"]\nfields = [\n  "child.given_name", "child.family_name", "child.date_of_birth",\n  "identifiers.upn"',
            "unknown data class 'secret'",
        ),
        (
            'name = "household-financial-support"\ndescription = "Department for Work and Pensions: benefits, and employment support for young people not in education or work"\nprovides = ["neet_support"]\nwhen_any = ["concern:financial", "service_requested"]\nground = "uk_gdpr_6_1_e"',
            'name = "household-financial-support"\ndescription = "Department for Work and Pensions: benefits, and employment support for young people not in education or work"\nprovides = ["neet_support"]\nwhen_any = ["concern:financial", "service_requested"]\nground = "because_we_can"',
            "unknown ground 'because_we_can'",
        ),
        (
            'when_any = ["concern:financial", "service_requested"]',
            'when_any = ["concern:gossip", "service_requested"]',
            "'gossip' is not one of",
        ),
        (
            'when_any = ["concern:financial", "service_requested"]',
            'when_any = ["moon_phase", "service_requested"]',
            "unknown condition 'moon_phase'",
        ),
    ],
)
def test_load_rejects_with_file_and_line(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in SHIPPED, old
    path = write_policy(tmp_path, SHIPPED.replace(old, new, 1))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    text = str(err.value)
    assert message in text
    line = int(re.search(r", line (\d+):", text).group(1))
    assert text.startswith(str(path))
    # the line named is the one carrying the problem (or its purpose's header)
    content = path.read_text().splitlines()[line - 1]
    assert content.strip() == "[[purpose]]" or any(
        tok in content for tok in re.findall(r"'([^']+)'", message)
    )


def test_special_category_without_art9_condition_fails(tmp_path: Path) -> None:
    text = SHIPPED.replace('special_category_condition = "dpa_2018_sch1_para18"\n', "", 1)
    with pytest.raises(
        PolicyError,
        match=r"special category field\(s\) .*concerns.detail.* without a special_category_condition",
    ):
        load_policy(write_policy(tmp_path, text))


def test_shipped_policy_uses_every_recipient_rule(policy) -> None:
    assert policy.recipients() == [
        "child_school",
        "gp_practice",
        "service_provider",
        "named_charity",
        "police_force",
        "dwp",
        "district_team",
    ]


def test_a_rule_needing_provides_says_so(tmp_path: Path) -> None:
    text = SHIPPED.replace(
        'provides = ["citizens_advice", "caring_together", "parenting_programme", "drug_alcohol_support"]\n'
        'when_all = ["service_requested"]\n',
        'when_all = ["concern:parenting"]\n',
        1,
    )
    with pytest.raises(PolicyError, match=r"line \d+: recipient rule 'named_charity' needs 'provides'"):
        load_policy(write_policy(tmp_path, text))


# -- deciding -------------------------------------------------------------------------------


def test_police_get_nothing_without_the_flag(policy) -> None:
    got = decisions(policy, referral(sharing_override=override(ground="prevention_detection_of_crime")))
    assert POLICE not in got
    flagged = decisions(
        policy,
        referral(
            flags={"safeguarding_concern": True, "crime_prevention": False, "early_support_pathway": False}
        ),
    )
    assert POLICE in flagged


def test_consent_alone_does_not_reach_police_an_override_does(policy) -> None:
    flags = {"safeguarding_concern": True, "crime_prevention": False, "early_support_pathway": False}
    without = decisions(policy, referral(flags=flags))[POLICE]
    assert not without.delivered and without.shared == ()
    assert "no sharing override record" in without.withheld["child.given_name"]
    with_override = decisions(policy, referral(flags=flags, sharing_override=override()))[POLICE]
    assert with_override.delivered and with_override.basis == "override"
    assert with_override.override_id == "8a1f7a52-0f0e-4f53-9c36-6b8f0e0b9d11"
    assert "child.given_name" in with_override.shared
    assert "identifiers.nhs_number" in with_override.withheld
    assert with_override.withheld["identifiers.nhs_number"] == DEFAULT_DENY


def test_refused_consent_shares_only_with_council_team(policy) -> None:
    record = referral(
        consent={"state": "refused", "recorded_at": NOW, "recorded_by": "Synthetic Worker"},
        district="huntingdonshire",
        service_providers=[{"service": "parenting_programme", "provider": "1190003"}],
    )
    got = decisions(policy, record)
    charities = got["charity-1190003"]
    assert not charities.delivered and "consent is 'refused'" in charities.withheld["child.given_name"]
    team = got["district-huntingdonshire"]
    assert team.delivered and team.basis == "not_required"


def test_incomplete_override_is_an_error(policy) -> None:
    bad = override(approved_by={"role": "Team manager", "name": ""})
    with pytest.raises(PolicyError, match=r"missing sharing_override.approved_by.name"):
        decide(policy, referral(sharing_override=bad), referrer_party=SCHOOL, at=NOW)


def test_early_support_pathway_only_for_children_up_to_five(policy) -> None:
    base = referral(services_requested=["health_visitor"])
    young = copy.deepcopy(base)
    young["child"]["date_of_birth"] = date(2023, 1, 1)
    old = copy.deepcopy(base)
    old["child"]["date_of_birth"] = date(2019, 1, 1)
    assert decisions(policy, young)[HEALTH_VISITING].delivered
    assert HEALTH_VISITING not in decisions(policy, old)


def test_district_team_chosen_by_family_district(policy) -> None:
    got = decisions(policy, referral(district="south_cambs"))
    teams = [r for r in got if r.startswith("district-")]
    assert teams == ["district-south-cambs"]


def test_referrer_never_receives_its_own_referral(policy) -> None:
    record = referral(district="huntingdonshire", services_requested=["parenting_programme"])
    assert "charity-1190003" in decisions(policy, record)
    assert "charity-1190003" not in decisions(policy, record, referrer="charity-1190003")


def test_every_unit_is_either_shared_or_withheld(policy) -> None:
    for decision in decisions(policy, referral()).values():
        if decision.unresolved:
            assert not decision.delivered and decision.shared == ()
            continue
        assert set(decision.shared) | set(decision.withheld) == set(policy.units)
        assert not set(decision.shared) & set(decision.withheld)


# -- explain and diff ------------------------------------------------------------------------


def test_explain_lists_given_and_withheld(policy) -> None:
    data = explain(policy, DWP)
    given = {f["path"] for f in data["fields"]}
    assert "identifiers.ni_number" in given and "household.ni_number" in given
    assert "identifiers.nhs_number" in {f["path"] for f in data["not_shared"]}
    assert given | {f["path"] for f in data["not_shared"]} == set(policy.units)


def test_diff_shows_started_and_stopped(tmp_path: Path, policy) -> None:
    changed = SHIPPED.replace(
        '"identifiers.upn", "school", "referrer.practitioner",',
        '"identifiers.upn", "identifiers.nhs_number", "referrer.practitioner",',
        1,
    )
    new = load_policy(write_policy(tmp_path, changed))
    result = diff(policy, new)["recipients"]
    assert "identifiers.nhs_number" in result["child_school"]["starts_sharing"]
    assert "school.attendance.present_sessions" in result["child_school"]["stops_sharing"]
    assert set(result) == {"child_school"}


def test_cli_explain_json_and_unknown_recipient() -> None:
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "referral_broker.cli.main", *a], capture_output=True, text=True
    )
    ok = run("policy", "explain", "--recipient", "police:35", "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["recipient"] == POLICE and data["name"] == "Cambridgeshire Constabulary"
    assert data["purposes"][0]["name"] == "safeguarding-and-crime-prevention"
    rule = json.loads(run("policy", "explain", "--recipient", "child_school", "--json").stdout)
    assert [p["name"] for p in rule["purposes"]] == ["education-support", "operation-encompass"]
    bad = run("policy", "explain", "--recipient", "the-press")
    assert bad.returncode == ConfigError.exit_code and "unknown party 'the-press'" in bad.stderr and "Traceback" not in bad.stderr
    kind = run("policy", "explain", "--recipient", "schools")
    assert kind.returncode == ConfigError.exit_code and "'schools' is a partner kind, not a party" in kind.stderr


def test_schemas_show_view_takes_fields_from_the_policy(policy) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "referral_broker.cli.main", "schemas", "show", "--view", DWP, "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(proc.stdout)["granted"]) == sorted(
        f["path"] for f in explain(policy, DWP)["fields"]
    )


# -- recipients are organisations, resolved per referral -------------------------------------


def encompass(**changes) -> dict:
    changes.setdefault("sharing_override", override())  # Operation Encompass: no consent is sought
    record = referral(concern_types=["domestic_abuse"], services_requested=[], service_providers=[], **changes)
    record["referrer"] = {**record["referrer"], "partner": "police"}
    return record


def test_operation_encompass_goes_to_the_childs_school_only(policy) -> None:
    got = decisions(policy, encompass(), referrer=POLICE)
    schools = [r for r in got if r.startswith("school-")]
    assert schools == [SCHOOL] and got[SCHOOL].delivered
    assert got[SCHOOL].purposes == ("operation-encompass",) and got[SCHOOL].rules == ("child_school",)
    assert got[SCHOOL].recipient_name == "Fenland Fields Primary School"
    assert OTHER_SCHOOL not in got


@pytest.mark.parametrize(
    ("urn", "registry", "reason"),
    [
        ("999999", None, "school not registered"),
        (None, None, "no school identifier in the referral"),
        ("110123", {SCHOOL: OrgStatus.DISABLED}, "school disabled"),
    ],
)
def test_an_unresolved_school_sends_to_no_school_and_says_why(policy, urn, registry, reason) -> None:
    record = encompass()
    record["school"]["urn"] = urn
    got = decisions(policy, record, referrer=POLICE, registry=county(**registry) if registry else None)
    assert not [r for r in got if r.startswith("school-")]  # never a broadcast to the kind
    unresolved = got["child_school"]
    assert unresolved.unresolved == reason and not unresolved.delivered and unresolved.shared == ()
    assert unresolved.purposes == ("operation-encompass",)
    assert got["district-fenland"].delivered  # the team still gets the case


def test_gp_practice_only_when_the_referral_names_it(policy) -> None:
    record = referral(services_requested=["school_nurse"], service_providers=[])
    record["health_and_development"] = {**(record.get("health_and_development") or {}), "gp_practice_ods": "Z90001"}
    got = decisions(policy, record)
    assert got[GP].delivered and got[GP].purposes == ("gp-practice-awareness",)
    assert "nhs-z90002" not in got
    assert got[SCHOOL_NURSING].delivered  # the school nursing service for the district
    record["health_and_development"]["gp_practice_ods"] = None
    got = decisions(policy, record)
    assert not [r for r in got if r in (GP, "nhs-z90002")]
    assert got["gp_practice"].unresolved == "no GP practice identifier in the referral"


def test_named_charity_must_provide_the_service_in_the_district(policy) -> None:
    base = dict(district="fenland", services_requested=["citizens_advice"])
    named = decisions(policy, referral(**base, service_providers=[{"service": "citizens_advice", "provider": "1190001"}]))
    assert named[CHARITY].delivered
    assert "charity-1190004" not in named  # the other Citizens Advice is not told
    elsewhere = decisions(
        policy, referral(**base, service_providers=[{"service": "citizens_advice", "provider": "1190004"}])
    )
    assert not [r for r in elsewhere if r.startswith("charity-")]
    assert elsewhere["named_charity"].unresolved == "charity does not serve fenland"
    unnamed = decisions(policy, referral(**base, service_providers=[]))
    assert unnamed["named_charity"].unresolved == "no charity named as provider of Citizens Advice"


def test_disabling_an_organisation_stops_its_next_decision(policy) -> None:
    record = encompass()
    assert decisions(policy, record, referrer=POLICE)[SCHOOL].delivered
    after = decisions(policy, record, referrer=POLICE, registry=county(**{SCHOOL: OrgStatus.DISABLED}))
    assert SCHOOL not in after and after["child_school"].unresolved == "school disabled"


def test_explain_per_organisation_follows_what_it_provides(policy) -> None:
    assert [p["name"] for p in explain(policy, HEALTH_VISITING)["purposes"]] == ["early-support-pathway"]
    assert [p["name"] for p in explain(policy, GP)["purposes"]] == ["gp-practice-awareness"]
    assert explain(policy, "ons")["fields"] == []  # research gets nothing through a purpose
