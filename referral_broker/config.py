"""Settings: defaults, then a TOML file, then environment variables (last wins).

The file is ``$REFERRAL_BROKER_CONFIG`` or ``./referral-broker.toml`` when present. Its tables
mirror the field prefixes below (``[kafka] bootstrap_servers = ...``, ``[keys] dek_cache_max_uses``).
Unknown keys are an error, never ignored, so a typo cannot silently change behaviour.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from referral_broker.errors import ConfigError


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / fallback) / "referral-broker"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything configurable. Build with :func:`load_settings`, not by hand, outside tests."""

    # [kafka]
    kafka_bootstrap_servers: str | None = None
    kafka_client_id: str = "referral-broker"
    kafka_topic_prefix: str = ""
    kafka_topic_profile: str = "local"
    kafka_request_timeout_ms: int = 15_000
    # [kafka] security, with Kafka's conventional names (security.protocol, sasl.mechanism,
    # sasl.username, sasl.password_file, ssl.cafile, ssl.certfile, ssl.keyfile). Empty protocol:
    # inferred (SASL_SSL with a username, SSL with a CA file), else the local broker's own
    # client file when the address is a local broker, else PLAINTEXT (cluster/security.py).
    kafka_security_protocol: str = ""
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    # only from the environment (KAFKA_SASL_PASSWORD), never from the settings file
    kafka_sasl_password: str = field(default="", repr=False)
    kafka_sasl_password_file: Path | None = None  # must be 0600
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None  # unencrypted PEM, must be 0600
    # [local] the broker the project runs itself when no cluster is configured
    local_kafka_version: str = "4.3.1"
    local_port: int = 19092
    local_controller_port: int = 19093
    local_heap: str = "512m"
    local_start_timeout_s: float = 90.0
    # [paths]
    paths_cache_dir: Path = field(default_factory=lambda: _xdg("XDG_CACHE_HOME", ".cache"))
    paths_data_dir: Path = field(default_factory=lambda: _xdg("XDG_DATA_HOME", ".local/share"))
    # [keys]
    keys_dek_cache_max_uses: int = 1000
    keys_dek_cache_max_age_s: float = 300.0
    keys_directory_refresh_s: float = 60.0
    # the council's root public key every party pins; default <data_dir>/keys/trust-anchor.pem
    keys_trust_anchor: Path | None = None
    # [send] processes that check and seal a large native file (0: one a core, at most 4;
    # 1: in the sending process)
    send_workers: int = 0
    # [inbox]
    inbox_database: Path | None = None
    inbox_session_max_age_s: int = 8 * 3600
    # working days from receipt to the team's decision, by priority (0: the same working day)
    inbox_due_urgent_working_days: int = 0
    inbox_due_high_working_days: int = 3
    inbox_due_routine_working_days: int = 10
    inbox_page_size: int = 25
    inbox_search_max_records: int = 2000  # referrals opened in memory to answer one search
    # an e-mail (a link only, no personal data) to a team when an urgent referral arrives;
    # off while smtp_host is empty. urgent_mail_to: "team=address,team=address"
    inbox_smtp_host: str = ""
    inbox_smtp_port: int = 25
    inbox_mail_from: str = "early-help-inbox@localhost"
    inbox_urgent_mail_to: str = ""
    inbox_public_url: str = "http://localhost:8000"

    @property
    def uses_local_broker(self) -> bool:
        return not self.kafka_bootstrap_servers

    @property
    def bootstrap_servers(self) -> str:
        """The cluster every command talks to: the configured one, else the local broker."""
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.local_port}"

    @property
    def local_run_dir(self) -> Path:
        """The local broker's folder (data, logs, certificates, client file) for its port."""
        return self.paths_cache_dir / "local-broker" / str(self.local_port)

    @property
    def keys_dir(self) -> Path:
        return self.paths_data_dir / "keys"

    @property
    def inbox_db_path(self) -> Path:
        return self.inbox_database or self.paths_data_dir / "inbox.sqlite3"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


# Environment variables with conventional names first, then the project's own.
ENV_VARS: dict[str, str] = {
    "KAFKA_BOOTSTRAP_SERVERS": "kafka_bootstrap_servers",
    "KAFKA_SECURITY_PROTOCOL": "kafka_security_protocol",
    "KAFKA_SASL_MECHANISM": "kafka_sasl_mechanism",
    "KAFKA_SASL_USERNAME": "kafka_sasl_username",
    "KAFKA_SASL_PASSWORD": "kafka_sasl_password",
    "KAFKA_SASL_PASSWORD_FILE": "kafka_sasl_password_file",
    "KAFKA_SSL_CAFILE": "kafka_ssl_cafile",
    "KAFKA_SSL_CERTFILE": "kafka_ssl_certfile",
    "KAFKA_SSL_KEYFILE": "kafka_ssl_keyfile",
    "REFERRAL_BROKER_TOPIC_PREFIX": "kafka_topic_prefix",
    "REFERRAL_BROKER_TOPIC_PROFILE": "kafka_topic_profile",
    "REFERRAL_BROKER_LOCAL_PORT": "local_port",
    "REFERRAL_BROKER_LOCAL_CONTROLLER_PORT": "local_controller_port",
    "REFERRAL_BROKER_CACHE_DIR": "paths_cache_dir",
    "REFERRAL_BROKER_DATA_DIR": "paths_data_dir",
    "REFERRAL_BROKER_DEK_CACHE_MAX_USES": "keys_dek_cache_max_uses",
    "REFERRAL_BROKER_DEK_CACHE_MAX_AGE_S": "keys_dek_cache_max_age_s",
    "REFERRAL_BROKER_DIRECTORY_REFRESH_S": "keys_directory_refresh_s",
    "REFERRAL_BROKER_TRUST_ANCHOR": "keys_trust_anchor",
    "REFERRAL_BROKER_INBOX_DATABASE": "inbox_database",
    "REFERRAL_BROKER_SEND_WORKERS": "send_workers",
}

_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_PROFILES = ("local", "production", "test")


def _coerce(name: str, raw: Any, source: str) -> Any:
    kind = str(_FIELDS[name].type)
    try:
        if "Path" in kind:
            return Path(raw).expanduser() if raw not in (None, "") else None
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        return None if raw == "" and "None" in kind else str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{name}' must be of type {kind}") from None


def _from_file(path: Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for table, entries in doc.items():
        if not isinstance(entries, dict):
            raise ConfigError(f"{path}: top-level key '{table}' must be a table like [{table}]")
        for key, raw in _flatten(entries):
            name = f"{table}_{key}".replace(".", "_")
            if name in _ENV_ONLY:
                raise ConfigError(
                    f"{path}: [{table}] {key} is not read from a settings file; put the password in "
                    "a file of its own (sasl.password_file, mode 0600) or in KAFKA_SASL_PASSWORD"
                )
            if name not in _FIELDS:
                raise ConfigError(f"{path}: unknown setting [{table}] {key}")
            values[name] = _coerce(name, raw, str(path))
    return values


_ENV_ONLY = {"kafka_sasl_password"}


def _flatten(entries: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted TOML keys (``security.protocol = "SASL_SSL"``, Kafka's own spelling) become
    nested tables; read them back as ``security_protocol``."""
    out: list[tuple[str, Any]] = []
    for key, raw in entries.items():
        if isinstance(raw, dict):
            out += _flatten(raw, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", raw))
    return out


def load_settings(
    config_file: Path | None = None, environ: dict[str, str] | None = None, **overrides: Any
) -> Settings:
    """Defaults < TOML file < environment < explicit overrides."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or (Path(env["REFERRAL_BROKER_CONFIG"]) if env.get("REFERRAL_BROKER_CONFIG") else None)
    if path is None and Path("referral-broker.toml").is_file():
        path = Path("referral-broker.toml")
    if path is not None:
        values.update(_from_file(path))
    for var, name in ENV_VARS.items():
        if var in env:
            values[name] = _coerce(name, env[var], f"environment variable {var}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("kafka_topic_profile", "local") not in _PROFILES:
        raise ConfigError(f"topic profile must be one of {', '.join(_PROFILES)}")
    if not 0 <= values.get("send_workers", 0) <= 64:
        raise ConfigError("[send] workers must be from 0 (one a core) to 64")
    return Settings(**values)
