"""Deterministic CBOR (RFC 8949 §4.2) for everything valuemesh signs or sends.

Only the subset valuemesh needs: unsigned and negative integers, byte strings,
text strings, arrays, maps, booleans and null. No floats, tags, indefinite
lengths or undefined. Decoding is strict: a value must be encoded in its one
canonical form (shortest heads, map keys sorted bytewise by their encoding, no
duplicate keys), so a signature covers exactly one byte string.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import DecodeError, LocalError

MAX_DEPTH = 16
MAX_ITEMS = 100_000
DEFAULT_MAX_SIZE = 4 * 1024 * 1024
_UINT64_MAX = (1 << 64) - 1

CborValue = Any


def _head(major: int, value: int) -> bytes:
    mt = major << 5
    if value < 24:
        return bytes((mt | value,))
    if value < 0x100:
        return bytes((mt | 24, value))
    if value < 0x10000:
        return bytes((mt | 25,)) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes((mt | 26,)) + value.to_bytes(4, "big")
    return bytes((mt | 27,)) + value.to_bytes(8, "big")


def encode(value: CborValue) -> bytes:
    """Encode `value` canonically; raise LocalError for unsupported types."""
    out = bytearray()
    _encode_into(value, out, 0)
    return bytes(out)


def _encode_into(value: CborValue, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise LocalError("The value is nested too deeply to encode.")
    if value is None:
        out.append(0xF6)
    elif value is True:
        out.append(0xF5)
    elif value is False:
        out.append(0xF4)
    elif isinstance(value, int):
        if value >= 0:
            if value > _UINT64_MAX:
                raise LocalError("An integer is too large to encode.")
            out += _head(0, value)
        else:
            if -1 - value > _UINT64_MAX:
                raise LocalError("An integer is too small to encode.")
            out += _head(1, -1 - value)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        b = bytes(value)
        out += _head(2, len(b))
        out += b
    elif isinstance(value, str):
        b = value.encode("utf-8")
        out += _head(3, len(b))
        out += b
    elif isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise LocalError("Map keys must be text or integers.")
            items.append((encode(k), v))
        items.sort(key=lambda kv: kv[0])
        for i in range(1, len(items)):
            if items[i][0] == items[i - 1][0]:
                raise LocalError("A map has the same key twice.")
        out += _head(5, len(items))
        for kb, v in items:
            out += kb
            _encode_into(v, out, depth + 1)
    elif isinstance(value, (list, tuple)):
        out += _head(4, len(value))
        for v in value:
            _encode_into(v, out, depth + 1)
    elif isinstance(value, float):
        raise LocalError("Floats are not allowed in signed data; use integers or decimal strings.")
    else:
        raise LocalError(f"A value of type {type(value).__name__} cannot be encoded.")


class _Decoder:
    __slots__ = ("data", "items", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.items = 0

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise DecodeError("The encoding ends in the middle of a value.")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def _arg(self, info: int) -> int:
        if info < 24:
            return info
        if info == 24:
            v = self._take(1)[0]
            if v < 24:
                raise DecodeError("The encoding is not canonical (a length is not in its shortest form).")
            return v
        if info == 25:
            v = int.from_bytes(self._take(2), "big")
            if v < 0x100:
                raise DecodeError("The encoding is not canonical (a length is not in its shortest form).")
            return v
        if info == 26:
            v = int.from_bytes(self._take(4), "big")
            if v < 0x10000:
                raise DecodeError("The encoding is not canonical (a length is not in its shortest form).")
            return v
        if info == 27:
            v = int.from_bytes(self._take(8), "big")
            if v < 0x100000000:
                raise DecodeError("The encoding is not canonical (a length is not in its shortest form).")
            return v
        raise DecodeError("The encoding uses an indefinite or reserved length, which is not allowed.")

    def value(self, depth: int) -> CborValue:
        if depth > MAX_DEPTH:
            raise DecodeError("The encoding is nested too deeply.")
        self.items += 1
        if self.items > MAX_ITEMS:
            raise DecodeError("The encoding holds too many items.")
        ib = self._take(1)[0]
        major, info = ib >> 5, ib & 0x1F
        if major == 0:
            return self._arg(info)
        if major == 1:
            return -1 - self._arg(info)
        if major == 2:
            return self._take(self._arg(info))
        if major == 3:
            raw = self._take(self._arg(info))
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DecodeError("A text string is not valid UTF-8.") from None
        if major == 4:
            n = self._arg(info)
            if n > len(self.data) - self.pos:
                raise DecodeError("An array claims more items than the encoding holds.")
            return [self.value(depth + 1) for _ in range(n)]
        if major == 5:
            n = self._arg(info)
            if n > len(self.data) - self.pos:
                raise DecodeError("A map claims more entries than the encoding holds.")
            result: dict[Any, Any] = {}
            last_key: bytes | None = None
            for _ in range(n):
                start = self.pos
                key = self.value(depth + 1)
                key_bytes = self.data[start : self.pos]
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise DecodeError("A map key is neither text nor an integer.")
                if last_key is not None and key_bytes <= last_key:
                    raise DecodeError("The encoding is not canonical (map keys are unsorted or repeated).")
                last_key = key_bytes
                result[key] = self.value(depth + 1)
            return result
        if major == 7:
            if info == 20:
                return False
            if info == 21:
                return True
            if info == 22:
                return None
            if info in (25, 26, 27):
                raise DecodeError("Floats are not allowed in valuemesh data.")
            raise DecodeError("The encoding uses a simple value valuemesh does not accept.")
        raise DecodeError("The encoding uses tags, which valuemesh does not accept.")


def decode(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> CborValue:
    """Decode one canonical CBOR value that must fill `data` exactly.

    Raises DecodeError (never anything else) for malformed, non-canonical,
    oversized or trailing input.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("Only bytes can be decoded.")
    data = bytes(data)
    if len(data) > max_size:
        raise DecodeError(f"The encoding is {len(data)} bytes, over the limit of {max_size}.")
    if not data:
        raise DecodeError("The encoding is empty.")
    dec = _Decoder(data)
    try:
        value = dec.value(0)
    except RecursionError:
        raise DecodeError("The encoding is nested too deeply.") from None
    if dec.pos != len(data):
        raise DecodeError("The encoding has trailing bytes after the value.")
    return value


def as_list(value: object, what: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise DecodeError(f"{what} must be an array.")
    return value
