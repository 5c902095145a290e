"""Message signatures: Ed25519 by the sender over topic, key, headers and value.

What is signed (:func:`signing_input`) is a length-prefixed encoding of::

    label "referral-broker/message/v1" | topic | key presence (1 byte) + key | header count |
    each header name and value, IN THE ORDER THEY ARE SENT, except the signature header | value

A message of a batch (:func:`sign_batch`) carries instead an ``rb-batch-proof`` header, and
its signature is over the root of a Merkle tree (:mod:`~referral_broker.sealing.merkle`) whose
leaves are the signing inputs of the batch's messages (each without ``rb-batch-proof``), framed
as ``label "referral-broker/batch/v1" | root``: one signature for a batch, each message still
verified on its own (its proof leads to the signed root). The two labels keep a batch signature
from passing for a message's, or the other way round.

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
import threading
from collections import OrderedDict
from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from referral_broker.errors import SignatureError
from referral_broker.sealing.framing import frame
from referral_broker.sealing.merkle import decode_proof, encode_proof, leaf_hash, root_from_proof, tree

SIGNATURE_HEADER = "rb-signature"
BATCH_PROOF_HEADER = "rb-batch-proof"
SIGNATURE_SIZE = 64
_LABEL = b"referral-broker/message/v1"
_BATCH_LABEL = b"referral-broker/batch/v1"
_UNSIGNED = (SIGNATURE_HEADER, BATCH_PROOF_HEADER)
_U32 = struct.Struct(">I")
_FRAMED_LABEL = frame(_LABEL)
_FOUR = _U32.pack(4)  # the header count is a framed 4-byte part

Headers = Sequence[tuple[str, bytes]]


def signing_input(topic: str, key: bytes | None, headers: Headers, value: bytes) -> bytes:
    """The exact bytes a signature covers (the signature header itself left out): what
    ``frame(label, topic, key, count, name, value, ..., value)`` gives, built in one pass (it
    runs for every message signed or verified)."""
    return _signing_input(topic, key, headers, value)[0]


def _signing_input(topic: str, key: bytes | None, headers: Headers, value: bytes) -> tuple[bytes, bool]:
    """:func:`signing_input`, and whether a signature or proof header was left out."""
    pack = _U32.pack
    names = _FRAMED_NAMES
    raw_topic = topic.encode("utf-8")
    raw_key = b"\x00" if key is None else b"\x01" + key
    out = [_FRAMED_LABEL, pack(len(raw_topic)), raw_topic, pack(len(raw_key)), raw_key, _FOUR, b""]
    add = out.extend
    count = 0
    for name, val in headers:
        if name in _UNSIGNED:
            continue
        add((names.get(name) or _framed_name(name), pack(len(val)), val))
        count += 1
    out[6] = pack(count)
    add((pack(len(value)), value))
    return b"".join(out), count != len(headers)


# A header name's framed bytes, by name: the same few dozen names head every message.
_FRAMED_NAMES: dict[str, bytes] = {}


def _framed_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    framed = _U32.pack(len(raw)) + raw
    if len(_FRAMED_NAMES) < 1024:  # a sender's odd names do not grow it without bound
        _FRAMED_NAMES[name] = framed
    return framed


def sign_message(
    private_key: Ed25519PrivateKey, topic: str, key: bytes | None, headers: Headers, value: bytes
) -> bytes:
    if any(name == BATCH_PROOF_HEADER for name, _ in headers):
        raise ValueError("a message signed on its own carries no batch proof")
    return private_key.sign(signing_input(topic, key, headers, value))


def sign_batch(
    private_key: Ed25519PrivateKey, messages: Sequence[tuple[str, bytes | None, Headers, bytes]]
) -> list[list[tuple[str, bytes]]]:
    """The headers of each (topic, key, headers, value), in order, with its ``rb-batch-proof``
    and the batch's one signature appended: what :func:`verify_message` accepts for each."""
    leaves = []
    for topic, key, headers, value in messages:
        data, left_out = _signing_input(topic, key, headers, value)
        if left_out:
            raise ValueError("a message of a batch must not carry a signature or a proof yet")
        leaves.append(leaf_hash(data))
    root, paths = tree(leaves)
    signature = private_key.sign(frame(_BATCH_LABEL, root))
    return [
        [*headers, (BATCH_PROOF_HEADER, encode_proof(i, len(leaves), paths[i])), (SIGNATURE_HEADER, signature)]
        for i, (_, _, headers, _) in enumerate(messages)
    ]


class _VerifiedRoots:
    """Batch roots whose signature verified, by (signer key, root, signature): the other
    messages of a batch then cost a proof, not another Ed25519 verification. Only a success
    is kept, and only for the exact key, root and signature bytes that verified."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._seen: OrderedDict[tuple[bytes, bytes, bytes], None] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, public_key: Ed25519PublicKey, root: bytes, signature: bytes) -> None:
        entry = (public_key.public_bytes_raw(), root, signature)
        with self._lock:
            if entry in self._seen:
                self._seen.move_to_end(entry)
                return
        public_key.verify(signature, frame(_BATCH_LABEL, root))  # InvalidSignature: not kept
        with self._lock:
            self._seen[entry] = None
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)


_verified_roots = _VerifiedRoots()


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
    proofs = [val for name, val in headers if name == BATCH_PROOF_HEADER]
    try:
        if not proofs:
            public_key.verify(signature, signing_input(topic, key, headers, value))
        elif len(proofs) > 1:
            raise SignatureError("message carries more than one rb-batch-proof header; refused")
        else:
            index, size, siblings = decode_proof(proofs[0])
            root = root_from_proof(leaf_hash(signing_input(topic, key, headers, value)), index, size, siblings)
            _verified_roots.verify(public_key, root, signature)
    except InvalidSignature:
        raise SignatureError(
            f"signature of {signer} does not verify: the message was altered, moved to another "
            "topic, or forged"
        ) from None
