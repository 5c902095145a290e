"""Organisations, not kinds, on the real broker: each referral reaches the organisations its
own data names (the child's school, GP practice, the provider it names), never a whole kind;
what cannot be resolved is audited with the reason and listed by ``orgs unresolved``; the
registry changes (add, disable) take effect in a running router without a restart; statuses go
back to the referring organisation only."""

from __future__ import annotations

import copy
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from county import GP, OTHER_GP, OTHER_SCHOOL, POLICE, SCHOOL, cli, in_county

from referral_broker.audit_log import decisions as audit_decisions
from referral_broker.cluster.clients import build_consumer, drain
from referral_broker.cluster.topics import topic_name
from referral_broker.config import Settings
from referral_broker.consumers.receiving import Received, Refused, receive
from referral_broker.consumers.router import Router
from referral_broker.errors import ConfigError, ReferralBrokerError, RegistryError
from referral_broker.identity import load_identity
from referral_broker.organisations import load_file
from referral_broker.producers.intake import IntakeSender
from referral_broker.producers.sending import PartnerSender
from referral_broker.schemas.synth import synthetic_referrals
from referral_broker.sealing.key_admin import init_parties

SCHOOLS = [o.party for o in load_file() if o.kind.value == "school"]
NEW_SCHOOL = "school-119999"




def override() -> dict[str, Any]:
    now = datetime.now(UTC).replace(microsecond=0)
    return {
        "override_id": uuid.uuid4(),
        "ground": "risk_of_significant_harm",
        "reason": "Synthetic reason for a test",
        "approved_by": {"role": "Early Help duty manager", "name": "Test Approver"},
        "approved_at": now,
    }


def encompass(seed: int, urn: str | None) -> dict[str, Any]:
    """A police referral about a child at a domestic abuse incident (Operation Encompass)."""
    for record in synthetic_referrals(50, seed=seed):
        if record.get("school"):
            break
    record = in_county(copy.deepcopy(record))
    record.update(
        district="fenland",
        concern_types=["domestic_abuse"],
        concerns=[{"type": "domestic_abuse", "detail": "Synthetic incident for a test", "since": None}],
        services_requested=["family_support"],
        service_providers=[],
        sharing_override=override(),  # Operation Encompass: shared without consent, on an override
        consent={"state": "refused", "recorded_at": record["created_at"], "recorded_by": "Synthetic Officer"},
        flags={"safeguarding_concern": False, "crime_prevention": False, "early_support_pathway": False},
    )
    record["referrer"] = {**record["referrer"], "partner": "police"}
    record["school"]["urn"] = urn
    return record


def send(settings: Settings, bootstrap: str, party: str, records: list[dict[str, Any]]) -> list[str]:
    with IntakeSender(settings, bootstrap, party) as sender:
        return [s.referral_id for s in sender.send_referrals(records)]


def got(settings: Settings, bootstrap: str, party: str) -> list[Received]:
    items = list(receive(settings, bootstrap, party, stop_when_idle=1.5, group_id=None))
    assert not [i for i in items if not isinstance(i, Received)], items
    return items  # type: ignore[return-value]


def raw_out(settings: Settings, bootstrap: str, party: str) -> list[Any]:
    consumer = build_consumer(settings, bootstrap, [topic_name(settings, "out", party)], group_id=None)
    try:
        return [r for batch in drain(consumer, idle_s=1.5) for r in batch]
    finally:
        consumer.close()


def test_operation_encompass_reaches_only_the_childs_school(county: Settings, kafka_bootstrap: str) -> None:
    [rid] = send(county, kafka_bootstrap, POLICE, [encompass(1, "110123")])
    stats = Router(county, kafka_bootstrap).run(stop_when_idle=3)
    assert stats.routed == 1 and stats.dead_lettered == 0
    [mine] = got(county, kafka_bootstrap, SCHOOL)
    assert mine.referral_id == rid and mine.record["child"]["given_name"]
    for other in SCHOOLS:
        if other != SCHOOL:
            assert raw_out(county, kafka_bootstrap, other) == [], other  # not even a sealed copy
    # The school's own copy, moved by an attacker onto another school's topic, does not open
    # with that school's keys: it is sealed for one organisation alone.
    [copy_] = raw_out(county, kafka_bootstrap, SCHOOL)
    thief = load_identity(county, kafka_bootstrap, OTHER_SCHOOL)
    with pytest.raises(ReferralBrokerError):
        thief.open(copy_)
    from referral_broker.consumers.receiving import open_record

    refused = open_record(thief, copy_, topic=topic_name(county, "out", OTHER_SCHOOL))
    assert isinstance(refused, Refused)
    audits = [a for a in audit_decisions(county, kafka_bootstrap) if str(a["referral_id"]) == rid]
    school = [a for a in audits if a["recipient"] == SCHOOL]
    assert school and school[0]["recipient_name"] == "Fenland Fields Primary School"
    assert school[0]["recipient_rules"] == ["child_school"] and school[0]["delivered"]


def test_a_school_not_in_the_registry_gets_nothing_and_the_audit_says_why(
    county: Settings, kafka_bootstrap: str
) -> None:
    [rid] = send(county, kafka_bootstrap, POLICE, [encompass(2, "654321")])  # outside the county
    Router(county, kafka_bootstrap).run(stop_when_idle=3)
    for school in SCHOOLS:
        assert raw_out(county, kafka_bootstrap, school) == [], school
    audits = [a for a in audit_decisions(county, kafka_bootstrap) if str(a["referral_id"]) == rid]
    [why] = [a for a in audits if a["recipient"] == "child_school"]
    assert why["unresolved_reason"] == "school not registered" and not why["delivered"]
    assert why["fields_shared"] == [] and why["purpose"] == "operation-encompass"
    # the district team's copy says who was not told
    [team] = [r for r in raw_out(county, kafka_bootstrap, "district-fenland") if r.key.decode() == rid]
    assert json.loads(dict(team.headers)["rb-unresolved"]) == {"child_school": "school not registered"}
    listed = cli(county, kafka_bootstrap, "orgs", "unresolved", "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(r["referral_id"], r["rule"], r["reason"]) for r in rows] == [(rid, "child_school", "school not registered")]


def test_a_gp_practice_receives_only_referrals_that_name_it(county: Settings, kafka_bootstrap: str) -> None:
    records: list[dict[str, Any]] = []
    for record in synthetic_referrals(40, seed=3):
        record = in_county(copy.deepcopy(record))
        record.update(district="fenland", services_requested=["school_nurse"], service_providers=[])
        record["consent"] = {**record["consent"], "state": "given"}
        record["referrer"] = {**record["referrer"], "partner": "schools"}
        health = record.get("health_and_development")
        if health is None:
            continue
        health["gp_practice_ods"] = ("Z90001", None)[len(records) % 2]
        records.append(record)
        if len(records) == 4:
            break
    naming = {str(r["referral_id"]) for r in records if r["health_and_development"]["gp_practice_ods"]}
    send(county, kafka_bootstrap, SCHOOL, records)
    Router(county, kafka_bootstrap).run(stop_when_idle=3)
    assert {m.referral_id for m in got(county, kafka_bootstrap, GP)} == naming and len(naming) == 2
    assert raw_out(county, kafka_bootstrap, OTHER_GP) == []


def test_orgs_add_and_disable_take_effect_in_a_running_router(county: Settings, kafka_bootstrap: str) -> None:
    router = Router(county, kafka_bootstrap)  # one router object throughout: no restart
    send(county, kafka_bootstrap, POLICE, [encompass(4, "119999")])
    router.run(stop_when_idle=3)
    added = cli(
        county, kafka_bootstrap, "orgs", "add", "--kind", "school", "--id", "119999",
        "--name", "Synthetic New Primary School", "--district", "fenland", "--json",
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    init_parties(county, [NEW_SCHOOL], bootstrap=kafka_bootstrap)
    [rid] = send(county, kafka_bootstrap, POLICE, [encompass(5, "119999")])
    router.run(stop_when_idle=3)
    assert [m.referral_id for m in got(county, kafka_bootstrap, NEW_SCHOOL)] == [rid]  # its next one

    disabled = cli(county, kafka_bootstrap, "orgs", "disable", NEW_SCHOOL)
    assert disabled.exit_code == 0, disabled.output
    [later] = send(county, kafka_bootstrap, POLICE, [encompass(6, "119999")])
    router.run(stop_when_idle=3)
    assert [m.referral_id for m in got(county, kafka_bootstrap, NEW_SCHOOL)] == [rid]  # nothing more
    audits = [a for a in audit_decisions(county, kafka_bootstrap) if str(a["referral_id"]) == later]
    assert [a["unresolved_reason"] for a in audits if a["recipient"] == "child_school"] == ["school disabled"]


def test_a_status_goes_back_to_the_referring_organisation_only(county: Settings, kafka_bootstrap: str) -> None:
    [rid] = send(county, kafka_bootstrap, POLICE, [encompass(7, "110123")])
    router = Router(county, kafka_bootstrap)
    router.run(stop_when_idle=3)
    [mine] = got(county, kafka_bootstrap, SCHOOL)
    with IntakeSender(county, kafka_bootstrap, SCHOOL) as school:
        school.send_status(
            {
                "status_id": uuid.uuid4(),
                "referral_id": uuid.UUID(rid),
                "version": mine.version,
                "from_party": SCHOOL,
                "to_party": mine.referrer,
                "status": "accepted",
                "reason": None,
                "at": datetime.now(UTC).replace(microsecond=0),
                "actor_role": "Designated Safeguarding Lead",
            }
        )
    router.run(stop_when_idle=3)
    assert mine.referrer == POLICE
    back = [m for m in got(county, kafka_bootstrap, POLICE) if m.kind == "status"]
    assert [(m.referral_id, m.record["status"]) for m in back] == [(rid, "accepted")]
    for other in ["dwp", "charity-1190001", "nhs-zhv01", OTHER_SCHOOL]:
        assert not [r for r in raw_out(county, kafka_bootstrap, other) if r.key.decode() == rid], other


def test_bad_organisation_input_is_a_clear_error(county: Settings, kafka_bootstrap: str, tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="'schools' is a partner kind, not a party"):
        PartnerSender(county, kafka_bootstrap, "schools")
    with pytest.raises(ConfigError, match=r"unknown party 'school-999998': not in the organisation registry"):
        PartnerSender(county, kafka_bootstrap, "school:999998")
    with pytest.raises(ConfigError, match="malformed school identifier '12ab'"):
        PartnerSender(county, kafka_bootstrap, "school:12ab")
    clash = cli(
        county, kafka_bootstrap, "orgs", "add", "--kind", "school", "--id", "110123",
        "--name", "Another Name For The Same URN", "--district", "fenland",
    )  # fmt: skip
    assert isinstance(clash.exception, RegistryError) and "already registered" in str(clash.exception)
    assert "nothing was written" in str(clash.exception)
    assert cli(county, kafka_bootstrap, "orgs", "disable", OTHER_SCHOOL).exit_code == 0
    from referral_broker.parties import use_cluster_registry

    use_cluster_registry(county, kafka_bootstrap)
    with pytest.raises(ConfigError, match=f"organisation {OTHER_SCHOOL} is disabled"):
        PartnerSender(county, kafka_bootstrap, OTHER_SCHOOL)


def test_an_intake_from_a_disabled_organisation_is_dead_lettered(county: Settings, kafka_bootstrap: str) -> None:
    record = in_county(copy.deepcopy(next(synthetic_referrals(1, seed=8))))
    record["referrer"] = {**record["referrer"], "partner": "schools"}
    send(county, kafka_bootstrap, OTHER_SCHOOL, [record])  # written before it was disabled
    assert cli(county, kafka_bootstrap, "orgs", "disable", OTHER_SCHOOL).exit_code == 0
    stats = Router(county, kafka_bootstrap).run(stop_when_idle=3)
    assert stats.routed == 0 and stats.dead_lettered == 1 and stats.by_reason == {"policy": 1}


# -- claims bound to who made them (issue 15, attacks 4 and 5) -------------------------------


def test_a_charity_cannot_refer_as_the_police(county: Settings, kafka_bootstrap: str) -> None:
    forged = encompass(9, "110123")  # claims referrer.partner = police
    send(county, kafka_bootstrap, "charity-1190001", [forged])
    stats = Router(county, kafka_bootstrap).run(stop_when_idle=3)
    assert stats.routed == 0 and stats.dead_lettered == 1 and stats.by_reason == {"policy": 1}
    for school in SCHOOLS:
        assert raw_out(county, kafka_bootstrap, school) == [], school
    from referral_broker.consumers.dead_letters import read_dead_letters

    [(_, dead)] = list(read_dead_letters(county, kafka_bootstrap))
    assert "claims a police referrer but charity-1190001 (charities) signed it" in dead.reason


def status(party: str, to: str, rid: str, version: int, text: str | None = None) -> dict[str, Any]:
    return {
        "status_id": uuid.uuid4(),
        "referral_id": uuid.UUID(rid),
        "version": version,
        "from_party": party,
        "to_party": to,
        "status": "declined" if text else "accepted",
        "reason": text,
        "at": datetime.now(UTC).replace(microsecond=0),
        "actor_role": "Synthetic role",
    }


def test_a_status_only_from_a_recipient_and_only_to_the_referrer(county: Settings, kafka_bootstrap: str) -> None:
    [rid] = send(county, kafka_bootstrap, POLICE, [encompass(10, "110123")])
    Router(county, kafka_bootstrap).run(stop_when_idle=3)
    # a charity that never received it answers, addressed to the police, with free text
    with IntakeSender(county, kafka_bootstrap, "charity-1190001") as charity:
        charity.send_status(status("charity-1190001", POLICE, rid, 1, "Synthetic free text"))
    # the school that did receive it tries to send its answer to another school
    with IntakeSender(county, kafka_bootstrap, SCHOOL) as school:
        school.send_status(status(SCHOOL, OTHER_SCHOOL, rid, 1))
        school.send_status(status(SCHOOL, POLICE, rid, 1))  # the right answer
    stats = Router(county, kafka_bootstrap).run(stop_when_idle=3)  # a new router: the ledger is on Kafka
    assert stats.statuses == 1 and stats.dead_lettered == 2 and stats.by_reason == {"policy": 2}
    back = [m for m in got(county, kafka_bootstrap, POLICE) if m.kind == "status"]
    assert [(m.referral_id, m.record["from_party"]) for m in back] == [(rid, SCHOOL)]
    assert raw_out(county, kafka_bootstrap, OTHER_SCHOOL) == []
    audits = [a for a in audit_decisions(county, kafka_bootstrap) if str(a["referral_id"]) == rid]
    relayed = [a for a in audits if a["purpose"] == "status-to-referrer"]
    assert [(a["recipient"], a["conditions_met"][0]) for a in relayed] == [(POLICE, f"received-by:{SCHOOL}")]


def test_a_catch_up_asks_for_the_registry_and_the_ledger_ends_in_one_request(
    county: Settings, kafka_bootstrap: str
) -> None:
    """Before every batch the router reads the registry and the delivery ledger to their ends:
    one ListOffsets request for both topics (a round trip a batch fewer), and a registry change
    committed before the catch-up is still in effect after it."""
    from referral_broker.parties import all_parties

    router = Router(county, kafka_bootstrap)
    try:
        router.catch_up()
        reader, ledger = router._registry_reader, router._ledger
        assert reader is not None and ledger is not None
        requests: list[str] = []
        for name, consumer in (("registry", reader._consumer), ("ledger", ledger._consumer)):
            fetcher = consumer._fetcher
            original = fetcher._send_list_offsets_request

            async def counted(node_id: Any, timestamps: Any, _name: str = name, _original: Any = original) -> Any:
                requests.append(_name)
                return await _original(node_id, timestamps)

            fetcher._send_list_offsets_request = counted
        # the first catch-ups may ask apart, while the ledger's consumer learns where the
        # registry's partitions are; from then on, one request
        for _ in range(50):
            requests.clear()
            router.catch_up()
            if requests == ["ledger"]:
                break
            time.sleep(0.1)
        assert requests == ["ledger"]  # the registry's ends came with the ledger's
        assert all_parties()[OTHER_SCHOOL].active
        assert cli(county, kafka_bootstrap, "orgs", "disable", OTHER_SCHOOL).exit_code == 0
        router.catch_up()
        assert requests == ["ledger", "ledger"]
        assert not all_parties()[OTHER_SCHOOL].active  # applied by this catch-up
    finally:
        assert cli(county, kafka_bootstrap, "orgs", "enable", OTHER_SCHOOL).exit_code == 0
        if router._registry_reader is not None:
            router._registry_reader.close()
        if router._ledger is not None:
            router._ledger.close()
