"""Epoch ends still waiting on something: a closing snapshot still to encode (`Closing`), and
checkpoint signatures that came before this node could aggregate them (`EarlyCheckpoints`).

A peer may sign an epoch's end before we reach it, and a node catching up may not yet know
the signer as a member, so such signatures are held rather than refused. Anyone can make keys,
so the hold is bounded per epoch, one signature per signer; when it is full, a signer this node
does not know as a core member makes room only by pushing out another unknown one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from valuemesh.protocol.consensus import Checkpoint, Committee
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.ledger import LedgerParts
from valuemesh.protocol.snapshot import Snapshot

MAX_EARLY_CHECKPOINTS = 512  # signatures held per epoch (a committee has at most 512 members)


@dataclass(frozen=True, slots=True)
class Closing:
    """An epoch end whose snapshot is still to encode: the ledger's parts copied at the end."""

    committee: Committee
    round: int
    index: int
    clock: int
    final: int
    state_hash: bytes
    next: Committee
    parts: LedgerParts

    def encode(self) -> Snapshot:
        return Snapshot.encode(self.parts, epoch=self.committee.epoch, round=self.round, index=self.index,
                               clock=self.clock, final=self.final)


class EarlyCheckpoints:
    """Verified checkpoint signatures waiting for their epoch's aggregator."""

    def __init__(self, limit: int = MAX_EARLY_CHECKPOINTS) -> None:
        self.limit = limit
        self._held: dict[int, dict[MemberId, tuple[Checkpoint, bool]]] = {}

    def hold(self, cp: Checkpoint, known: Callable[[MemberId], bool]) -> bool:
        """Hold `cp` (its signature already checked); `known` says whether a signer is a core
        member as far as this node knows. False if it was not kept."""
        epoch = self._held.setdefault(cp.epoch, {})
        if cp.signer in epoch:
            return False  # one per signer: a second content would only be an equivocation
        preferred = known(cp.signer)
        if len(epoch) >= self.limit:
            victim = next((s for s, (_, pref) in epoch.items() if not pref), None)
            if victim is None or not preferred:
                return False
            del epoch[victim]
        epoch[cp.signer] = (cp, preferred)
        return True

    def take(self, epoch: int) -> list[Checkpoint]:
        """Everything held for `epoch`, once: the aggregator of that epoch now exists."""
        return [cp for cp, _ in self._held.pop(epoch, {}).values()]

    def held(self, epoch: int) -> int:
        return len(self._held.get(epoch, {}))

    def forget_before(self, epoch: int) -> None:
        """Drop what is held for epochs already certified or passed."""
        for e in [e for e in self._held if e < epoch]:
            del self._held[e]
