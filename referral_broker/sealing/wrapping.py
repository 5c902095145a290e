"""Data keys wrapped to a recipient's X25519 key, and the bounded data-key cache.

Wrapping is HPKE (RFC 9180, base mode) with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and
AES-256-GCM, as ``cryptography`` implements it: an ephemeral-static X25519 exchange, HKDF and
AES-GCM, but in the standard, test-vectored composition rather than one assembled here. The
HPKE ``info`` binds the recipient party and the whole clear header of the wrapped key (its
mode, the recipient key id, the data-key id and, for case keys, the case id and case-key id),
so a wrapped key cannot be relabelled or handed to another recipient or case.

Wrapped data key (the ``rb-dek`` header)::

    version (1) | suite (1) | mode (1) | recipient key id (1-byte length + id) | data-key id (idem)
    [modes 2, 3: case id (idem) | case-key id (idem)] [mode 3: share id (idem)]
    | HPKE encapsulated key (32) + ciphertext (48)

Mode 1 (recipient): the HPKE plaintext is the data key itself.
Mode 2 (recipient + case key): the HPKE plaintext is a random 32-byte share; the data key is
HKDF-SHA256 over ``share || case key`` (see :mod:`referral_broker.sealing.case_keys`). Opening
needs both the recipient's X25519 private key and the case key, so destroying the case key
makes the message unreadable even to its recipient (crypto-shredding).
Mode 3 (recipient + case key, shared share): as mode 2, but the share's HPKE ``info`` binds only
the recipient, its key id and the share id, not the case, so one wrapped share (one X25519
exchange) serves many messages and cases within the data-key cache's bounds (:class:`CaseShare`).
The data key still derives from ``share || case key`` with the whole clear header (the case,
the case key and a data-key id of each message's own) in the HKDF ``info``: each message has
its own key, a relabelled case derives a key that opens nothing, and a destroyed case key
leaves every message of the case unreadable. Mode 2 is still opened (older messages).

This module must never write a private key, a data key or a share anywhere (no logs, no
exception messages, no files); the cache holds data keys in memory only, within its bounds.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from referral_broker.config import Settings
from referral_broker.errors import ShreddedError, TamperedError
from referral_broker.sealing.fields import KEY_SIZE, DataKey
from referral_broker.sealing.framing import Reader, frame, short

WRAP_VERSION = 1
SUITE_HPKE_X25519_SHA256_AES256GCM = 1
MODE_RECIPIENT = 1
MODE_RECIPIENT_AND_CASE = 2
MODE_CASE_SHARE = 3
_CASE_MODES = (MODE_RECIPIENT_AND_CASE, MODE_CASE_SHARE)
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_HPKE_LENGTH = 32 + KEY_SIZE + 16
MAX_USES_CEILING = 1_000_000
_WRAP_LABEL = b"referral-broker/dek-wrap/v1"
_CASE_LABEL = b"referral-broker/case-dek/v1"
_SHARE_LABEL = b"referral-broker/case-share/v1"

# (case id, case-key id) -> the 32-byte case key, or raise KeyNotFoundError / ShreddedError.
CaseKeyLookup = Callable[[str, str], bytes]


@dataclass(frozen=True)
class WrappedKeyHeader:
    """The clear part of a wrapped data key: which keys it needs, nothing secret."""

    mode: int
    recipient_key_id: str
    data_key_id: bytes
    case_id: str | None = None
    case_key_id: str | None = None
    share_id: bytes | None = None  # mode 3


def _prefix(header: WrappedKeyHeader) -> bytes:
    out = bytes([WRAP_VERSION, SUITE_HPKE_X25519_SHA256_AES256GCM, header.mode])
    out += short(header.recipient_key_id) + short(header.data_key_id)
    if header.mode in _CASE_MODES:
        assert header.case_id is not None and header.case_key_id is not None
        out += short(header.case_id) + short(header.case_key_id)
    if header.mode == MODE_CASE_SHARE:
        assert header.share_id is not None
        out += short(header.share_id)
    return out


def _share_info(recipient: str, recipient_key_id: str, share_id: bytes) -> bytes:
    """A mode-3 share's HPKE ``info``: the recipient, its key and the share, no case, no message
    (the sealer and every opener build it here)."""
    header = bytes([WRAP_VERSION, SUITE_HPKE_X25519_SHA256_AES256GCM, MODE_CASE_SHARE])
    return frame(_SHARE_LABEL, recipient, header + short(recipient_key_id) + short(share_id))


def _info(recipient: str, prefix: bytes) -> bytes:
    return frame(_WRAP_LABEL, recipient, prefix)


def _case_data_key(
    share: bytes, case_key: bytes, recipient: str, prefix: bytes, data_key_id: bytes
) -> DataKey:
    secret = HKDF(
        algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=frame(_CASE_LABEL, recipient, prefix)
    ).derive(share + case_key)
    return DataKey(data_key_id, secret)


def wrap_data_key(
    key: DataKey, *, recipient: str, recipient_key_id: str, recipient_public: X25519PublicKey
) -> bytes:
    """Wrap ``key`` so that only the holder of ``recipient_key_id``'s private key can unwrap it."""
    prefix = _prefix(WrappedKeyHeader(MODE_RECIPIENT, recipient_key_id, key.key_id))
    return prefix + _SUITE.encrypt(key.secret, recipient_public, info=_info(recipient, prefix))


@dataclass(frozen=True)
class CaseShare:
    """A random share wrapped once to one recipient key (mode 3), for the case-sealed messages
    to that key within the data-key cache's bounds; held in memory only."""

    recipient: str
    recipient_key_id: str
    share_id: bytes
    secret: bytes = field(repr=False)
    sealed: bytes  # the HPKE encapsulated key and ciphertext of ``secret``

    @classmethod
    def new(cls, *, recipient: str, recipient_key_id: str, recipient_public: X25519PublicKey) -> CaseShare:
        share_id, secret = os.urandom(8), os.urandom(KEY_SIZE)
        info = _share_info(recipient, recipient_key_id, share_id)
        sealed = _SUITE.encrypt(secret, recipient_public, info=info)
        return cls(recipient, recipient_key_id, share_id, secret, sealed)


def new_case_data_key(
    share: CaseShare, *, case_id: str, case_key_id: str, case_key: bytes
) -> tuple[DataKey, bytes]:
    """A fresh data key for one message of ``case_id`` that needs both the recipient's private
    key (for ``share``) and the case key, and its wrapped form (mode 3). Nothing derived from
    the case key is written into the wrapped form."""
    data_key_id = os.urandom(8)
    header = WrappedKeyHeader(
        MODE_CASE_SHARE, share.recipient_key_id, data_key_id, case_id, case_key_id, share.share_id
    )
    prefix = _prefix(header)
    key = _case_data_key(share.secret, case_key, share.recipient, prefix, data_key_id)
    return key, prefix + share.sealed


def read_wrapped_header(wrapped: bytes) -> tuple[WrappedKeyHeader, bytes, bytes]:
    """Parse the clear header; returns it, the authenticated prefix bytes and the HPKE part."""
    reader = Reader(wrapped, "wrapped data key")
    version = reader.byte()
    if version != WRAP_VERSION:
        raise TamperedError(f"unknown wrapped-key format version {version} (expected {WRAP_VERSION})")
    suite = reader.byte()
    if suite != SUITE_HPKE_X25519_SHA256_AES256GCM:
        raise TamperedError(f"unknown key-wrapping suite id {suite}")
    mode = reader.byte()
    if mode not in (MODE_RECIPIENT, *_CASE_MODES):
        raise TamperedError(f"unknown key-wrapping mode {mode}")
    try:
        recipient_key_id = reader.short().decode("ascii")
        data_key_id = reader.short()
        case_id = case_key_id = share_id = None
        if mode in _CASE_MODES:
            case_id = reader.short().decode("ascii")
            case_key_id = reader.short().decode("ascii")
        if mode == MODE_CASE_SHARE:
            share_id = reader.short()
    except UnicodeDecodeError:
        raise TamperedError("malformed wrapped data key: a key id is not ASCII") from None
    prefix_len = reader.consumed
    sealed = reader.rest()
    if len(sealed) != _HPKE_LENGTH:
        raise TamperedError(
            "truncated wrapped data key"
            if len(sealed) < _HPKE_LENGTH
            else "wrapped data key has trailing bytes"
        )
    header = WrappedKeyHeader(mode, recipient_key_id, data_key_id, case_id, case_key_id, share_id)
    return header, bytes(wrapped[:prefix_len]), sealed


def unwrap_data_key(
    wrapped: bytes,
    *,
    recipient: str,
    private_key: X25519PrivateKey,
    case_keys: CaseKeyLookup | None = None,
    shares: DekCache[bytes] | None = None,
) -> DataKey:
    """Recover the data key, or raise: :class:`TamperedError` when the wrapped key is not for
    this recipient and key or was altered; :class:`ShreddedError`/``KeyNotFoundError`` from
    ``case_keys`` when the case key is gone. ``shares`` keeps mode-3 shares already unwrapped
    (never a data key: the case key is looked up for every message, so a shred takes effect
    on the next one)."""
    header, prefix, sealed = read_wrapped_header(wrapped)
    if header.mode == MODE_CASE_SHARE:
        assert header.share_id is not None
        info = _share_info(recipient, header.recipient_key_id, header.share_id)
        slot = hashlib.sha256(info + sealed).digest()
        secret = shares.get(slot) if shares is not None else None
        if secret is None:
            secret = _hpke_open(sealed, private_key, info, header)
            if shares is not None:
                shares.put(slot, secret)
    else:
        secret = _hpke_open(sealed, private_key, _info(recipient, prefix), header)
    if header.mode == MODE_RECIPIENT:
        return DataKey(header.data_key_id, secret)
    if case_keys is None:
        raise ShreddedError(
            f"message is sealed under the key of case {header.case_id}, and no case key store was given"
        )
    assert header.case_id is not None and header.case_key_id is not None
    case_key = case_keys(header.case_id, header.case_key_id)
    return _case_data_key(secret, case_key, recipient, prefix, header.data_key_id)


def _hpke_open(sealed: bytes, private_key: X25519PrivateKey, info: bytes, header: WrappedKeyHeader) -> bytes:
    try:
        return _SUITE.decrypt(sealed, private_key, info=info)
    except (InvalidTag, ValueError):
        raise TamperedError(
            f"wrapped data key for key {header.recipient_key_id}: authentication failed "
            "(tampered, addressed to another recipient, or wrong private key)"
        ) from None


V = TypeVar("V")


class DekCache(Generic[V]):
    """A data-key cache bounded by uses AND age, so one public-key operation can serve several
    messages without a key living (or being reused) without limit.

    Each entry serves at most ``max_uses`` messages (the one that created it included) and
    lives at most ``max_age_s`` seconds by ``clock`` (monotonic by default; tests inject one).
    ``max_uses <= 1`` or ``max_age_s <= 0`` turns caching off. The number of entries is also
    bounded (least recently used go first) so a receiver fed many distinct keys cannot grow it.
    """

    def __init__(
        self,
        max_uses: int,
        max_age_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 4096,
    ) -> None:
        # Hard ceiling whatever the config says: with random 96-bit nonces one AES-GCM key must
        # stay far below 2**32 encryptions; a million messages of ~100 sealed fields does.
        self.max_uses = min(max_uses, MAX_USES_CEILING)
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Hashable, list[Any]] = OrderedDict()  # slot -> [value, born, uses]
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> DekCache[V]:
        return cls(settings.keys_dek_cache_max_uses, settings.keys_dek_cache_max_age_s, clock=clock)

    @property
    def enabled(self) -> bool:
        return self.max_uses > 1 and self.max_age_s > 0

    def get(self, slot: Hashable) -> V | None:
        """The cached value for ``slot`` (counting one use), or None when absent or spent."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(slot)
            if entry is None:
                return None
            if self._clock() - entry[1] >= self.max_age_s or entry[2] >= self.max_uses:
                del self._entries[slot]
                return None
            entry[2] += 1
            self._entries.move_to_end(slot)
            value: V = entry[0]
            return value

    def put(self, slot: Hashable, value: V) -> None:
        """Remember ``value``; this counts as its first use."""
        if not self.enabled:
            return
        with self._lock:
            self._entries[slot] = [value, self._clock(), 1]
            self._entries.move_to_end(slot)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def forget(self, predicate: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose slot matches (a revoked key, a shredded case)."""
        with self._lock:
            doomed = [slot for slot in self._entries if predicate(slot)]
            for slot in doomed:
                del self._entries[slot]
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def wrapped_slot(recipient: str, wrapped: bytes) -> bytes:
    """A receiver's cache slot: a digest of the exact wrapped bytes it already authenticated."""
    return hashlib.sha256(frame(recipient, wrapped)).digest()
