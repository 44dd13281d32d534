"""The native (cbor2) encoding path against the pure-Python reference encoder.

`cbor.encode` writes maps and arrays with cbor2's encoder once `_canonical` has proven
the value is in the subset and put its keys in canonical order; everything else goes to
`cbor.encode_reference`. These tests show both give the same bytes, or refuse with the
same error, for values of every shape and key order, values just outside the subset
(big integers, floats, subclasses, bytearrays, lone surrogates, too deep), and that the
native path is really taken for the usual values, so the comparison is not vacuous.
"""

from __future__ import annotations

import enum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valuemesh.protocol import cbor
from valuemesh.protocol.errors import LocalError

U64 = (1 << 64) - 1

ints = st.one_of(
    st.integers(-1 - U64, U64),
    st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, U64, -1, -24, -25, -256, -257, -1 - U64]),
)
out_of_range = st.sampled_from([U64 + 1, -2 - U64, 1 << 70, -(1 << 70)])
ascii_texts = st.text(alphabet=st.characters(max_codepoint=127), max_size=30)
texts = st.one_of(st.text(max_size=30), ascii_texts, st.text(alphabet="abcxyz", max_size=4))


class Colour(enum.IntEnum):
    RED = 1


class Name(str):
    pass


odd_keys = st.one_of(
    out_of_range, st.floats(allow_nan=False), st.just(Colour.RED), st.builds(Name, ascii_texts),
    st.sampled_from(["\ud800", "a\udfff"]), st.booleans(),
)
odd = st.one_of(odd_keys, st.binary(max_size=8).map(bytearray))
scalars = st.one_of(st.none(), st.booleans(), ints, st.binary(max_size=40), texts)
keys = st.one_of(ascii_texts, ascii_texts, texts, ints)


def containers(kids: Any, key_st: Any) -> Any:
    return st.one_of(st.lists(kids, max_size=6), st.lists(kids, max_size=4).map(tuple),
                     st.dictionaries(key_st, kids, max_size=6))


# Dictionaries are built in whatever insertion order Hypothesis draws, so keys come in every order.
plain_values = st.recursive(scalars, lambda kids: containers(kids, keys), max_leaves=40)
any_values = st.recursive(st.one_of(scalars, odd), lambda kids: containers(kids, st.one_of(keys, odd_keys)),
                          max_leaves=30)
text_key_values = st.recursive(scalars, lambda kids: containers(kids, ascii_texts), max_leaves=40)


def outcome(fn: Any, value: Any) -> Any:
    try:
        return ("ok", fn(value))
    except LocalError as e:
        return ("error", str(e))


@settings(max_examples=800, deadline=None)
@given(plain_values)
def test_values_in_the_subset_encode_to_the_same_bytes(value: Any) -> None:
    assert outcome(cbor.encode, value) == outcome(cbor.encode_reference, value)


@settings(max_examples=800, deadline=None)
@given(any_values)
def test_values_outside_the_subset_get_the_same_bytes_or_error(value: Any) -> None:
    assert outcome(cbor.encode, value) == outcome(cbor.encode_reference, value)


@settings(max_examples=400, deadline=None)
@given(text_key_values.filter(lambda v: isinstance(v, (dict, list, tuple))))
def test_maps_with_ascii_text_keys_take_the_native_path(value: Any) -> None:
    ordered = cbor._canonical(value, 0)
    assert ordered is not cbor._NOT_PROVEN
    assert cbor.encode(value) == cbor.encode_reference(value)
    # The value itself is never reordered or changed in place.
    assert cbor.encode_reference(value) == cbor.encode_reference(ordered)


def test_a_usual_state_value_takes_the_native_path_in_every_key_order() -> None:
    value = {"poster": b"p" * 32, "provider": b"q" * 32, "action": "work", "quantity": "3.5", "unit": "hour",
             "note": "", "period": None, "evidence": {"uri": "x", "hash": b"h" * 32}, "payback": "once",
             "at": 1_700_000_000_000, "acks": [], "disputes": [[b"d" * 32, "no"]], "amended": 0}
    want = cbor.encode_reference(value)
    for shift in range(len(value)):
        items = list(value.items())
        rotated = dict(items[shift:] + items[:shift])
        assert cbor._canonical(rotated, 0) is not cbor._NOT_PROVEN
        assert cbor.encode(rotated) == want
        assert list(rotated) == [k for k, _ in items[shift:] + items[:shift]]  # not reordered in place


@pytest.mark.parametrize("depth", [14, 15, 16, 17, 18])
def test_the_depth_limit_is_the_same_on_both_paths(depth: int) -> None:
    for innermost in (0, [], {}, [0], {"a": 0}):
        for wrap in (lambda v: [v], lambda v: {"k": v}, lambda v: (v,)):
            value: Any = innermost
            for _ in range(depth):
                value = wrap(value)
            assert outcome(cbor.encode, value) == outcome(cbor.encode_reference, value)


def test_a_lone_surrogate_is_refused_with_the_reference_error() -> None:
    for value in ({"a": "\ud800"}, ["\udfff"], {"\ud800": 1}):
        with pytest.raises(LocalError, match="lone surrogate"):
            cbor.encode(value)


def test_key_sets_seen_before_are_ordered_from_the_cache_and_stay_bounded() -> None:
    for i in range(cbor.MAX_KEY_ORDERS + 10):
        m = {f"k{i}": 1, "b": 2, "a": 3}
        assert cbor.encode(m) == cbor.encode_reference(m)
    assert len(cbor._KEY_ORDERS) <= cbor.MAX_KEY_ORDERS
    big = {f"key{i}": i for i in range(cbor.MAX_CACHED_KEYS + 1)}
    assert cbor.encode(big) == cbor.encode_reference(big)
    assert tuple(big) not in cbor._KEY_ORDERS
    # A str subclass equal to remembered keys is not taken for them (the reference encodes it).
    class Loud(str):
        def encode(self, *args: Any, **kwargs: Any) -> bytes:
            return str.upper(self).encode(*args, **kwargs)

    cbor.encode({"a": 1, "b": 2})
    loud = {Loud("a"): 1, Loud("b"): 2}
    assert cbor._canonical(loud, 0) is cbor._NOT_PROVEN
    assert cbor.encode(loud) == cbor.encode_reference(loud) == cbor.encode_reference({"A": 1, "B": 2})
    # Nor does a subclass refused first make equal plain text keys refused later.
    cbor._KEY_ORDERS.clear()
    assert cbor._canonical({Loud("x"): 1}, 0) is cbor._NOT_PROVEN
    assert cbor._canonical({"x": 1}, 0) == {"x": 1}
    # Equal key tuples of another type (1 == True) share an entry, and are refused either way.
    for m2 in ({1: "x"}, {True: "x"}, {1.0: "x"}):
        assert outcome(cbor.encode, m2) == outcome(cbor.encode_reference, m2)


def typed(v: Any) -> Any:
    """A form of `v` in which equal also means the same types (True != 1, b"" != "")."""
    if isinstance(v, dict):
        return ("map", [(typed(k), typed(x)) for k, x in v.items()])
    if isinstance(v, list):
        return ("array", [typed(x) for x in v])
    return (type(v).__name__, v)


def containers_of(v: Any) -> list[int]:
    if isinstance(v, dict):
        return [id(v), *(i for x in v.values() for i in containers_of(x))]
    if isinstance(v, (list, tuple)):
        return [id(v), *(i for x in v for i in containers_of(x))]
    return []


@settings(max_examples=600, deadline=None)
@given(st.one_of(plain_values, any_values).filter(lambda v: isinstance(v, (dict, list, tuple))))
def test_encode_with_form_is_encode_then_decode(value: Any) -> None:
    want = outcome(cbor.encode_reference, value)
    try:
        raw, form = cbor.encode_with_form(value)
    except LocalError as e:
        assert want == ("error", str(e))
        return
    assert want == ("ok", raw)
    assert typed(form) == typed(cbor.decode_reference(raw))
    # The form is the caller's to keep: none of its lists or maps is one of the value's.
    assert not set(containers_of(form)) & set(containers_of(value))


def test_encode_with_form_leaves_an_oversized_value_to_the_callers_size_check() -> None:
    raw, form = cbor.encode_with_form({1: b"x" * 100}, max_size=50)
    assert form is None and raw == cbor.encode_reference({1: b"x" * 100})


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(ascii_texts, ints), plain_values, max_size=5), st.integers(0, 2**40),
       st.integers(0, 300))
def test_a_created_record_is_its_map_encoded_whole_and_decodes_to_itself(body: dict[str, Any], seq: int,
                                                                         v: int) -> None:
    from valuemesh.protocol.identity import Identity
    from valuemesh.protocol.records import Record, decode_record

    ident = Identity(bytes(range(32)))
    try:
        rec = Record.create(ident, type="t", v=v, constellation=b"c" * 32, seq=seq, body=body, created=seq + 1)
    except LocalError:
        with pytest.raises(LocalError):
            cbor.encode_reference({"body": body})
        return
    assert rec.raw == cbor.encode_reference({**rec.payload_map(), "sig": rec.sig})
    again = decode_record(rec.raw)
    assert again == rec and again.id == rec.id
    assert typed(dict(rec.body)) == typed(dict(again.body))
    assert not set(containers_of(dict(rec.body))) & set(containers_of(body))
