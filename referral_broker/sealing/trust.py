"""The root of trust for the key directory: the council's root signing key and the trust anchor.

Who holds what:

* the **root signing key** (Ed25519) is the council's alone, kept apart from the hub's routing
  keys: ``<keys_dir>/_root/root-signing.key`` (0600 in a 0700 folder). ``keys root init
  --export FILE`` also writes it to FILE (0600) for offline storage.
* the **trust anchor** is the root's public half, a PEM file every party pins
  (``[keys] trust_anchor``, default ``<keys_dir>/trust-anchor.pem``).

What the root signs: every key-directory entry (party, key id, public keys, validity, status)
and every revocation, as a **signed record**::

    {"format": 2, "entry": {...the KeyEntry...}, "signed_at": "...",
     "root": "<anchor fingerprint>", "signature": "<base64 Ed25519>"}

The signature covers ``referral-broker/key-directory/v1`` and the canonical JSON (sorted keys,
no spaces) of ``{"entry", "signed_at"}``. A reader verifies every record against its pinned
anchor; a record that does not verify is refused (:class:`Refused`, with a reason) and never
fatal to the rest of the directory.

A party makes its own key pair and hands the hub a **key request**: its public entry with a
proof of possession (the entry signed by the new signing key), so nobody can have another
party's public key certified as theirs. The hub checks it and signs the entry (``keys
certify``). Private keys never leave their owner.

Refused records are counted per reason (:data:`REFUSED`, exposed to Prometheus by
:class:`RefusalCollector`) and logged once per process, without any key material.

This module must never print, log or raise with a private key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from referral_broker.config import Settings
from referral_broker.errors import ConfigError, SealingError, SignatureError
from referral_broker.folders import private_folder
from referral_broker.sealing.timefmt import to_iso
from referral_broker.structured_log import get_logger

log = get_logger(__name__)

ROOT_FOLDER = "_root"  # not a party name: party names start with a letter
ROOT_FILE = "root-signing.key"
ANCHOR_FILE = "trust-anchor.pem"
RECORD_FORMAT = 2
_LABEL = b"referral-broker/key-directory/v1\x00"
_REQUEST_LABEL = b"referral-broker/key-request/v1\x00"

# Why a record was refused (the label of the counter; the reason text says more).
UNSIGNED = "unsigned"
BAD_SIGNATURE = "signature"
NO_ANCHOR = "no-anchor"
MALFORMED = "malformed"
TOMBSTONE = "tombstone"
REPLAY = "replay"
COLLISION = "collision"
MISPLACED = "misplaced"
CATEGORIES = (UNSIGNED, BAD_SIGNATURE, NO_ANCHOR, MALFORMED, TOMBSTONE, REPLAY, COLLISION, MISPLACED)


class Refused(Exception):
    """A key-directory record that is not taken into the directory, and why."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


# -- the anchor ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrustAnchor:
    """The root's public key, as every party pins it."""

    public: bytes  # raw 32 bytes

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.public).hexdigest()

    def key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.public)

    def to_pem(self) -> bytes:
        return self.key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def from_pem(cls, data: bytes, where: str = "trust anchor") -> TrustAnchor:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError):
            raise ConfigError(f"{where} is not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{where} is not an Ed25519 public key")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def verify(self, doc: Any) -> dict[str, Any]:
        """The entry of a signed record, or :class:`Refused`."""
        return verify_record(self, doc)


def anchor_path(settings: Settings) -> Path:
    return settings.keys_trust_anchor or settings.keys_dir / ANCHOR_FILE


def load_anchor(settings: Settings) -> TrustAnchor | None:
    """The pinned trust anchor, or None when this machine pins none (then nothing verifies)."""
    path = anchor_path(settings)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"trust anchor {path} cannot be read: {exc.strerror}") from None
    return TrustAnchor.from_pem(data, f"trust anchor {path}")


def pin_anchor(settings: Settings, anchor: TrustAnchor) -> Path:
    """Write ``anchor`` to the anchor path (public: 0644); refuses to replace another anchor."""
    path = anchor_path(settings)
    current = load_anchor(settings)
    if current is not None:
        if current != anchor:
            raise ConfigError(
                f"{path} already pins another trust anchor (fingerprint {current.fingerprint[:16]}); "
                "remove it first if the council's root really changed"
            )
        return path
    private_folder(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(anchor.to_pem())
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return path


# -- the root key ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RootKey:
    """The council's root signing key (held by the hub, or offline)."""

    private: Ed25519PrivateKey = field(repr=False, compare=False)

    @property
    def anchor(self) -> TrustAnchor:
        return TrustAnchor(
            self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    def sign(self, entry: dict[str, Any], *, signed_at: float) -> dict[str, Any]:
        """A signed record of ``entry`` (an entry's JSON form)."""
        body = {"entry": entry, "signed_at": to_iso(signed_at)}
        signature = self.private.sign(_LABEL + canonical(body))
        return {
            "format": RECORD_FORMAT,
            **body,
            "root": self.anchor.fingerprint,
            "signature": _b64(signature),
        }

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def root_path(settings: Settings) -> Path:
    return settings.keys_dir / ROOT_FOLDER / ROOT_FILE


def holds_root(settings: Settings) -> bool:
    return root_path(settings).exists()


_root_lock = threading.Lock()


def open_root(settings: Settings) -> RootKey:
    """The root key held here (permissions checked), which must match the pinned anchor."""
    from referral_broker.sealing.keystore import check_private, read_private

    path = root_path(settings)
    if not path.exists():
        raise ConfigError(
            f"this machine does not hold the council's root signing key ({path}); "
            "run 'referral-broker keys root init' on the hub"
        )
    check_private(path.parent, is_dir=True)
    try:
        key = serialization.load_pem_private_key(read_private(path), password=None)
    except (ValueError, TypeError):
        raise SealingError(f"root key file {path} is malformed") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SealingError(f"root key file {path} is not an Ed25519 key")
    root = RootKey(key)
    pinned = load_anchor(settings)
    if pinned is not None and pinned != root.anchor:
        raise ConfigError(
            f"the root key held here does not match the pinned trust anchor {anchor_path(settings)}"
        )
    if pinned is None:
        pin_anchor(settings, root.anchor)
    return root


def init_root(settings: Settings, *, export: Path | None = None) -> RootKey:
    """Make the council's root signing key and pin its public half; refuses to overwrite one,
    and refuses on a machine that already pins another anchor (a partner's machine)."""
    from referral_broker.sealing.keystore import locked, make_private_dir, write_private

    with _root_lock:
        folder = root_path(settings).parent
        make_private_dir(settings.keys_dir)
        if holds_root(settings):
            raise ConfigError(
                f"a root signing key already exists at {root_path(settings)}; refusing to overwrite it"
            )
        pinned = load_anchor(settings)
        if pinned is not None:
            raise ConfigError(
                f"this machine pins the trust anchor {anchor_path(settings)} (fingerprint "
                f"{pinned.fingerprint[:16]}) but does not hold its root key; a new root would not be trusted"
            )
        make_private_dir(folder)
        with locked(folder):
            if holds_root(settings):
                raise ConfigError(f"a root signing key already exists at {root_path(settings)}")
            root = RootKey(Ed25519PrivateKey.generate())
            if export is not None:
                export_root(root, export)
            write_private(root_path(settings), root.private_pem())
        pin_anchor(settings, root.anchor)
    log.info("root signing key created", path=str(root_path(settings)))
    return root


def export_root(root: RootKey, path: Path) -> None:
    """Write the root's private half to ``path`` (0600 from creation; never overwrites)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(root.private_pem())
        fh.flush()
        os.fsync(fh.fileno())


def ensure_root(settings: Settings) -> RootKey:
    """The root held here, created first when this machine has neither a root nor an anchor
    (a fresh local setup: the demo, tests). A machine that pins an anchor without holding its
    root (a partner) gets a :class:`ConfigError`: it cannot certify keys."""
    if holds_root(settings):
        return open_root(settings)
    try:
        return init_root(settings)
    except ConfigError:
        if holds_root(settings):  # another thread or process made it meanwhile
            return open_root(settings)
        raise


# -- signed records --------------------------------------------------------------------------
def verify_record(anchor: TrustAnchor | None, doc: Any) -> dict[str, Any]:
    """The entry (JSON form) of a root-signed record, or :class:`Refused` saying why not."""
    if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT or "signature" not in doc:
        raise Refused(UNSIGNED, "not signed by the council's root (an unsigned entry)")
    unknown = sorted(set(doc) - {"format", "entry", "signed_at", "root", "signature"})
    if unknown:
        raise Refused(MALFORMED, f"signed record has unknown fields {', '.join(unknown)[:80]}")
    if anchor is None:
        raise Refused(NO_ANCHOR, "no trust anchor is pinned here, so no entry can be verified")
    if doc.get("root") != anchor.fingerprint:
        claimed = doc.get("root")
        shown = claimed[:16] if isinstance(claimed, str) and claimed.isalnum() else "?"
        raise Refused(BAD_SIGNATURE, f"signed by another root (fingerprint {shown}), not the pinned anchor")
    try:
        signature = base64.b64decode(doc["signature"], validate=True)
        body = {"entry": doc["entry"], "signed_at": doc["signed_at"]}
        anchor.key().verify(signature, _LABEL + canonical(body))
    except (KeyError, ValueError, TypeError, InvalidSignature):
        raise Refused(BAD_SIGNATURE, "the root signature does not verify (forged or altered)") from None
    entry = doc["entry"]
    if not isinstance(entry, dict):
        raise Refused(MALFORMED, "signed record holds no entry")
    return entry


# -- key requests (a party's public half, handed to the hub) -------------------------------------
def key_request(entry: dict[str, Any], signing: Ed25519PrivateKey) -> dict[str, Any]:
    """A party's public entry with proof that it holds the entry's signing key."""
    proof = signing.sign(_REQUEST_LABEL + canonical(entry))
    return {"format": 1, "kind": "key-request", "entry": entry, "proof": _b64(proof)}


def check_request(doc: Any) -> dict[str, Any]:
    """The entry of a key request whose proof of possession verifies, or SignatureError."""
    if not isinstance(doc, dict) or doc.get("kind") != "key-request" or doc.get("format") != 1:
        raise SealingError("not a key request (expected the file 'keys generate --public-out' writes)")
    entry = doc.get("entry")
    if not isinstance(entry, dict) or not isinstance(entry.get("signing_public"), str):
        raise SealingError("key request holds no public entry")
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(entry["signing_public"], validate=True))
        public.verify(
            base64.b64decode(doc.get("proof", ""), validate=True), _REQUEST_LABEL + canonical(entry)
        )
    except (ValueError, TypeError, InvalidSignature):
        raise SignatureError(
            "key request's proof of possession does not verify: it was not made by the holder of the key"
        ) from None
    return entry


# -- reporting -------------------------------------------------------------------------------
REFUSED: Counter[str] = Counter()  # refused records seen by this process, per category
_seen: set[tuple[str, ...]] = set()
_seen_lock = threading.Lock()
_SEEN_MAX = 100_000


def report(where: str, category: str, reason: str, *, key_id: str | None, party: str | None) -> None:
    """Count and log a refused record once per process (a directory is re-read often)."""
    mark = (where, category, key_id or "", reason)
    with _seen_lock:
        if mark in _seen:
            return
        if len(_seen) >= _SEEN_MAX:
            _seen.clear()
        _seen.add(mark)
        REFUSED[category] += 1
    log.warning(
        "key directory record refused", reason=f"{category}: {reason}", key_id=key_id, party=party, path=where
    )


class RefusalCollector:
    """Prometheus collector: ``referral_key_directory_refused_records_total{reason=...}``.
    Register it in a stage's registry (the router's does)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "referral_key_directory_refused_records",
            "Key-directory records refused (unsigned, bad signature, replay, collision, ...), by reason.",
            labels=["reason"],
        )
        with _seen_lock:
            counts = dict(REFUSED)
        for category in CATEGORIES:
            family.add_metric([category], counts.get(category, 0))
        yield family
