"""Unambiguous byte encodings for everything that is authenticated or signed.

Associated data, key-derivation info and signature input are all built from several variable
length parts (ids, paths, header values). Plain concatenation is ambiguous ("ab"+"c" equals
"a"+"bc"), which would let one context pass for another. Every part here is therefore prefixed
with its length, so two different lists of parts can never encode to the same bytes.

This module must never hold or see key material or values; it only frames identifiers.
"""

from __future__ import annotations

import struct

from referral_broker.errors import TamperedError

_U32 = struct.Struct(">I")


def frame(*parts: bytes | str) -> bytes:
    """Each part as a 4-byte big-endian length then its bytes (strings as UTF-8)."""
    out: list[bytes] = []
    add = out.append
    pack = _U32.pack
    for part in parts:
        raw = part.encode("utf-8") if isinstance(part, str) else part
        add(pack(len(raw)))
        add(raw)
    return b"".join(out)


def unframe(data: bytes, count: int | None, what: str) -> list[bytes]:
    """The ``count`` parts (every part when None) of :func:`frame` output, refusing a short,
    overlong or padded input."""
    parts: list[bytes] = []
    pos = 0
    while (len(parts) < count) if count is not None else (pos < len(data)):
        if pos + 4 > len(data):
            raise TamperedError(f"truncated {what}")
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if pos + n > len(data):
            raise TamperedError(f"truncated {what}")
        parts.append(bytes(data[pos : pos + n]))
        pos += n
    if pos != len(data):
        raise TamperedError(f"malformed {what}: trailing bytes")
    return parts


def short(part: bytes | str) -> bytes:
    """One part with a 1-byte length, for the short ids carried inside sealed values."""
    raw = part.encode("utf-8") if isinstance(part, str) else bytes(part)
    if not 0 < len(raw) < 256:
        raise ValueError("short part must be 1 to 255 bytes")
    return bytes([len(raw)]) + raw


class Reader:
    """Reads a byte string front to back; any overrun is a truncated input, never an IndexError."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise TamperedError(f"truncated {self._what}")
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def short(self) -> bytes:
        n = self.byte()
        if n == 0:
            raise TamperedError(f"malformed {self._what}: empty id")
        return self.take(n)

    def rest(self) -> bytes:
        out = bytes(self._data[self._pos :])
        self._pos = len(self._data)
        return out

    @property
    def consumed(self) -> int:
        return self._pos
