"""Tests of the deterministic CBOR codec: RFC 8949 vectors, strictness, limits.

Property tests show that anything decode accepts is the one canonical encoding
of its value, and that random bytes only ever raise DecodeError.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valuemesh.protocol import cbor
from valuemesh.protocol.errors import DecodeError, LocalError

# RFC 8949 Appendix A, restricted to the types valuemesh accepts.
RFC_VECTORS = [
    (0, "00"), (1, "01"), (10, "0a"), (23, "17"), (24, "1818"), (25, "1819"), (100, "1864"),
    (1000, "1903e8"), (1000000, "1a000f4240"), (1000000000000, "1b000000e8d4a51000"),
    (18446744073709551615, "1bffffffffffffffff"), (-1, "20"), (-10, "29"), (-100, "3863"),
    (-1000, "3903e7"), (-18446744073709551616, "3bffffffffffffffff"),
    (False, "f4"), (True, "f5"), (None, "f6"),
    (b"", "40"), (b"\x01\x02\x03\x04", "4401020304"),
    ("", "60"), ("a", "6161"), ("IETF", "6449455446"), ('"\\', "62225c"), ("\u00fc", "62c3bc"),
    ("\u6c34", "63e6b0b4"), ("\U00010151", "64f0908591"),
    ([], "80"), ([1, 2, 3], "83010203"), ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"), ({1: 2, 3: 4}, "a201020304"), ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    ({"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"}, "a56161614161626142616361436164614461656145"),
]


@pytest.mark.parametrize(("value", "hexed"), RFC_VECTORS)
def test_rfc8949_vectors_encode_and_decode(value: object, hexed: str) -> None:
    assert cbor.encode(value).hex() == hexed
    assert cbor.decode(bytes.fromhex(hexed)) == value


def test_map_keys_are_sorted_bytewise_by_their_encoding() -> None:
    # Shorter encodings sort first: 10 (0a) < -1 (20) < "b" (6162) < "aa" (626161).
    enc = cbor.encode({"aa": 3, "b": 1, -1: 5, 10: 4})
    assert enc.hex() == "a40a04200561620162616103"
    assert list(cbor.decode(enc)) == [10, -1, "b", "aa"]


def test_tuples_and_bytearrays_encode_as_arrays_and_bytes() -> None:
    assert cbor.encode((1, 2)) == cbor.encode([1, 2])
    assert cbor.encode(bytearray(b"ab")) == cbor.encode(b"ab")


NON_CANONICAL = {
    "long-form int 0 in one byte": "1800",
    "long-form int 23 in one byte": "1817",
    "long-form int in two bytes": "190017",
    "long-form int 255 in two bytes": "1900ff",
    "long-form int in four bytes": "1a000000ff",
    "long-form int in eight bytes": "1b00000000ffffffff",
    "long-form negative int": "3800",
    "long-form byte string length": "580161",
    "long-form text length": "780161",
    "long-form array length": "9800",
    "long-form map length": "b800",
    "unsorted map keys": "a2616201616101",
    "unsorted int map keys": "a2030401 02",
    "length-first key order violated": "a2626161016162 02",
    "duplicate map keys": "a2616101616102",
    "duplicate int map keys": "a201010102",
    "indefinite byte string": "5f4101ff",
    "indefinite text string": "7f6161ff",
    "indefinite array": "9f01ff",
    "indefinite map": "bf616101ff",
    "half float": "f93c00",
    "single float": "fa47c35000",
    "double float": "fb3ff199999999999a",
    "tag 0 (date)": "c074323031332d30332d32315432303a30343a30305a",
    "tag 2 (bignum)": "c249010000000000000000",
    "tag 55799 (self-describe)": "d9d9f700",
    "undefined": "f7",
    "simple value 16": "f0",
    "simple value in extra byte": "f818",
    "lone break": "ff",
    "reserved additional info": "1c",
    "trailing bytes": "0000",
    "trailing bytes after map": "a0a0",
    "empty input": "",
    "truncated int": "1901",
    "truncated text": "62",
    "truncated text body": "6261",
    "truncated array": "8201",
    "truncated map": "a16161",
    "invalid UTF-8": "62c328",
    "UTF-8 surrogate": "63eda080",
    "byte-string map key": "a1410000",
    "array map key": "a1800000",
    "boolean map key": "a1f500",
    "null map key": "a1f600",
    "array longer than input": "9affffffff00",
    "map longer than input": "bbffffffffffffffff00",
    "byte string longer than input": "5bffffffffffffffff00",
}


@pytest.mark.parametrize("name", sorted(NON_CANONICAL))
def test_non_canonical_or_unsupported_encodings_are_rejected(name: str) -> None:
    data = bytes.fromhex(NON_CANONICAL[name].replace(" ", ""))
    with pytest.raises(DecodeError) as exc:
        cbor.decode(data)
    msg = str(exc.value)
    assert msg.endswith(".") and "\n" not in msg


def test_depth_limit_is_the_same_for_encode_and_decode() -> None:
    deep: object = 0
    for _ in range(cbor.MAX_DEPTH):
        deep = [deep]
    enc = cbor.encode(deep)
    assert cbor.decode(enc) == deep
    with pytest.raises(LocalError):
        cbor.encode([deep])
    with pytest.raises(DecodeError, match="nested too deeply"):
        cbor.decode(b"\x81" + enc)
    # An empty container at the deepest level is fine both ways.
    empty: object = {}
    for _ in range(cbor.MAX_DEPTH):
        empty = [empty]
    assert cbor.decode(cbor.encode(empty)) == empty


def test_very_deep_input_raises_decode_error_not_recursion_error() -> None:
    with pytest.raises(DecodeError):
        cbor.decode(b"\x81" * 100_000 + b"\x00")


def test_item_limit() -> None:
    n = cbor.MAX_ITEMS
    ok = b"\x9a" + (n - 1).to_bytes(4, "big") + b"\x00" * (n - 1)
    assert len(cbor.decode(ok)) == n - 1
    too_many = b"\x9a" + n.to_bytes(4, "big") + b"\x00" * n
    with pytest.raises(DecodeError, match="too many items"):
        cbor.decode(too_many)


def test_size_limit() -> None:
    data = cbor.encode(b"x" * 100)
    assert cbor.decode(data, max_size=len(data)) == b"x" * 100
    with pytest.raises(DecodeError, match="over the limit"):
        cbor.decode(data, max_size=len(data) - 1)


def test_decode_refuses_non_bytes() -> None:
    with pytest.raises(DecodeError):
        cbor.decode("00")  # type: ignore[arg-type]
    assert cbor.decode(memoryview(b"\x01")) == 1
    assert cbor.decode(bytearray(b"\x41\x00")) == b"\x00"


@pytest.mark.parametrize(
    "value",
    [1.5, float("nan"), {1, 2}, object(), 2**64, -(2**64) - 1, "\ud800", {b"k": 1}, {True: 1},
     {(1,): 2}, {"a": 1.0}],
)
def test_encode_refuses_unsupported_values_with_local_error(value: object) -> None:
    with pytest.raises(LocalError):
        cbor.encode(value)


def test_encode_refuses_colliding_keys() -> None:
    class Weird(dict):  # type: ignore[type-arg]
        def items(self):  # type: ignore[no-untyped-def]
            return [("a", 1), ("a", 2)]

    with pytest.raises(LocalError, match="same key twice"):
        cbor.encode(Weird())


def test_decode_map_without_splices_the_payload() -> None:
    m = {"a": 1, "sig": b"\x00" * 64, "zz": [1, 2], "b": {"x": None}}
    full = cbor.encode(m)
    got, rest = cbor.decode_map_without(full, "sig")
    assert got == m
    assert rest == cbor.encode({k: v for k, v in m.items() if k != "sig"})
    with pytest.raises(DecodeError):
        cbor.decode_map_without(full, "absent")
    with pytest.raises(DecodeError):
        cbor.decode_map_without(cbor.encode([1]), "sig")
    with pytest.raises(DecodeError):
        cbor.decode_map_without(full + b"\x00", "sig")
    # 24 entries -> 23: the head shrinks from two bytes to one.
    big = {f"k{i:02}": i for i in range(23)} | {"sig": 1}
    got, rest = cbor.decode_map_without(cbor.encode(big), "sig")
    assert rest == cbor.encode({k: v for k, v in big.items() if k != "sig"})


def test_read_uint() -> None:
    data = cbor.encode([5, 300, "x"])
    assert cbor.read_uint(data, 1) == (5, 2)
    assert cbor.read_uint(data, 2) == (300, 5)
    assert cbor.read_uint(data, 5) is None
    with pytest.raises(DecodeError):
        cbor.read_uint(bytes.fromhex("1800"), 0)


# -- properties -------------------------------------------------------------------

scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=40) | st.text(max_size=20)
)
keys = st.integers(min_value=-(2**64), max_value=2**64 - 1) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None)
@given(values)
def test_round_trip(value: object) -> None:
    enc = cbor.encode(value)
    assert cbor.decode(enc) == value
    assert cbor.encode(cbor.decode(enc)) == enc


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(keys, values, max_size=5))
def test_map_insertion_order_does_not_change_the_encoding(m: dict[object, object]) -> None:
    assert cbor.encode(dict(reversed(list(m.items())))) == cbor.encode(m)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_decode_error_and_accepted_bytes_are_canonical(data: bytes) -> None:
    try:
        value = cbor.decode(data)
    except DecodeError:
        return
    # Whatever is accepted is the one canonical encoding of its value.
    assert cbor.encode(value) == data


@settings(max_examples=150, deadline=None)
@given(values, st.data())
def test_a_changed_byte_is_rejected_or_is_the_canonical_form_of_another_value(
    value: object, data: st.DataObject
) -> None:
    enc = bytearray(cbor.encode(value))
    pos = data.draw(st.integers(0, len(enc) - 1))
    enc[pos] ^= data.draw(st.integers(1, 255))
    try:
        other = cbor.decode(bytes(enc))
    except DecodeError:
        return
    # Canonical encodings are unique, so the changed bytes mean a different value.
    assert cbor.encode(other) == bytes(enc)


# -- differential test against a plain reference decoder ----------------------------


def _reference_decode(data: bytes) -> object:
    """A direct transcription of the strictness rules, kept simple rather than fast."""

    def head(pos: int) -> tuple[int, int, int]:
        ib = data[pos]
        major, info = ib >> 5, ib & 31
        if info < 24:
            return major, info, pos + 1
        if info > 27:
            raise DecodeError("reserved")
        width = 1 << (info - 24)
        if pos + 1 + width > len(data):
            raise DecodeError("truncated")
        arg = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
        if arg < (24 if width == 1 else 1 << (4 * width)):
            raise DecodeError("non-canonical")
        return major, arg, pos + 1 + width

    def item(pos: int, depth: int) -> tuple[object, int]:
        if depth > cbor.MAX_DEPTH or pos >= len(data):
            raise DecodeError("deep or truncated")
        ib = data[pos]
        if ib >> 5 == 7:
            simple = {0xF4: False, 0xF5: True, 0xF6: None}
            if ib not in simple:
                raise DecodeError("simple")
            return simple[ib], pos + 1
        if ib >> 5 == 6:
            raise DecodeError("tag")
        major, arg, pos = head(pos)
        if major == 0:
            return arg, pos
        if major == 1:
            return -1 - arg, pos
        if major in (2, 3):
            if pos + arg > len(data):
                raise DecodeError("truncated")
            raw = data[pos : pos + arg]
            try:
                return (raw if major == 2 else raw.decode("utf-8")), pos + arg
            except UnicodeDecodeError:
                raise DecodeError("utf-8") from None
        if major == 4:
            out = []
            for _ in range(arg):
                v, pos = item(pos, depth + 1)
                out.append(v)
            return out, pos
        result: dict[object, object] = {}
        last = None
        for _ in range(arg):
            start = pos
            k, pos = item(pos, depth + 1)
            if type(k) not in (int, str) or (last is not None and data[start:pos] <= last):
                raise DecodeError("key")
            last = data[start:pos]
            result[k], pos = item(pos, depth + 1)
        return result, pos

    if not data:
        raise DecodeError("empty")
    value, end = item(0, 0)
    if end != len(data):
        raise DecodeError("trailing")
    return value


def _outcome(fn, data: bytes):  # type: ignore[no-untyped-def]
    try:
        return ("ok", fn(data))
    except DecodeError:
        return ("error", None)


@settings(max_examples=300, deadline=None)
@given(values, st.data())
def test_fast_decoder_agrees_with_the_reference_on_mutated_encodings(value: object, data: st.DataObject) -> None:
    enc = bytearray(cbor.encode(value))
    for _ in range(data.draw(st.integers(0, 3))):
        pos = data.draw(st.integers(0, len(enc) - 1))
        enc[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        enc = enc[: data.draw(st.integers(0, len(enc)))]
    blob = bytes(enc)
    got, want = _outcome(cbor.decode, blob), _outcome(_reference_decode, blob)
    assert got == want
    # The same bytes inside a larger buffer, as records decode their bodies.
    if want[0] == "ok":
        assert cbor.decode_prefix(b"\x00" + blob + b"\x00", 1, 0) == (want[1], len(blob) + 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=48))
def test_fast_decoder_agrees_with_the_reference_on_random_bytes(blob: bytes) -> None:
    assert _outcome(cbor.decode, blob) == _outcome(_reference_decode, blob)
