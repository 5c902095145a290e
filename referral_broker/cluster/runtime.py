"""A real single-node Apache Kafka (KRaft, combined broker + controller) without Docker.

Kafka's own jars come from Maven Central through ``mvn dependency:copy-dependencies`` into the
user's cache folder, keyed by version; the broker's data and logs live beside them, never in
the repository. The process is started detached so that ``kafka start`` returns and
``kafka stop`` finds it again through its pid file.

**Secured by default** (``kafka start --insecure`` for a plaintext debugging broker): one
SASL_SSL listener on loopback (SCRAM-SHA-512, a certificate from the project's own local CA),
a controller listener that requires client certificates (mutual TLS: no process without a key
the local CA signed can reach the controller and rewrite ACLs), KRaft's ``StandardAuthorizer``
with ``allow.everyone.if.no.acl.found=false`` and only the broker and the administrator as
super users. The SCRAM credentials of the broker and the administrator are created when the
storage is formatted. Everything secret lives under ``<run dir>/security`` (0700, files 0600);
the administrator's client settings are in ``<run dir>/client.toml`` (0600), which every local
client finds by the broker's port (``cluster/security.py``).
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from referral_broker.cluster import security as sec
from referral_broker.config import Settings
from referral_broker.errors import BrokerError, ConfigError

JVM_FLAGS = [
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:MaxInlineLevel=15",
    "-Djava.awt.headless=true",
]

LOG4J2_YAML = """\
Configuration:
  Appenders:
    Console:
      name: STDOUT
      target: SYSTEM_OUT
      ThresholdFilter: {level: WARN}
      PatternLayout: {pattern: "[%d] %p %m (%c)%n"}
    # one key per appender type: two "RollingFile:" keys would be one (YAML keeps the last)
    RollingFile:
      - name: FILE
        fileName: "${sys:kafka.logs.dir}/server.log"
        filePattern: "${sys:kafka.logs.dir}/server.log.%i"
        PatternLayout: {pattern: "[%d] %p %m (%c)%n"}
        SizeBasedTriggeringPolicy: {size: 20MB}
        DefaultRolloverStrategy: {max: 3}
      - name: AUTHORIZER
        fileName: "${sys:kafka.logs.dir}/authorizer.log"
        filePattern: "${sys:kafka.logs.dir}/authorizer.log.%i"
        PatternLayout: {pattern: "[%d] %p %m%n"}
        SizeBasedTriggeringPolicy: {size: 20MB}
        DefaultRolloverStrategy: {max: 3}
  Loggers:
    # WARN by default: at INFO a busy test run writes tens of MB a minute of topic churn.
    Root:
      level: WARN
      AppenderRef: [{ref: STDOUT}, {ref: FILE}]
    Logger:
      - {name: kafka.server.BrokerServer, level: INFO, additivity: false, AppenderRef: [{ref: FILE}]}
      - {name: kafka.server.ControllerServer, level: INFO, additivity: false, AppenderRef: [{ref: FILE}]}
      # ACL refusals are logged at INFO ("Principal = User:x is Denied operation = WRITE ..."):
      # kept in a file of their own to audit refusals
      - {name: kafka.authorizer.logger, level: INFO, additivity: false, AppenderRef: [{ref: AUTHORIZER}]}
"""

POM_TEMPLATE = """\
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.referral-broker</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <!-- Kafka logs through slf4j 1.7; without this bridge every broker log is lost. -->
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>2.25.4</version>
    </dependency>
  </dependencies>
</project>
"""


def broker_properties(
    *,
    listen: str,
    controller: str,
    data_dir: str,
    advertised: str | None = None,
    keystore: Path | None = None,
    ca: Path | None = None,
    broker_password: str | None = None,
) -> dict[str, str]:
    """server.properties of the single-node broker: plaintext without ``keystore``, else the
    secured set-up (SASL_SSL + SCRAM, mTLS controller, deny-by-default ACLs). ``listen`` is
    host:port (``:9092`` for every interface), ``advertised`` what clients are told."""
    advertised = advertised or listen
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": controller,
        "controller.listener.names": "CONTROLLER",
        "log.dirs": data_dir,
        "num.partitions": "3",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "10",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "unclean.leader.election.enable": "false",
    }
    ctrl_port = controller.rpartition(":")[2]
    ctrl_listen = f"{listen.rpartition(':')[0]}:{ctrl_port}"
    if keystore is None:
        return props | {
            "listeners": f"PLAINTEXT://{listen},CONTROLLER://{ctrl_listen}",
            "advertised.listeners": f"PLAINTEXT://{advertised},CONTROLLER://{controller}",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        }
    return props | {
        "listeners": f"SECURE://{listen},CONTROLLER://{ctrl_listen}",
        "advertised.listeners": f"SECURE://{advertised},CONTROLLER://{controller}",
        "listener.security.protocol.map": "SECURE:SASL_SSL,CONTROLLER:SSL",
        "inter.broker.listener.name": "SECURE",
        "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
        "listener.name.secure.sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.secure.scram-sha-512.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{sec.BROKER_USER}" password="{broker_password}";'
        ),
        "listener.name.secure.ssl.keystore.type": "PEM",
        "listener.name.secure.ssl.keystore.location": str(keystore),
        "listener.name.secure.ssl.truststore.type": "PEM",
        "listener.name.secure.ssl.truststore.location": str(ca),
        # mutual TLS on the controller: only a holder of a key the local CA signed. Never a
        # plaintext controller: with User:ANONYMOUS a super user, any local process could
        # rewrite the ACLs through it.
        "listener.name.controller.ssl.client.auth": "required",
        "listener.name.controller.ssl.keystore.type": "PEM",
        "listener.name.controller.ssl.keystore.location": str(keystore),
        "listener.name.controller.ssl.truststore.type": "PEM",
        "listener.name.controller.ssl.truststore.location": str(ca),
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": f"User:{sec.ADMIN_USER};User:{sec.BROKER_USER};User:CN={sec.BROKER_CN}",
    }


def properties_text(props: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in props.items())


def new_cluster_id() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()


def write_compose_files(
    out: Path,
    *,
    host: str,
    port: int,
    controller_port: int,
    data_dir: str,
    owner: int | None,
    nodes: int = 1,
) -> list[Path]:
    """What the secured Kafka of docker-compose.yml needs, in ``out`` (mounted at the same
    path in every container): the CA, the broker's keystore (its name and ``localhost`` in
    the certificate), the broker's and the administrator's passwords, a cluster id,
    server.properties, the administrator's client file for the project's services
    (``client.toml``) and for Kafka's own tools (``admin.properties``). Kept when present,
    so re-running changes nothing. Every file is 0600; ``owner`` (the Kafka image's user) owns
    them so the broker can read them. With ``nodes`` > 1 (the three-node profile), the nodes
    are ``<host>-1`` .. ``<host>-N``, node i on ports ``port + 2(i-1)`` (client) and the next
    (controller), each with its own ``server-<i>.properties`` (:func:`cluster_node_properties`),
    sharing the CA, keystore, passwords and cluster id."""
    out.mkdir(parents=True, exist_ok=True)
    names = [host] if nodes == 1 else [f"{host}-{i}" for i in range(1, nodes + 1)]
    keystore = sec.ensure_broker_keystore(out, (*names, "localhost", "127.0.0.1"))
    passwords = {}
    for user in (sec.BROKER_USER, sec.ADMIN_USER):
        path = out / f"{user}.password"
        if not path.exists():
            sec.write_private(path, sec.new_password().encode())
        passwords[user] = sec.read_secret(path, f"password file of {user}")
    if not (out / "cluster-id").exists():
        sec.write_private(out / "cluster-id", new_cluster_id().encode())
    props = broker_properties(
        listen=f":{port}",
        advertised=f"{host}:{port}",
        controller=f"{host}:{controller_port}",
        data_dir=data_dir,
        keystore=keystore,
        ca=out / "ca.pem",
        broker_password=passwords[sec.BROKER_USER],
    )
    if nodes > 1:
        for i in range(1, nodes + 1):
            node_props = cluster_node_properties(
                node=i,
                nodes=nodes,
                base_port=port,
                data_dir=data_dir,
                hosts=names,
                keystore=keystore,
                ca=out / "ca.pem",
                broker_password=passwords[sec.BROKER_USER],
            )
            sec.write_private(out / f"server-{i}.properties", properties_text(node_props).encode())
        bootstrap = ",".join(f"{names[i - 1]}:{cluster_ports(port, i)[0]}" for i in range(1, nodes + 1))
    else:
        sec.write_private(out / "server.properties", properties_text(props).encode())
        bootstrap = f"{host}:{port}"
    admin = sec.ClientSecurity(
        protocol="SASL_SSL",
        mechanism="SCRAM-SHA-512",
        username=sec.ADMIN_USER,
        password=passwords[sec.ADMIN_USER],
        cafile=out / "ca.pem",
    )
    client = sec.client_file_text(bootstrap, admin, out / f"{sec.ADMIN_USER}.password")
    sec.write_private(out / sec.CLIENT_FILE, client.encode())
    tools = (
        "security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n"
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{sec.ADMIN_USER}" password="{passwords[sec.ADMIN_USER]}";\n'
        f"ssl.truststore.type=PEM\nssl.truststore.location={out / 'ca.pem'}\n"
    )
    sec.write_private(out / "admin.properties", tools.encode())
    files = sorted(p for p in out.iterdir() if p.is_file())
    for path in files:
        os.chmod(path, 0o600)
        if owner is not None:
            os.chown(path, owner, owner)
    if owner is not None:
        os.chown(out, owner, owner)
    return files


@dataclass(frozen=True)
class BrokerStatus:
    bootstrap: str
    managed: bool
    running: bool
    pid: int | None
    answering: bool
    topics: int | None
    data_dir: str | None
    version: str | None
    security: str = "PLAINTEXT"  # what this machine's clients use: SASL_SSL as <user>, or PLAINTEXT
    problem: str | None = None  # why it does not answer, when a client error says so

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _stored_password(security_dir: Path, user: str) -> str:
    """``user``'s SCRAM password, kept 0600 in the broker's security folder (made once)."""
    path = security_dir / f"{user}.password"
    if path.exists():
        return sec.read_secret(path, f"password file of {user}")
    password = sec.new_password()
    sec.write_private(path, password.encode())
    return password


def _admin_security(security_dir: Path, client_file: Path) -> sec.ClientSecurity:
    """How this machine's clients log in to a local broker or cluster: as its administrator."""
    return sec.ClientSecurity(
        protocol="SASL_SSL",
        mechanism="SCRAM-SHA-512",
        username=sec.ADMIN_USER,
        password=_stored_password(security_dir, sec.ADMIN_USER),
        cafile=security_dir / "ca.pem",
        source=str(client_file),
    )


class LocalBroker:
    """The project's own broker on loopback. Every method is safe to call repeatedly."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.version = settings.local_kafka_version
        self.home = settings.paths_cache_dir / f"kafka-{self.version}"
        self.libs = self.home / "libs"
        self.run_dir = settings.local_run_dir
        self.data_dir = self.run_dir / "data"
        self.logs_dir = self.run_dir / "logs"
        self.pid_file = self.run_dir / "broker.pid"
        self.bootstrap = f"127.0.0.1:{settings.local_port}"

    # -- jars ------------------------------------------------------------------------------
    def ensure_jars(self) -> Path:
        marker = self.libs / ".complete"
        if marker.exists():
            return self.libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError(
                "Maven ('mvn') is not installed; it fetches Kafka's jars. Install Maven "
                "(e.g. 'apt-get install maven') or set KAFKA_BOOTSTRAP_SERVERS to an existing cluster"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "pom.xml").write_text(POM_TEMPLATE.format(version=self.version))
        staging = self.home / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [mvn, "-q", "-B", "dependency:copy-dependencies", f"-DoutputDirectory={staging}"]
        proc = subprocess.run(cmd, cwd=self.home, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise BrokerError(
                f"could not download Apache Kafka {self.version} jars with Maven "
                f"(exit {proc.returncode}): {' | '.join(tail) or 'no output'}"
            )
        shutil.rmtree(self.libs, ignore_errors=True)
        staging.rename(self.libs)
        marker.write_text(self.version)
        return self.libs

    # -- process ---------------------------------------------------------------------------
    def _pid(self) -> int | None:
        return _kafka_pid(self.pid_file, self.run_dir)

    def answering(self, timeout_s: float = 3.0) -> int | None:
        """Number of topics when a metadata request answers, else None."""
        return metadata_topic_count(self.bootstrap, timeout_s, settings=self.settings)

    def status(self) -> BrokerStatus:
        pid = self._pid()
        topics, problem = probe(self.settings, self.bootstrap) if pid else (None, None)
        return BrokerStatus(
            bootstrap=self.bootstrap,
            managed=True,
            running=pid is not None,
            pid=pid,
            answering=topics is not None,
            topics=topics,
            data_dir=str(self.run_dir),
            version=self.version,
            security=_describe_security(self.settings, self.bootstrap),
            problem=problem,
        )

    def _check_java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise BrokerError(
                "Java is not installed; the local Kafka broker needs Java 17 or newer "
                "(e.g. 'apt-get install openjdk-17-jre-headless') or set KAFKA_BOOTSTRAP_SERVERS"
            )
        out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
        try:
            major = int(out.split('"')[1].split(".")[0])
        except (IndexError, ValueError):
            major = 0
        if major and major < 17:
            raise BrokerError(f"Java {major} found; Kafka {self.version} needs Java 17 or newer")
        return java

    @staticmethod
    def _port_free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    # -- security ----------------------------------------------------------------------------
    @property
    def security_dir(self) -> Path:
        return self.run_dir / "security"

    @property
    def client_file(self) -> Path:
        return self.run_dir / sec.CLIENT_FILE

    def _formatted(self) -> bool:
        return (self.data_dir / "meta.properties").exists()

    def _formatted_secured(self) -> bool:
        """The storage holds the broker's and the administrator's SCRAM credentials (it was
        formatted secured); a plaintext-formatted storage has none, and a SASL listener on it
        could never let anyone in."""
        return (self.security_dir / "formatted-with-scram").exists()

    def needs_fresh_for_security(self) -> bool:
        return self._formatted() and not self._formatted_secured()

    def _password(self, user: str) -> str:
        return _stored_password(self.security_dir, user)

    def admin_security(self) -> sec.ClientSecurity:
        return _admin_security(self.security_dir, self.client_file)

    def _write_client_file(self, insecure: bool) -> None:
        if insecure:
            security = sec.ClientSecurity(source="insecure local broker")
            text = sec.client_file_text(self.bootstrap, security, None)
        else:
            text = sec.client_file_text(
                self.bootstrap, self.admin_security(), self.security_dir / f"{sec.ADMIN_USER}.password"
            )
        sec.write_private(self.client_file, text.encode())
        sec.register_local_broker(self.settings.local_port, self.client_file)

    def _write_config(self, insecure: bool) -> Path:
        s = self.settings
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        ctrl = f"127.0.0.1:{s.local_controller_port}"
        if insecure:
            props = broker_properties(listen=self.bootstrap, controller=ctrl, data_dir=str(self.data_dir))
        else:
            keystore = sec.ensure_broker_keystore(self.security_dir, ("127.0.0.1", "localhost"))
            props = broker_properties(
                listen=self.bootstrap,
                controller=ctrl,
                data_dir=str(self.data_dir),
                keystore=keystore,
                ca=self.security_dir / "ca.pem",
                broker_password=self._password(sec.BROKER_USER),
            )
        path = self.run_dir / "server.properties"
        # 0600: the broker's own SCRAM password is in its JAAS line
        sec.write_private(path, properties_text(props).encode())
        os.chmod(self.run_dir, 0o700)
        (self.run_dir / "log4j2.yaml").write_text(LOG4J2_YAML)
        return path

    def _log_tail(self, lines: int = 8) -> str:
        for name in ("server.log", "stdout.log"):
            path = self.logs_dir / name
            if path.exists():
                text = path.read_text(errors="replace").strip().splitlines()
                errors = [ln for ln in text if " ERROR " in ln or "Exception" in ln]
                return " | ".join((errors or text)[-lines:])[-1500:]
        return "no broker log written"

    def _format(
        self, java: str, classpath: str, config: Path, insecure: bool, cluster_id: str | None = None
    ) -> None:
        cluster_id = cluster_id or new_cluster_id()
        cmd = [
            java,
            "-cp",
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            # '=': about one random id in 64 starts with '-', which '-t <id>' reads as an option
            f"--cluster-id={cluster_id}",
            "-c",
            str(config),
            "--ignore-formatted",
        ]
        if not insecure:
            for user in (sec.BROKER_USER, sec.ADMIN_USER):
                password = self._password(user)
                cmd += [
                    "--add-scram",
                    f"SCRAM-SHA-512=[name={user},iterations={sec.SCRAM_ITERATIONS},password={password}]",
                ]
        # its stdout lists each user's salt and keys: never shown, never logged
        fmt = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if fmt.returncode != 0:
            tail = [
                ln for ln in (fmt.stdout + fmt.stderr).strip().splitlines() if "password" not in ln.lower()
            ]
            raise BrokerError(f"formatting the local Kafka storage failed: {' | '.join(tail[-3:])}")
        if not insecure:
            sec.write_private(self.security_dir / "formatted-with-scram", b"")

    def start(self, *, insecure: bool = False, fresh: bool = False) -> BrokerStatus:
        """Start the broker (secured unless ``insecure``) and wait until it answers; nothing
        is changed while it runs. ``fresh`` deletes its data first (every topic)."""
        if not self.settings.uses_local_broker:
            raise ConfigError(
                "KAFKA_BOOTSTRAP_SERVERS is set, so the configured cluster is used and no local "
                "broker is started; unset it to run the local broker"
            )
        if self._pid() is not None:
            if self.answering(timeout_s=10) is not None:
                return self.status()
            self._wait_ready(self._pid())
            return self.status()
        java = self._check_java()
        for port in (self.settings.local_port, self.settings.local_controller_port):
            if not self._port_free(port):
                raise port_taken(
                    port,
                    "",
                    "choose other ports with REFERRAL_BROKER_LOCAL_PORT / REFERRAL_BROKER_LOCAL_CONTROLLER_PORT",
                    mine=self.run_dir,
                )
        if fresh:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            (self.security_dir / "formatted-with-scram").unlink(missing_ok=True)
        if not insecure and self.needs_fresh_for_security():
            raise BrokerError(
                f"the local broker's data ({self.data_dir}) was formatted without security, so it "
                "holds no credentials; start it with --fresh (deletes its topics) or --insecure"
            )
        libs = self.ensure_jars()
        config = self._write_config(insecure)
        classpath = f"{libs}/*"
        if not self._formatted():
            self._format(java, classpath, config, insecure)
        self._write_client_file(insecure)
        cmd = [
            java,
            f"-Xmx{self.settings.local_heap}",
            f"-Xms{self.settings.local_heap}",
            *JVM_FLAGS,
            f"-Dkafka.logs.dir={self.logs_dir}",
            f"-Dlog4j2.configurationFile={self.run_dir / 'log4j2.yaml'}",
            "-cp",
            classpath,
            "kafka.Kafka",
            str(config),
        ]
        with open(self.logs_dir / "stdout.log", "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.run_dir,
            )
        self.pid_file.write_text(str(proc.pid))
        self._wait_ready(proc.pid, proc)
        return self.status()

    def _wait_ready(self, pid: int | None, proc: subprocess.Popen[bytes] | None = None) -> None:
        deadline = time.monotonic() + self.settings.local_start_timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise BrokerError(
                    f"the local Kafka broker exited with code {proc.returncode} while starting: "
                    f"{self._log_tail()} (logs in {self.logs_dir})"
                )
            if self.answering(timeout_s=2) is not None:
                return
            time.sleep(0.3)
        raise BrokerError(
            f"the local Kafka broker (pid {pid}) did not answer on {self.bootstrap} within "
            f"{self.settings.local_start_timeout_s:.0f}s: {self._log_tail()} (logs in {self.logs_dir})"
        )

    def stop(self, timeout_s: float = 30.0) -> BrokerStatus:
        pid = self._pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        sec.unregister_local_broker(self.settings.local_port, self.client_file)
        return self.status()


def _kafka_pid(pid_file: Path, run_dir: Path) -> int | None:
    """The pid ``pid_file`` names while it is the Kafka JVM started from ``run_dir`` (its config
    and logs are there); a pid that was recycled, even into another broker's JVM, is not."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        if not _alive(pid):
            return None
    except PermissionError:  # another user's process: cannot be checked further
        return pid
    args = _command_line(pid)
    if args is None:  # cannot be read: cannot be checked further
        return pid
    return pid if _config_folder(args) == run_dir else None


def port_taken(port: int, what: str, other_ports: str, *, mine: Path) -> BrokerError:
    """The error for a local port something already listens on, naming the holder when it
    can be told: most often it is one of this project's own brokers, started with another cache
    folder (another ``HOME`` or ``REFERRAL_BROKER_CACHE_DIR``), as a local cluster, or having
    lost its pid file, and then the command that stops it is the useful answer. ``mine``: the
    folder the broker being started runs from."""
    pid = listening_pid(port)
    where = f"port {port} on 127.0.0.1{what}"
    if pid is None:
        return BrokerError(f"{where} is taken by another program; free it or {other_ports}")
    folder = kafka_folder(pid)
    if folder is None:
        name = _process_name(pid)
        return BrokerError(f"{where} is taken by another program (pid {pid}{name}); free it or {other_ports}")
    if folder == mine:
        return BrokerError(
            f"{where} is taken by this broker's own Kafka process (pid {pid}), which has lost its "
            f"pid file; stop it with 'kill {pid}' and start again"
        )
    found = _project_broker(folder)
    if found is None:
        return BrokerError(
            f"{where} is taken by a Kafka broker run from {folder} (pid {pid}); stop it or {other_ports}"
        )
    cache, base_port = found
    command = (
        f"REFERRAL_BROKER_CACHE_DIR={shlex.quote(str(cache))} REFERRAL_BROKER_LOCAL_PORT={base_port} "
        "referral-broker kafka stop"
    )
    return BrokerError(
        f"{where} is taken by this project's local Kafka broker run from {folder} (pid {pid}); "
        f"stop it with '{command}', or {other_ports}"
    )


def listening_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (any local address), from ``/proc``;
    None when it cannot be told (no ``/proc``, or another user's process whose descriptors
    this user may not read)."""
    sockets: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            # local address "HEX_IP:HEX_PORT", state 0A = LISTEN, inode in column 10
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rpartition(":")[2], 16) == port:
                sockets.add(f"socket:[{cols[9]}]")
    if not sockets:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in sockets:
                        return int(proc.name)
        except OSError:  # gone, or not ours to look into
            continue
    return None


def _command_line(pid: int) -> list[str] | None:
    """The arguments ``pid`` runs with; None when ``/proc`` does not say (gone, not ours)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(arg) for arg in raw.split(b"\0") if arg]


def _process_name(pid: int) -> str:
    args = _command_line(pid)
    return f", {Path(args[0]).name}" if args else ""


def _config_folder(args: list[str]) -> Path | None:
    """The folder of the config a Kafka JVM's arguments (``... kafka.Kafka <config>``) name."""
    if "kafka.Kafka" not in args[:-1]:
        return None
    return Path(args[args.index("kafka.Kafka") + 1]).parent


def kafka_folder(pid: int) -> Path | None:
    """The folder of the config the Kafka JVM ``pid`` runs with; None for any other process."""
    args = _command_line(pid)
    return None if args is None else _config_folder(args)


def _project_broker(folder: Path) -> tuple[Path, str] | None:
    """(cache folder, REFERRAL_BROKER_LOCAL_PORT) of a folder laid out as this project lays out
    a local broker's (``<cache>/local-broker/<port>``) or a local cluster node's
    (``<cache>/local-cluster/<first port>/node-<n>``)."""
    if folder.parent.name == "local-broker" and folder.name.isdigit():
        return folder.parent.parent, folder.name
    cluster = folder.parent
    if folder.name.startswith("node-") and cluster.parent.name == "local-cluster" and cluster.name.isdigit():
        return cluster.parent.parent, cluster.name
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        if state == "Z":
            os.waitpid(pid, os.WNOHANG)
            return False
    except (OSError, ChildProcessError):
        pass
    return True


def _describe_security(settings: Settings, bootstrap: str) -> str:
    try:
        return sec.client_security(settings, bootstrap).describe()
    except ConfigError as exc:
        return f"unusable: {exc}"


def probe(settings: Settings, bootstrap: str, timeout_s: float = 5.0) -> tuple[int | None, str | None]:
    """(number of topics, None) when a metadata request answers, else (None, why not)."""
    from kafka.errors import KafkaError

    admin = None
    try:
        security = sec.client_security(settings, bootstrap)
        admin = sec.admin_with(
            settings.replace(kafka_request_timeout_ms=int(timeout_s * 1000)),
            bootstrap,
            security,
            client_id="referral-broker-probe",
        )
        return len(admin.list_topics()), None
    except (BrokerError, ConfigError) as exc:
        return None, str(exc)
    except (KafkaError, OSError) as exc:
        return None, type(exc).__name__
    finally:
        if admin is not None:
            admin.close()


def metadata_topic_count(
    bootstrap: str, timeout_s: float = 5.0, *, settings: Settings | None = None
) -> int | None:
    """Ask the cluster for metadata; the number of topics if it answers, else None. Without
    ``settings``, the default ones (the client file of a local broker at that address)."""
    return probe(settings or Settings(), bootstrap, timeout_s)[0]


def remote_status(settings: Settings) -> BrokerStatus:
    topics, problem = probe(settings, settings.bootstrap_servers)
    return BrokerStatus(
        bootstrap=settings.bootstrap_servers,
        managed=False,
        running=topics is not None,
        pid=None,
        answering=topics is not None,
        topics=topics,
        data_dir=None,
        version=None,
        security=_describe_security(settings, settings.bootstrap_servers),
        problem=problem,
    )


def ensure_broker(settings: Settings) -> str:
    """The bootstrap address to use, starting the local broker when no cluster is configured.
    A configured cluster that refuses this client's credentials, certificate or protocol
    raises that error (its own exit code); one that does not answer, 'cannot reach'."""
    if settings.uses_local_broker:
        return LocalBroker(settings).start().bootstrap
    bootstrap = settings.bootstrap_servers
    admin = sec.admin_with(settings, bootstrap, sec.client_security(settings, bootstrap))
    admin.close()
    return bootstrap


# -- a local cluster of several nodes -------------------------------------------------------------

CLUSTER_HEAP = "384m"  # three JVMs on a small shared machine: each gets a small heap


def cluster_ports(base_port: int, node: int) -> tuple[int, int]:
    """(client listener, controller listener) of node ``node`` (1-based) of a local cluster
    whose first node listens on ``base_port``: two consecutive ports per node."""
    return base_port + 2 * (node - 1), base_port + 2 * (node - 1) + 1


def cluster_node_properties(
    *,
    node: int,
    nodes: int,
    base_port: int,
    data_dir: str,
    host: str = "127.0.0.1",
    hosts: list[str] | None = None,
    keystore: Path | None = None,
    ca: Path | None = None,
    broker_password: str | None = None,
) -> dict[str, str]:
    """server.properties of node ``node`` of an ``nodes``-node KRaft cluster, every node a
    combined broker + controller with a static voter set, secured as the single node is
    (same listeners, mTLS controller, deny-by-default ACLs), with the production durability:
    internal topics replicated ``min(3, nodes)`` times, ``min.insync.replicas`` 2, no unclean
    election, and leaders moved back to their preferred node within seconds of its return.
    ``hosts`` names each node (default: all on ``host``, ports from :func:`cluster_ports`)."""
    hosts = hosts or [host] * nodes
    port, ctrl = cluster_ports(base_port, node)
    voters = ",".join(f"{i}@{hosts[i - 1]}:{cluster_ports(base_port, i)[1]}" for i in range(1, nodes + 1))
    listen_host = "" if hosts[node - 1] != "127.0.0.1" else "127.0.0.1"
    props = broker_properties(
        listen=f"{listen_host}:{port}",
        advertised=f"{hosts[node - 1]}:{port}",
        controller=f"{hosts[node - 1]}:{ctrl}",
        data_dir=data_dir,
        keystore=keystore,
        ca=ca,
        broker_password=broker_password,
    )
    props.pop("controller.quorum.bootstrap.servers")
    rf = str(min(3, nodes))
    isr = str(min(2, nodes))
    return props | {
        "node.id": str(node),
        "controller.quorum.voters": voters,
        "default.replication.factor": rf,
        "min.insync.replicas": isr,
        "offsets.topic.replication.factor": rf,
        "transaction.state.log.replication.factor": rf,
        "transaction.state.log.min.isr": isr,
        "share.coordinator.state.topic.replication.factor": rf,
        "share.coordinator.state.topic.min.isr": isr,
        "unclean.leader.election.enable": "false",
        "auto.leader.rebalance.enable": "true",
        "leader.imbalance.check.interval.seconds": "5",
        "leader.imbalance.per.broker.percentage": "0",
    }


@dataclass(frozen=True)
class NodeStatus:
    node: int
    roles: str
    bootstrap: str
    controller: str
    running: bool
    pid: int | None
    answering: bool
    leaders: int | None = None  # partitions this node leads (when the cluster answers)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ClusterStatus:
    bootstrap: str
    nodes: list[NodeStatus]
    answering: bool
    brokers: list[int]  # node ids the cluster's metadata lists as live brokers
    topics: int | None
    data_dir: str
    version: str
    security: str
    managed: bool = True
    problem: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class LocalCluster:
    """``nodes`` KRaft nodes on loopback from the same jars, each a combined broker and
    controller (static quorum of every node), node ``i`` on the ports
    :func:`cluster_ports` gives from ``settings.local_port``. One CA, one broker keystore and
    one pair of SCRAM credentials for the whole cluster; the administrator's client file is
    registered for every node's port, so any node's address (or the list) finds it."""

    def __init__(self, settings: Settings, nodes: int | None = None) -> None:
        self.settings = settings
        self.base_port = settings.local_port
        self.dir = settings.paths_cache_dir / "local-cluster" / str(self.base_port)
        self.security_dir = self.dir / "security"
        self.client_file = self.dir / sec.CLIENT_FILE
        self.version = settings.local_kafka_version
        self.heap = CLUSTER_HEAP
        self._single = LocalBroker(settings)  # the jars, Java, and the process helpers
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        found = self._recorded_nodes()
        self.nodes = nodes or found or 3
        if nodes and found and nodes != found:
            raise BrokerError(
                f"the local cluster at {self.dir} was created with {found} nodes; "
                "stop it and start with --fresh to change that"
            )
        self.bootstrap = ",".join(f"127.0.0.1:{self.port(i)}" for i in self.node_ids)

    # -- layout ------------------------------------------------------------------------------
    @property
    def node_ids(self) -> list[int]:
        return list(range(1, self.nodes + 1))

    def port(self, node: int) -> int:
        return cluster_ports(self.base_port, node)[0]

    def controller_port(self, node: int) -> int:
        return cluster_ports(self.base_port, node)[1]

    def node_dir(self, node: int) -> Path:
        return self.dir / f"node-{node}"

    def _pid_file(self, node: int) -> Path:
        return self.node_dir(node) / "broker.pid"

    def _recorded_nodes(self) -> int | None:
        try:
            return int((self.dir / "nodes").read_text().strip())
        except (OSError, ValueError):
            return None

    def exists(self) -> bool:
        return self._recorded_nodes() is not None

    def _check(self, node: int) -> None:
        if node not in self.node_ids:
            raise ConfigError(f"the local cluster has nodes 1 to {self.nodes}; there is no node {node}")

    # -- processes -----------------------------------------------------------------------------
    def pid(self, node: int) -> int | None:
        return _kafka_pid(self._pid_file(node), self.node_dir(node))

    def _password(self, user: str) -> str:
        return _stored_password(self.security_dir, user)

    def admin_security(self) -> sec.ClientSecurity:
        return _admin_security(self.security_dir, self.client_file)

    def _insecure(self) -> bool:
        return (self.dir / "insecure").exists()

    def _write_node_config(self, node: int) -> Path:
        d = self.node_dir(node)
        (d / "data").mkdir(parents=True, exist_ok=True)
        (d / "logs").mkdir(parents=True, exist_ok=True)
        common: dict[str, object] = {}
        if not self._insecure():
            common = {
                "keystore": sec.ensure_broker_keystore(self.security_dir, ("127.0.0.1", "localhost")),
                "ca": self.security_dir / "ca.pem",
                "broker_password": self._password(sec.BROKER_USER),
            }
        props = cluster_node_properties(
            node=node, nodes=self.nodes, base_port=self.base_port, data_dir=str(d / "data"), **common  # type: ignore[arg-type]
        )
        path = d / "server.properties"
        sec.write_private(path, properties_text(props).encode())
        os.chmod(d, 0o700)
        (d / "log4j2.yaml").write_text(LOG4J2_YAML)
        return path

    def _format(self, java: str, classpath: str, node: int, config: Path) -> None:
        cluster_id = sec.read_secret(self.dir / "cluster-id", "cluster id")
        cmd = [java, "-cp", classpath, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}"]
        cmd += ["-c", str(config), "--ignore-formatted"]
        if not self._insecure():
            for user in (sec.BROKER_USER, sec.ADMIN_USER):
                cmd += [
                    "--add-scram",
                    f"SCRAM-SHA-512=[name={user},iterations={sec.SCRAM_ITERATIONS},"
                    f"password={self._password(user)}]",
                ]
        fmt = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if fmt.returncode != 0:
            tail = [ln for ln in (fmt.stdout + fmt.stderr).strip().splitlines() if "password" not in ln.lower()]
            raise BrokerError(f"formatting node {node} of the local cluster failed: {' | '.join(tail[-3:])}")

    def _launch(self, node: int) -> None:
        self._check(node)
        if self.pid(node) is not None:
            return
        for port in cluster_ports(self.base_port, node):
            if not LocalBroker._port_free(port):
                raise port_taken(
                    port,
                    f" (node {node} of the local cluster)",
                    "choose another first port with REFERRAL_BROKER_LOCAL_PORT",
                    mine=self.node_dir(node),
                )
        java = self._single._check_java()
        classpath = f"{self._single.ensure_jars()}/*"
        config = self._write_node_config(node)
        d = self.node_dir(node)
        if not (d / "data" / "meta.properties").exists():
            self._format(java, classpath, node, config)
        cmd = [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            *JVM_FLAGS,
            f"-Dkafka.logs.dir={d / 'logs'}",
            f"-Dlog4j2.configurationFile={d / 'log4j2.yaml'}",
            "-cp",
            classpath,
            "kafka.Kafka",
            str(config),
        ]
        with open(d / "logs" / "stdout.log", "ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=d
            )
        self._pid_file(node).write_text(str(proc.pid))
        self._procs[node] = proc

    def _write_client_file(self) -> None:
        if self._insecure():
            text = sec.client_file_text(self.bootstrap, sec.ClientSecurity(source="insecure local cluster"), None)
        else:
            text = sec.client_file_text(
                self.bootstrap, self.admin_security(), self.security_dir / f"{sec.ADMIN_USER}.password"
            )
        sec.write_private(self.client_file, text.encode())
        for node in self.node_ids:
            sec.register_local_broker(self.port(node), self.client_file)

    def start(self, *, insecure: bool = False, fresh: bool = False) -> ClusterStatus:
        """Start every node that is not running and wait until the cluster lists all of them as
        live brokers. ``fresh`` deletes the cluster's data and credentials first."""
        if not self.settings.uses_local_broker:
            raise ConfigError(
                "KAFKA_BOOTSTRAP_SERVERS is set, so the configured cluster is used and no local "
                "cluster is started; unset it to run the local cluster"
            )
        if fresh:
            self.stop()
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.exists() and self._insecure() != insecure:
            raise BrokerError(
                f"the local cluster at {self.dir} was created {'without' if self._insecure() else 'with'} "
                "security; start it with --fresh (deletes its topics) to change that"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if not self.exists():
            if insecure:
                (self.dir / "insecure").write_text("")
            sec.write_private(self.dir / "cluster-id", new_cluster_id().encode())
            (self.dir / "nodes").write_text(str(self.nodes))
        self._write_client_file()
        self._procs = {}
        self._single.ensure_jars()
        if not insecure:  # the CA, keystore and passwords once, before the nodes start in parallel
            sec.ensure_broker_keystore(self.security_dir, ("127.0.0.1", "localhost"))
            for user in (sec.BROKER_USER, sec.ADMIN_USER):
                self._password(user)
        with ThreadPoolExecutor(self.nodes) as pool:  # formatting takes seconds of JVM start each
            list(pool.map(self._launch, self.node_ids))
        self.wait_for_brokers(self.node_ids)
        return self.status()

    def start_node(self, node: int) -> ClusterStatus:
        """Start one stopped node and wait until the cluster lists it as a live broker."""
        self._check(node)
        if not self.exists():
            raise BrokerError("there is no local cluster; start one with 'kafka start --nodes 3'")
        self._procs = {}
        self._launch(node)
        self.wait_for_brokers([node])
        return self.status()

    def stop_node(self, node: int, *, kill: bool = False, timeout_s: float = 30.0) -> None:
        """Stop one node: SIGTERM (a controlled shutdown that hands its leaderships over), or
        SIGKILL at once with ``kill`` (a crash). Its data stays."""
        self._check(node)
        pid = self.pid(node)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL if kill else signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        self._pid_file(node).unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop every node (the data stays in the cache folder)."""
        if not self.exists():
            return
        for node in reversed(self.node_ids):
            self.stop_node(node)
        for node in self.node_ids:
            sec.unregister_local_broker(self.port(node), self.client_file)

    def _admin(self, timeout_s: float) -> Any:
        security = sec.read_client_file(self.client_file)
        return sec.admin_with(
            self.settings.replace(kafka_request_timeout_ms=int(timeout_s * 1000)),
            self.bootstrap,
            security,
            client_id="referral-broker-cluster-probe",
        )

    def live_brokers(self, timeout_s: float = 5.0) -> list[int]:
        """Node ids the cluster's metadata lists as live brokers (empty when none answers)."""
        from kafka.errors import KafkaError

        admin = None
        try:
            admin = self._admin(timeout_s)
            return sorted(int(b["broker_id"]) for b in admin.describe_cluster()["brokers"] if not b.get("is_fenced"))
        except (BrokerError, ConfigError, KafkaError, OSError):
            return []
        finally:
            if admin is not None:
                admin.close()

    def wait_for_brokers(self, nodes: list[int]) -> None:
        deadline = time.monotonic() + self.settings.local_start_timeout_s * 2
        while time.monotonic() < deadline:
            for node in nodes:
                proc = self._procs.get(node)
                if proc is not None and proc.poll() is not None:
                    self._pid_file(node).unlink(missing_ok=True)
                    raise BrokerError(
                        f"node {node} of the local cluster exited with code {proc.returncode} while "
                        f"starting: {self._log_tail(node)} (logs in {self.node_dir(node) / 'logs'})"
                    )
            if set(nodes) <= set(self.live_brokers(timeout_s=3)):
                return
            time.sleep(0.5)
        raise BrokerError(
            f"the local cluster did not list nodes {nodes} as live brokers within "
            f"{self.settings.local_start_timeout_s * 2:.0f}s: {self._log_tail(nodes[0])}"
        )

    def _log_tail(self, node: int, lines: int = 6) -> str:
        for name in ("server.log", "stdout.log"):
            path = self.node_dir(node) / "logs" / name
            if path.exists():
                text = path.read_text(errors="replace").strip().splitlines()
                errors = [ln for ln in text if " ERROR " in ln or "Exception" in ln]
                return " | ".join((errors or text)[-lines:])[-1500:]
        return "no log written"

    def leaders(self, topics: list[str] | None = None, timeout_s: float = 10.0) -> dict[tuple[str, int], int]:
        """(topic, partition) -> the node leading it (-1 while it has no leader)."""
        admin = self._admin(timeout_s)
        try:
            found = admin.describe_topics(topics)
        finally:
            admin.close()
        return {
            (t["name"], int(p.get("partition_index", p.get("partition", -1)))): int(
                p.get("leader_id", p.get("leader", -1)) if p.get("leader_id", p.get("leader")) is not None else -1
            )
            for t in found
            for p in t.get("partitions") or []
        }

    def status(self) -> ClusterStatus:
        brokers = self.live_brokers() if self.exists() else []
        topics: int | None = None
        led: dict[int, int] = {}
        problem = None
        if brokers:
            try:
                leaders = self.leaders()
                topics = len({t for t, _ in leaders})
                for node in leaders.values():
                    led[node] = led.get(node, 0) + 1
            except Exception as exc:
                problem = type(exc).__name__
        elif self.exists():
            problem = "no node answers"
        else:
            problem = "no local cluster was created here"
        nodes = [
            NodeStatus(
                node=n,
                roles="broker,controller",
                bootstrap=f"127.0.0.1:{self.port(n)}",
                controller=f"127.0.0.1:{self.controller_port(n)}",
                running=self.pid(n) is not None,
                pid=self.pid(n),
                answering=n in brokers,
                leaders=led.get(n, 0) if brokers else None,
            )
            for n in self.node_ids
        ]
        return ClusterStatus(
            bootstrap=self.bootstrap,
            nodes=nodes,
            answering=bool(brokers),
            brokers=brokers,
            topics=topics,
            data_dir=str(self.dir),
            version=self.version,
            security="PLAINTEXT" if self._insecure() else f"SASL_SSL as {sec.ADMIN_USER}",
            problem=problem,
        )
