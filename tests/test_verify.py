"""Signature checks in batches: `first_invalid`, the node's `ParallelVerifier` and
`decode_blocks` / `decode_records` with a batch verifier. Whatever the threads and slices, the
answer is the first failing check, and decoding raises the error a loop would meet first."""

from __future__ import annotations

import hashlib

import pytest

from valuemesh.node.verify import PARALLEL_MIN_CHECKS, ParallelVerifier
from valuemesh.protocol.errors import DecodeError, SignatureError
from valuemesh.protocol.identity import Identity, SignatureCheck, first_invalid
from valuemesh.protocol.records import Block, Record, decode_block, decode_blocks, decode_record, decode_records

CID = hashlib.blake2b(b"verify-constellation", digest_size=32).digest()
SIGNERS = [Identity(hashlib.blake2b(b"signer-%d" % i, digest_size=32).digest()) for i in range(5)]


def checks(n: int, bad: set[int] = frozenset()) -> list[SignatureCheck]:  # type: ignore[assignment]
    out: list[SignatureCheck] = []
    for i in range(n):
        who = SIGNERS[i % len(SIGNERS)]
        msg = b"message %d" % i
        sig = who.sign(msg)
        if i in bad:
            sig = bytes([sig[0] ^ 1]) + sig[1:]
        out.append((who.member, msg, sig))
    return out


def record(i: int, forged: bool = False) -> Record:
    r = Record.create(SIGNERS[i % len(SIGNERS)], type="contribution", v=1, constellation=CID, seq=i // len(SIGNERS),
                      body={"op": "record", "action": "work", "n": i}, created=1_700_000_000_000 + i)
    if not forged:
        return r
    return decode_record(flip_sig(r.raw, r.sig), verify=False)


def flip_sig(raw: bytes, sig: bytes) -> bytes:
    """The same encoding with one bit of its signature changed."""
    i = raw.index(sig)
    return raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1:]


def block(k: int, recs: list[Record]) -> Block:
    return Block.create(SIGNERS[k % 4], constellation=CID, epoch=0, round=k, prev=None, parents=[],
                        records=recs, created=1_700_000_000_000 + k)


def test_first_invalid_finds_the_first_bad_check() -> None:
    assert first_invalid(checks(10)) is None
    assert first_invalid(checks(10, {7, 3})) == 3
    assert first_invalid(checks(10, {3}), start=4) is None
    assert first_invalid(checks(10, {8}), start=2, stop=8) is None
    who, msg, sig = checks(1)[0]
    assert first_invalid([(who, msg, sig[:63])]) == 0  # a short signature never verifies


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_parallel_verifier_answers_as_the_loop(threads: int) -> None:
    v = ParallelVerifier(threads)
    try:
        n = 5 * PARALLEL_MIN_CHECKS
        base = checks(n)
        assert v(base) is None
        for bad in [{0}, {n - 1}, {n // 2}, {n - 1, 1}, {n // 3, 2 * n // 3}, set(range(n))]:
            batch = list(base)
            for i in bad:
                who, msg, sig = batch[i]
                batch[i] = (who, msg, bytes([sig[0] ^ 1]) + sig[1:])
            assert v(batch) == min(bad) == first_invalid(batch)
        small = checks(PARALLEL_MIN_CHECKS - 1, {5})
        assert v(small) == 5
        assert v([]) is None
    finally:
        v.close()


def test_parallel_verifier_needs_a_thread() -> None:
    with pytest.raises(ValueError):
        ParallelVerifier(0)


def test_decode_blocks_checks_every_signature_of_the_batch() -> None:
    v = ParallelVerifier(2)
    try:
        blocks = [block(k, [record(8 * k + j) for j in range(8)]) for k in range(6)]
        raws = [b.raw for b in blocks]
        assert decode_blocks(raws, batch_verifier=v) == [decode_block(r) for r in raws] == blocks
        assert decode_blocks([]) == []
        forged = block(6, [record(60), record(61, forged=True)])
        with pytest.raises(SignatureError):
            decode_blocks([*raws, forged.raw], batch_verifier=v)
        with pytest.raises(SignatureError):
            decode_block(forged.raw, batch_verifier=v)
        # A forged block signature is refused as well.
        bad_sig = flip_sig(blocks[2].raw, blocks[2].sig)
        with pytest.raises(SignatureError):
            decode_blocks([raws[0], bad_sig, raws[3]], batch_verifier=v)
        # The loop's first error wins: a forgery before a malformed block is the error raised,
        # a malformed block before a forgery is.
        with pytest.raises(SignatureError):
            decode_blocks([raws[0], forged.raw, b"\xa1junk"], batch_verifier=v)
        with pytest.raises(DecodeError):
            decode_blocks([raws[0], b"\xa1junk", forged.raw], batch_verifier=v)
    finally:
        v.close()


def test_decode_records_with_a_batch_verifier() -> None:
    v = ParallelVerifier(2)
    try:
        recs = [record(i) for i in range(3 * PARALLEL_MIN_CHECKS)]
        raws = [r.raw for r in recs]
        assert decode_records(raws, batch_verifier=v) == recs
        bad = list(raws)
        bad[40] = record(40, forged=True).raw
        with pytest.raises(SignatureError):
            decode_records(bad, batch_verifier=v)
        bad[10] = b"\x00"
        with pytest.raises(DecodeError):
            decode_records(bad, batch_verifier=v)
    finally:
        v.close()


def test_a_verifier_that_names_a_good_check_is_refused_not_trusted() -> None:
    # A batch verifier whose answer the loop does not confirm fails closed.
    r = record(1)
    with pytest.raises(SignatureError):
        decode_records([r.raw], batch_verifier=lambda cs: 0)

