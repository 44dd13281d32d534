"""Deterministic CBOR (RFC 8949 §4.2) for everything valuemesh signs or sends.

Only the subset valuemesh needs: unsigned and negative integers, byte strings,
text strings, arrays, maps, booleans and null. No floats, tags, indefinite
lengths or undefined. Decoding is strict: a value must be encoded in its one
canonical form (shortest heads, map keys sorted bytewise by their encoding, no
duplicate keys), so a signature covers exactly one byte string.

Two decoders implement one definition. The reference is the pure-Python
`_Decoder` below. `decode` first tries cbor2's native decoder and accepts its
result only when it can prove the input is the canonical encoding of a value
in the subset (see `_native`); anything it cannot prove, including every
invalid input, goes to the reference, which accepts or refuses it with its own
error. So the native path changes speed, never answers
(tests/test_cbor_native.py checks both agree).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import cbor2

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
    """Encode `value` canonically; raise LocalError for unsupported types.

    Maps and arrays (records, blocks, ledger values) are written by cbor2's encoder
    once `_canonical` has proven the value is in the subset and put every map's keys
    in canonical order; everything else, every refusal included, is the reference
    encoder's (`encode_reference`), so the fast path changes speed, never bytes or
    errors (tests/test_cbor_encode_native.py checks both agree).
    """
    t = type(value)
    if t is dict or t is list or t is tuple:
        ordered = _canonical(value, 0)
        if ordered is not _NOT_PROVEN:
            try:
                return cbor2.dumps(ordered)
            except Exception:  # e.g. text with a lone surrogate: the reference refuses it in its own words
                pass
    return encode_reference(value)


def encode_with_form(value: CborValue, max_size: int = DEFAULT_MAX_SIZE) -> tuple[bytes, CborValue]:
    """`encode(value)` and the value `decode` gives back for those bytes (tuples as lists,
    map keys in canonical order, containers of its own), without decoding them when the
    native path has the canonical copy at hand already; the form is None if the encoding
    is over `max_size` (the caller refuses it by its size)."""
    t = type(value)
    if t is dict or t is list or t is tuple:
        ordered = _canonical(value, 0)
        if ordered is not _NOT_PROVEN:
            try:
                return cbor2.dumps(ordered), ordered
            except Exception:  # e.g. text with a lone surrogate: the reference refuses it in its own words
                pass
    raw = encode_reference(value)
    return raw, (decode(raw, max_size) if len(raw) <= max_size else None)


def encode_reference(value: CborValue) -> bytes:
    """`encode` by the pure-Python reference encoder alone (for tests and comparisons)."""
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
        try:
            b = value.encode("utf-8")
        except UnicodeEncodeError:
            raise LocalError("A text value is not valid Unicode (it holds a lone surrogate).") from None
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


_NON_CANONICAL = "The encoding is not canonical (a length is not in its shortest form)."
_TRUNCATED = "The encoding ends in the middle of a value."


class _Decoder:
    """Strict one-pass decoder; hot path for every record a node receives.

    Heads are parsed inline rather than through helper calls because record
    verification throughput is bounded by this loop (see bench/protocol.py).
    """

    __slots__ = ("counting", "data", "end", "items", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.end = len(data)
        self.pos = 0
        self.items = 0
        # Every item takes at least one byte, so shorter inputs cannot exceed
        # the item limit and skip the count (all records do).
        self.counting = self.end > MAX_ITEMS

    def _count(self) -> None:
        self.items += 1
        if self.items > MAX_ITEMS:
            raise DecodeError("The encoding holds too many items.")

    def value(self, depth: int) -> CborValue:
        if depth > MAX_DEPTH:
            raise DecodeError("The encoding is nested too deeply.")
        if self.counting:
            self._count()
        data = self.data
        pos = self.pos
        end = self.end
        if pos >= end:
            raise DecodeError(_TRUNCATED)
        ib = data[pos]
        pos += 1
        major = ib >> 5
        info = ib & 0x1F
        if major == 7:
            self.pos = pos
            if info == 20:
                return False
            if info == 21:
                return True
            if info == 22:
                return None
            if info in (25, 26, 27):
                raise DecodeError("Floats are not allowed in valuemesh data.")
            raise DecodeError("The encoding uses a simple value valuemesh does not accept.")
        if major == 6:
            raise DecodeError("The encoding uses tags, which valuemesh does not accept.")
        if info < 24:
            arg = info
        elif info == 24:
            if pos + 1 > end:
                raise DecodeError(_TRUNCATED)
            arg = data[pos]
            pos += 1
            if arg < 24:
                raise DecodeError(_NON_CANONICAL)
        elif info == 25:
            if pos + 2 > end:
                raise DecodeError(_TRUNCATED)
            arg = (data[pos] << 8) | data[pos + 1]
            pos += 2
            if arg < 0x100:
                raise DecodeError(_NON_CANONICAL)
        elif info == 26:
            if pos + 4 > end:
                raise DecodeError(_TRUNCATED)
            arg = int.from_bytes(data[pos : pos + 4], "big")
            pos += 4
            if arg < 0x10000:
                raise DecodeError(_NON_CANONICAL)
        elif info == 27:
            if pos + 8 > end:
                raise DecodeError(_TRUNCATED)
            arg = int.from_bytes(data[pos : pos + 8], "big")
            pos += 8
            if arg < 0x100000000:
                raise DecodeError(_NON_CANONICAL)
        else:
            raise DecodeError("The encoding uses an indefinite or reserved length, which is not allowed.")
        if major == 0:
            self.pos = pos
            return arg
        if major == 1:
            self.pos = pos
            return -1 - arg
        if major == 2 or major == 3:
            stop = pos + arg
            if stop > end:
                raise DecodeError(_TRUNCATED)
            self.pos = stop
            if major == 2:
                return data[pos:stop]
            try:
                return data[pos:stop].decode("utf-8")
            except UnicodeDecodeError:
                raise DecodeError("A text string is not valid UTF-8.") from None
        self.pos = pos
        if major == 4:
            if arg > end - pos:
                raise DecodeError("An array claims more items than the encoding holds.")
            return [self.value(depth + 1) for _ in range(arg)]
        if arg > end - pos:
            raise DecodeError("A map claims more entries than the encoding holds.")
        return self._map_body(arg, depth)

    def _map_body(
        self, n: int, depth: int, spans: list[tuple[Any, int, int]] | None = None
    ) -> dict[Any, Any]:
        """Decode `n` map entries; append (key, key start, value end) to `spans` if given.

        Short text keys and short scalar values are decoded inline: they are
        most of the items in a record, and a call per item doubles the cost.
        """
        if n and depth + 1 > MAX_DEPTH:
            raise DecodeError("The encoding is nested too deeply.")
        result: dict[Any, Any] = {}
        data = self.data
        end = self.end
        last_key = b""
        pos = self.pos
        for i in range(n):
            start = pos
            ib = data[pos] if pos < end else 0xFF
            if 0x60 <= ib < 0x78:
                pos += 1 + ib - 0x60
                if pos > end:
                    raise DecodeError(_TRUNCATED)
                try:
                    key: Any = data[start + 1 : pos].decode("utf-8")
                except UnicodeDecodeError:
                    raise DecodeError("A text string is not valid UTF-8.") from None
                if self.counting:
                    self._count()
            else:
                self.pos = pos
                key = self.value(depth + 1)
                if type(key) is not str and type(key) is not int:
                    raise DecodeError("A map key is neither text nor an integer.")
                pos = self.pos
            key_bytes = data[start:pos]
            # Bytewise order of the encoded keys (RFC 8949 §4.2.1); equal means repeated.
            if i and key_bytes <= last_key:
                raise DecodeError("The encoding is not canonical (map keys are unsorted or repeated).")
            last_key = key_bytes
            ib = data[pos] if pos < end else 0xFF
            if ib < 0x18:
                result[key] = ib
                pos += 1
                if self.counting:
                    self._count()
            elif 0x60 <= ib < 0x78:
                stop = pos + 1 + ib - 0x60
                if stop > end:
                    raise DecodeError(_TRUNCATED)
                try:
                    result[key] = data[pos + 1 : stop].decode("utf-8")
                except UnicodeDecodeError:
                    raise DecodeError("A text string is not valid UTF-8.") from None
                pos = stop
                if self.counting:
                    self._count()
            else:
                self.pos = pos
                result[key] = self._scalar_or_value(depth + 1)
                pos = self.pos
            if spans is not None:
                spans.append((key, start, pos))
        self.pos = pos
        return result

    def _scalar_or_value(self, depth: int) -> CborValue:
        """Decode the common scalar forms of a record field inline, else defer to value()."""
        data = self.data
        pos = self.pos
        end = self.end
        if pos + 1 >= end:
            return self.value(depth)
        ib = data[pos]
        if ib < 0x18:
            value: CborValue = ib
            self.pos = pos + 1
        elif ib == 0x1B and pos + 9 <= end:
            value = int.from_bytes(data[pos + 1 : pos + 9], "big")
            if value < 0x100000000:
                raise DecodeError(_NON_CANONICAL)
            self.pos = pos + 9
        elif 0x40 <= ib < 0x58 or 0x60 <= ib < 0x78:
            stop = pos + 1 + (ib & 0x1F)
            if stop > end:
                raise DecodeError(_TRUNCATED)
            value = data[pos + 1 : stop]
            self.pos = stop
        elif ib == 0x58 or ib == 0x78:
            n = data[pos + 1]
            if n < 24:
                raise DecodeError(_NON_CANONICAL)
            stop = pos + 2 + n
            if stop > end:
                raise DecodeError(_TRUNCATED)
            value = data[pos + 2 : stop]
            self.pos = stop
        else:
            return self.value(depth)
        if self.counting:
            self._count()
        if ib >= 0x60:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise DecodeError("A text string is not valid UTF-8.") from None
        return value


def _refuse_tag(*_: object) -> Any:
    raise ValueError("valuemesh data has no tags")


# Tags cbor2 6.x decodes by itself (found by probing every tag below 70 000).
# Refusing them as they are met keeps hostile input away from the datetime,
# regex, MIME and address parsers they would run, and from shared references
# (28/29), which can make a decoded value a cyclic or exponentially shared
# graph. A tag missing here is still refused: see _native.
_CBOR2_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004,
               43000, 55799)
_NATIVE_OPTIONS: dict[str, Any] = {
    "tag_hook": _refuse_tag,
    "semantic_decoders": dict.fromkeys(_CBOR2_TAGS, _refuse_tag),
    "allow_indefinite": False,
    "allow_duplicate_keys": False,
    "max_depth": MAX_DEPTH,
}
_NOT_PROVEN = object()
# Below this size the reference decoder is faster than cbor2's call plus the proof
# (e.g. 1.2 against 1.8 µs for an integer, 5.9 against 6.2 for a 49-byte map).
NATIVE_MIN_SIZE = 64
_SCALARS = frozenset({str, bytes, bool, type(None)})


def _plain_items(values: Iterable[Any], depth: int) -> int:
    """Count the CBOR items in `values` (all at `depth`), or -1 if one is outside the subset."""
    n = 0
    for x in values:
        t = type(x)
        if t in _SCALARS:
            n += 1
        elif t is int:
            if not -1 - _UINT64_MAX <= x <= _UINT64_MAX:
                return -1
            n += 1
        else:
            m = _plain(x, depth)
            if m < 0:
                return -1
            n += m
            # Bounds the walk however the value was built (the decoder is linear in its input).
            if n > MAX_ITEMS:
                return -1
    return n


def _keys_in_order(value: dict[Any, Any]) -> bool:
    """Whether the keys are text or in-range integers in strictly increasing order of their encodings."""
    prev: tuple[Any, ...] = ()
    for k in value:
        tk = type(k)
        # A rank that orders like the encoding: major type, then (heads being
        # shortest) the length, then the content; code point order of text is the
        # byte order of its UTF-8.
        rank: tuple[Any, ...]
        if tk is str:
            rank = (3, len(k.encode()), k)
        elif tk is int:
            if k >= 0:
                if k > _UINT64_MAX:
                    return False
                rank = (0, k)
            else:
                if -1 - k > _UINT64_MAX:
                    return False
                rank = (1, -1 - k)
        else:
            return False
        if rank <= prev:
            return False
        prev = rank
    return True


def _plain(value: Any, depth: int) -> int:
    """Items in the container `value` at `depth`, itself included, or -1 unless it is in the
    subset: exact types, keys text or integers in strictly increasing order of their
    encodings, integers in range, nothing below MAX_DEPTH."""
    t = type(value)
    if t is list:
        if not value:
            return 1
        if depth >= MAX_DEPTH:
            return -1
        m = _plain_items(value, depth + 1)
        return -1 if m < 0 else 1 + m
    if t is not dict:
        return -1
    if not value:
        return 1
    if depth >= MAX_DEPTH:
        return -1
    # ASCII text keys (nearly all maps) encode as a head that grows with the length,
    # then the characters: canonical order is by length, then by the text.
    last_len = -1
    last = ""
    for k in value:
        if type(k) is not str or not k.isascii():
            if not _keys_in_order(value):
                return -1
            break
        n = len(k)
        if n < last_len or (n == last_len and k <= last):
            return -1
        last_len = n
        last = k
    m = _plain_items(value.values(), depth + 1)
    return -1 if m < 0 else 1 + len(value) + m


# Key tuple of a map -> its keys in canonical order, for the small key sets
# that recur on every record (plugin state values, record and block envelopes).
_KEY_ORDERS: dict[tuple[Any, ...], tuple[str, ...]] = {}
MAX_KEY_ORDERS = 1024
MAX_CACHED_KEYS = 32
_STR_ONLY = frozenset({str})


def _text_key_order(keys: tuple[Any, ...]) -> Any:
    """The keys in canonical order if all are ASCII text (whose encodings order by length,
    then by the text, like `_plain` reads them), else _NOT_PROVEN."""
    for k in keys:
        if type(k) is not str or not k.isascii():
            return _NOT_PROVEN
    return tuple(sorted(keys, key=lambda k: (len(k), k)))


def _canonical(value: Any, depth: int) -> Any:
    """`value` (a dict, list or tuple at `depth`) rebuilt with every map's keys in canonical
    order, or _NOT_PROVEN unless it holds only the subset's exact types, integers in range,
    ASCII text keys and nothing deeper than the reference encoder accepts. cbor2's encoder
    writes such a value with shortest heads, definite lengths and keys in the dict's order
    (the same property `_native` relies on), i.e. exactly as `encode_reference` does."""
    t = type(value)
    if t is dict:
        if not value:
            return {}  # a new one: encode_with_form's copy shares no container with the value
        if depth >= MAX_DEPTH:
            return _NOT_PROVEN
        keys = tuple(value)
        order = _KEY_ORDERS.get(keys)
        if order is None:
            order = _text_key_order(keys)
            # Only proven orders are remembered: keys refused for their type (a str subclass)
            # compare equal to plain text keys and must not refuse those later.
            if order is not _NOT_PROVEN and len(keys) <= MAX_CACHED_KEYS:
                if len(_KEY_ORDERS) >= MAX_KEY_ORDERS:
                    _KEY_ORDERS.clear()
                _KEY_ORDERS[keys] = order
        elif not _STR_ONLY.issuperset(map(type, keys)):
            return _NOT_PROVEN  # equal to remembered text keys but not of type str (a subclass)
        if order is _NOT_PROVEN:
            return _NOT_PROVEN
        out: dict[str, Any] = {}
        for k in order:
            v = value[k]
            tv = type(v)
            if tv is int:
                if not -1 - _UINT64_MAX <= v <= _UINT64_MAX:
                    return _NOT_PROVEN
            elif tv not in _SCALARS:
                v = _canonical(v, depth + 1)
                if v is _NOT_PROVEN:
                    return _NOT_PROVEN
            out[k] = v
        return out
    if t is list or t is tuple:
        if not value:
            return []
        if depth >= MAX_DEPTH:
            return _NOT_PROVEN
        items = []
        for v in value:
            tv = type(v)
            if tv is int:
                if not -1 - _UINT64_MAX <= v <= _UINT64_MAX:
                    return _NOT_PROVEN
            elif tv not in _SCALARS:
                v = _canonical(v, depth + 1)
                if v is _NOT_PROVEN:
                    return _NOT_PROVEN
            items.append(v)
        return items
    return _NOT_PROVEN


def _native(raw: bytes) -> Any:
    """The value `raw` encodes if cbor2's decoder proves it canonical, else _NOT_PROVEN.

    The proof: `value` holds only the subset's types, integers in range, keys in
    canonical order, within the depth and item limits (_plain); cbor2's encoder
    writes such a value with shortest heads, definite lengths and keys in the
    dict's order, i.e. exactly as `encode` does. So `dumps(value) == raw` means
    raw is the one canonical encoding of value, which the reference decoder
    accepts and decodes to an equal value of the same types. Floats, tags,
    simple values, duplicate keys, indefinite lengths and long heads all fail
    one of the two checks.
    """
    try:
        value = cbor2.loads(raw, **_NATIVE_OPTIONS)
        t = type(value)
        if t in _SCALARS or t is int:
            n = 1 if t is not int or -1 - _UINT64_MAX <= value <= _UINT64_MAX else -1
        else:
            n = _plain(value, 0)
        if 0 < n <= MAX_ITEMS and cbor2.dumps(value) == raw:
            return value
    except Exception:  # any failure only means "not proven": the reference decides
        pass
    return _NOT_PROVEN


def decode_fixed_map(raw: bytes, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """The map `raw` encodes if it has exactly `keys` (given in canonical order) and is
    proven canonical as in _native; None otherwise, and the caller then decodes `raw`
    strictly, which accepts or refuses it as before.

    For envelopes with a fixed key set (records): comparing the key tuple replaces
    ranking each key. `raw` must already be within the caller's size limit.
    """
    try:
        m = cbor2.loads(raw, **_NATIVE_OPTIONS)
        if type(m) is not dict or tuple(m) != keys:
            return None
        n = _plain_items(m.values(), 1)
        if 0 <= n <= MAX_ITEMS - 1 - len(keys) and cbor2.dumps(m) == raw:
            return m
    except Exception:  # any failure only means "not proven": the reference decides
        pass
    return None


def _check_input(data: object, max_size: int) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("Only bytes can be decoded.")
    raw = bytes(data)
    if len(raw) > max_size:
        raise DecodeError(f"The encoding is {len(raw)} bytes, over the limit of {max_size}.")
    if not raw:
        raise DecodeError("The encoding is empty.")
    return raw


def decode(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> CborValue:
    """Decode one canonical CBOR value that must fill `data` exactly.

    Raises DecodeError (never anything else) for malformed, non-canonical,
    oversized or trailing input.
    """
    raw = _check_input(data, max_size)
    if len(raw) >= NATIVE_MIN_SIZE:
        value = _native(raw)
        if value is not _NOT_PROVEN:
            return value
    return _decode_reference(raw)


def decode_reference(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> CborValue:
    """`decode` by the pure-Python reference decoder alone (for tests and comparisons)."""
    return _decode_reference(_check_input(data, max_size))


def _decode_reference(raw: bytes) -> CborValue:
    dec = _Decoder(raw)
    try:
        value = dec.value(0)
    except RecursionError:
        raise DecodeError("The encoding is nested too deeply.") from None
    if dec.pos != len(raw):
        raise DecodeError("The encoding has trailing bytes after the value.")
    return value


def decode_prefix(data: bytes, pos: int, depth: int = 1) -> tuple[CborValue, int]:
    """Decode one canonical value of `data` starting at `pos`; return it and its end.

    For decoders of fixed envelopes (records) that parse their own frame and
    hand each variable part here; `depth` is the value's nesting level.
    """
    dec = _Decoder(data)
    dec.pos = pos + 1
    try:
        # A short map (the usual record body) skips value()'s dispatch.
        if pos < dec.end and 0xA0 <= data[pos] < 0xB8 and depth <= MAX_DEPTH:
            n = data[pos] - 0xA0
            if dec.counting:
                dec._count()
            if n > dec.end - dec.pos:
                raise DecodeError("A map claims more entries than the encoding holds.")
            return dec._map_body(n, depth), dec.pos
        dec.pos = pos
        value = dec.value(depth)
    except RecursionError:
        raise DecodeError("The encoding is nested too deeply.") from None
    return value, dec.pos


def read_uint(data: bytes, pos: int) -> tuple[int, int] | None:
    """Read a canonical unsigned integer at `pos`; None if another type is there.

    Raises DecodeError for a non-canonical or truncated integer.
    """
    if pos >= len(data) or data[pos] >> 5 != 0:
        return None
    value, end = decode_prefix(data, pos, 0)
    return int(value), end


def decode_map_without(data: bytes, omit: str, max_size: int = DEFAULT_MAX_SIZE) -> tuple[dict[Any, Any], bytes]:
    """Decode a canonical top-level map and also return the canonical encoding
    of the same map with the entry `omit` removed (the signed payload).

    Because decoding is strict, the encoding of the rest is a splice of the
    input, so a signed object is verified without re-encoding it. Raises
    DecodeError if `data` is not such a map or lacks `omit`.
    """
    raw = _check_input(data, max_size)
    native = _native(raw) if len(raw) >= NATIVE_MIN_SIZE else _NOT_PROVEN
    if type(native) is dict and omit in native:
        # Canonical and sorted, so the rest re-encodes to the splice of the input.
        return native, cbor2.dumps({k: v for k, v in native.items() if k != omit})
    return _map_without_reference(raw, omit)


def decode_map_without_reference(
    data: bytes, omit: str, max_size: int = DEFAULT_MAX_SIZE
) -> tuple[dict[Any, Any], bytes]:
    """`decode_map_without` by the pure-Python reference decoder alone."""
    return _map_without_reference(_check_input(data, max_size), omit)


def _map_without_reference(raw: bytes, omit: str) -> tuple[dict[Any, Any], bytes]:
    ib = raw[0]
    if ib >> 5 != 5:
        raise DecodeError("The encoding is not a map.")
    dec = _Decoder(raw)
    try:
        # The strict head parser is reused by reading the map head as an unsigned int.
        head = bytearray(raw[:9])
        head[0] = ib & 0x1F
        hdec = _Decoder(bytes(head))
        n = hdec.value(0)
        dec.pos = hdec.pos
        dec.items = 1
        if n > len(raw) - dec.pos:
            raise DecodeError("A map claims more entries than the encoding holds.")
        body_start = dec.pos
        spans: list[tuple[Any, int, int]] = []
        result = dec._map_body(n, 0, spans)
    except RecursionError:
        raise DecodeError("The encoding is nested too deeply.") from None
    if dec.pos != len(raw):
        raise DecodeError("The encoding has trailing bytes after the value.")
    for key, start, stop in spans:
        if key == omit and type(key) is str:
            return result, _head(5, n - 1) + raw[body_start:start] + raw[stop:]
    raise DecodeError(f"The map has no '{omit}' entry.")


def as_list(value: object, what: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise DecodeError(f"{what} must be an array.")
    return value
