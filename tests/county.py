"""The shipped demo county's organisations, named once for the tests.

Parties are organisations (``referral_broker/organisations.toml``). A test that needs "a
school" or "the police" takes it from here; partner kinds (``schools``, ``health``) are only
adapter formats and the referral's ``referrer.partner``.
"""

from __future__ import annotations

import zlib
from typing import Any

from referral_broker.organisations import load_file

SCHOOL = "school-110123"  # Fenland Fields Primary School, fenland
OTHER_SCHOOL = "school-110245"  # Wisbech Brinkside Academy, fenland
GP = "nhs-z90001"  # Fenland Bridge Surgery: fenland, east_cambs
OTHER_GP = "nhs-z90002"  # Cam Valley Medical Practice: cambridge, south_cambs
HEALTH_VISITING = "nhs-zhv01"  # health visiting, every district
SCHOOL_NURSING = "nhs-zsn01"  # school nursing, every district
POLICE = "police-35"
DWP = "dwp"
CHARITY = "charity-1190001"  # Citizens Advice: fenland, east_cambs, huntingdonshire
CARERS_CHARITY = "charity-1190002"  # Caring Together, every district
RESEARCH = "ons"
HUB = "council"

# The organisation that sends as each partner format in tests.
SENDER = {
    "schools": SCHOOL,
    "health": HEALTH_VISITING,
    "dwp": DWP,
    "police": POLICE,
    "charities": CHARITY,
}
FORMAT = {party: fmt for fmt, party in SENDER.items()}
PARTNERS = list(SENDER.values())  # one sending organisation per partner format


def schools_of(district: str) -> list[str]:
    """URNs of the county's schools in ``district`` (a District symbol)."""
    return [o.identifier for o in load_file() if o.kind.value == "school" and district in o.districts]


def in_county(record: dict[str, Any], *, seed: int = 0) -> dict[str, Any]:
    """``record`` (a synthetic referral, changed in place) naming the county's organisations
    for its district: a registered school (when it names a school), a GP practice serving the
    district (when it has health details), and a charity provider for each requested service a
    charity there provides. The choice is fixed by the referral id, so runs repeat."""
    orgs = load_file()
    district = record["district"]
    pick = zlib.crc32(str(record["referral_id"]).encode()) + seed
    if record.get("school"):
        urns = schools_of(district)
        record["school"]["urn"] = urns[pick % len(urns)]
    health = record.get("health_and_development")
    if health is not None:
        gps = [
            o.identifier
            for o in orgs
            if o.kind.value == "nhs_organisation" and not o.services and district in o.districts
        ]
        health["gp_practice_ods"] = gps[pick % len(gps)] if gps else None  # none serves huntingdonshire
    providers = []
    for service in record.get("services_requested") or []:
        found = [
            o for o in orgs if o.kind.value == "charity" and service in o.services and district in o.districts
        ]
        if found:
            providers.append({"service": service, "provider": found[0].identifier})
    record["service_providers"] = providers
    return record


def cli(settings: Any, bootstrap: str, *args: str) -> Any:
    """Run the CLI in-process against the test's cluster, topic namespace and data folder."""
    from click.testing import CliRunner

    from referral_broker.cli.main import cli as cli_group

    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "REFERRAL_BROKER_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "REFERRAL_BROKER_TOPIC_PROFILE": settings.kafka_topic_profile,
        "REFERRAL_BROKER_DATA_DIR": str(settings.paths_data_dir),
    }
    return CliRunner().invoke(cli_group, list(args), env=env)
