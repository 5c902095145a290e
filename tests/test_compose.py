"""docker-compose.yml (for users with Docker) stays consistent with the local runtime, and its
project services run under their own Kafka identities: only the one-shot set-up holds the
administrator's password (issue 14, Build 5). tests/test_compose_setup.py runs the same
set-up, router and inbox against the real secured broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from referral_broker.cli.main import COMMANDS
from referral_broker.cluster import acls
from referral_broker.cluster.runtime import LocalBroker
from referral_broker.cluster.security import ADMIN_USER
from referral_broker.config import load_settings
from referral_broker.organisations import OrgKind, load_file

COMPOSE: dict[str, Any] = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """A service's mounts: container path -> (volume, read-only)."""
    found = {}
    for entry in service.get("volumes", []):
        volume, target, *mode = entry.split(":")
        assert volume in COMPOSE["volumes"], f"{entry} is not a named volume"
        found[target] = (volume, mode == ["ro"])
    return found


def volume_of(service: dict[str, Any], path: str) -> tuple[str, str]:
    """(volume, path inside it) holding the container path ``path`` in ``service``."""
    best = max((t for t in mounts(service) if path == t or path.startswith(t.rstrip("/") + "/")), key=len, default=None)
    assert best is not None, f"{path} is in no volume of the service"
    return mounts(service)[best][0], path[len(best) :].lstrip("/")


def logs_in(name: str) -> bool:
    """A project service (built from this repository) that talks to Kafka."""
    service = SERVICES[name]
    return service.get("build") == "." and "KAFKA_BOOTSTRAP_SERVERS" in service.get("environment", {})


def is_setup(name: str) -> bool:
    return SERVICES[name]["command"][0] == "setup"


def option(command: list[str], name: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == name]


def admin_volumes() -> set[str]:
    """Volumes that hold the administrator's password: those the pki services write."""
    return {volume for name, s in SERVICES.items() if s["command"][:2] == ["kafka", "compose-files"] for volume, _ in mounts(s).values()}


def test_kafka_image_is_the_pinned_local_version() -> None:
    settings = load_settings(environ={})
    image = SERVICES["kafka"]["image"]
    assert image == f"apache/kafka:{settings.local_kafka_version}"
    assert LocalBroker(settings).version == settings.local_kafka_version


def test_broker_settings_match_the_local_runtime() -> None:
    env = SERVICES["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # topics come from the plan only
    assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"


def test_project_services_use_real_commands_and_the_local_profile() -> None:
    names = [n for n in SERVICES if logs_in(n) and "profiles" not in SERVICES[n]]
    assert {"setup", "router"} <= set(names) and any(n.startswith("inbox-") for n in names)
    for name in names:
        service = SERVICES[name]
        assert service["command"][0] in COMMANDS, f"{name} runs an unknown command"
        assert service["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert service["environment"]["REFERRAL_BROKER_TOPIC_PROFILE"] == "local"
        assert service["environment"]["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        if name != "setup":
            assert service["depends_on"] == {"setup": {"condition": "service_completed_successfully"}}, name


def test_only_the_setup_logs_in_as_the_administrator() -> None:
    admin = admin_volumes()
    assert admin >= {"pki"}
    checked = 0
    for name in (n for n in SERVICES if logs_in(n)):
        env = SERVICES[name]["environment"]
        user = env["KAFKA_SASL_USERNAME"]
        password_volume, password_path = volume_of(SERVICES[name], env["KAFKA_SASL_PASSWORD_FILE"])
        if is_setup(name):
            assert user == ADMIN_USER, name
            assert password_volume in admin and password_path == "admin.password", name
            continue
        checked += 1
        assert user != ADMIN_USER, f"{name} logs in as the administrator"
        # no admin password anywhere it can read
        assert not {v for v, _ in mounts(SERVICES[name]).values()} & admin, f"{name} mounts the pki volume"
        # its password and CA come from its own volume, mounted read-only, shared with no other
        # service but the setup that writes it
        ca_volume, _ = volume_of(SERVICES[name], env["KAFKA_SSL_CAFILE"])
        assert ca_volume == password_volume and password_path == "kafka-password", name
        target = next(t for t, (v, _) in mounts(SERVICES[name]).items() if v == password_volume)
        assert mounts(SERVICES[name])[target][1], f"{name}'s secrets are not read-only"
        others = [o for o in SERVICES if o != name and not is_setup(o) and password_volume in {v for v, _ in mounts(SERVICES[o]).values()}]
        assert not others, f"{name}'s secrets volume is also mounted by {others}"
        # ... which is where the setup enrols exactly this identity
        setup = SERVICES["setup"]
        assert mounts(setup)[f"/secrets/{user}"] == (password_volume, False), name
        assert option(setup["command"], "--out") == ["/secrets"]
        assert user == acls.ROUTER or user in option(setup["command"], "--team"), name
    assert checked >= 2


def test_the_router_and_each_district_team_has_its_own_service() -> None:
    teams = sorted(o.party for o in load_file() if o.kind is OrgKind.DISTRICT_TEAM)
    setup = SERVICES["setup"]
    assert sorted(option(setup["command"], "--team")) == teams
    inboxes = {n: s for n, s in SERVICES.items() if s.get("command", [])[:2] == ["inbox", "serve"]}
    assert sorted(s["environment"]["KAFKA_SASL_USERNAME"] for s in inboxes.values()) == teams
    ports = []
    for name, service in inboxes.items():
        assert option(service["command"], "--team") == [service["environment"]["KAFKA_SASL_USERNAME"]], name
        # the hub's key store read-only (the team's copies are sealed under the hub's case
        # keys), its own database in its own volume
        assert mounts(service)["/data"] == ("broker-data", True), name
        assert service["environment"]["REFERRAL_BROKER_DATA_DIR"] == "/data"
        db_volume, _ = volume_of(service, service["environment"]["REFERRAL_BROKER_INBOX_DATABASE"])
        assert [o for o, s in SERVICES.items() if db_volume in {v for v, _ in mounts(s).values()}] == [name]
        ports += service["ports"]
    assert len(set(ports)) == len(ports) == len(teams)
    router = SERVICES["router"]
    assert router["command"] == ["route"] and router["environment"]["KAFKA_SASL_USERNAME"] == acls.ROUTER
    assert mounts(router)["/data"] == ("broker-data", False)  # it writes the case keys
    assert mounts(setup)["/data"] == ("broker-data", False)
