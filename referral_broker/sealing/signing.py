"""Message signatures: Ed25519 by the sender over topic, key, headers and value.

What is signed (:func:`signing_input`) is a length-prefixed encoding of::

    label "referral-broker/message/v1" | topic | key presence (1 byte) + key | header count |
    each header name and value, IN THE ORDER THEY ARE SENT, except the signature header | value

Headers are taken in wire order rather than sorted: Kafka keeps header order, so a reordering
is a change like any other and is refused; duplicate ``rb-`` header names are refused before
anything is read from them (see :mod:`referral_broker.sealing.envelope`). The topic is signed
so a message copied to another topic (another recipient's inbox) does not verify there.

:func:`verify_message` raises :class:`SignatureError` and never returns a bool, so a forgotten
check cannot pass as a success. This module must never accept a message without exactly one
signature header, and must never log or print the message it verifies.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from referral_broker.errors import SignatureError
from referral_broker.sealing.framing import frame

SIGNATURE_HEADER = "rb-signature"
SIGNATURE_SIZE = 64
_LABEL = b"referral-broker/message/v1"

Headers = Sequence[tuple[str, bytes]]


def signing_input(topic: str, key: bytes | None, headers: Headers, value: bytes) -> bytes:
    """The exact bytes a signature covers (the signature header itself left out)."""
    signed = [(name, val) for name, val in headers if name != SIGNATURE_HEADER]
    parts: list[bytes | str] = [_LABEL, topic, b"\x00" if key is None else b"\x01" + key]
    parts.append(struct.pack(">I", len(signed)))
    for name, val in signed:
        parts += [name, val]
    parts.append(value)
    return frame(*parts)


def sign_message(
    private_key: Ed25519PrivateKey, topic: str, key: bytes | None, headers: Headers, value: bytes
) -> bytes:
    return private_key.sign(signing_input(topic, key, headers, value))


def signature_of(headers: Headers) -> bytes:
    """The one signature header's value; refuses none, several, or one of the wrong size."""
    found = [val for name, val in headers if name == SIGNATURE_HEADER]
    if not found:
        raise SignatureError("message is unsigned (no rb-signature header); refused")
    if len(found) > 1:
        raise SignatureError("message carries more than one rb-signature header; refused")
    if len(found[0]) != SIGNATURE_SIZE:
        raise SignatureError(f"rb-signature header is {len(found[0])} bytes, not {SIGNATURE_SIZE}")
    return found[0]


def verify_message(
    public_key: Ed25519PublicKey,
    topic: str,
    key: bytes | None,
    headers: Headers,
    value: bytes,
    *,
    signer: str,
) -> None:
    """Return only if ``signer``'s key signed exactly this message on exactly this topic."""
    signature = signature_of(headers)
    try:
        public_key.verify(signature, signing_input(topic, key, headers, value))
    except InvalidSignature:
        raise SignatureError(
            f"signature of {signer} does not verify: the message was altered, moved to another "
            "topic, or forged"
        ) from None
