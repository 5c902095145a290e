"""docker-compose.yml (for users with Docker) stays consistent with the local runtime."""

from __future__ import annotations

from pathlib import Path

import yaml

from referral_broker.cli.main import COMMANDS
from referral_broker.cluster.runtime import LocalBroker
from referral_broker.config import load_settings

COMPOSE = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text())


def test_kafka_image_is_the_pinned_local_version() -> None:
    settings = load_settings(environ={})
    image = COMPOSE["services"]["kafka"]["image"]
    assert image == f"apache/kafka:{settings.local_kafka_version}"
    assert LocalBroker(settings).version == settings.local_kafka_version


def test_broker_settings_match_the_local_runtime() -> None:
    env = COMPOSE["services"]["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # topics come from the plan only
    assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"


def test_project_services_use_real_commands_and_the_local_profile() -> None:
    for name in ("topics", "router", "inbox"):
        service = COMPOSE["services"][name]
        assert service["command"][0] in COMMANDS, f"{name} runs an unknown command"
        assert service["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert service["environment"]["REFERRAL_BROKER_TOPIC_PROFILE"] == "local"
