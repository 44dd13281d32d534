"""Tests of protocol/addressrec.py: a record round-trips, its signature covers every field
under its own domain label, and the strict decoder refuses each kind of malformed input
with one sentence."""

from __future__ import annotations

from pathlib import Path

import pytest

from valuemesh.protocol import cbor
from valuemesh.protocol import messages as m
from valuemesh.protocol.addressrec import (
    MAX_RECORD_ADDRESSES,
    MAX_RECORD_SIZE,
    RECORD_DOMAIN,
    AddressRecord,
    Kind,
    RecordAddress,
    decode_record,
    next_seq,
)
from valuemesh.protocol.errors import DecodeError, LocalError, SignatureError
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.vectors import seed

ALICE = Identity(seed("alice"))
BOB = Identity(seed("bob"))
ADDRS = (RecordAddress(Kind.LAN, "192.168.1.5", 7700), RecordAddress(Kind.DIRECT, "2001:db8::5", 7700),
         RecordAddress(Kind.MAPPED, "203.0.113.9", 40001))


def test_a_signed_record_round_trips_and_verifies() -> None:
    rec = AddressRecord.sign(ALICE, 1_700_000_000_000, ADDRS, [BOB.member])
    back = decode_record(rec.raw())
    assert back == rec
    assert back.addresses == tuple(sorted(ADDRS))
    assert back.relays == (BOB.member,)
    # The signature is over the domain label and the canonical payload, nothing else.
    ALICE.member.verify(RECORD_DOMAIN + cbor.encode(rec.payload()), rec.sig)
    with pytest.raises(SignatureError):
        ALICE.member.verify(cbor.encode(rec.payload()), rec.sig)


def test_a_worst_case_record_fits_the_byte_cap() -> None:
    addrs = [RecordAddress(Kind.DIRECT, f"2001:db8:1234:5678:9abc:def0:1234:{i:x}", 65535)
             for i in range(MAX_RECORD_ADDRESSES)]
    relays = [Identity(seed(f"r{i}")).member for i in range(4)]
    rec = AddressRecord.sign(ALICE, (1 << 63) - 1, addrs, relays)
    assert len(rec.raw()) <= MAX_RECORD_SIZE
    assert decode_record(rec.raw()) == rec


def test_seq_follows_the_clock_but_never_goes_back() -> None:
    assert next_seq(None, 5000) == 5000
    assert next_seq(5000, 9000) == 9000
    assert next_seq(9000, 100) == 9001  # the clock was set back


def _tampered(**change: object) -> bytes:
    doc = {**AddressRecord.sign(ALICE, 10, ADDRS).payload(), "sig": AddressRecord.sign(ALICE, 10, ADDRS).sig}
    doc.update(change)
    return cbor.encode({k: v for k, v in doc.items() if v is not None})


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (_tampered(seq=11), "does not verify"),  # a field changed after signing
        (_tampered(m=BOB.member.key), "does not verify"),  # someone else's key on Alice's record
        (_tampered(v=2), "version 2"),
        (_tampered(extra=1), "exactly v, m, seq"),
        (_tampered(relays=None), "exactly v, m, seq"),
        (_tampered(seq=-1), "seq must be"),
        (_tampered(seq=True), "seq must be"),
        (_tampered(sig=b"x" * 63), "64 bytes"),
        (_tampered(addrs=[["lan", "10.0.0.1", 1]] * 9), "at most 8 addresses"),
        (_tampered(relays=[BOB.member.key] * 5), "at most 4 relays"),
        (_tampered(relays=[BOB.member.key] * 2), "distinct"),
        (_tampered(relays=[ALICE.member.key]), "not the member itself"),
        (_tampered(relays=[b"short"]), "not a member id"),
        (_tampered(addrs=[["wan", "10.0.0.1", 1]]), "kind and a canonical IP"),
        (_tampered(addrs=[["lan", "example.com", 1]]), "kind and a canonical IP"),
        (_tampered(addrs=[["lan", "0.0.0.0", 1]]), "kind and a canonical IP"),
        (_tampered(addrs=[["lan", "2001:DB8::1", 1]]), "kind and a canonical IP"),  # not canonical
        (_tampered(addrs=[["lan", "fe80::1%eth0", 1]]), "kind and a canonical IP"),
        (_tampered(addrs=[["lan", "10.0.0.1", 0]]), "kind and a canonical IP"),
        (_tampered(addrs=[["lan", "10.0.0.1", 70000]]), "kind and a canonical IP"),
        (_tampered(addrs=[["lan", "10.0.0.2", 1], ["lan", "10.0.0.1", 1]]), "sorted and distinct"),
        (_tampered(addrs=[["lan", "10.0.0.1"]]), "[kind, host, port]"),
        (b"\xa0" + b"\x00" * 2000, "exceeds the limit"),
        (b"\xff", "not canonical CBOR"),
        (cbor.encode([1, 2]), "exactly v, m, seq"),
    ],
)
def test_malformed_records_are_refused_with_one_sentence(raw: bytes, words: str) -> None:
    with pytest.raises((DecodeError, SignatureError)) as exc:
        decode_record(raw)
    assert words in str(exc.value)
    assert str(exc.value).count(". ") == 0  # one sentence


def test_signing_refuses_what_decoding_would_refuse() -> None:
    with pytest.raises(LocalError):
        AddressRecord.sign(ALICE, 1, [RecordAddress(Kind.LAN, f"10.0.0.{i}", 1) for i in range(9)])
    with pytest.raises(LocalError):
        AddressRecord.sign(ALICE, 1, ADDRS, [ALICE.member])
    with pytest.raises(LocalError):
        RecordAddress(Kind.LAN, "localhost", 1)


def test_messages_carrying_records_and_dial_backs_are_bounded() -> None:
    rec = AddressRecord.sign(ALICE, 10, ADDRS).raw()
    assert m.decode_message(m.encode_message(m.AddressRecords([rec]))) == m.AddressRecords([rec])
    for bad in (m.AddressRecords([]), m.AddressRecords([rec] * 33), m.AddressRecords([b"x" * 1025]),
                m.DialBackAsk(b"n" * 16, [["127.0.0.1", 1]] * 5), m.DialBackAsk(b"n" * 15, [["127.0.0.1", 1]]),
                m.DialBackAsk(b"n" * 16, [["127.0.0.1", 0]]),
                m.DialBackReply(b"n" * 16, [["127.0.0.1", 1, "maybe"]], ["127.0.0.1", 5])):
        with pytest.raises(DecodeError):
            m.decode_message(m.encode_message(bad))  # type: ignore[arg-type]
    ok = m.DialBackReply(b"n" * 16, [["127.0.0.1", 1, "reachable"]], ["127.0.0.1", 5])
    assert m.decode_message(m.encode_message(ok)) == ok


def test_the_documented_vector_is_what_alice_signs() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    block = doc.split("<!-- address-record-vector -->", 1)[1].split("```", 2)[1]
    raw = bytes.fromhex("".join(block.split()))
    rec = AddressRecord.sign(ALICE, 1_767_225_600_000, ADDRS, [BOB.member])
    assert rec.raw() == raw  # Ed25519 is deterministic: same key and content, same bytes
    assert decode_record(raw) == rec
