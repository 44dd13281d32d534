"""The native (cbor2) decoding path against the pure-Python reference decoder.

`cbor.decode`, `cbor.decode_map_without` and `records.decode_record` try cbor2's
decoder first and keep its result only when they can prove the input canonical.
These tests show the two paths accept exactly the same inputs and return equal
values of the same types: on valid values of every shape, on byte mutations and
truncations of them, on non-canonical variants built with cbor2's own encoder,
and on random bytes. They also check that the native path is really taken for
valid input, so the comparison is not vacuous.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from valuemesh.protocol import cbor, records
from valuemesh.protocol.errors import DecodeError, RemoteError
from valuemesh.protocol.identity import Identity

U64 = (1 << 64) - 1

ints = st.one_of(
    st.integers(-1 - U64, U64),
    st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, U64, -1, -24, -25, -256, -257, -1 - U64]),
)
texts = st.one_of(st.text(max_size=30), st.text(alphabet="abcxyz", max_size=4))
keys = st.one_of(ints, texts)
scalars = st.one_of(st.none(), st.booleans(), ints, st.binary(max_size=40), texts)
values = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=6), st.dictionaries(keys, kids, max_size=6)),
    max_leaves=40,
)


def typed(v: Any) -> Any:
    """A form of `v` in which equal also means the same types (True != 1, b"" != "")."""
    if isinstance(v, dict):
        return ("map", [(typed(k), typed(x)) for k, x in v.items()])
    if isinstance(v, list):
        return ("array", [typed(x) for x in v])
    return (type(v).__name__, v)


def outcome(fn: Any, *args: Any) -> Any:
    try:
        return ("ok", typed(fn(*args)))
    except DecodeError as e:
        return ("error", type(e).__name__, str(e))


def head(major: int, arg: int, width: int) -> bytes:
    """A head with `arg` in a chosen width (0 = in the initial byte), canonical or not."""
    if width == 0:
        return bytes([major << 5 | arg])
    info = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | info]) + arg.to_bytes(width, "big")


def assert_same(data: bytes) -> Any:
    """Both decoders give the same answer; so does the native path itself, below NATIVE_MIN_SIZE too."""
    reference = outcome(cbor.decode_reference, data)
    assert outcome(cbor.decode, data) == reference
    native = cbor._native(data) if data else cbor._NOT_PROVEN
    if native is not cbor._NOT_PROVEN:
        assert reference == ("ok", typed(native))
    return reference


@settings(max_examples=600, deadline=None)
@given(values)
def test_valid_values_decode_natively_to_the_same_values(value: Any) -> None:
    raw = cbor.encode(value)
    got = cbor._native(raw)
    assert got is not cbor._NOT_PROVEN, "the native path should prove every canonical encoding"
    assert typed(got) == typed(cbor.decode_reference(raw))
    assert typed(cbor.decode(raw)) == typed(cbor.decode_reference(raw))


@settings(max_examples=800, deadline=None)
@given(values, st.data())
def test_mutated_encodings_get_the_same_answer(value: Any, data: st.DataObject) -> None:
    raw = bytearray(cbor.encode(value))
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and raw:
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            raw.insert(i, data.draw(st.integers(0, 255)))
        elif op == "delete" and len(raw) > 1:
            del raw[i]
        elif op == "truncate" and len(raw) > 1:
            del raw[min(i + 1, len(raw) - 1) :]
    assert_same(bytes(raw))


@settings(max_examples=800, deadline=None)
@given(st.binary(min_size=1, max_size=64))
def test_random_bytes_get_the_same_answer(data: bytes) -> None:
    assert_same(data)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(keys, scalars, min_size=2, max_size=6), st.randoms(use_true_random=False))
def test_maps_in_any_other_key_order_are_refused_by_both(m: dict[Any, Any], rnd: Any) -> None:
    items = list(m.items())
    rnd.shuffle(items)
    shuffled = dict(items)
    assume(list(shuffled) != list(cbor.decode(cbor.encode(m))))
    raw = cbor2.dumps(shuffled)
    assert cbor._native(raw) is cbor._NOT_PROVEN
    assert assert_same(raw)[0] == "error"


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.integers(-300, 70000), texts), scalars, min_size=2, max_size=6))
def test_length_first_key_order_is_not_taken_for_bytewise(m: dict[Any, Any]) -> None:
    # cbor2's canonical mode sorts keys length-first (RFC 7049); ours is bytewise
    # (RFC 8949 §4.2.1). They differ once integer and text keys mix.
    raw = cbor2.dumps(m, canonical=True)
    ours = cbor.encode(m)
    result = assert_same(raw)
    assert (result[0] == "ok") == (raw == ours)


@settings(max_examples=400, deadline=None)
@given(ints, st.sampled_from([0, 1, 2, 4, 8]))
def test_integers_in_every_head_width_get_the_same_answer(n: int, width: int) -> None:
    major, arg = (0, n) if n >= 0 else (1, -1 - n)
    assume(arg < 24 if width == 0 else arg < 1 << (8 * width))
    raw = head(major, arg, width)
    result = assert_same(raw)
    assert (result[0] == "ok") == (raw == cbor.encode(n))
    # The same head as a string length, array count and map size.
    if arg <= 40:
        shortest = min(w for w in (0, 1, 2, 4, 8) if arg < (24 if w == 0 else 1 << 8 * w))
        entries = b"".join(cbor.encode(k) + b"\x00" for k in range(arg))
        for body, m in ((b"a" * arg, 3), (b"\x00" * arg, 4), (entries, 5)):
            raw = head(m, arg, width) + body
            result = assert_same(raw)
            assert (result[0] == "ok") == (width == shortest)


FORBIDDEN = {
    "half float": "f93c00",
    "single float": "fa3f800000",
    "double float": "fb3ff0000000000000",
    "double float in a map": "a16161fb3ff8000000000000",
    "double float in an array": "81fb4000000000000000",
    "undefined": "f7",
    "simple value 0": "e0",
    "simple value 255": "f8ff",
    "break byte": "ff",
    "indefinite array": "9f01ff",
    "indefinite map": "bf616101ff",
    "indefinite text": "7f616161ff",
    "indefinite bytes": "5f4101ff",
    "duplicate key": "a2616101616102",
    "true and 1 as keys": "a201f5f500",
    "bytes key": "a1410000",
    "array key": "a1810000",
    "map key": "a1a00000",
    "float key": "a1fb3ff000000000000000",
    "null key": "a1f600",
    "lone surrogate": "63eda080",
    "invalid utf-8": "62c328",
    "self-described": "d9d9f700",
    "bignum 1": "c24101",
    "bignum 2**64": "c249010000000000000000",
    "negative bignum": "c349010000000000000000",
    "shared value": "d81c8100",
    "shared reference": "82d81c8100d81d00",
    "string reference": "d90100826161d81900",
    "epoch datetime": "c11a514b67b0",
    "decimal": "c48221196ab3",
    "regex": "d82363612a62",
    "unknown tag": "d9ffff00",
    "trailing byte": "0000",
    "empty": "",
}


@pytest.mark.parametrize("hexed", FORBIDDEN.values(), ids=list(FORBIDDEN))
def test_forbidden_items_are_refused_by_both(hexed: str) -> None:
    raw = bytes.fromhex(hexed)
    if raw:
        assert cbor._native(raw) is cbor._NOT_PROVEN
    assert assert_same(raw)[0] == "error"


@pytest.mark.parametrize("tag", cbor._CBOR2_TAGS)
def test_every_tag_cbor2_knows_is_refused(tag: int) -> None:
    for payload in (b"\x00", b"\x41\x01", b"\x61a", b"\x80", b"\xa0"):
        raw = cbor.encode([tag])[1:]  # the integer's head, re-typed as a tag below
        raw = bytes([0xC0 | (raw[0] & 0x1F)]) + raw[1:] + payload
        assert cbor._native(raw) is cbor._NOT_PROVEN
        with pytest.raises(DecodeError):
            cbor.decode(raw)


@pytest.mark.parametrize("depth", [15, 16, 17, 18])
def test_the_depth_limit_is_the_same_on_both_paths(depth: int) -> None:
    for innermost in (b"\x00", b"\x80", b"\xa0", b"\x81\x00", b"\xa1\x00\x00"):
        for wrap in (b"\x81", b"\xa1\x00"):
            raw = wrap * depth + innermost
            result = assert_same(raw)
            if result[0] == "ok":
                assert cbor._native(raw) is not cbor._NOT_PROVEN


def test_the_item_limit_is_the_same_on_both_paths() -> None:
    for n in (cbor.MAX_ITEMS - 1, cbor.MAX_ITEMS, cbor.MAX_ITEMS + 1):
        raw = cbor.encode([0] * (n - 1))  # the array itself is an item
        assert len(raw) > cbor.MAX_ITEMS - 10
        assert assert_same(raw)[0] == ("ok" if n <= cbor.MAX_ITEMS else "error")
        nested = cbor.encode([[0] * (n - 2)])
        assert assert_same(nested)[0] == ("ok" if n <= cbor.MAX_ITEMS else "error")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=6), texts, st.binary(max_size=8))
def test_map_without_agrees_with_the_reference(m: dict[Any, Any], omit: str, junk: bytes) -> None:
    # The padding lifts every variant over NATIVE_MIN_SIZE, so the native path is the one compared.
    m = {**m, 0: b"\x00" * cbor.NATIVE_MIN_SIZE}
    for raw in (cbor.encode(m), cbor.encode({**m, omit: 1}), cbor.encode(m) + junk):
        def native(r: bytes) -> Any:
            return cbor.decode_map_without(r, omit)

        def reference(r: bytes) -> Any:
            return cbor.decode_map_without_reference(r, omit)

        got = outcome(native, raw)
        assert got == outcome(reference, raw)


IDENT = Identity(hashlib.blake2b(b"native-test", digest_size=32).digest())
CID = hashlib.blake2b(b"native-test-constellation", digest_size=32).digest()


def record_outcome(raw: bytes, reference: bool) -> Any:
    try:
        rec = (records.decode_record_reference if reference else records.decode_record)(raw)
    except RemoteError as e:
        return ("error", type(e).__name__, str(e))
    return ("ok", rec, rec.id, typed(dict(rec.body)), rec.raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(texts, values, max_size=5),
    st.integers(0, 2**53 - 1),
    st.integers(0, 1 << 16),
    st.integers(0, 2**53 - 1),
    st.text(min_size=1, max_size=64),
    st.data(),
)
def test_records_decode_the_same_on_both_paths(
    body: dict[str, Any], seq: int, v: int, created: int, rtype: str, data: st.DataObject
) -> None:
    rec = records.Record.create(IDENT, type=rtype, v=v, constellation=CID, seq=seq, body=body, created=created)
    assert records._record_native(rec.raw) is not None
    assert record_outcome(rec.raw, False) == record_outcome(rec.raw, True)
    raw = bytearray(rec.raw)
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    assert record_outcome(bytes(raw), False) == record_outcome(bytes(raw), True)


OTHER_CID = hashlib.blake2b(b"native-test-other", digest_size=32).digest()
BLOCK_AUTHOR = Identity(hashlib.blake2b(b"native-test-block", digest_size=32).digest())


def forged(kind: str, n: int) -> records.Record:
    """A record of the given kind for slot n, as a block author could carry it."""
    good = records.Record.create(IDENT, type="t", v=1, constellation=CID, seq=n, body={"n": n}, created=n)
    if kind == "good":
        return good
    if kind == "bad signature":
        raw = bytearray(good.raw)
        raw[good.raw.index(good.sig) + 5] ^= 1
        return dataclasses.replace(good, raw=bytes(raw))
    if kind == "undecodable":
        return dataclasses.replace(good, raw=good.raw[:-1])
    other = records.Record.create(IDENT, type="t", v=1, constellation=OTHER_CID, seq=n, body={}, created=n)
    return dataclasses.replace(other, constellation=CID)  # "other constellation": its bytes say otherwise


def first_outcome(fn: Any) -> Any:
    try:
        got = fn()
    except RemoteError as e:
        return ("error", type(e).__name__, str(e))
    return ("ok", [(r.id, r.raw) for r in (got.records if isinstance(got, records.Block) else got)])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["good", "good", "bad signature", "undecodable", "other constellation", "repeat"]),
                max_size=8))
def test_batched_verification_meets_the_same_first_error(kinds: list[str]) -> None:
    recs: list[records.Record] = []
    for n, kind in enumerate(kinds):
        recs.append(recs[-1] if kind == "repeat" and recs else forged("good" if kind == "repeat" else kind, n))
    raws = [r.raw for r in recs]
    # One by one, in order, as before batching.
    assert first_outcome(lambda: records.decode_records(raws)) == first_outcome(
        lambda: [records.decode_record(r) for r in raws])
    # Block.create refuses repeated ids; the block is built from its parts like a hostile author would.
    payload = {"c": CID, "epoch": 0, "author": BLOCK_AUTHOR.member.key, "round": 1, "prev": None, "parents": [],
               "records": raws, "created": 1}
    sig = BLOCK_AUTHOR.sign(records.BLOCK_DOMAIN + cbor.encode(payload))
    raw_block = cbor.encode({**payload, "sig": sig})
    assert first_outcome(lambda: records.decode_block(raw_block)) == first_outcome(
        lambda: records.decode_block(raw_block, record_verifier=records.decode_record))
