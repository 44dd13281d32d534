"""Tests of the mDNS announcement format: the strict TXT parser and encoder, and the
validation of an announcement's fields, against hostile and random input.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valuemesh.node.announcement import (
    announcement_txt,
    encode_txt,
    parse_announcement,
    parse_txt,
)
from valuemesh.protocol.errors import DecodeError, LocalError, RemoteError, ValuemeshError
from valuemesh.protocol.identity import Identity, MemberId


def member(i: int) -> MemberId:
    return Identity(bytes([i]) * 32).member


NET = bytes.fromhex("a1b2c3d4e5f60718")


def good_txt(m: MemberId | None = None, net: bytes = NET, port: int = 7000) -> bytes:
    return encode_txt(announcement_txt(m or member(1), net, port))


# --- TXT parsing -----------------------------------------------------------------------------


def test_good_announcement_round_trips() -> None:
    ann = parse_announcement(good_txt(), 7000)
    assert (ann.member, ann.network_id, ann.port, ann.version) == (member(1), NET, 7000, 1)
    # Unknown keys are tolerated for forward compatibility (RFC 6763 §6.4); case is folded.
    extra = good_txt() + encode_txt({"Future": "x"})
    assert parse_announcement(extra, 7000).member == member(1)


@pytest.mark.parametrize(
    ("raw", "srv_port"),
    [
        (b"", 7000),  # nothing at all
        (b"\x05id=x", 7000),  # truncated string
        (b"\x00" + good_txt(), 7000),  # empty string
        (good_txt() + b"\x04port", 7000),  # key without '='
        (good_txt() + encode_txt({"id": str(member(2))}), 7000),  # duplicate key
        (good_txt() + b"\x05\xffk=v", 7000),  # non-ASCII key
        (good_txt(), 7001),  # TXT and SRV ports disagree
        (good_txt(), None),
        (good_txt().replace(b"pv=1", b"pv=2"), 7000),  # unknown version
        (good_txt().replace(b"pv=1", b"pv=01"), 7000),  # non-canonical number
        (good_txt(port=7000).replace(b"port=7000", b"port=+7000"), 7000),
        (good_txt(port=7000).replace(b"port=7000", b"port=70000"), 70000),
        (good_txt().replace(b"id=vm1", b"id=vm2"), 7000),  # not a member id
        (encode_txt({**announcement_txt(member(1), NET, 7000),
                     "id": str(member(1))[:-1] + ("a" if str(member(1))[-1] != "a" else "b")}),
         7000),  # checksum mismatch
        (encode_txt({**announcement_txt(member(1), NET, 7000), "net": "xyz1"}), 7000),
        (encode_txt({**announcement_txt(member(1), NET, 7000), "net": "A1B2"}), 7000),
        (encode_txt({**announcement_txt(member(1), NET, 7000), "net": ""}), 7000),
        (encode_txt({**announcement_txt(member(1), NET, 7000), "net": "ab" * 65}), 7000),
        (b"".join(encode_txt({f"k{i}": "v"}) for i in range(20)) + good_txt(), 7000),
        (good_txt() + b"\xff" + b"x" * 255 + (b"\xff" + b"y" * 255) * 5, 7000),  # oversized
    ],
)
def test_bad_announcements_rejected(raw: bytes, srv_port: int | None) -> None:
    with pytest.raises(RemoteError):
        parse_announcement(raw, srv_port)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.none() | st.integers(0, 70000))
def test_any_bytes_parse_or_raise_typed_error(raw: bytes, port: int | None) -> None:
    try:
        parse_announcement(raw, port)
    except ValuemeshError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text("abcdefghijklmnop", min_size=1, max_size=9),
                       st.text(min_size=0, max_size=40), max_size=10))
def test_txt_encoding_round_trips(items: dict[str, str]) -> None:
    assert parse_txt(encode_txt(items)) == {k: v.encode() for k, v in items.items()}


def test_txt_limits() -> None:
    with pytest.raises(DecodeError):
        parse_txt(b"id=x")  # the first byte is read as a length, and the string is short
    with pytest.raises(LocalError):
        encode_txt({"k": "v" * 300})
