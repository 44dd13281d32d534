"""Held checkpoint signatures (node/epoch_ends.py): one per signer and epoch, bounded, and the
known core's never pushed out by strangers' keys."""

from __future__ import annotations

from valuemesh.node.epoch_ends import EarlyCheckpoints
from valuemesh.protocol.consensus import Checkpoint, Content
from valuemesh.protocol.identity import Identity, MemberId

CID = b"\x0c" * 32


def signed(seed: int, epoch: int = 1, state: bytes = b"\x01" * 32) -> Checkpoint:
    content = Content(CID, epoch, 10, 20, state, b"\x02" * 32, b"\x03" * 32)
    return Checkpoint.create(Identity(seed.to_bytes(32, "big")), content)


CORE = {signed(s).signer for s in (1, 2)}


def known(m: MemberId) -> bool:
    return m in CORE


def test_one_signature_per_signer_and_epoch() -> None:
    inbox = EarlyCheckpoints()
    assert inbox.hold(signed(1), known)
    assert not inbox.hold(signed(1, state=b"\x09" * 32), known)  # a second content: never both
    assert inbox.hold(signed(1, epoch=2), known)
    assert [cp.content.state_hash for cp in inbox.take(1)] == [b"\x01" * 32]
    assert inbox.take(1) == []  # handed over once
    assert inbox.held(2) == 1


def test_strangers_fill_the_hold_but_never_push_out_the_core() -> None:
    inbox = EarlyCheckpoints(limit=4)
    assert inbox.hold(signed(1), known)
    assert all(inbox.hold(signed(100 + i), known) for i in range(3))
    assert not inbox.hold(signed(200), known)  # full: a stranger does not push out a stranger
    assert inbox.hold(signed(2), known)  # a core member's pushes out a stranger's
    held = {cp.signer for cp in inbox.take(1)}
    assert CORE <= held and len(held) == 4


def test_a_hold_full_of_the_core_keeps_it() -> None:
    inbox = EarlyCheckpoints(limit=2)
    assert inbox.hold(signed(1), known) and inbox.hold(signed(2), known)
    assert not inbox.hold(signed(300), known)
    assert {cp.signer for cp in inbox.take(1)} == CORE


def test_passed_epochs_are_forgotten() -> None:
    inbox = EarlyCheckpoints()
    inbox.hold(signed(1, epoch=1), known)
    inbox.hold(signed(1, epoch=3), known)
    inbox.forget_before(3)
    assert (inbox.held(1), inbox.held(3)) == (0, 1)
