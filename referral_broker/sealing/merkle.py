"""Merkle trees for batch signatures: one Ed25519 signature over many messages, each message
still verifiable on its own with its inclusion proof.

The tree is RFC 9162's (Certificate Transparency 2.0, section 2.1.1): a leaf hashes as
``SHA-256(0x00 | leaf)``, an inner node as ``SHA-256(0x01 | left | right)``, and a tree of ``n``
leaves splits at the largest power of two below ``n``. Built bottom-up, that is pairing each
level's nodes and carrying a lone last node up unchanged, which is how :func:`tree` does it.
The prefixes keep a leaf from passing for an inner node (a second preimage).

A proof (:func:`encode_proof`) is::

    version 1 (1 byte) | leaf index (4, big-endian) | tree size (4) | sibling hashes (32 each)

with the siblings from the leaf up. It is not secret: a sibling is a digest of another message
of the same signer's batch, whose content it does not reveal.
"""

from __future__ import annotations

import hashlib
import struct

from referral_broker.errors import SignatureError

PROOF_VERSION = 1
HASH_SIZE = 32
MAX_LEAVES = 1 << 20  # far above a batch's messages; bounds what a proof may claim
_HEAD = struct.Struct(">BII")


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def tree(leaves: list[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root over ``leaves`` (already :func:`leaf_hash`-ed) and each leaf's siblings, from the
    leaf up."""
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    if len(leaves) > MAX_LEAVES:
        raise ValueError(f"a batch signature covers at most {MAX_LEAVES} messages")
    paths: list[list[bytes]] = [[] for _ in leaves]
    # members[i]: the leaves under node i of the current level
    members: list[list[int]] = [[i] for i in range(len(leaves))]
    level = list(leaves)
    while len(level) > 1:
        up: list[bytes] = []
        up_members: list[list[int]] = []
        for i in range(0, len(level) - 1, 2):
            for leaf in members[i]:
                paths[leaf].append(level[i + 1])
            for leaf in members[i + 1]:
                paths[leaf].append(level[i])
            up.append(_node(level[i], level[i + 1]))
            up_members.append(members[i] + members[i + 1])
        if len(level) % 2:
            up.append(level[-1])  # a lone last node goes up as it is
            up_members.append(members[-1])
        level, members = up, up_members
    return level[0], paths


def root_from_proof(leaf: bytes, index: int, size: int, siblings: list[bytes]) -> bytes:
    """The root that ``leaf`` at ``index`` of a ``size``-leaf tree reaches with ``siblings``;
    :class:`SignatureError` when the proof does not fit that tree's shape."""
    if not 0 <= index < size <= MAX_LEAVES:
        raise SignatureError("batch proof names a leaf outside its tree; refused")
    node, width, taken = leaf, size, 0
    while width > 1:
        if index % 2 or index + 1 < width:
            if taken == len(siblings):
                raise SignatureError("batch proof is too short for its tree; refused")
            sibling = siblings[taken]
            taken += 1
            node = _node(sibling, node) if index % 2 else _node(node, sibling)
        index //= 2
        width = (width + 1) // 2
    if taken != len(siblings):
        raise SignatureError("batch proof is too long for its tree; refused")
    return node


def encode_proof(index: int, size: int, siblings: list[bytes]) -> bytes:
    return _HEAD.pack(PROOF_VERSION, index, size) + b"".join(siblings)


def decode_proof(data: bytes) -> tuple[int, int, list[bytes]]:
    """(index, size, siblings) of a proof; :class:`SignatureError` when malformed."""
    if len(data) < _HEAD.size or (len(data) - _HEAD.size) % HASH_SIZE:
        raise SignatureError("batch proof is malformed; refused")
    version, index, size = _HEAD.unpack_from(data)
    if version != PROOF_VERSION:
        raise SignatureError(f"batch proof version {version} is not known; refused")
    body = data[_HEAD.size :]
    return index, size, [bytes(body[i : i + HASH_SIZE]) for i in range(0, len(body), HASH_SIZE)]
