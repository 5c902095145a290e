"""Enrolment: what one organisation's machine needs to reach the cluster, and nothing more.

``enrol`` (``referral-broker orgs enrol ORG --out DIR``) creates or resets the organisation's
SCRAM credentials (user ``<prefix><party>``, see :mod:`referral_broker.cluster.acls`) and writes
into DIR (0700):

* ``referral-broker.toml``: the client settings (bootstrap, SASL_SSL, SCRAM-SHA-512, the user,
  the password file, the CA file, the topic prefix), the machine's data folder ``DIR/data``
  (its own key pair, its outbox) and the pinned trust anchor. Paths are absolute: enrol to the
  path the machine will use. Point ``REFERRAL_BROKER_CONFIG`` at it, or run from DIR;
* ``kafka-password`` (0600): the SCRAM password, never printed;
* ``ca.pem``: the CA that signs the brokers' certificates (public);
* ``trust-anchor.pem``: the council's root public key (``referral_broker/sealing/trust.py``),
  which verifies every key-directory entry.

No private key, no other organisation's name, no administrator credential is written. The
services (``router``, ``keyadmin``, ``ops``) enrol the same way by name.

``rotate`` replaces the password (the old one is refused at once) and rewrites only the password
file. ``revoke`` (run by ``orgs disable``) deletes the SCRAM user and every binding it has: a
disabled organisation cannot even log in. ``orgs enable`` then needs a new ``enrol`` (and ``acl
apply`` for its bindings).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from referral_broker.cluster import acls, quotas
from referral_broker.cluster import security as sec
from referral_broker.config import Settings
from referral_broker.errors import BrokerAuthenticationError, BrokerError, ConfigError, RegistryError

CONFIG_FILE = "referral-broker.toml"
PASSWORD_FILE = "kafka-password"
CA_FILE = "ca.pem"
ANCHOR_FILE = "trust-anchor.pem"


@dataclass
class Enrolled:
    name: str  # party name or service
    user: str  # the SCRAM user
    folder: Path
    files: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "user": self.user, "folder": str(self.folder), "files": self.files}


def resolve(settings: Settings, bootstrap: str, ref: str) -> str:
    """The party name of an active organisation (``school:110123`` or ``school-110123``), or a
    service name (``router``, ``keyadmin``, ``ops``)."""
    if ref in acls.SERVICES:
        return ref
    from referral_broker.organisations import load_registry

    org = load_registry(settings, bootstrap).require(ref)
    if not org.active:
        raise RegistryError(f"{org.party} is disabled: enable it before enrolling it")
    return org.party


def _admin_security(settings: Settings, bootstrap: str) -> sec.ClientSecurity:
    """The super user's settings (as :func:`security.super_admin_client` picks them)."""
    if settings.uses_local_broker and not sec._explicit(settings):
        return sec.local_admin_security(settings)
    return sec.client_security(settings, bootstrap)


def _set_password(settings: Settings, bootstrap: str, user: str, password: str) -> None:
    admin = sec.super_admin_client(settings, bootstrap)
    try:
        sec.upsert_scram_users(admin, {user: password})
    finally:
        admin.close()


def config_text(settings: Settings, bootstrap: str, user: str, folder: Path, mechanism: str) -> str:
    lines = [
        "# Written by 'referral-broker orgs enrol': this machine's Kafka identity and trust.",
        "# Point REFERRAL_BROKER_CONFIG at this file (or run from this folder).",
        "[kafka]",
        f'bootstrap_servers = "{bootstrap}"',
        'security_protocol = "SASL_SSL"',
        f'sasl_mechanism = "{mechanism}"',
        f'sasl_username = "{user}"',
        f'sasl_password_file = "{folder / PASSWORD_FILE}"',
        f'ssl_cafile = "{folder / CA_FILE}"',
    ]
    if settings.kafka_topic_prefix:
        lines.append(f'topic_prefix = "{settings.kafka_topic_prefix}"')
    if settings.kafka_topic_profile != "local":
        lines.append(f'topic_profile = "{settings.kafka_topic_profile}"')
    lines += [
        "",
        "[paths]",
        f'data_dir = "{folder / "data"}"',
        "",
        "[keys]",
        f'trust_anchor = "{folder / ANCHOR_FILE}"',
    ]
    return "\n".join(lines) + "\n"


def enrol(settings: Settings, bootstrap: str, ref: str, out: Path, *, keep_password: bool = False) -> Enrolled:
    """Create or reset ``ref``'s credentials and write its folder (see the module's note).
    With ``keep_password`` a password already in the folder is set again instead of a new one
    (``referral-broker setup`` run twice leaves a running service's credentials as they are)."""
    from referral_broker.sealing.trust import anchor_path

    name = resolve(settings, bootstrap, ref)
    admin_security = _admin_security(settings, bootstrap)
    if not admin_security.sasl or admin_security.cafile is None:
        raise ConfigError(
            f"the cluster at {bootstrap} is not secured with SASL_SSL and a CA file "
            f"({admin_security.describe()}): there are no credentials to enrol"
        )
    anchor = anchor_path(settings)
    if not anchor.is_file():
        raise ConfigError(f"no trust anchor at {anchor}: run 'referral-broker keys root init' first")
    folder = out.expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    user = acls.user_name(settings, name)
    kept = folder / PASSWORD_FILE
    if keep_password and kept.is_file():
        password = sec.read_secret(kept, "Kafka password file")
    else:
        password = sec.new_password()
    _set_password(settings, bootstrap, user, password)
    sec.write_private(folder / PASSWORD_FILE, (password + "\n").encode())  # folder 0700
    shutil.copyfile(admin_security.cafile, folder / CA_FILE)
    shutil.copyfile(anchor, folder / ANCHOR_FILE)
    mechanism = admin_security.mechanism or "SCRAM-SHA-512"
    (folder / CONFIG_FILE).write_text(config_text(settings, bootstrap, user, folder, mechanism), "utf-8")
    return Enrolled(name, user, folder, sorted(p.name for p in folder.iterdir()))


def rotate(settings: Settings, bootstrap: str, ref: str, out: Path) -> Enrolled:
    """A new password for ``ref`` (the old one stops working), written to ``out``'s password
    file; the user must exist (enrolled before)."""
    name = resolve(settings, bootstrap, ref)
    user = acls.user_name(settings, name)
    admin = sec.super_admin_client(settings, bootstrap)
    try:
        if user not in sec.scram_users(admin):
            raise ConfigError(f"{name} has no credentials: run 'referral-broker orgs enrol {name}' first")
        password = sec.new_password()
        sec.upsert_scram_users(admin, {user: password})
    finally:
        admin.close()
    folder = out.expanduser().resolve()
    sec.write_private(folder / PASSWORD_FILE, (password + "\n").encode())
    _wait_for_login(settings, bootstrap, user, password)
    return Enrolled(name, user, folder, [PASSWORD_FILE])


def _wait_for_login(settings: Settings, bootstrap: str, user: str, password: str, timeout_s: float = 15.0) -> None:
    """Return once the broker takes ``password`` for ``user`` (a SCRAM change reaches the
    brokers through the metadata log a moment after the controller accepts it; until then the
    old password still works). A user has one credential per mechanism, so from then on the
    old one is refused."""
    security = sec.client_security(settings, bootstrap)
    trial = dataclasses.replace(security, username=user, password=password, source="rotation check")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sec.admin_with(settings, bootstrap, trial).close()
            return
        except BrokerAuthenticationError:
            if time.monotonic() > deadline:
                raise BrokerError(f"the new password for {user} was not in effect after {timeout_s:.0f}s") from None
            time.sleep(0.2)


def revoke(settings: Settings, bootstrap: str, party: str) -> dict[str, Any]:
    """Delete ``party``'s SCRAM user, its bindings and its quotas (a disabled organisation). A
    cluster without SASL (``kafka start --insecure``) has none of them: nothing to do."""
    try:
        security = _admin_security(settings, bootstrap)
    except BrokerError:  # no local client file: an unsecured broker
        security = sec.ClientSecurity(source="none")
    if not security.sasl:
        return {"user": None, "credentials_deleted": False, "bindings_deleted": 0, "quotas_removed": 0}
    user = acls.user_name(settings, party)
    admin = sec.super_admin_client(settings, bootstrap)
    try:
        sec.delete_scram_users(admin, [user])
        gone = acls.revoke_principal(settings, admin, user)
        limits = quotas.remove_user(settings, admin, user)
    finally:
        admin.close()
    return {"user": user, "credentials_deleted": True, "bindings_deleted": len(gone), "quotas_removed": len(limits)}
