"""The recipe: seal and open ONE field value. Everything else in this package builds on it.

A sealed value is self-describing, so a reader needs nothing but the data key and the context::

    version (1 byte) | cipher id (1) | data-key id length (1) | data-key id | nonce (12) | ciphertext+tag

The plaintext is the value's Avro binary encoding under the field's own Avro type (so a date, an
enum, an array of records or a null is sealed exactly like a string), zero-padded to a multiple
of 16 bytes so that short values of nearby lengths look alike on the wire. The cipher is
AES-256-GCM from ``cryptography`` with a fresh random 12-byte nonce per value.

The associated data (built in :func:`associated_data`, the only place that builds it) binds the
ciphertext to the referral id and version, the field path, the recipient, the schema
fingerprint and the value's own header (version, cipher, key id). A ciphertext copied to another
referral, field or recipient, or relabelled with another key id, fails to open.

Two versions of a sealed value exist; the first byte says which, and the message format
(``rb-format``) says which one every field of a message must be:

- **2** (written today): the associated data also holds the message's :class:`Binding`, that is
  the sending party, the topic the message is for, its kind, and the SHA-256 digest of its clear
  (operational) fields. A copy re-signed by another party, moved to another topic, relabelled
  as another kind, or with any clear field changed fails to open. Next to the fields, the
  message carries the binding itself sealed under the same data key
  (:func:`seal_binding`), so the opener can say which of these was changed.
- **1** (messages written before; opened only, never written): no binding.

Since sealed format 3 messages seal one value per data class (:mod:`~referral_broker.sealing.classes`)
and this per-field recipe only opens format 1 and 2 messages; ``seal_value`` stays for them and
for the tests that hold the two formats to the same guarantees.

Every failure to open is one exception type, :class:`TamperedError`, whose message says what
failed and where (field path, key id, format version) but never carries the value, the
plaintext or key material. This module must never log, print or put a value or key into an
exception message, and must never return partial plaintext.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastavro import parse_schema, schemaless_reader

from referral_broker.errors import ContractError, TamperedError
from referral_broker.schemas import union_branches
from referral_broker.sealing.framing import frame, short, unframe

FORMAT_VERSION = 2  # what seal_value writes
LEGACY_FORMAT_VERSION = 1  # opened, never written
CIPHER_AES_256_GCM = 1
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
DATA_KEY_ID_SIZE = 8
PAD_BLOCK = 16
_AAD_LABELS = {LEGACY_FORMAT_VERSION: b"referral-broker/field/v1", FORMAT_VERSION: b"referral-broker/field/v2"}
# The message part of the associated data is framed alike for a field (formats 1, 2) and for a
# data class (format 3, sealing/classes.py); only per-field versions are in _AAD_LABELS.
_MESSAGE_LABELS = {**_AAD_LABELS, 3: b"referral-broker/class/v3"}
_BINDING_LABEL = b"referral-broker/binding/v2"
_CLEAR_LABEL = b"referral-broker/clear-fields/v2"
DIGEST_SIZE = 32
_U64 = struct.Struct(">Q")


class _NoncePool:
    """Fresh random AES-GCM nonces, drawn from the OS a block at a time: one ``getrandom``
    for hundreds of messages instead of one or more each (the same CSPRNG bytes). Each nonce
    is handed out once, under a lock; a forked child starts on a block of its own, so a parent
    and its child never seal with the same nonce."""

    BLOCK = 512  # nonces a draw

    def __init__(self) -> None:
        self._fresh()

    def _fresh(self) -> None:
        self._lock = threading.Lock()
        self._buf = b""
        self._pos = 0

    def take(self, count: int = 1) -> bytes:
        """``count`` nonces, concatenated."""
        size = NONCE_SIZE * count
        with self._lock:
            if self._pos + size > len(self._buf):
                self._buf = os.urandom(NONCE_SIZE * max(self.BLOCK, count))
                self._pos = 0
            start = self._pos
            self._pos = start + size
            return self._buf[start : self._pos]


nonces = _NoncePool()
os.register_at_fork(after_in_child=nonces._fresh)


class DataKey:
    """A 256-bit data key (DEK) with its id. Keeps one AESGCM object: building one costs as
    much as sealing a short field. ``repr`` shows only the id, so a key cannot leak into a log
    or a traceback by being printed."""

    __slots__ = ("_aead", "_secret", "key_id", "sealed_header")

    def __init__(self, key_id: bytes, secret: bytes) -> None:
        if len(secret) != KEY_SIZE:
            raise ValueError("a data key is 32 bytes")
        if not 0 < len(key_id) < 256:
            raise ValueError("a data-key id is 1 to 255 bytes")
        self.key_id = bytes(key_id)
        self._secret = bytes(secret)
        self._aead = AESGCM(self._secret)
        # The clear header every value sealed under this key starts with (today's version).
        self.sealed_header = bytes([FORMAT_VERSION, CIPHER_AES_256_GCM]) + short(self.key_id)

    @classmethod
    def generate(cls) -> DataKey:
        return cls(os.urandom(DATA_KEY_ID_SIZE), os.urandom(KEY_SIZE))

    @property
    def secret(self) -> bytes:
        """The raw key, for wrapping to a recipient only."""
        return self._secret

    @property
    def aead(self) -> AESGCM:
        return self._aead

    def __repr__(self) -> str:
        return f"DataKey(id={self.key_id.hex()})"


def clear_digest(projection: bytes) -> bytes:
    """The digest of a message's clear fields: SHA-256 over a label and their canonical
    encoding (``SealingPlan.clear_projection``)."""
    return hashlib.sha256(frame(_CLEAR_LABEL, projection)).digest()


@dataclass(frozen=True)
class Binding:
    """What a format-2 sealed value is bound to beyond its referral: who sealed it, for which
    topic, as which kind of message, and the digest of the message's clear fields."""

    sender: str
    topic: str
    kind: str
    clear_digest: bytes

    def __post_init__(self) -> None:
        if not all(isinstance(v, str) and v for v in (self.sender, self.topic, self.kind)):
            raise ValueError("a binding names a sender, a topic and a kind (non-empty text)")
        if len(self.clear_digest) != DIGEST_SIZE:
            raise ValueError("the clear-fields digest is 32 bytes")


@dataclass(frozen=True)
class FieldContext:
    """Where a sealed value belongs: which referral (id and version), for whom, under which
    schema, and (format 2) the message :class:`Binding`. Together with the field path this is
    what a ciphertext is bound to. Without a binding the context is format 1: it opens values
    sealed by the old code and seals nothing."""

    referral_id: str
    referral_version: int
    recipient: str
    schema_fingerprint: bytes
    binding: Binding | None = None

    @property
    def version(self) -> int:
        """The sealed-value format version every value in this context must have."""
        return FORMAT_VERSION if self.binding is not None else LEGACY_FORMAT_VERSION

    def unbound(self) -> FieldContext:
        """The same context without its binding (what the sealed binding itself is bound to)."""
        return FieldContext(self.referral_id, self.referral_version, self.recipient, self.schema_fingerprint)

    def __post_init__(self) -> None:
        if not isinstance(self.referral_id, str) or not isinstance(self.recipient, str):
            raise TypeError("referral id and recipient are text (str(uuid) for a UUID)")
        if not self.referral_id:
            raise ValueError("referral id must not be empty")
        if not 0 <= self.referral_version < 2**63:
            raise ValueError("referral version must be a non-negative 63-bit integer")
        if not self.recipient:
            raise ValueError("recipient must not be empty")
        if len(self.schema_fingerprint) != 8:
            raise ValueError("schema fingerprint must be 8 bytes")


def associated_data(
    context: FieldContext, path: str, *, version: int, cipher: int, data_key_id: bytes
) -> bytes:
    """THE associated data of a sealed value. Built here and nowhere else, length-prefixed,
    so sealing and opening cannot drift apart and no two contexts share an encoding::

        label | version+cipher | data-key id | referral id | referral version | recipient |
        schema fingerprint | [version 2: sender | topic | kind | clear-fields digest] | field path

    Every part but the path is the same for all fields of one message, so that prefix is
    framed once per message (``frame(a, b) == frame(a) + frame(b)``) and the path appended.
    ``version`` must be the context's: a format-1 context never builds version-2 data and a
    bound context never builds version-1 data.
    """
    if version != context.version:
        raise ValueError("sealed-value version and context do not match")
    return _message_part(context, version, cipher, data_key_id) + frame(path)


def message_aad_prefix(context: FieldContext, key: DataKey) -> bytes:
    """The message's part of every sealed value's associated data under ``key`` in
    ``context`` (its version is the context's): ``associated_data`` without the path."""
    return _message_part(context, context.version, CIPHER_AES_256_GCM, key.key_id)


def _message_part(context: FieldContext, version: int, cipher: int, data_key_id: bytes) -> bytes:
    parts: list[bytes | str] = [
        _MESSAGE_LABELS[version],
        bytes([version, cipher]),
        data_key_id,
        context.referral_id,
        _U64.pack(context.referral_version),
        context.recipient,
        context.schema_fingerprint,
    ]
    if context.binding is not None:
        b = context.binding
        parts += [b.sender, b.topic, b.kind, b.clear_digest]
    return frame(*parts)


class FieldCodec:
    """The canonical Avro binary encoding of one field's values under the field's own type.

    ``field_type`` must be self-contained (named types expanded, as
    :func:`fastavro.schema.expand_schema` gives), because a field is encoded on its own.
    """

    __slots__ = ("_fast", "_parsed", "framed_path", "path")

    def __init__(self, path: str, field_type: Any) -> None:
        self.path = path
        self.framed_path = frame(path)  # the last part of every sealed value's associated data
        self._parsed = parse_schema(field_type, named_schemas={})
        self._fast = _fast_encoder(self._parsed)

    def encode(self, value: Any) -> bytes:
        if self._fast is not None:
            try:
                encoded: bytes = self._fast(value)
                return encoded
            except _NotFast:
                pass  # a value the fast path does not take: fastavro decides
        buf = io.BytesIO()
        try:
            union_branches.write(buf, self._parsed, value)
        except Exception:
            # fastavro's messages can quote the value: drop them (from None), keep the path.
            raise ContractError(f"field {self.path}: value does not match its Avro type") from None
        return buf.getvalue()

    def decode(self, data: bytes) -> tuple[Any, int]:
        """The value and how many bytes its encoding took."""
        buf = io.BytesIO(data)
        value = schemaless_reader(buf, self._parsed, None)
        return value, buf.tell()


_PADDING = tuple(bytes(n) for n in range(PAD_BLOCK + 1))


class _NotFast(Exception):
    """A value the fast encoder leaves to fastavro (which encodes it or refuses it)."""


_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1


def _varint_long(n: int) -> bytes:
    """Avro's zig-zag varint of a long."""
    if isinstance(n, bool) or not isinstance(n, int) or not _LONG_MIN <= n <= _LONG_MAX:
        raise _NotFast
    z = (n << 1) ^ (n >> 63)
    if z < 0x80:
        return bytes((z,))
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _string(value: Any) -> bytes:
    if type(value) is not str:
        raise _NotFast
    raw = value.encode("utf-8")
    return _varint_long(len(raw)) + raw


def _boolean(value: Any) -> bytes:
    if value is True:
        return b"\x01"
    if value is False:
        return b"\x00"
    raise _NotFast


def _enum(symbols: list[str]) -> Any:
    index = {s: _varint_long(i) for i, s in enumerate(symbols)}

    def encode(value: Any) -> bytes:
        if type(value) is not str or value not in index:
            raise _NotFast
        return index[value]

    return encode


def _plain_encoder(t: Any) -> Any:
    if t == "string":
        return _string
    if t == "boolean":
        return _boolean
    if t in ("int", "long"):
        return _varint_long
    if isinstance(t, dict) and t.get("type") == "enum" and "logicalType" not in t:
        return _enum(list(t["symbols"]))
    return None


def _fast_encoder(parsed: Any) -> Any:
    """The Avro binary encoding of the commonest sealed types, without a fastavro call per
    value (which costs more than sealing the value): string, boolean, int, long, enum and the
    optional (["null", T]) of each. Same bytes as fastavro (Avro's binary encoding of these is
    unique); anything else, or a value not plainly of the type, goes to fastavro."""
    plain = _plain_encoder(parsed)
    if plain is not None:
        return plain
    if isinstance(parsed, list) and len(parsed) == 2 and parsed[0] == "null":
        inner = _plain_encoder(parsed[1])
        if inner is None:
            return None

        def optional(value: Any) -> bytes:
            return b"\x00" if value is None else b"\x02" + inner(value)

        return optional
    return None


def seal_value(value: Any, codec: FieldCodec, key: DataKey, context: FieldContext) -> bytes:
    """Seal one value for one recipient. The nonce is random, so sealing twice differs.
    Only today's format is written: the context must carry the message binding."""
    return MessageCipher(key, context).seal(value, codec)


class MessageCipher:
    """Seals (today's format) or opens the values of ONE message under one data key and
    context: what :func:`seal_value` and :func:`open_value` do per value, with the message's
    part of the associated data framed once (it is the same for every field of a message) and
    each nonce taken from the pool (:data:`nonces`). The bytes are the
    same as :func:`seal_value`'s: ``prefix + frame(path) == associated_data(...)``."""

    __slots__ = ("context", "key", "prefix")

    def __init__(self, key: DataKey, context: FieldContext) -> None:
        if context.binding is None:
            raise ValueError("sealing needs the message binding (sender, topic, kind, clear fields)")
        self.key = key
        self.context = context
        self.prefix = _message_part(context, FORMAT_VERSION, CIPHER_AES_256_GCM, key.key_id)

    def seal(self, value: Any, codec: FieldCodec) -> bytes:
        encoded = codec.encode(value)
        plaintext = encoded + _PADDING[PAD_BLOCK - (len(encoded) % PAD_BLOCK)]
        nonce = nonces.take()
        key = self.key
        return key.sealed_header + nonce + key.aead.encrypt(nonce, plaintext, self.prefix + codec.framed_path)


@dataclass(frozen=True)
class SealedHeader:
    """The clear part of a sealed value: enough to pick the key, nothing about the value."""

    version: int
    cipher: int
    data_key_id: bytes


def read_header(sealed: bytes, path: str) -> tuple[SealedHeader, int]:
    """Parse the clear header of a sealed value, refusing unknown versions and ciphers.
    Returns the header and where the nonce starts."""
    if not isinstance(sealed, (bytes, bytearray)):
        raise TamperedError(f"field {path}: arrived unsealed (not a sealed value)")
    if len(sealed) < 3:
        raise TamperedError(f"truncated sealed value in field {path}")
    version, cipher, id_len = sealed[0], sealed[1], sealed[2]
    if version not in _AAD_LABELS:
        raise TamperedError(
            f"field {path}: unknown sealed-value format version {version} (expected {FORMAT_VERSION}); "
            "the field arrived unsealed or from a newer sender"
        )
    if cipher != CIPHER_AES_256_GCM:
        raise TamperedError(f"field {path}: unknown cipher id {cipher}")
    if id_len == 0:
        raise TamperedError(f"malformed sealed value in field {path}: empty data-key id")
    start = 3 + id_len
    if len(sealed) < start:
        raise TamperedError(f"truncated sealed value in field {path}")
    return SealedHeader(version, cipher, bytes(sealed[3:start])), start


def open_value(
    sealed: bytes, codec: FieldCodec, key: DataKey, context: FieldContext, *, aad_prefix: bytes | None = None
) -> Any:
    """Open one sealed value, or raise :class:`TamperedError`; never returns partial data.
    ``aad_prefix`` is :func:`message_aad_prefix` of this key and context, when the caller
    opens many values of one message (the checks below make it the only one that can fit)."""
    path = codec.path
    header, start = read_header(sealed, path)
    if header.version != context.version:
        raise TamperedError(
            f"field {path}: sealed-value format version {header.version} in a message of sealed "
            f"format {context.version}; refused (a downgraded or spliced message)"
        )
    if header.data_key_id != key.key_id:
        raise TamperedError(
            f"field {path}: sealed under data key {header.data_key_id.hex()}, "
            f"but the message carries data key {key.key_id.hex()}"
        )
    if len(sealed) < start + NONCE_SIZE + TAG_SIZE + PAD_BLOCK:
        raise TamperedError(f"truncated sealed value in field {path}")
    nonce = bytes(sealed[start : start + NONCE_SIZE])
    body = bytes(sealed[start + NONCE_SIZE :])
    if aad_prefix is not None:
        # version == context.version, data-key id == key's and the cipher were checked above
        aad = aad_prefix + codec.framed_path
    else:
        aad = associated_data(
            context, path, version=header.version, cipher=header.cipher, data_key_id=header.data_key_id
        )
    try:
        plaintext = key.aead.decrypt(nonce, body, aad)
    except InvalidTag:
        raise TamperedError(f"field {path}: authentication failed (tampered, moved, or wrong key)") from None
    try:
        value, used = codec.decode(plaintext)
    except Exception:
        raise TamperedError(f"field {path}: sealed payload does not decode as the field's type") from None
    padding = plaintext[used:]
    if not 0 < len(padding) <= PAD_BLOCK or padding.count(0) != len(padding):
        raise TamperedError(f"field {path}: sealed payload has malformed padding")
    return value


def _binding_aad(context: FieldContext, cipher: int, data_key_id: bytes) -> bytes:
    return frame(
        _BINDING_LABEL,
        bytes([FORMAT_VERSION, cipher]),
        data_key_id,
        context.referral_id,
        _U64.pack(context.referral_version),
        context.recipient,
        context.schema_fingerprint,
    )


def seal_binding(binding: Binding, projection: bytes, key: DataKey, context: FieldContext) -> bytes:
    """The message's binding (and the clear fields it was computed from), sealed under the
    message's data key for ``context``'s referral and recipient, so the opener can name what
    a re-signer changed. Same layout as a sealed value::

        version (1) | cipher (1) | data-key id (1-byte length + id) | nonce (12) | ciphertext+tag

    The plaintext is ``frame(sender, topic, kind, clear digest, clear projection)``. Its
    associated data has its own label and no binding (it is what the binding is read from).

    ``binding`` must be made from ``projection``'s :func:`clear_digest`, as the sealer makes
    it just before (it is not digested again here): the opener binds the message's sealed
    values to the digest of the projection it reads, so values sealed under any other digest
    fail to open.
    """
    plaintext = frame(binding.sender, binding.topic, binding.kind, binding.clear_digest, projection)
    nonce = nonces.take()
    aad = _binding_aad(context, CIPHER_AES_256_GCM, key.key_id)
    return key.sealed_header + nonce + key.aead.encrypt(nonce, plaintext, aad)


def open_binding(sealed: bytes, key: DataKey, context: FieldContext) -> tuple[Binding, bytes]:
    """The sealed binding of a format-2 message and the clear projection it was computed
    from, or :class:`TamperedError`. Only the sealer of the message could have made it."""
    what = "sealed binding (header rb-binding)"
    if len(sealed) < 3 or sealed[0] != FORMAT_VERSION:
        raise TamperedError(f"{what}: not a format-{FORMAT_VERSION} sealed value")
    if sealed[1] != CIPHER_AES_256_GCM:
        raise TamperedError(f"{what}: unknown cipher id {sealed[1]}")
    start = 3 + sealed[2]
    if sealed[2] == 0 or len(sealed) < start + NONCE_SIZE + TAG_SIZE:
        raise TamperedError(f"truncated {what}")
    data_key_id = bytes(sealed[3:start])
    if data_key_id != key.key_id:
        raise TamperedError(f"{what}: sealed under another data key than the message's fields")
    nonce = bytes(sealed[start : start + NONCE_SIZE])
    try:
        plaintext = key.aead.decrypt(
            nonce, bytes(sealed[start + NONCE_SIZE :]), _binding_aad(context, sealed[1], data_key_id)
        )
    except InvalidTag:
        raise TamperedError(
            f"{what}: authentication failed (tampered, taken from another referral, or wrong key)"
        ) from None
    sender, topic, kind, digest, projection = unframe(plaintext, 5, what)
    try:
        binding = Binding(sender.decode("utf-8"), topic.decode("utf-8"), kind.decode("utf-8"), digest)
    except (UnicodeDecodeError, ValueError):
        raise TamperedError(f"malformed {what}") from None
    if clear_digest(projection) != digest:
        raise TamperedError(f"malformed {what}: its digest is not that of its clear fields")
    return binding, projection
