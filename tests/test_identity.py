"""Tests of member identities: vm1 ids and their typo detection, signatures,
key files sealed with a passphrase, and text backups.
"""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valuemesh.protocol import cbor
from valuemesh.protocol.errors import DecodeError, KeyFileError, MemberIdError, SignatureError
from valuemesh.protocol.identity import (
    FAST_MEMLIMIT,
    FAST_OPSLIMIT,
    Identity,
    MemberId,
    decode_keyfile,
    encode_keyfile,
    export_identity,
    import_identity,
    keyfile_is_sealed,
)

B32 = "abcdefghijklmnopqrstuvwxyz234567"


def det_random(seed: bytes):  # type: ignore[no-untyped-def]
    """Deterministic stand-in for os.urandom: tests must not depend on luck."""
    counter = itertools.count()

    def random_bytes(n: int) -> bytes:
        return hashlib.blake2b(seed + next(counter).to_bytes(4, "big"), digest_size=64).digest()[:n]

    return random_bytes


ALICE = Identity(bytes(range(32)))


def test_member_id_text_form() -> None:
    text = str(ALICE.member)
    assert text.startswith("vm1") and len(text) == 61
    assert set(text[3:]) <= set(B32)
    assert MemberId.parse(text) == ALICE.member
    assert MemberId.parse("  " + text.upper() + "\n") == ALICE.member
    assert repr(ALICE.member) == f"MemberId({text})"
    assert text.startswith(ALICE.member.short)


def test_every_single_character_typo_is_rejected() -> None:
    text = str(ALICE.member)
    tried = 0
    for i in range(3, len(text)):
        for c in B32:
            if c == text[i]:
                continue
            typo = text[:i] + c + text[i + 1 :]
            with pytest.raises(MemberIdError) as exc:
                MemberId.parse(typo)
            assert "mistyped" in str(exc.value)
            tried += 1
    assert tried == 58 * 31


def test_adjacent_swaps_are_rejected() -> None:
    text = str(ALICE.member)
    for i in range(3, len(text) - 1):
        if text[i] != text[i + 1]:
            swapped = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
            with pytest.raises(MemberIdError):
                MemberId.parse(swapped)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("vm2aaaa", "start with 'vm1'"),
        ("", "start with 'vm1'"),
        ("vm1abc", "58 letters"),
        ("vm1" + "a" * 57 + "1", "58 letters"),
        ("vm1" + "a" * 59, "58 letters"),
    ],
)
def test_malformed_member_ids_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(MemberIdError, match=fragment):
        MemberId.parse(text)


def test_non_ascii_look_alikes_are_refused() -> None:
    text = str(Identity(bytes(32)).member)
    i = text.index("k", 3)
    with pytest.raises(MemberIdError):
        MemberId.parse(text[:i] + "\u212a" + text[i + 1 :])  # KELVIN SIGN lower-cases to 'k'
    with pytest.raises(MemberIdError):
        MemberId.parse("\uff56m1" + text[3:])  # fullwidth 'v'


def test_member_id_parse_refuses_non_text() -> None:
    with pytest.raises(MemberIdError):
        MemberId.parse(b"vm1")  # type: ignore[arg-type]


def test_member_id_needs_32_bytes() -> None:
    with pytest.raises(DecodeError):
        MemberId(b"\x00" * 31)
    with pytest.raises(DecodeError):
        MemberId("x" * 32)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_any_key_round_trips_through_text(key: bytes) -> None:
    m = MemberId(key)
    assert MemberId.parse(str(m)) == m


def test_sign_and_verify() -> None:
    msg = b"hello"
    sig = ALICE.sign(msg)
    assert len(sig) == 64
    ALICE.member.verify(msg, sig)
    with pytest.raises(SignatureError):
        ALICE.member.verify(b"hellO", sig)
    with pytest.raises(SignatureError):
        Identity(b"\x01" * 32).member.verify(msg, sig)
    with pytest.raises(SignatureError):
        ALICE.member.verify(msg, sig[:63])
    bad = bytearray(sig)
    bad[10] ^= 1
    with pytest.raises(SignatureError):
        ALICE.member.verify(msg, bytes(bad))


def test_identity_is_determined_by_its_seed() -> None:
    assert Identity(bytes(range(32))).member == ALICE.member
    assert Identity(ALICE.seed).member == ALICE.member
    gen = Identity.generate(det_random(b"x"))
    assert gen.member == Identity(gen.seed).member
    with pytest.raises(KeyFileError):
        Identity(b"short")
    assert "vm1" in repr(ALICE) and ALICE.seed.hex() not in repr(ALICE)


def test_plain_key_file_round_trip() -> None:
    data = encode_keyfile(ALICE, None, det_random(b"k"))
    assert not keyfile_is_sealed(data)
    assert decode_keyfile(data, None).member == ALICE.member
    assert decode_keyfile(data, "ignored").member == ALICE.member


def test_sealed_key_file_round_trip_and_wrong_passphrase() -> None:
    data = encode_keyfile(ALICE, "correct horse", det_random(b"k"), opslimit=FAST_OPSLIMIT,
                          memlimit=FAST_MEMLIMIT)
    assert keyfile_is_sealed(data)
    assert ALICE.seed not in data
    assert decode_keyfile(data, "correct horse").member == ALICE.member
    with pytest.raises(KeyFileError, match="passphrase is wrong"):
        decode_keyfile(data, "correct horse!")
    with pytest.raises(KeyFileError, match="passphrase is needed"):
        decode_keyfile(data, None)
    # Any change to the sealed box is detected, not decrypted to another key.
    doc = cbor.decode(data)
    box = bytearray(doc["box"])
    box[-1] ^= 1
    with pytest.raises(KeyFileError):
        decode_keyfile(cbor.encode({**doc, "box": bytes(box)}), "correct horse")


def test_sealing_uses_fresh_salt_and_nonce() -> None:
    rnd = det_random(b"k")
    a = encode_keyfile(ALICE, "pw", rnd, opslimit=FAST_OPSLIMIT, memlimit=FAST_MEMLIMIT)
    b = encode_keyfile(ALICE, "pw", rnd, opslimit=FAST_OPSLIMIT, memlimit=FAST_MEMLIMIT)
    assert a != b


def test_empty_or_invalid_passphrase_is_refused() -> None:
    with pytest.raises(KeyFileError, match="empty"):
        encode_keyfile(ALICE, "", det_random(b"k"))
    with pytest.raises(KeyFileError, match="valid Unicode"):
        encode_keyfile(ALICE, "\ud800", det_random(b"k"), opslimit=FAST_OPSLIMIT, memlimit=FAST_MEMLIMIT)
    sealed = encode_keyfile(ALICE, "pw", det_random(b"k"), opslimit=FAST_OPSLIMIT, memlimit=FAST_MEMLIMIT)
    with pytest.raises(KeyFileError, match="valid Unicode"):
        decode_keyfile(sealed, "\ud800")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not cbor at all",
        cbor.encode([1, 2]),
        cbor.encode({"v": 2, "kind": "plain", "seed": b"\x00" * 32}),
        cbor.encode({"v": 1, "kind": "other"}),
        cbor.encode({"v": 1, "kind": "plain", "seed": b"\x00" * 31}),
        cbor.encode({"v": 1, "kind": "plain"}),
        cbor.encode({"v": 1, "kind": "sealed", "kdf": "argon2id", "ops": 0, "mem": 1,
                     "salt": b"\x00" * 16, "box": b"x"}),
        cbor.encode({"v": 1, "kind": "sealed", "kdf": "argon2id", "ops": 2, "mem": 1 << 40,
                     "salt": b"\x00" * 16, "box": b"x"}),
        cbor.encode({"v": 1, "kind": "sealed", "kdf": "argon2id", "ops": 2, "mem": 1 << 26,
                     "salt": b"\x00" * 15, "box": b"x"}),
        b"\x00" * 5000,
    ],
)
def test_damaged_key_files_raise_key_file_error(data: bytes) -> None:
    with pytest.raises(KeyFileError):
        decode_keyfile(data, "pw")


def test_export_import_round_trip() -> None:
    text = export_identity(ALICE, "backup pw", det_random(b"e"), opslimit=FAST_OPSLIMIT,
                           memlimit=FAST_MEMLIMIT)
    assert text.startswith("vmkey1:")
    assert import_identity("  " + text + "\n", "backup pw").member == ALICE.member
    with pytest.raises(KeyFileError, match="passphrase is wrong"):
        import_identity(text, "wrong")
    with pytest.raises(KeyFileError, match="vmkey1"):
        import_identity(text[1:], "backup pw")
    with pytest.raises(KeyFileError):
        import_identity(text[:-8], "backup pw")
    with pytest.raises(KeyFileError):
        import_identity("vmkey1:@@@@", "backup pw")
