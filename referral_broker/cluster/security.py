"""Kafka security for the project's clients and its local broker.

Three things live here:

* **Client settings** (:class:`ClientSecurity`, :func:`client_security`): the conventional
  Kafka settings (``security.protocol``, ``sasl.mechanism``, username, password, ``ssl.cafile``,
  optional client certificate and key) from the settings, or, when none are configured and the
  bootstrap address is a local broker this machine runs, from the client file that broker
  wrote (``<cache>/local-broker/<port>/client.toml``). Every producer, consumer and admin client
  is built with :meth:`ClientSecurity.kafka_kwargs`.
* **The local PKI**: a CA and the broker's certificate made with ``cryptography`` (unencrypted
  PKCS#8 PEM, mode 0600: Java 17 cannot read cryptography's encrypted PKCS#8).
* **Errors that name their cause**: kafka-python reports every TLS or SASL failure at connect
  time as one ``KafkaTimeoutError`` after retrying until its bootstrap deadline; the cause is
  only in its log. :func:`connecting` reads that log while a client is built, stops the
  bootstrap at the first failure that cannot heal by retrying (bad credentials, untrusted
  certificate, wrong protocol) and raises one line with its own exit code.

No password is ever logged or put in an error message; usernames are not personal data here
(they name organisations and services).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import secrets
import stat
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from referral_broker.config import Settings
from referral_broker.errors import (
    BrokerAuthenticationError,
    BrokerError,
    BrokerProtocolError,
    BrokerTrustError,
    ConfigError,
    NotAuthorisedError,
)

ADMIN_USER = "admin"  # the local broker's administrator: a super user
BROKER_USER = "kafka-broker"  # the broker's own SCRAM identity on its inter-broker listener
BROKER_CN = "kafka-broker"  # the broker certificate's subject; User:CN=kafka-broker on the controller
PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_SSL")
MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256")
SCRAM_ITERATIONS = 8192
CLIENT_FILE = "client.toml"


# -- files with secrets -------------------------------------------------------------------------
def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only (0600), atomically; the folder becomes 0700."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_private(path: Path, what: str) -> None:
    """Refuse a secret file that group or others may read or write, or that is missing."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"the {what} {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"the {what} {path} is open to group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run 'chmod 600 {path}'"
        )


def read_secret(path: Path, what: str) -> str:
    check_private(path, what)
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise ConfigError(f"the {what} {path} is empty")
    return value


# -- client settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientSecurity:
    """How a client authenticates to the cluster. ``source`` says where it was found."""

    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    source: str = "default"

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.protocol == "SASL_SSL"

    def kafka_kwargs(self) -> dict[str, Any]:
        """The kafka-python keyword arguments (the same for producers, consumers, admins)."""
        kw: dict[str, Any] = {"security_protocol": self.protocol}
        if self.tls:
            kw["ssl_cafile"] = str(self.cafile) if self.cafile else None
            kw["ssl_check_hostname"] = True
            if self.certfile:
                kw["ssl_certfile"] = str(self.certfile)
                kw["ssl_keyfile"] = str(self.keyfile)
        if self.sasl:
            kw["sasl_mechanism"] = self.mechanism
            kw["sasl_plain_username"] = self.username
            kw["sasl_plain_password"] = self.password
        return kw

    def describe(self) -> str:
        who = f" as {self.username}" if self.sasl else ""
        return f"{self.protocol}{who}"


def _build(
    *,
    protocol: str,
    mechanism: str | None,
    username: str | None,
    password: str | None,
    password_file: Path | None,
    cafile: Path | None,
    certfile: Path | None,
    keyfile: Path | None,
    source: str,
) -> ClientSecurity:
    protocol = protocol.strip().upper()
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"{source}: security.protocol must be one of {', '.join(PROTOCOLS)}, not '{protocol}'"
        )
    if protocol != "SASL_SSL" and (username or password or password_file):
        raise ConfigError(f"{source}: a SASL username or password is set but security.protocol is {protocol}")
    if protocol == "PLAINTEXT" and (cafile or certfile or keyfile):
        raise ConfigError(f"{source}: TLS files are set but security.protocol is PLAINTEXT")
    if protocol == "SASL_SSL":
        mechanism = (mechanism or "SCRAM-SHA-512").strip().upper()
        if mechanism not in MECHANISMS:
            raise ConfigError(
                f"{source}: sasl.mechanism must be one of {', '.join(MECHANISMS)}, not '{mechanism}'"
            )
        if not username:
            raise ConfigError(f"{source}: security.protocol SASL_SSL needs a username (sasl.username)")
        if password and password_file:
            raise ConfigError(
                f"{source}: give the password either in KAFKA_SASL_PASSWORD or in a file, not both"
            )
        if password_file:
            password = read_secret(password_file, "SASL password file")
        if not password:
            raise ConfigError(
                f"{source}: no password for user {username}: set KAFKA_SASL_PASSWORD or sasl.password_file"
            )
    else:
        mechanism = None
    for path, what in ((cafile, "CA file (ssl.cafile)"), (certfile, "client certificate (ssl.certfile)")):
        if path is not None and not path.is_file():
            raise ConfigError(f"{source}: the {what} {path} does not exist")
    if bool(certfile) != bool(keyfile):
        raise ConfigError(f"{source}: ssl.certfile and ssl.keyfile go together")
    if keyfile is not None:
        check_private(keyfile, "client key file (ssl.keyfile)")
    return ClientSecurity(
        protocol=protocol,
        mechanism=mechanism,
        username=username or None,
        password=password or None,
        cafile=cafile,
        certfile=certfile,
        keyfile=keyfile,
        source=source,
    )


def _explicit(settings: Settings) -> ClientSecurity | None:
    s = settings
    protocol = s.kafka_security_protocol
    if not protocol:
        if s.kafka_sasl_username:
            protocol = "SASL_SSL"
        elif s.kafka_ssl_cafile or s.kafka_ssl_certfile:
            protocol = "SSL"
        else:
            return None
    return _build(
        protocol=protocol,
        mechanism=s.kafka_sasl_mechanism,
        username=s.kafka_sasl_username,
        password=s.kafka_sasl_password,
        password_file=s.kafka_sasl_password_file,
        cafile=s.kafka_ssl_cafile,
        certfile=s.kafka_ssl_certfile,
        keyfile=s.kafka_ssl_keyfile,
        source="settings",
    )


def read_client_file(path: Path) -> ClientSecurity:
    """The security settings in a client file such as the local broker's ``client.toml``
    (the same ``[kafka]`` keys as the settings file)."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the Kafka client file {path}: {exc}") from None
    kafka = doc.get("kafka", {})

    def p(key: str) -> Path | None:
        return Path(kafka[key]) if kafka.get(key) else None

    return _build(
        protocol=str(kafka.get("security_protocol", "PLAINTEXT")),
        mechanism=kafka.get("sasl_mechanism"),
        username=kafka.get("sasl_username"),
        password=None,
        password_file=p("sasl_password_file"),
        cafile=p("ssl_cafile"),
        certfile=p("ssl_certfile"),
        keyfile=p("ssl_keyfile"),
        source=str(path),
    )


def local_client_file(settings: Settings, bootstrap: str) -> Path | None:
    """The client file of a local broker this machine runs at ``bootstrap`` (one loopback
    address, or a list of them: a local cluster registers its file for every node's port), if
    it wrote one."""
    first = bootstrap.strip().split(",")[0]
    host, _, port = first.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]") or not port.isdigit():
        return None
    path = settings.paths_cache_dir / "local-broker" / port / CLIENT_FILE
    if path.is_file():
        return path
    try:  # a broker started with another cache folder (a test's own) registered its file
        pointed = Path(index_path(int(port)).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    return pointed if pointed.is_file() else None


def index_path(port: int) -> Path:
    """Where a local broker on ``port`` records its client file, whatever cache folder it was
    started with: only one broker can listen on a port, so the last one started there wins."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "referral-broker"
    return base / "local-broker-index" / str(port)


def register_local_broker(port: int, client_file: Path) -> None:
    write_private(index_path(port), str(client_file).encode())


def unregister_local_broker(port: int, client_file: Path) -> None:
    """Forget the pointer when it is this broker's (a stopped broker's file must not be
    found for another broker that later listens on the same port)."""
    path = index_path(port)
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8").strip() == str(client_file):
            path.unlink()


_remembered: dict[str, ClientSecurity] = {}
_remembered_lock = threading.Lock()


def remember(bootstrap: str, security: ClientSecurity) -> None:
    """Use ``security`` for ``bootstrap`` in this process whenever the settings name none (the
    test suite does this for a secured cluster given in the environment)."""
    with _remembered_lock:
        _remembered[bootstrap] = security


def client_security(settings: Settings, bootstrap: str | None = None) -> ClientSecurity:
    """The security every client of ``settings`` uses against ``bootstrap``: the configured
    settings if any, else what this process was told for that address, else the local broker's
    client file, else PLAINTEXT."""
    explicit = _explicit(settings)
    if explicit is not None:
        return explicit
    bootstrap = bootstrap or settings.bootstrap_servers
    with _remembered_lock:
        known = _remembered.get(bootstrap)
    if known is not None:
        return known
    path = local_client_file(settings, bootstrap)
    if path is not None:
        return read_client_file(path)
    return ClientSecurity(source="no security configured")


def client_file_text(bootstrap: str, security: ClientSecurity, password_file: Path | None) -> str:
    """A client file that :func:`read_client_file` and ``load_settings`` both read."""
    lines = [
        "# Kafka client settings written by 'referral-broker kafka start'. Point",
        "# REFERRAL_BROKER_CONFIG at this file to use them; the password stays in its own file.",
        "[kafka]",
        f'bootstrap_servers = "{bootstrap}"',
        f'security_protocol = "{security.protocol}"',
    ]
    if security.sasl:
        lines += [f'sasl_mechanism = "{security.mechanism}"', f'sasl_username = "{security.username}"']
        if password_file is not None:
            lines.append(f'sasl_password_file = "{password_file}"')
    if security.tls and security.cafile:
        lines.append(f'ssl_cafile = "{security.cafile}"')
    return "\n".join(lines) + "\n"


# -- the local PKI ------------------------------------------------------------------------------
def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ensure_ca(folder: Path) -> tuple[Any, Any]:
    """The local CA (``ca.pem``, ``ca-key.pem``), created on first use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = folder / "ca.pem", folder / "ca-key.pem"
    if cert_path.is_file() and key_path.is_file():
        check_private(key_path, "local CA key")
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if cert.not_valid_after_utc > _now() + dt.timedelta(days=30):
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "referral-broker local CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _pkcs8(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(cert_path, 0o644)  # the CA certificate is public: clients on this machine read it
    return cert, key


def _pkcs8(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def issue_certificate(
    ca: tuple[Any, Any], common_name: str, *, hosts: tuple[str, ...] = (), days: int = 825
) -> tuple[bytes, bytes]:
    """(PKCS#8 key PEM, certificate PEM) signed by ``ca``, for server and client use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _pkcs8(key), cert.public_bytes(serialization.Encoding.PEM)


def ensure_broker_keystore(folder: Path, hosts: tuple[str, ...]) -> Path:
    """``broker.pem``: the broker's key, certificate and the CA in one PEM file (0600), as
    Kafka's ``ssl.keystore.type=PEM`` reads it; renewed 30 days before it expires or when the
    CA changed."""
    from cryptography import x509

    ca = ensure_ca(folder)
    path = folder / "broker.pem"
    ca_pem = (folder / "ca.pem").read_bytes()
    if path.is_file():
        check_private(path, "broker keystore")
        data = path.read_bytes()
        certs = x509.load_pem_x509_certificates(data)
        if (
            data.endswith(ca_pem)
            and certs
            and certs[0].issuer == ca[0].subject
            and certs[0].not_valid_after_utc > _now() + dt.timedelta(days=30)
        ):
            return path
    key_pem, cert_pem = issue_certificate(ca, BROKER_CN, hosts=hosts)
    write_private(path, key_pem + cert_pem + ca_pem)
    return path


def new_password() -> str:
    return secrets.token_urlsafe(24)


# -- errors that name their cause ----------------------------------------------------------------
class _Capture(logging.Handler):
    """Collects kafka-python's connection failures while a client is being built.

    Once a failure that retrying cannot heal has been seen (a refused login, an untrusted
    certificate, the wrong protocol; or, twice, a connection dropped by the broker after it
    answered ApiVersions, which is how Kafka ends an unknown user's login) it closes the
    bootstrap at its next "Bootstrap ..." log call (made by ``_do_bootstrap``, found on that
    call's stack): the constructor then gives up at once instead of retrying until its deadline.

    The loggers are process-wide, so it counts only records from the thread building the client
    and from threads started since (the client's own IO thread): another client's connections
    dropped by a broker that died are not this login's refusal."""

    def __init__(self, protocol: str) -> None:
        super().__init__(logging.WARNING)
        self.protocol = protocol
        self.kinds: list[str] = []
        # Thread objects, not idents: an ident is reused once its thread ends
        self.others = set(threading.enumerate()) - {threading.current_thread()}

    def verdict(self) -> str | None:
        for kind in ("auth", "trust", "protocol"):
            if kind in self.kinds:
                return kind
        dropped = self.kinds.count("dropped-after-versions")
        if dropped >= 2 or (dropped and "dropped" in self.kinds):
            # SASL_SSL: the login was refused (unknown user); SSL or PLAINTEXT: the port wants SASL
            return "auth" if self.protocol == "SASL_SSL" else "protocol"
        if self.kinds.count("dropped") >= 2 and self.protocol == "PLAINTEXT":
            return "protocol"  # a TLS port drops a plaintext client before any answer
        return None

    def emit(self, record: logging.LogRecord) -> None:
        if threading.current_thread() in self.others:  # emit runs in the logging thread
            return
        try:
            text = record.getMessage()
        except Exception:  # a malformed record must not break the client
            return
        kind = classify(text)
        if kind is not None:
            self.kinds.append(kind)
        if text.startswith("Bootstrap ") and self.verdict() is not None:  # logged by _do_bootstrap
            self._stop_bootstrap()

    @staticmethod
    def _stop_bootstrap() -> None:
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == "_do_bootstrap":
                manager = frame.f_locals.get("self")
                if manager is not None and hasattr(manager, "closed"):
                    manager.closed = True  # its loop ends and raises KafkaTimeoutError
                return
            frame = frame.f_back  # type: ignore[assignment]


# kafka-python's loggers that report connection failures. The CLI silences "kafka" (CRITICAL);
# while a client is being built their warnings are let through to the capture only.
_NET_LOGGERS = ("kafka.net.manager", "kafka.net.connection", "kafka.net.transport", "kafka.cluster")
_capture_lock = threading.Lock()
_capture_state: dict[str, Any] = {"active": 0, "saved": {}}


@contextlib.contextmanager
def _capturing(protocol: str) -> Iterator[_Capture]:
    cap = _Capture(protocol)
    loggers = [logging.getLogger(name) for name in _NET_LOGGERS]
    with _capture_lock:
        if _capture_state["active"] == 0:
            saved: dict[str, tuple[int, bool]] = {}
            for lg in loggers:
                if lg.getEffectiveLevel() > logging.WARNING:
                    # nobody would see these records: let them reach the capture, and only it
                    saved[lg.name] = (lg.level, lg.propagate)
                    lg.setLevel(logging.WARNING)
                    lg.propagate = False
            _capture_state["saved"] = saved
        _capture_state["active"] += 1
        for lg in loggers:
            lg.addHandler(cap)
    try:
        yield cap
    finally:
        with _capture_lock:
            for lg in loggers:
                lg.removeHandler(cap)
            _capture_state["active"] -= 1
            if _capture_state["active"] == 0:
                for name, (level, propagate) in _capture_state["saved"].items():
                    logging.getLogger(name).setLevel(level)
                    logging.getLogger(name).propagate = propagate
                _capture_state["saved"] = {}


def classify(text: str) -> str | None:
    """What a kafka-python connection log line shows: ``auth``, ``trust``, ``protocol``,
    ``dropped`` / ``dropped-after-versions`` (the broker closed the connection before / after
    answering ApiVersions), or None."""
    low = text.lower()
    if "saslauthenticationfailed" in low or "invalid credentials" in low:
        return "auth"
    if "certificate_verify_failed" in low or "certificate verify failed" in low:
        return "trust"
    if "wrong_version_number" in low or "invalid frame length" in low or "unexpected_eof" in low:
        return "protocol"
    if "unsupportedsaslmechanism" in low or "illegalsaslstate" in low:
        return "protocol"
    if "connection lost" in low and "socket disconnected" in low:
        return "dropped" if "broker_version=unknown" in low else "dropped-after-versions"
    return None


def _cause(cap: _Capture, security: ClientSecurity, bootstrap: str, what: str) -> BrokerError | None:
    kind = cap.verdict()
    if kind is None and cap.kinds and security.protocol in ("PLAINTEXT", "SSL"):
        kind = "protocol"
    if kind == "auth":
        return BrokerAuthenticationError(
            f"authentication failed for user {security.username} at {bootstrap} ({what}): wrong "
            f"password or unknown user ({security.mechanism}; settings from {security.source})"
        )
    if kind == "trust":
        ca = (
            f"the configured CA ({security.cafile})"
            if security.cafile
            else "the system's CAs (no ssl.cafile set)"
        )
        return BrokerTrustError(
            f"the broker's certificate at {bootstrap} is not signed by {ca}, or does not name that address ({what})"
        )
    if kind == "protocol":
        return BrokerProtocolError(
            f"the broker at {bootstrap} does not speak {security.protocol} on that port ({what}); "
            "check security.protocol and the address (a secured local broker needs SASL_SSL, "
            "read from its client file)"
        )
    return None


@contextlib.contextmanager
def connecting(security: ClientSecurity, bootstrap: str, what: str) -> Iterator[None]:
    """Build a kafka-python client inside this block. A connect failure becomes one clear
    :class:`BrokerError` (authentication, trust, protocol; otherwise 'cannot reach')."""
    from kafka.errors import KafkaError

    with _capturing(security.protocol) as cap:
        try:
            yield
        except KafkaError as exc:
            cause = _cause(cap, security, bootstrap, what)
            if cause is not None:
                raise cause from None
            if "bootstrap" in str(exc).lower():
                raise BrokerError(
                    f"cannot reach Kafka at {bootstrap} ({what}); start it with 'referral-broker "
                    "kafka start' or check KAFKA_BOOTSTRAP_SERVERS"
                ) from exc
            raise


def construct(cls: Any, **config: Any) -> Any:
    """``cls(**config)`` for a kafka-python client; when the constructor fails, its IO thread
    and sockets are closed (KafkaAdminClient leaves them running)."""
    client = cls.__new__(cls)
    try:
        client.__init__(**config)
    except BaseException:
        inner, net = getattr(client, "_client", None), getattr(client, "_net", None)
        with contextlib.suppress(Exception):
            if inner is not None:
                inner.close()
        with contextlib.suppress(Exception):
            if net is not None:
                net.stop()
        raise
    return client


def authorisation_error(exc: BaseException, action: str, resource: str | None = None) -> BrokerError | None:
    """:class:`NotAuthorisedError` for a Kafka refusal (topic, group, transactional id,
    cluster), else None. ``action`` is 'write', 'read', 'describe', ..."""
    from kafka import errors as ke

    kinds: list[tuple[type[BaseException], str]] = [
        (ke.TopicAuthorizationFailedError, "topic"),
        (ke.GroupAuthorizationFailedError, "consumer group"),
        (ke.TransactionalIdAuthorizationFailedError, "transactional id"),
        (ke.ClusterAuthorizationFailedError, "cluster"),
    ]
    for cls, noun in kinds:
        if isinstance(exc, cls):
            name = resource or _refused_name(exc) or "?"
            target = "the cluster" if noun == "cluster" else f"{noun} {name}"
            return NotAuthorisedError(f"not authorised to {action} {target}")
    return None


def _refused_name(exc: BaseException) -> str | None:
    for arg in getattr(exc, "args", ()):
        if isinstance(arg, set | frozenset | list | tuple) and arg:
            return ", ".join(sorted(str(a) for a in arg))
        if isinstance(arg, str) and arg and " " not in arg:
            return arg
    return None


# -- SCRAM users (the lead's enrolment and ACL work builds on these) ------------------------------
def upsert_scram_users(admin: Any, credentials: dict[str, str], *, mechanism: str = "SCRAM-SHA-512") -> None:
    """Create or replace SCRAM credentials (as a super user). Raises on any refusal."""
    from kafka.admin import ScramMechanism, UserScramCredentialUpsertion
    from kafka.errors import KafkaError

    mech = ScramMechanism.SCRAM_SHA_512 if mechanism == "SCRAM-SHA-512" else ScramMechanism.SCRAM_SHA_256
    changes = [
        UserScramCredentialUpsertion(user, mech, password, SCRAM_ITERATIONS)
        for user, password in credentials.items()
    ]
    try:
        result = admin.alter_user_scram_credentials(changes)
    except KafkaError as exc:
        raise authorisation_error(exc, "alter", "SCRAM credentials") or BrokerError(
            f"setting SCRAM credentials failed: {type(exc).__name__}"
        ) from None
    _check_scram_result(result, "setting")


def delete_scram_users(admin: Any, users: list[str], *, mechanism: str = "SCRAM-SHA-512") -> None:
    """Delete SCRAM credentials; a user without one is not an error (already gone)."""
    from kafka.admin import ScramMechanism, UserScramCredentialDeletion
    from kafka.errors import KafkaError

    mech = ScramMechanism.SCRAM_SHA_512 if mechanism == "SCRAM-SHA-512" else ScramMechanism.SCRAM_SHA_256
    try:
        result = admin.alter_user_scram_credentials([UserScramCredentialDeletion(u, mech) for u in users])
    except KafkaError as exc:
        raise authorisation_error(exc, "alter", "SCRAM credentials") or BrokerError(
            f"deleting SCRAM credentials failed: {type(exc).__name__}"
        ) from None
    result = {u: e for u, e in (result or {}).items() if e and "does not exist" not in str(e)}
    _check_scram_result(result, "deleting")


def _check_scram_result(result: dict[str, Any] | None, doing: str) -> None:
    failed = {user: str(err) for user, err in (result or {}).items() if err}
    if failed:
        shown = "; ".join(f"{u}: {e}" for u, e in sorted(failed.items()))
        raise BrokerError(f"{doing} SCRAM credentials failed for {shown}")


def scram_users(admin: Any) -> list[str]:
    """The users that have SCRAM credentials."""
    from kafka.errors import KafkaError

    try:
        described = admin.describe_user_scram_credentials()
    except KafkaError as exc:
        raise authorisation_error(exc, "describe", "SCRAM credentials") or BrokerError(
            f"listing SCRAM users failed: {type(exc).__name__}"
        ) from None
    return sorted(u for u, info in described.items() if not (info or {}).get("error"))


def local_admin_security(settings: Settings) -> ClientSecurity:
    """The local broker's administrator (a super user), from the files the broker wrote."""
    path = settings.local_run_dir / CLIENT_FILE
    if not path.is_file():
        raise BrokerError(
            f"the local broker on port {settings.local_port} has no client file ({path}); "
            "start it with 'referral-broker kafka start'"
        )
    security = read_client_file(path)
    if security.sasl and security.username != ADMIN_USER:
        raise ConfigError(f"{path} does not hold the administrator's settings")
    return security


def super_admin_client(settings: Settings, bootstrap: str | None = None) -> Any:
    """A ``KafkaAdminClient`` as the super user: the local broker's administrator when the
    settings name no cluster, else the configured identity (which must be a super user for
    SCRAM and ACL changes)."""
    if settings.uses_local_broker and not _explicit(settings):
        security = local_admin_security(settings)
        bootstrap = bootstrap or settings.bootstrap_servers
    else:
        bootstrap = bootstrap or settings.bootstrap_servers
        security = client_security(settings, bootstrap)
    return admin_with(settings, bootstrap, security)


def admin_with(
    settings: Settings, bootstrap: str, security: ClientSecurity, *, client_id: str | None = None
) -> Any:
    """A ``KafkaAdminClient`` with these credentials; connect failures raise clear errors."""
    from kafka import KafkaAdminClient

    with connecting(security, bootstrap, "connecting an admin client"):
        return construct(
            KafkaAdminClient,
            bootstrap_servers=bootstrap,
            client_id=client_id or f"{settings.kafka_client_id}-admin",
            bootstrap_timeout_ms=settings.kafka_request_timeout_ms,
            request_timeout_ms=settings.kafka_request_timeout_ms,
            **security.kafka_kwargs(),
        )
