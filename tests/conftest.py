"""Shared fixtures: one real Kafka broker per test session, fresh topics per test.

``KAFKA_BOOTSTRAP_SERVERS`` points the suite at an existing cluster; otherwise the project's
own local broker is started on test ports (19192/19193, apart from the demo's) and stopped at
the end if this session started it. Tests isolate by a unique topic prefix, never by sleeping.

The local broker is secured (TLS, SCRAM, ACLs; the suite uses its administrator, found through
the client file the broker wrote). For an existing secured cluster, give its client settings
in the environment as for any command: ``KAFKA_SECURITY_PROTOCOL=SASL_SSL``,
``KAFKA_SASL_USERNAME``, ``KAFKA_SASL_PASSWORD`` or ``KAFKA_SASL_PASSWORD_FILE``,
``KAFKA_SSL_CAFILE`` (or ``REFERRAL_BROKER_CONFIG`` naming a client file such as a local
broker's ``client.toml``); a local broker of this machine at that address needs none of them.
``REFERRAL_BROKER_TEST_INSECURE=1`` starts the suite's own broker plaintext instead (debugging).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from referral_broker.cluster.runtime import LocalBroker, probe
from referral_broker.cluster.security import client_security, remember
from referral_broker.cluster.topics import admin_client, ensure_topics
from referral_broker.config import Settings, load_settings
from referral_broker.organisations import load_file
from referral_broker.organisations import publish as publish_orgs
from referral_broker.parties import use_shipped_registry

TEST_PORT = int(os.environ.get("REFERRAL_BROKER_TEST_PORT", "19192"))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        # the environment's security settings (or the local broker's client file for that
        # address), used by every test's settings in this process, which ignore the environment
        env_settings = load_settings(kafka_bootstrap_servers=configured)
        remember(configured, client_security(env_settings, configured))
        topics, problem = probe(env_settings, configured, timeout_s=10)
        if topics is None:
            pytest.fail(f"KAFKA_BOOTSTRAP_SERVERS={configured} does not answer metadata requests: {problem}")
        yield configured
        return
    settings = load_settings(
        environ={},
        local_port=TEST_PORT,
        local_controller_port=TEST_PORT + 1,
        local_start_timeout_s=240.0,  # a loaded 2-core machine
    )
    broker = LocalBroker(settings)
    was_running = broker.status().answering
    insecure = os.environ.get("REFERRAL_BROKER_TEST_INSECURE") == "1"
    # The test broker's data is disposable, so a session that starts it starts it empty: what
    # earlier sessions left (topics of killed runs, partitions still waiting for deletion) would
    # otherwise pile up in the cache from run to run until the broker no longer starts in time.
    if not was_running:
        broker.stop()  # a test broker an interrupted session left running but not answering
        broker.start(insecure=insecure, fresh=True)
    yield broker.bootstrap
    if not was_running:
        broker.stop()


@pytest.fixture
def settings(kafka_bootstrap: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own topic namespace and data folder, the session's broker."""
    return load_settings(
        environ={},
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        kafka_topic_profile="test",
        paths_data_dir=tmp_path / "data",
        keys_dek_cache_max_age_s=300.0,
    )


@pytest.fixture
def topics(settings: Settings, kafka_bootstrap: str) -> Iterator[Settings]:
    """Create the whole topic plan under the test's prefix; delete it afterwards.

    A deletion the broker refuses fails the test's teardown (it would leave topics behind and
    hide a broken cluster); only a topic that is already gone is fine.
    """
    # The shipped demo county, registered under the test's prefix: its organisations are the
    # parties, each with its own topics (a test that adds one creates its topics too).
    ensure_topics(settings, kafka_bootstrap, read_registry=False)
    publish_orgs(settings, kafka_bootstrap, load_file())
    yield settings
    delete_test_topics(settings, kafka_bootstrap)


@pytest.fixture
def namespace(settings: Settings, kafka_bootstrap: str) -> Iterator[Settings]:
    """The test's topic namespace, empty: the test creates what it needs; every topic under it
    is deleted afterwards, as for ``topics``."""
    yield settings
    delete_test_topics(settings, kafka_bootstrap)


def delete_test_topics(settings: Settings, bootstrap: str) -> None:
    """Delete every topic under the test's prefix; a deletion the broker refuses fails the test."""
    admin = admin_client(settings, bootstrap)
    try:
        names = [t for t in admin.list_topics() if t.startswith(settings.kafka_topic_prefix)]
        result = admin.delete_topics(names, raise_errors=False)
    finally:
        admin.close()
    failed = deletion_failures(result)
    if failed:
        pytest.fail(f"deleting the test's topics failed: {failed}", pytrace=False)


def deletion_failures(result: dict[str, Any]) -> dict[str, str]:
    """Topic -> error name for each topic the broker did not delete, except those already gone."""
    from kafka.errors import UnknownTopicOrPartitionError, for_code

    return {
        t["name"]: for_code(t["error_code"]).__name__
        for t in result["topics"]
        if t["error_code"] not in (0, UnknownTopicOrPartitionError.errno)
    }


@pytest.fixture
def county(topics: Settings, kafka_bootstrap: str) -> Settings:
    """The shipped county's topics, registry and every organisation's keys."""
    from referral_broker.parties import all_parties
    from referral_broker.sealing.key_admin import init_parties

    init_parties(topics, sorted(all_parties()), bootstrap=kafka_bootstrap)
    return topics


@pytest.fixture(autouse=True)
def _shipped_parties() -> None:
    """Every test starts with the shipped county as its parties (a test that installs another
    registry, or adds an organisation, must not change the next test's)."""
    use_shipped_registry()


@pytest.fixture(autouse=True, scope="module")
def _shipped_parties_for_the_module() -> None:
    """The same for a module's own fixtures, which run before any test's (the fuzz world seals
    with a school's key before its first test)."""
    use_shipped_registry()


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves non-daemon threads running (a consumer or server not closed)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for t in leaked:
        t.join(timeout=5)
    leaked = [t.name for t in leaked if t.is_alive()]
    assert not leaked, f"test leaked threads: {leaked}"
