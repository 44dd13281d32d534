"""Invite tokens (protocol/invite.py): creation refuses what decoding would refuse, decoding
refuses every malformed or altered token with one typed error, also under `python -O`.
"""

from __future__ import annotations

import base64
import dataclasses

import pytest
from optimized import refused_under_dash_o

from valuemesh.protocol import cbor
from valuemesh.protocol.errors import DecodeError, LocalError, SignatureError
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.invite import INVITE_DOMAIN, MAX_ADDRS, TOKEN_PREFIX, Invite, decode_invite, parse_token

ALICE = Identity(b"\x01" * 32)
CID = b"\xc1" * 32


def make(**over: object) -> Invite:
    args: dict[str, object] = dict(constellation=CID, name="bakery", tier="core", roles=("producer",), uses=3,
                                   expires=10_000, addrs=(("127.0.0.1", 7470),), nonce=b"\x07" * 16)
    args.update(over)
    return Invite.create(ALICE, **args)  # type: ignore[arg-type]


def signed_raw(payload: dict[str, object]) -> bytes:
    """A token whose signature is valid over any payload: only the shape checks can refuse it."""
    sig = ALICE.sign(INVITE_DOMAIN + cbor.encode(payload))
    return cbor.encode({"p": payload, "sig": sig})


def test_round_trip_through_text() -> None:
    inv = make(roles=("producer", "customer", "producer"), approve=True)
    assert inv.roles == ("customer", "producer")
    back = parse_token(inv.text())
    assert back == inv
    assert back.id == inv.id
    assert inv.text().startswith(TOKEN_PREFIX)


def test_only_the_first_addresses_are_kept() -> None:
    inv = make(addrs=tuple((f"10.0.0.{i}", 7000 + i) for i in range(MAX_ADDRS + 4)))
    assert len(inv.addrs) == MAX_ADDRS
    assert decode_invite(inv.raw()) == inv


@pytest.mark.parametrize(("over", "words"), [
    ({"tier": "god"}, "Tier must be"),
    ({"roles": ("king",)}, "Role 'king'"),
    ({"uses": 0}, "use limit"),
    ({"uses": 10_001}, "use limit"),
    ({"name": "x" * 129}, "name"),
    ({"constellation": b"\x00" * 31}, "32-byte id"),
    ({"nonce": b"\x00"}, "nonce"),
    ({"expires": -1}, "expiry"),
    ({"addrs": (("", 7470),)}, "not a host and port"),
    ({"addrs": (("h", 0),)}, "not a host and port"),
])
def test_create_refuses_what_decoding_would(over: dict[str, object], words: str) -> None:
    with pytest.raises(LocalError, match=words):
        make(**over)


def _bad_payloads() -> list[tuple[str, dict[str, object]]]:
    good = make().payload()
    cases: list[tuple[str, dict[str, object]]] = [
        ("tier outside the list", {"tier": "god"}),
        ("zero uses", {"uses": 0}),
        ("bool for uses", {"uses": True}),
        ("short nonce", {"nonce": b"\x01"}),
        ("short constellation", {"c": b"\x01" * 5}),
        ("long name", {"name": "n" * 129}),
        ("roles not sorted", {"roles": ["producer", "customer"]}),
        ("unknown role", {"roles": ["king"]}),
        ("negative expiry", {"expires": -5}),
        ("address not a pair", {"addrs": [["h"]]}),
        ("port out of range", {"addrs": [["h", 70000]]}),
        ("too many addresses", {"addrs": [["h", 1]] * (MAX_ADDRS + 1)}),
        ("approve not a bool", {"approve": 1}),
        ("inviter not a key", {"inviter": b"\x01" * 3}),
    ]
    return [(why, {**good, **change}) for why, change in cases]


@pytest.mark.parametrize(("why", "payload"), _bad_payloads(), ids=[w for w, _ in _bad_payloads()])
def test_decode_refuses_malformed_payloads_even_when_signed(why: str, payload: dict[str, object]) -> None:
    with pytest.raises(DecodeError, match="malformed"):
        decode_invite(signed_raw(payload))


def test_decode_refuses_unknown_or_missing_keys() -> None:
    payload = make().payload()
    with pytest.raises(DecodeError):
        decode_invite(signed_raw({**payload, "extra": 1}))
    del payload["nonce"]
    with pytest.raises(DecodeError):
        decode_invite(signed_raw(payload))


def test_an_altered_token_fails_its_signature() -> None:
    inv = make()
    forged = dataclasses.replace(inv, uses=10_000)
    with pytest.raises(SignatureError):
        decode_invite(forged.raw())


@pytest.mark.parametrize(("text", "words"), [
    ("hello", "not a valuemesh invite token"),
    (TOKEN_PREFIX + "!!!", "damaged"),
    (TOKEN_PREFIX + base64.urlsafe_b64encode(b"\xa0").decode(), "damaged"),
])
def test_parse_token_says_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(LocalError, match=words):
        parse_token(text)


def test_checks_hold_under_python_dash_o() -> None:
    # A node run with -O must refuse the same tokens as one run without it: asserts would vanish.
    payload = {**make().payload(), "tier": "god", "uses": 0, "nonce": b"\x01"}
    raw = signed_raw(payload)
    assert refused_under_dash_o("from valuemesh.protocol.invite import decode_invite\n",
                                f"decode_invite(bytes.fromhex({raw.hex()!r}))")
