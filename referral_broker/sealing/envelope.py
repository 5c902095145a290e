"""Signed, sealed Kafka messages: what a sender produces and what a receiver accepts.

A sealed message is::

    key     = referral id (UTF-8)
    value   = the wire record, Avro single-object encoded under the wire schema of
              :mod:`~referral_broker.sealing.records` (magic, wire fingerprint, body)
    headers = rb-format, rb-kind, rb-sender, rb-sender-key, rb-recipient, rb-recipient-key,
              rb-schema (fingerprint, hex), rb-referral-version, rb-sealed-at (epoch ms),
              [rb-case], rb-dek (wrapped data key), rb-binding (format 2),
              [caller's extra headers], rb-signature

The message format (``rb-format``) is ``3`` for every sealed message written today: one AEAD
per data class of the record (:mod:`~referral_broker.sealing.classes`), with its own wire
schema; ``2`` (one AEAD per field, :mod:`~referral_broker.sealing.fields`) still opens, and
signed-only messages keep ``2``. In formats 2 and 3 every sealed value's associated data also
binds the sending party, the topic the message was sealed for, its kind and the digest of its
clear (operational) fields, and ``rb-binding`` carries that binding sealed under the message's
data key. So a sealed copy that another party re-signs, that is moved to another
topic, or whose clear fields (district, flags, priority...) are edited, does not open, and the
refusal says which of these happened. Format ``1`` (before the binding) still opens, unless an
opener is built with ``accept_legacy=False``; its sealed fields bind only the referral,
recipient, schema and field path, so a format-1 copy can still be re-signed by another party:
turn it off once no format-1 message is left to read.

Receiving is fail-closed and in this order: exactly one signature, a known message format, the
signer's key known, of the claimed sender, not revoked and valid at the signing time, the
signature verifying over topic, key, headers and value; then the message must be addressed to
this party, its data key must unwrap with this party's key (and, for case-sealed messages, the
case key), (format 2) its sealed binding must open and name this signer, this topic, this kind
and these clear fields, and every sealing unit must be a sealed value that opens. Any failure raises a
:class:`~referral_broker.errors.SealingError` (or a ``ContractError`` for an unknown schema)
with the reason, and nothing of the record is returned.

This module must never return a partly opened record, never let a message through unsigned or
with a sensitive field in the clear, and never put a value, a key or plaintext in an error.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

from referral_broker.errors import ContractError, SealingError, SignatureError, TamperedError
from referral_broker.parties import get_party
from referral_broker.schemas.registry import Schema, writer_schema
from referral_broker.sealing.classes import ClassBytes
from referral_broker.sealing.directory import KeyDirectory, KeyEntry
from referral_broker.sealing.fields import (
    Binding,
    DataKey,
    FieldContext,
    clear_digest,
    open_binding,
    seal_binding,
)
from referral_broker.sealing.keystore import KeyStore
from referral_broker.sealing.records import SealingPlan, sealing_plan
from referral_broker.sealing.signing import (
    BATCH_PROOF_HEADER,
    SIGNATURE_HEADER,
    sign_batch,
    sign_message,
    signature_of,
    verify_message,
)
from referral_broker.sealing.wrapping import (
    MODE_RECIPIENT,
    CaseKeyLookup,
    CaseShare,
    DekCache,
    new_case_data_key,
    read_wrapped_header,
    unwrap_data_key,
    wrap_data_key,
    wrapped_slot,
)

if TYPE_CHECKING:
    from referral_broker.cluster.clients import Producer
    from referral_broker.sealing.case_keys import CaseKeyStore

MESSAGE_FORMAT = b"3"  # what this code seals: one AEAD per data class
FIELD_MESSAGE_FORMAT = b"2"  # one AEAD per field, bound: opened, never sealed
LEGACY_MESSAGE_FORMAT = b"1"  # sealed fields without the binding: opened, never written
# A signed-only message (audit, notices) seals nothing: its layout is format 2's, unchanged by
# format 3, so readers from before format 3 still verify it.
PLAIN_MESSAGE_FORMAT = FIELD_MESSAGE_FORMAT
FORMATS = (MESSAGE_FORMAT, FIELD_MESSAGE_FORMAT, LEGACY_MESSAGE_FORMAT)
H_FORMAT = "rb-format"
H_KIND = "rb-kind"
H_SENDER = "rb-sender"
H_SENDER_KEY = "rb-sender-key"
H_RECIPIENT = "rb-recipient"
H_RECIPIENT_KEY = "rb-recipient-key"
H_SCHEMA = "rb-schema"
H_VERSION = "rb-referral-version"
H_SEALED_AT = "rb-sealed-at"
H_CASE = "rb-case"
H_DEK = "rb-dek"
H_BINDING = "rb-binding"
H_SIGNATURE = SIGNATURE_HEADER
RESERVED = frozenset(
    {H_FORMAT, H_KIND, H_SENDER, H_SENDER_KEY, H_RECIPIENT, H_RECIPIENT_KEY, H_SCHEMA, H_VERSION}
    | {H_SEALED_AT, H_CASE, H_DEK, H_BINDING, H_SIGNATURE, BATCH_PROOF_HEADER}
)
_SIGNED_REQUIRED = (H_KIND, H_SENDER, H_SENDER_KEY, H_SEALED_AT)
_SEALED_REQUIRED = (H_RECIPIENT, H_RECIPIENT_KEY, H_SCHEMA, H_VERSION, H_DEK)
_KIND = re.compile(r"^[a-z][a-z0-9_.-]{0,39}$")
_MAX_ID_HEADER = 128
_DIGITS = re.compile(rb"^(0|[1-9][0-9]{0,18})$")

Headers = list[tuple[str, bytes]]
# fingerprint -> the schema the record was written with (the recipient's view schema).
SchemaLookup = Mapping[bytes, Schema] | Callable[[bytes], Schema | None]


class ConsumedRecord(Protocol):
    """What a receiver needs of a Kafka record (``cluster.clients.Record`` has it). Read-only,
    so a frozen record matches."""

    @property
    def topic(self) -> str: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(frozen=True)
class OutgoingMessage:
    """A signed, sealed message ready to produce. ``repr`` leaves out the value bytes.
    ``awaiting_signature``: built with ``sign=False``, not sendable until
    :func:`sign_messages` has signed it."""

    topic: str
    key: bytes
    value: bytes = field(repr=False)
    headers: Headers = field(repr=False)
    awaiting_signature: bool = False

    def send(self, producer: Producer) -> Any:
        """Queue on a ``cluster.clients.Producer``; its ``flush`` confirms or raises. Returns
        the future of where it was written (``Producer.send``'s)."""
        self.check_signed()
        return producer.send(self.topic, value=self.value, key=self.key, headers=self.headers)

    def check_signed(self) -> None:
        if self.awaiting_signature:
            raise SealingError("a message awaiting its batch signature may not be sent; refused")

    def with_signature(self, headers: Headers) -> Self:
        """This message signed: ``headers`` (its own and the signature's), no longer awaiting.
        A copy of its fields, not ``dataclasses.replace`` (a quarter of the cost; it runs for
        every message a batch signs, and no field but these two changes)."""
        new = object.__new__(type(self))
        fields = new.__dict__
        fields.update(self.__dict__)
        fields["headers"], fields["awaiting_signature"] = headers, False
        return new


M = TypeVar("M", bound=OutgoingMessage)


@dataclass(frozen=True)
class OpenedMessage:
    """A verified and opened message. ``record`` holds plaintext: keep it out of logs."""

    record: dict[str, Any] = field(repr=False)
    referral_id: str
    referral_version: int
    kind: str
    sender: str
    sender_key_id: str
    recipient: str
    recipient_key_id: str
    schema_fingerprint: bytes
    sealed_at_ms: int
    case_id: str | None
    extra_headers: tuple[tuple[str, bytes], ...] = ()
    sealed_format: int = int(MESSAGE_FORMAT)  # 1 for a message written before the binding
    # format 3: the bytes ``record`` was read from, for MessageSealer.seal(reuse=...)
    class_bytes: ClassBytes | None = field(default=None, repr=False, compare=False)


def schema_book(*schemas: Schema) -> dict[bytes, Schema]:
    """A fingerprint -> schema mapping for :class:`MessageOpener` from the schemas a party reads."""
    return {sealing_plan(s).fingerprint: s for s in schemas}


class MessageSealer:
    """Seals and signs messages as the party whose key store this is.

    One per sending process; thread-safe. ``cache`` (a :class:`DekCache`) lets one wrapped data
    key (for case-sealed messages, one wrapped share: wrap mode 3) serve several messages to
    the same recipient key within its bounds; ``case_keys`` (the hub's
    :class:`~referral_broker.sealing.case_keys.CaseKeyStore`) is needed to seal the council's
    long-lived copies (district teams, archive) under per-case keys.
    """

    def __init__(
        self,
        keystore: KeyStore,
        directory: KeyDirectory,
        *,
        cache: DekCache[Any] | None = None,
        case_keys: CaseKeyStore | None = None,
    ) -> None:
        self.keystore = keystore
        self.directory = directory
        self.cache = cache
        self.case_keys = case_keys
        self._sealing_to: dict[str, str] = {}  # recipient -> the key its cached entries are for

    @property
    def party(self) -> str:
        return self.keystore.party

    def seal(
        self,
        record: dict[str, Any],
        schema: Schema,
        *,
        topic: str,
        recipient: str,
        referral_id: str | uuid.UUID,
        referral_version: int,
        kind: str = "referral",
        case_id: str | None = None,
        extra_headers: Sequence[tuple[str, bytes]] = (),
        now: float | None = None,
        sign: bool = True,
        reuse: ClassBytes | None = None,
    ) -> OutgoingMessage:
        """Seal every sealing unit of ``record`` under ``schema`` (the recipient's view: only
        its fields are written, so ``record`` may be the whole referral) for ``recipient``
        alone, bound to this sender, ``topic``, ``kind`` and the record's clear fields, and sign
        the message for ``topic`` (``sign=False``: it awaits :func:`sign_messages` with others;
        a reader from before batch proofs refuses it).

        ``reuse``: the :attr:`OpenedMessage.class_bytes` ``record``'s values were opened from
        (the caller's promise: ``record`` holds the same values, as Avro schema resolution
        gives them); the clear part and each class of the same shape are sealed from those
        bytes instead of being encoded again.

        Messages to a district team must pass ``case_id`` (and the sealer must hold the hub's
        case keys): those copies are the council's and must die with the case key. The archive
        writer passes ``case_id`` too, with the hub itself as recipient.
        """
        now = time.time() if now is None else now
        referral_id = str(referral_id)
        if not _KIND.match(kind):
            raise SealingError(f"message kind {kind!r} must be lower-case letters, digits, '.', '_', '-'")
        if not referral_id:
            raise SealingError("referral id must not be empty")
        if not topic:
            raise SealingError("a sealed message needs the topic it is for")
        for name, _ in extra_headers:
            if name in RESERVED or not name.startswith("rb-"):
                raise SealingError(f"extra header {name!r} must start with 'rb-' and not be a reserved name")
        if get_party(recipient).kind == "district_team" and case_id is None:
            raise SealingError(
                f"messages to district team {recipient} must be sealed under a case key (case_id)"
            )
        signer = self.keystore.active(now)
        if signer.key_id in self.directory:
            self.directory.require_sendable(signer.key_id, self.party, now)
        target = self.directory.encryption_key_for(recipient, now)
        plan = sealing_plan(schema)

        if case_id is not None:
            if self.case_keys is None:
                raise SealingError(f"sealing under the key of case {case_id} needs the hub's case-key store")
            case_key_id, case_key = self.case_keys.key_for(case_id, now=now)
            share = self._case_share(recipient, target.key_id, target)
            key, wrapped = new_case_data_key(share, case_id=case_id, case_key_id=case_key_id, case_key=case_key)
        else:
            key, wrapped = self._recipient_key(recipient, target.key_id, target)

        projection = plan.clear_bytes(record, reuse)
        binding = Binding(self.party, topic, kind, clear_digest(projection))
        context = FieldContext(referral_id, referral_version, recipient, plan.fingerprint, binding)
        value = plan.seal_classes(record, projection, key, context, reuse)
        binding_header = seal_binding(binding, projection, key, context.unbound())
        headers: Headers = [
            (H_FORMAT, MESSAGE_FORMAT),
            (H_KIND, kind.encode()),
            (H_SENDER, self.party.encode()),
            (H_SENDER_KEY, signer.key_id.encode()),
            (H_RECIPIENT, recipient.encode()),
            (H_RECIPIENT_KEY, target.key_id.encode()),
            (H_SCHEMA, plan.fingerprint.hex().encode()),
            (H_VERSION, str(referral_version).encode()),
            (H_SEALED_AT, str(int(now * 1000)).encode()),
        ]
        if case_id is not None:
            headers.append((H_CASE, case_id.encode()))
        headers.append((H_DEK, wrapped))
        headers.append((H_BINDING, binding_header))
        headers.extend((n, bytes(v)) for n, v in extra_headers)
        msg_key = referral_id.encode("utf-8")
        if not sign:
            return OutgoingMessage(topic, msg_key, value, headers, awaiting_signature=True)
        headers.append((H_SIGNATURE, sign_message(signer.signing, topic, msg_key, headers, value)))
        return OutgoingMessage(topic, msg_key, value, headers)

    def _recipient_key(self, recipient: str, key_id: str, target: KeyEntry) -> tuple[DataKey, bytes]:
        def new() -> tuple[DataKey, bytes]:
            key = DataKey.generate()
            public = target.encryption_key()
            return key, wrap_data_key(key, recipient=recipient, recipient_key_id=key_id, recipient_public=public)

        cached: tuple[DataKey, bytes] = self._cached((recipient, key_id), new)
        return cached

    def _case_share(self, recipient: str, key_id: str, target: KeyEntry) -> CaseShare:
        """The share a case-sealed message to ``key_id`` wraps its data key with (mode 3):
        one X25519 exchange for many messages and cases, within the cache's bounds."""
        def new() -> CaseShare:
            return CaseShare.new(recipient=recipient, recipient_key_id=key_id, recipient_public=target.encryption_key())

        share: CaseShare = self._cached((recipient, key_id, "case-share"), new)
        return share

    def _cached(self, slot: tuple[str, ...], new: Callable[[], Any]) -> Any:
        """The cached value for a (recipient, key id, ...) slot, or ``new()`` remembered."""
        if self.cache is None:
            return new()
        # A recipient key that is no longer the one to seal to (rotated or revoked) loses
        # its cached keys and shares now, not when they age out.
        recipient, key_id = slot[0], slot[1]
        if self._sealing_to.get(recipient) != key_id:
            self.cache.forget(lambda s: isinstance(s, tuple) and s[0] == recipient and s[1] != key_id)
            self._sealing_to[recipient] = key_id
        hit = self.cache.get(slot)
        if hit is None:
            hit = new()
            self.cache.put(slot, hit)
        return hit


def sign_plain(
    keystore: KeyStore,
    *,
    topic: str,
    key: bytes,
    value: bytes,
    kind: str,
    extra_headers: Sequence[tuple[str, bytes]] = (),
    now: float | None = None,
    sign: bool = True,
) -> OutgoingMessage:
    """A signed message whose value is NOT sealed: only for values that hold no personal data
    by construction (audit events of ids and reasons, key-directory notices). ``sign=False``:
    it awaits :func:`sign_messages` with others (and refuses to be sent until then)."""
    now = time.time() if now is None else now
    if not _KIND.match(kind):
        raise SealingError(f"message kind {kind!r} must be lower-case letters, digits, '.', '_', '-'")
    signer = keystore.active(now)
    headers: Headers = [
        (H_FORMAT, PLAIN_MESSAGE_FORMAT),
        (H_KIND, kind.encode()),
        (H_SENDER, keystore.party.encode()),
        (H_SENDER_KEY, signer.key_id.encode()),
        (H_SEALED_AT, str(int(now * 1000)).encode()),
        *((n, bytes(v)) for n, v in extra_headers),
    ]
    if not sign:
        return OutgoingMessage(topic, key, value, headers, awaiting_signature=True)
    headers.append((H_SIGNATURE, sign_message(signer.signing, topic, key, headers, value)))
    return OutgoingMessage(topic, key, value, headers)


def sign_messages(keystore: KeyStore, messages: Sequence[M]) -> list[M]:
    """``messages`` (each built ``sign=False``, of any :class:`OutgoingMessage` kind) with
    one batch signature per signing key and topic (:func:`~.signing.sign_batch`), in order.

    One tree per topic: a message's proof tells its reader how many messages of the batch went
    to that topic, which every reader of the topic sees anyway, and nothing of the others."""
    by_tree: dict[tuple[bytes, str], list[int]] = {}
    for i, m in enumerate(messages):
        if not m.awaiting_signature:
            raise SealingError("only a message awaiting its signature is signed in a batch")
        by_tree.setdefault((_header(m.headers, H_SENDER_KEY), m.topic), []).append(i)
    out: list[M] = list(messages)
    for (key_id, _), indexes in by_tree.items():
        signing = keystore.get(key_id.decode("utf-8")).signing
        batch = [messages[i] for i in indexes]
        signed = sign_batch(signing, [(m.topic, m.key, m.headers, m.value) for m in batch])
        for i, m, headers in zip(indexes, batch, signed, strict=True):
            out[i] = m.with_signature(headers)
    return out


def sign_awaiting(messages: Sequence[M], sign_batch: Callable[[list[M]], list[M]]) -> list[M]:
    """``messages`` in their order, those awaiting a signature signed together by ``sign_batch``
    (one signature for them all), the others as they are."""
    waiting = [m for m in messages if m.awaiting_signature]
    signed = iter(sign_batch(waiting) if waiting else ())
    return [next(signed) if m.awaiting_signature else m for m in messages]


def _header(headers: Headers, name: str) -> bytes:
    return next(val for n, val in headers if n == name)


class VerifiedHeaders(dict[str, bytes]):
    """The headers of one record whose signature and signer :func:`verify_signed` checked,
    tied to that very record object, so :meth:`MessageOpener.open` can take them instead of
    verifying the same record twice (and still verifies any other record it is given)."""

    __slots__ = ("record",)

    def __init__(self, record: ConsumedRecord, headers: dict[str, bytes]) -> None:
        super().__init__(headers)
        self.record = record

    def of(self, record: ConsumedRecord) -> bool:
        return self.record is record


def verify_signed(
    directory: KeyDirectory, record: ConsumedRecord, *, now: float | None = None
) -> VerifiedHeaders:
    """Verify a message's signature and signer; return its headers by name.

    Refuses, in order: no (or several) signature headers, a repeated ``rb-`` header, an
    unknown message format, missing signing headers, no value, an unknown, revoked, foreign
    or out-of-validity signer key, and a signature that does not cover exactly this topic,
    key, header list and value. Never returns a bool: it returns headers or raises.
    """
    now = time.time() if now is None else now
    headers = list(record.headers or [])
    signature_of(headers)  # unsigned messages are refused before anything else is read
    by_name: dict[str, bytes] = {}
    for name, val in headers:
        if name in by_name and name.startswith("rb-"):
            raise SignatureError(f"message carries header {name} more than once; refused")
        by_name[name] = val if val is not None else b""
    fmt = by_name.get(H_FORMAT)
    if fmt not in FORMATS:
        shown = _shown(fmt.decode("ascii", "replace")[:10]) if fmt is not None else "none"
        raise TamperedError(
            f"unknown message format version {shown} (expected {MESSAGE_FORMAT.decode()}, "
            f"or {FIELD_MESSAGE_FORMAT.decode()} or {LEGACY_MESSAGE_FORMAT.decode()} for older messages)"
        )
    missing = [h for h in _SIGNED_REQUIRED if h not in by_name]
    if missing:
        raise SignatureError(f"message lacks header(s) {', '.join(missing)}; refused")
    if record.value is None:
        raise TamperedError("message has no value (a tombstone is never signed)")
    sender = _text(by_name, H_SENDER)
    signed_at = _number(by_name, H_SEALED_AT) / 1000
    public = directory.signer(_text(by_name, H_SENDER_KEY), sender, signed_at, now)
    verify_message(public, record.topic, record.key, headers, record.value, signer=sender)
    return VerifiedHeaders(record, by_name)


def _text(headers: dict[str, bytes], name: str) -> str:
    """An id-like header as text. Bounded and ASCII-only, because these values end up in
    error messages and a sender must not be able to smuggle arbitrary text into them."""
    raw = headers[name]
    if len(raw) > _MAX_ID_HEADER:
        raise TamperedError(f"header {name} is longer than {_MAX_ID_HEADER} bytes")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise TamperedError(f"header {name} is not ASCII") from None
    if not text.isprintable():
        raise TamperedError(f"header {name} holds control characters")
    return text


def _shown(name: str) -> str:
    """A party, topic or kind name read from a sealed binding, fit for an error message."""
    if len(name) <= _MAX_ID_HEADER and name.isascii() and name.isprintable():
        return name
    return "(a malformed name)"


def _number(headers: dict[str, bytes], name: str) -> int:
    raw = headers[name]
    if not _DIGITS.match(raw):
        raise TamperedError(f"header {name} is not a decimal number")
    return int(raw)


class MessageOpener:
    """Verifies and opens messages addressed to the party whose key store this is.

    ``schemas`` maps a schema fingerprint to the schema the record was written with; by
    default the schema registry's lookup (every shipped version and every registered view).
    ``case_keys`` is the hub's case-key lookup (``CaseKeyStore.lookup``) for case-sealed
    messages: the district-team inbox and the archive reader pass it. ``cache`` keeps
    unwrapped data keys (by the exact wrapped bytes) within its bounds; case-sealed data keys
    are never cached, so a shred takes effect on the very next message (the share a mode-3
    key wraps is, but the case key is looked up for every message).
    """

    def __init__(
        self,
        keystore: KeyStore,
        directory: KeyDirectory,
        schemas: SchemaLookup | None = None,
        *,
        cache: DekCache[Any] | None = None,
        case_keys: CaseKeyLookup | None = None,
        accept_legacy: bool = True,
    ) -> None:
        if schemas is None:
            schemas = writer_schema
        self.keystore = keystore
        self.directory = directory
        self.schemas = schemas
        self.cache = cache
        self.case_keys = case_keys
        self.accept_legacy = accept_legacy

    @property
    def party(self) -> str:
        return self.keystore.party

    def verify(self, record: ConsumedRecord, *, now: float | None = None) -> VerifiedHeaders:
        """Check the signature and the signer (see :func:`verify_signed`)."""
        return verify_signed(self.directory, record, now=now)

    def open(
        self, record: ConsumedRecord, *, now: float | None = None, verified: VerifiedHeaders | None = None
    ) -> OpenedMessage:
        """Verify, then open every sealed field; the whole record or an exception. ``verified``:
        what :meth:`verify` returned for this very record (checked), so it is not verified twice."""
        h = verified if verified is not None and verified.of(record) else self.verify(record, now=now)
        missing = [name for name in _SEALED_REQUIRED if name not in h]
        if missing:
            raise TamperedError(f"signed message lacks sealing header(s) {', '.join(missing)}; refused")
        legacy = h[H_FORMAT] == LEGACY_MESSAGE_FORMAT
        if legacy and not self.accept_legacy:
            raise TamperedError(
                f"message is in sealed format {LEGACY_MESSAGE_FORMAT.decode()}, which binds neither the "
                "sender, the topic nor the clear fields, and this receiver no longer accepts it; refused"
            )
        if legacy and H_BINDING in h:
            raise TamperedError(f"a format-{LEGACY_MESSAGE_FORMAT.decode()} message carries {H_BINDING}; refused")
        if not legacy and H_BINDING not in h:
            raise TamperedError(f"signed message lacks sealing header {H_BINDING}; refused")
        recipient = _text(h, H_RECIPIENT)
        if recipient != self.party:
            raise SealingError(f"message is addressed to {recipient}, not to {self.party}; refused")
        if not record.key:
            raise TamperedError("message has no key (the referral id)")
        try:
            referral_id = record.key.decode("utf-8")
        except UnicodeDecodeError:
            raise TamperedError("message key is not UTF-8") from None
        recipient_key_id = _text(h, H_RECIPIENT_KEY)
        case_id = _text(h, H_CASE) if H_CASE in h else None
        wrapped = h[H_DEK]
        header, _, _ = read_wrapped_header(wrapped)
        if header.recipient_key_id != recipient_key_id or header.case_id != case_id:
            raise TamperedError("wrapped data key names other keys than the message headers")
        fingerprint_hex = _text(h, H_SCHEMA)
        try:
            fingerprint = bytes.fromhex(fingerprint_hex)
        except ValueError:
            raise TamperedError("header rb-schema is not a hex fingerprint") from None
        schema = (
            self.schemas.get(fingerprint) if isinstance(self.schemas, Mapping) else self.schemas(fingerprint)
        )
        if schema is None:
            raise ContractError(f"unknown schema fingerprint {fingerprint_hex}; refusing to open")
        plan = sealing_plan(schema)
        if plan.fingerprint != fingerprint:
            raise ContractError(f"schema lookup for {fingerprint_hex} returned another schema")

        key = self._data_key(wrapped, header.mode, recipient_key_id)
        version = _number(h, H_VERSION)
        context = FieldContext(referral_id, version, recipient, fingerprint)
        assert record.value is not None  # verify_signed refuses a message without a value
        sealed_format = int(h[H_FORMAT])
        class_bytes = None
        if sealed_format == 3:
            clear, projection, blobs = plan.layout.decode(record.value)
            context = self._bound_context(h, record.topic, plan, projection, 3, key, context)
            opened, class_bytes = plan.layout.open(clear, projection, blobs, key, context)
        else:
            if plan.wire_format(record.value) == 3:
                raise TamperedError(
                    f"message value is sealed in format 3 but labelled format {sealed_format}; "
                    "refused (a downgraded or spliced message)"
                )
            wire = plan.decode_wire(record.value)
            if not legacy:
                context = self._bound_context(h, record.topic, plan, plan.clear_projection(wire), 2, key, context)
            opened = plan.open(wire, key, context)
        return OpenedMessage(
            record=opened,
            referral_id=referral_id,
            referral_version=version,
            kind=_text(h, H_KIND),
            sender=_text(h, H_SENDER),
            sender_key_id=_text(h, H_SENDER_KEY),
            recipient=recipient,
            recipient_key_id=recipient_key_id,
            schema_fingerprint=fingerprint,
            sealed_at_ms=_number(h, H_SEALED_AT),
            case_id=case_id,
            extra_headers=tuple((n, v) for n, v in record.headers if n not in RESERVED),
            sealed_format=sealed_format,
            class_bytes=class_bytes,
        )

    @staticmethod
    def _bound_context(
        h: dict[str, bytes],
        topic: str,
        plan: SealingPlan,
        projection: bytes,
        sealed_format: int,
        key: DataKey,
        context: FieldContext,
    ) -> FieldContext:
        """The bound (format 2 or 3) context: the binding this message must have (its signer,
        its topic, its kind, the clear ``projection`` that arrived), after checking it against
        the binding its sealer sealed, so a refusal names what was changed. Names only."""
        sealed, sealed_projection = open_binding(h[H_BINDING], key, context)
        signer, kind = _text(h, H_SENDER), _text(h, H_KIND)
        if sealed.sender != signer:
            raise TamperedError(
                f"re-signed copy: the sealed fields were sealed by {_shown(sealed.sender)}, but this "
                f"message is signed by {signer}; refused"
            )
        if sealed.topic != topic:
            raise TamperedError(
                f"moved: the sealed fields were sealed for topic {_shown(sealed.topic)}, but this "
                f"message is on topic {topic}; refused"
            )
        if sealed.kind != kind:
            raise TamperedError(
                f"relabelled: the sealed fields were sealed as a {_shown(sealed.kind)} message, but "
                f"this message says {kind}; refused"
            )
        if projection != sealed_projection:
            changed = plan.changed_clear_fields(sealed_projection, projection, sealed_format=sealed_format)
            which = ", ".join(changed[:10]) + (f" (and {len(changed) - 10} more)" if len(changed) > 10 else "")
            raise TamperedError(
                f"clear fields changed after sealing: {which or 'their encoding differs'}; refused"
            )
        binding = Binding(signer, topic, kind, clear_digest(projection))
        return FieldContext(
            context.referral_id, context.referral_version, context.recipient, context.schema_fingerprint, binding
        )

    def _data_key(self, wrapped: bytes, mode: int, recipient_key_id: str) -> DataKey:
        cache = self.cache if mode == MODE_RECIPIENT else None
        slot = wrapped_slot(self.party, wrapped) if cache is not None else b""
        if cache is not None:
            hit: DataKey | None = cache.get(slot)
            if hit is not None:
                return hit
        pair = self.keystore.get(recipient_key_id)
        key = unwrap_data_key(
            wrapped,
            recipient=self.party,
            private_key=pair.encryption,
            case_keys=self.case_keys if mode != MODE_RECIPIENT else None,
            shares=self.cache,
        )
        if cache is not None:
            cache.put(slot, key)
        return key
