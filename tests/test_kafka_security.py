"""Issue 14, part 1: the secured local broker and clients that can talk to one.

A broker of this module's own (its own ports and cache folder, the shared Kafka jars), started
secured exactly as ``kafka start`` starts it: SASL_SSL with SCRAM-SHA-512 on loopback, the
project's own CA, a controller that requires client certificates, ACLs enforced with nothing
allowed by default. Every refusal is made by Kafka itself; nothing is mocked.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from referral_broker.cluster import security as sec
from referral_broker.cluster.clients import build_consumer, build_producer, poll_records
from referral_broker.cluster.runtime import LocalBroker, LocalCluster
from referral_broker.cluster.topics import admin_client
from referral_broker.config import Settings, load_settings
from referral_broker.errors import (
    BrokerAuthenticationError,
    BrokerError,
    BrokerProtocolError,
    BrokerTrustError,
    ConfigError,
    NotAuthorisedError,
)

CLI = [sys.executable, "-m", "referral_broker.cli.main"]
PARTNER_USER = "school-110123"  # an organisation's Kafka identity (organisations issue)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    shared = load_settings(environ={})
    cache = tmp_path_factory.mktemp("secured-cache")
    jars = shared.paths_cache_dir / f"kafka-{shared.local_kafka_version}"
    (cache / jars.name).symlink_to(jars)
    broker = LocalBroker(
        load_settings(
            environ={},
            local_port=free_port(),
            local_controller_port=free_port(),
            paths_cache_dir=cache,
            local_start_timeout_s=240.0,  # a loaded 2-core machine
        )
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(timeout_s=15)


def client_settings(broker: LocalBroker, tmp_path: Path, **security: object) -> Settings:
    """What a command on this machine would use: only the address (the credentials are found
    through the broker's client file), or the explicit security settings given."""
    return load_settings(
        environ={},
        kafka_bootstrap_servers=broker.bootstrap,
        kafka_topic_prefix=f"s{uuid.uuid4().hex[:8]}.",
        kafka_request_timeout_ms=10_000,
        paths_data_dir=tmp_path / "data",
        **security,
    )


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def make_topic(settings: Settings, name: str) -> None:
    from kafka.admin import NewTopic

    admin = admin_client(settings, settings.bootstrap_servers)
    try:
        admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        admin.close()


# -- settings --------------------------------------------------------------------------------
def test_settings_read_kafkas_own_names_from_toml_and_env(tmp_path: Path) -> None:
    password = secret_file(tmp_path / "pw", "s3cret\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    config = tmp_path / "rb.toml"
    config.write_text(
        "[kafka]\n"
        'security.protocol = "SASL_SSL"\n'
        'sasl.mechanism = "SCRAM-SHA-512"\n'
        'sasl.username = "dwp"\n'
        f'sasl.password_file = "{password}"\n'
        f'ssl.cafile = "{ca}"\n'
    )
    s = load_settings(config, environ={})
    resolved = sec.client_security(s, "broker.example:9093")
    assert (resolved.protocol, resolved.mechanism, resolved.username) == ("SASL_SSL", "SCRAM-SHA-512", "dwp")
    assert resolved.password == "s3cret" and resolved.cafile == ca
    assert "s3cret" not in repr(resolved) and "s3cret" not in repr(s)
    kwargs = resolved.kafka_kwargs()
    assert kwargs["sasl_plain_username"] == "dwp" and kwargs["ssl_cafile"] == str(ca)

    env = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_USERNAME": "ops",
        "KAFKA_SASL_PASSWORD": "from-env",
        "KAFKA_SSL_CAFILE": str(ca),
    }
    from_env = sec.client_security(load_settings(environ=env), "broker.example:9093")
    assert (from_env.username, from_env.password, from_env.protocol) == ("ops", "from-env", "SASL_SSL")


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ('[kafka]\nsasl.password = "x"\n', {}, "not read from a settings file"),
        ('[kafka]\nsecurity.protocol = "SASL_PLAINTEXT"\n', {}, "security.protocol must be one of"),
        ('[kafka]\nsecurity.protocol = "SASL_SSL"\n', {}, "needs a username"),
        ('[kafka]\nsasl.username = "dwp"\n', {}, "no password for user dwp"),
        (
            '[kafka]\nsasl.username = "dwp"\nsasl.mechanism = "PLAIN"\n',
            {"KAFKA_SASL_PASSWORD": "x"},
            "sasl.mechanism",
        ),
    ],
)
def test_bad_security_settings_are_config_errors(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    config = tmp_path / "rb.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        sec.client_security(load_settings(config, environ=env), "broker.example:9093")


def test_a_password_file_open_to_others_is_refused(tmp_path: Path) -> None:
    loose = secret_file(tmp_path / "pw", "s3cret", mode=0o644)
    settings = load_settings(environ={"KAFKA_SASL_USERNAME": "dwp", "KAFKA_SASL_PASSWORD_FILE": str(loose)})
    with pytest.raises(ConfigError, match=r"open to group or others \(mode 0644\); run 'chmod 600"):
        sec.client_security(settings, "broker.example:9093")
    os.chmod(loose, 0o600)
    assert sec.client_security(settings, "broker.example:9093").password == "s3cret"


# -- the local PKI -----------------------------------------------------------------------------
def test_broker_keystore_is_unencrypted_pkcs8_signed_by_the_local_ca(tmp_path: Path) -> None:
    folder = tmp_path / "security"
    path = sec.ensure_broker_keystore(folder, ("127.0.0.1", "localhost"))
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, not encrypted, not PKCS#1
    assert b"ENCRYPTED" not in data
    for name in ("broker.pem", "ca-key.pem"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    leaf, ca_in_chain = x509.load_pem_x509_certificates(data)
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    assert ca_in_chain == ca
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert {str(v) for v in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    # idempotent: a second call keeps the same certificate
    assert sec.ensure_broker_keystore(folder, ("127.0.0.1", "localhost")).read_bytes() == data


def test_cluster_id_starting_with_a_dash_formats(tmp_path: Path) -> None:
    """Main passed '-t <id>', and about one random id in 64 starts with '-'."""
    shared = load_settings(environ={})
    cache = tmp_path / "cache"
    cache.mkdir()
    jars = shared.paths_cache_dir / f"kafka-{shared.local_kafka_version}"
    (cache / jars.name).symlink_to(jars)
    broker = LocalBroker(load_settings(environ={}, local_port=free_port(), paths_cache_dir=cache))
    config = broker._write_config(insecure=True)
    java = broker._check_java()
    broker._format(
        java, f"{broker.ensure_jars()}/*", config, insecure=True, cluster_id="-AbCdEfGhIjKlMnOpQrStU"
    )
    meta = (broker.data_dir / "meta.properties").read_text()
    assert "cluster.id=-AbCdEfGhIjKlMnOpQrStU" in meta


def test_a_pid_file_naming_another_kafka_process_is_not_this_broker(tmp_path: Path) -> None:
    """A stale pid file whose pid now belongs to another Kafka JVM (another broker's, after a
    reboot recycled it) is not this broker: status does not claim it, stop does not kill it."""
    broker = LocalBroker(
        load_settings(environ={}, local_port=free_port(), local_controller_port=free_port(), paths_cache_dir=tmp_path)
    )
    broker.run_dir.mkdir(parents=True)
    # a process whose command line names kafka.Kafka with another broker's config
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "kafka.Kafka", str(tmp_path / "other" / "server.properties")]
    )
    try:
        broker.pid_file.write_text(str(other.pid))
        assert broker.status().running is False
        broker.stop(timeout_s=1)
        assert other.poll() is None, "stop killed a process that is not this broker"
    finally:
        other.kill()
        other.wait()


def test_a_pid_file_counts_for_the_kafka_process_run_from_its_folder(tmp_path: Path) -> None:
    """The same check for a single broker and a cluster's node: the pid counts while its
    command line is a Kafka JVM's with that broker's (or node's) folder in it."""
    settings = load_settings(
        environ={}, local_port=free_port(), local_controller_port=free_port(), paths_cache_dir=tmp_path
    )
    broker, cluster = LocalBroker(settings), LocalCluster(settings, 3)
    for pid_file, folder, pid_of in (
        (broker.pid_file, broker.run_dir, lambda: broker.status().pid),
        (cluster.node_dir(2) / "broker.pid", cluster.node_dir(2), lambda: cluster.pid(2)),
    ):
        folder.mkdir(parents=True)
        for argv, counts in (
            (["kafka.Kafka", str(folder / "server.properties")], True),
            (["kafka.Kafka", str(tmp_path / "elsewhere" / "server.properties")], False),
            ([str(folder / "server.properties")], False),  # not a Kafka JVM
        ):
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv])
            try:
                pid_file.write_text(str(proc.pid))
                assert (pid_of() == proc.pid) is counts, argv
            finally:
                proc.kill()
                proc.wait()
        assert pid_of() is None  # the process is gone


def test_plaintext_formatted_data_is_not_started_secured_without_fresh(tmp_path: Path) -> None:
    broker = LocalBroker(
        load_settings(
            environ={}, local_port=free_port(), local_controller_port=free_port(), paths_cache_dir=tmp_path
        )
    )
    broker.data_dir.mkdir(parents=True)
    (broker.data_dir / "meta.properties").write_text("version=1\n")
    with pytest.raises(BrokerError, match=r"formatted without security.*--fresh"):
        broker.start()


# -- the secured broker ------------------------------------------------------------------------
def test_broker_config_is_locked(secured: LocalBroker) -> None:
    props = dict(
        line.split("=", 1)
        for line in (secured.run_dir / "server.properties").read_text().splitlines()
        if "=" in line
    )
    assert props["listener.security.protocol.map"] == "SECURE:SASL_SSL,CONTROLLER:SSL"
    assert "PLAINTEXT" not in props["listeners"]
    assert props["listener.name.controller.ssl.client.auth"] == "required"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:admin;User:kafka-broker;User:CN=kafka-broker"
    for path in (
        secured.run_dir / "server.properties",
        secured.client_file,
        secured.security_dir / "admin.password",
        secured.security_dir / "kafka-broker.password",
        secured.security_dir / "broker.pem",
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    admin_password = (secured.security_dir / "admin.password").read_text().strip()
    assert admin_password not in secured.client_file.read_text()  # it names the file, not the secret
    # the broker's own log file is written (log4j2 finds both file appenders) and, like the
    # console's, holds no secret
    server_log = (secured.logs_dir / "server.log").read_text()
    assert "Unable to locate appender" not in (secured.logs_dir / "stdout.log").read_text()
    assert "Transition from STARTING to STARTED" in server_log  # BrokerServer logs at INFO there
    for log in secured.logs_dir.glob("*.log"):
        assert admin_password not in log.read_text(), log.name


def test_local_clients_find_the_administrator_and_round_trip(secured: LocalBroker, tmp_path: Path) -> None:
    settings = client_settings(secured, tmp_path)  # only the address
    found = sec.client_security(settings, secured.bootstrap)
    assert (found.protocol, found.username) == ("SASL_SSL", sec.ADMIN_USER)
    topic = f"{settings.kafka_topic_prefix}round-trip"
    make_topic(settings, topic)
    producer = build_producer(settings, secured.bootstrap)
    try:
        producer.send(topic, b"value", key=b"k")
        assert producer.flush() == 1
    finally:
        producer.close()
    consumer = build_consumer(settings, secured.bootstrap, [topic], group_id=None, consumer_timeout_ms=1000)
    try:
        got: list[bytes | None] = []
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            got = [r.value for r in poll_records(consumer, 500)]
    finally:
        consumer.close()
    assert got == [b"value"]


def test_kafka_status_reports_the_secured_listener(secured: LocalBroker, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "REFERRAL_BROKER_LOCAL_PORT": str(secured.settings.local_port),
        "REFERRAL_BROKER_LOCAL_CONTROLLER_PORT": str(secured.settings.local_controller_port),
        "REFERRAL_BROKER_CACHE_DIR": str(secured.settings.paths_cache_dir),
    }
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    proc = subprocess.run(
        [*CLI, "kafka", "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert '"security": "SASL_SSL as admin"' in proc.stdout and '"answering": true' in proc.stdout


def wrong(secured: LocalBroker, tmp_path: Path) -> dict[str, dict[str, object]]:
    ca = secured.security_dir / "ca.pem"
    other = tmp_path / "other-ca"
    sec.ensure_ca(other)
    return {
        "wrong password": dict(
            kafka_sasl_username="admin",
            kafka_sasl_password_file=secret_file(tmp_path / "bad", "not-the-password"),
            kafka_ssl_cafile=ca,
        ),
        "unknown user": dict(kafka_sasl_username="mallory", kafka_sasl_password="guess", kafka_ssl_cafile=ca),
        "untrusted CA": dict(
            kafka_sasl_username="admin",
            kafka_sasl_password_file=secured.security_dir / "admin.password",
            kafka_ssl_cafile=other / "ca.pem",
        ),
        "plaintext client": dict(kafka_security_protocol="PLAINTEXT"),
        "TLS without SASL": dict(kafka_security_protocol="SSL", kafka_ssl_cafile=ca),
    }


EXPECTED = {
    "wrong password": (BrokerAuthenticationError, "authentication failed for user admin"),
    "unknown user": (BrokerAuthenticationError, "authentication failed for user mallory"),
    "untrusted CA": (BrokerTrustError, "certificate at .* is not signed by the configured CA"),
    "plaintext client": (BrokerProtocolError, "does not speak PLAINTEXT on that port"),
    "TLS without SASL": (BrokerProtocolError, "does not speak SSL on that port"),
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_refused_connections_fail_at_once_with_their_cause(
    secured: LocalBroker, tmp_path: Path, case: str
) -> None:
    settings = client_settings(secured, tmp_path, **wrong(secured, tmp_path)[case])
    error, message = EXPECTED[case]
    for build in (
        lambda: admin_client(settings, secured.bootstrap),
        lambda: build_producer(settings, secured.bootstrap),
        lambda: build_consumer(settings, secured.bootstrap, ["any"], group_id="g"),
    ):
        started = time.monotonic()
        with pytest.raises(error, match=message) as caught:
            build()
        # kafka-python alone retries until its bootstrap deadline (10 s here); the cause stops it
        assert time.monotonic() - started < 5.0, case
        assert "\n" not in str(caught.value)
        assert "not-the-password" not in str(caught.value) and "guess" not in str(caught.value)


DROPPED = "<KafkaConnection node_id=2 host=[127.0.0.1:19402] broker_version=4.1 (connected)>: Connection lost: socket disconnected"


def test_another_clients_dropped_connections_are_not_this_logins_refusal() -> None:
    """A broker killed under a running producer drops its connections; a client being built at
    that moment in another thread must not read them as its own login refused (it did: CI saw
    'authentication failed for user admin' right after a cluster node was SIGKILLed)."""
    log = logging.getLogger("kafka.net.connection")
    go, done = threading.Event(), threading.Event()

    def other_client() -> None:  # a client whose IO thread was running before the build began
        go.wait(5)
        log.error(DROPPED)
        log.error(DROPPED)
        done.set()

    running = threading.Thread(target=other_client, daemon=True)
    running.start()
    with sec._capturing("SASL_SSL") as cap:
        go.set()
        assert done.wait(5)
        assert cap.verdict() is None, cap.kinds
        # the same drops in the building thread, or in a thread it starts (its IO thread), count
        log.error(DROPPED)
        io = threading.Thread(target=log.error, args=(DROPPED,))
        io.start()
        io.join()
        assert cap.kinds == ["dropped-after-versions", "dropped-after-versions"]
        assert cap.verdict() == "auth"


@pytest.mark.parametrize(
    ("case", "code"), [("wrong password", 32), ("untrusted CA", 33), ("plaintext client", 34)]
)
def test_cli_exits_with_the_causes_own_code(
    secured: LocalBroker, tmp_path: Path, case: str, code: int
) -> None:
    given = wrong(secured, tmp_path)[case]
    names = {
        "kafka_security_protocol": "KAFKA_SECURITY_PROTOCOL",
        "kafka_sasl_username": "KAFKA_SASL_USERNAME",
        "kafka_sasl_password": "KAFKA_SASL_PASSWORD",
        "kafka_sasl_password_file": "KAFKA_SASL_PASSWORD_FILE",
        "kafka_ssl_cafile": "KAFKA_SSL_CAFILE",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")}
    env |= {names[k]: str(v) for k, v in given.items()}
    env |= {"KAFKA_BOOTSTRAP_SERVERS": secured.bootstrap, "REFERRAL_BROKER_DATA_DIR": str(tmp_path / "d")}
    started = time.monotonic()
    proc = subprocess.run(
        [*CLI, "topics", "list"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == code, proc.stderr
    assert (
        proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: ") and "Traceback" not in proc.stderr
    )
    assert time.monotonic() - started < 30


def test_a_partner_without_acls_is_refused_by_kafka(secured: LocalBroker, tmp_path: Path) -> None:
    from kafka.admin import (
        ACL,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourceType,
    )

    admin_settings = client_settings(secured, tmp_path)
    topic = f"{admin_settings.kafka_topic_prefix}referrals.intake.{PARTNER_USER}"
    make_topic(admin_settings, topic)
    partner_password = sec.new_password()
    admin = sec.super_admin_client(secured.settings)
    try:
        sec.upsert_scram_users(admin, {PARTNER_USER: partner_password})
        assert PARTNER_USER in sec.scram_users(admin)
    finally:
        admin.close()
    partner = client_settings(
        secured,
        tmp_path,
        kafka_sasl_username=PARTNER_USER,
        kafka_sasl_password=partner_password,
        kafka_ssl_cafile=secured.security_dir / "ca.pem",
    )
    partner = partner.replace(kafka_topic_prefix=admin_settings.kafka_topic_prefix)

    producer = build_producer(partner, secured.bootstrap)  # logging in works: the user exists
    try:
        producer.send(topic, b"forged")
        with pytest.raises(NotAuthorisedError, match=f"^not authorised to write topic {topic}$"):
            producer.flush(timeout_s=20)
    finally:
        producer.close()
    with pytest.raises(NotAuthorisedError, match=f"not authorised to read topic {topic}"):
        build_consumer(partner, secured.bootstrap, [topic], group_id=f"{PARTNER_USER}.inbox")
    assert NotAuthorisedError.exit_code == 35

    # Kafka allows exactly what an ACL grants: WRITE on this topic, and the same send succeeds
    admin = sec.super_admin_client(secured.settings)
    try:
        grant = ACL(
            f"User:{PARTNER_USER}",
            "*",
            ACLOperation.WRITE,
            ACLPermissionType.ALLOW,
            ResourcePattern(ResourceType.TOPIC, topic, ACLResourcePatternType.LITERAL),
        )
        assert not admin.create_acls([grant])["failed"]
    finally:
        admin.close()
    deadline = time.monotonic() + 20
    while True:  # the ACL reaches the broker's authorizer through the metadata log
        producer = build_producer(partner, secured.bootstrap)
        try:
            producer.send(topic, b"allowed")
            producer.flush(timeout_s=20)
            break
        except NotAuthorisedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        finally:
            producer.close()


def test_a_rotated_or_deleted_credential_stops_working(secured: LocalBroker, tmp_path: Path) -> None:
    user, password = "ops-rotated", sec.new_password()
    admin = sec.super_admin_client(secured.settings)
    try:
        sec.upsert_scram_users(admin, {user: password})
    finally:
        admin.close()
    settings = client_settings(
        secured,
        tmp_path,
        kafka_sasl_username=user,
        kafka_sasl_password=password,
        kafka_ssl_cafile=secured.security_dir / "ca.pem",
    )
    build_producer(settings, secured.bootstrap).close()  # the new user logs in at once
    rotated = sec.new_password()
    admin = sec.super_admin_client(secured.settings)
    try:
        sec.upsert_scram_users(admin, {user: rotated})
    finally:
        admin.close()
    with pytest.raises(BrokerAuthenticationError, match=f"authentication failed for user {user}"):
        build_producer(settings, secured.bootstrap)  # the old password no longer works
    settings = settings.replace(kafka_sasl_password=rotated)
    build_producer(settings, secured.bootstrap).close()
    admin = sec.super_admin_client(secured.settings)
    try:
        sec.delete_scram_users(admin, [user])
        sec.delete_scram_users(admin, [user])  # deleting twice is not an error
        assert user not in sec.scram_users(admin)
    finally:
        admin.close()
    with pytest.raises(BrokerAuthenticationError, match=f"authentication failed for user {user}"):
        build_producer(settings, secured.bootstrap)


def _tls_to_controller(secured: LocalBroker, cert: Path | None, key: Path | None) -> str:
    """'refused' when the controller ends the connection, 'open' when it keeps it."""
    context = ssl.create_default_context(cafile=str(secured.security_dir / "ca.pem"))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    port = secured.settings.local_controller_port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.settimeout(3)
                try:
                    data = tls.recv(1)
                except TimeoutError:
                    return "open"
                return "refused" if data == b"" else "open"
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return "refused"


def test_the_controller_requires_a_client_certificate(secured: LocalBroker, tmp_path: Path) -> None:
    assert _tls_to_controller(secured, None, None) == "refused"
    other = sec.ensure_ca(tmp_path / "other-ca")
    key_pem, cert_pem = sec.issue_certificate(other, sec.BROKER_CN)
    key = secret_file(tmp_path / "k.pem", key_pem.decode())
    cert = tmp_path / "c.pem"
    cert.write_bytes(cert_pem)
    assert _tls_to_controller(secured, cert, key) == "refused"  # right name, wrong CA
    # the control: the broker's own certificate is let in
    broker_pem = secured.security_dir / "broker.pem"
    assert _tls_to_controller(secured, broker_pem, broker_pem) == "open"


def test_insecure_start_writes_a_plaintext_client_file(tmp_path: Path) -> None:
    broker = LocalBroker(load_settings(environ={}, local_port=free_port(), paths_cache_dir=tmp_path))
    config = broker._write_config(insecure=True)
    text = config.read_text()
    assert "PLAINTEXT://" in text and "authorizer" not in text
    broker._write_client_file(insecure=True)
    found = sec.client_security(load_settings(environ={}, paths_cache_dir=tmp_path), broker.bootstrap)
    assert found.protocol == "PLAINTEXT"


def test_a_port_held_by_this_projects_broker_of_another_cache_folder_names_it_and_its_stop(
    secured: LocalBroker, tmp_path: Path
) -> None:
    """A newcomer's second checkout (another HOME, another cache folder) meets the first one's
    broker on the default port: the refusal names that broker and the command that stops it,
    and that command's settings do address it (the broker is left running here)."""
    mine = load_settings(
        environ={},
        local_port=secured.settings.local_port,
        local_controller_port=secured.settings.local_controller_port,
        paths_cache_dir=tmp_path / "cache",
    )
    with pytest.raises(BrokerError) as refused:
        LocalBroker(mine).start()
    text = str(refused.value)
    pid = secured.status().pid
    assert pid is not None
    assert f"is taken by this project's local Kafka broker run from {secured.run_dir} (pid {pid})" in text
    command = text.split("stop it with '")[1].split("'")[0]
    *assignments, program, group, verb = shlex.split(command)
    assert (program, group, verb) == ("referral-broker", "kafka", "stop")
    environ = dict(a.split("=", 1) for a in assignments)
    addressed = LocalBroker(load_settings(environ=environ))
    assert addressed.run_dir == secured.run_dir and addressed.status().pid == pid
    assert not (tmp_path / "cache").exists(), "the refused start wrote into its cache folder"


def _listener(port: int, *argv: str) -> subprocess.Popen[str]:
    """A process listening on loopback ``port`` (it says so in a line) with ``argv`` on its
    command line: what /proc shows of whatever holds a port."""
    code = (
        "import socket, sys, time\n"
        f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
        "print('listening', flush=True); time.sleep(60)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("holder", ["program", "kafka", "cluster node", "this broker"])
def test_a_taken_port_names_its_holder_when_it_can_be_told(holder: str, tmp_path: Path) -> None:
    other_cache = tmp_path / "other cache"  # a space: the command must quote it
    port = free_port()
    broker = LocalBroker(
        load_settings(environ={}, local_port=port, local_controller_port=free_port(), paths_cache_dir=tmp_path / "cache")
    )
    mine = broker.run_dir
    argv = {
        "program": [],
        "kafka": ["kafka.Kafka", str(tmp_path / "opt" / "kafka" / "server.properties")],
        "cluster node": ["kafka.Kafka", str(other_cache / "local-cluster" / "29500" / "node-2" / "server.properties")],
        "this broker": ["kafka.Kafka", str(mine / "server.properties")],
    }[holder]
    proc = _listener(port, *argv)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "listening\n"
        with pytest.raises(BrokerError) as refused:
            broker.start()
        text = str(refused.value)
        assert text.startswith(f"port {port} on 127.0.0.1 is taken by ")
        expected = {
            "program": f"another program (pid {proc.pid}, {Path(sys.executable).name}); free it or choose other ports",
            "kafka": f"a Kafka broker run from {tmp_path / 'opt' / 'kafka'} (pid {proc.pid}); stop it or choose",
            "cluster node": (
                f"run from {other_cache / 'local-cluster' / '29500' / 'node-2'} (pid {proc.pid}); stop it with "
                f"'REFERRAL_BROKER_CACHE_DIR={shlex.quote(str(other_cache))} REFERRAL_BROKER_LOCAL_PORT=29500 "
                "referral-broker kafka stop'"
            ),
            "this broker": f"this broker's own Kafka process (pid {proc.pid}), which has lost its pid file; stop it with 'kill {proc.pid}'",
        }[holder]
        assert expected in text
    finally:
        proc.kill()
        proc.wait()
