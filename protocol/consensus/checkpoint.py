"""Checkpoints (a ledger state hash signed by a quorum of one epoch's committee) and
re-founding (a new genesis, signed by the survivors of a core that lost quorum for good).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import cbor
from ..errors import AuthorizationError, DecodeError, LocalError, ValidationError
from ..identity import Identity, MemberId
from ..records import HASH_LEN, blake2b256
from .committee import MAX_COMMITTEE, Committee

CHECKPOINT_DOMAIN = b"valuemesh/checkpoint/v1\x00"
REFOUND_DOMAIN = b"valuemesh/refound/v1\x00"
MAX_CHECKPOINT_SIZE = 1024
MAX_REFOUNDING_SIZE = 256 * 1024


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise DecodeError(message)


def _checkpoint_payload(cid: bytes, epoch: int, round: int, state_hash: bytes) -> bytes:
    return cbor.encode({"c": cid, "epoch": epoch, "round": round, "state": state_hash})


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One core member's signature over the ledger state after all blocks of `round`."""

    constellation: bytes
    epoch: int
    round: int
    state_hash: bytes
    signer: MemberId
    sig: bytes

    @classmethod
    def create(
        cls, identity: Identity, *, constellation: bytes, epoch: int, round: int, state_hash: bytes
    ) -> Checkpoint:
        if len(state_hash) != HASH_LEN or epoch < 0 or round < 0:
            raise LocalError("A checkpoint needs a 32-byte state hash and a non-negative round.")
        payload = _checkpoint_payload(constellation, epoch, round, state_hash)
        sig = identity.sign(CHECKPOINT_DOMAIN + payload)
        return cls(constellation, epoch, round, state_hash, identity.member, sig)

    def verify(self) -> None:
        """Raise SignatureError unless `signer` signed exactly these fields."""
        payload = _checkpoint_payload(self.constellation, self.epoch, self.round, self.state_hash)
        self.signer.verify(CHECKPOINT_DOMAIN + payload, self.sig)

    def encode(self) -> bytes:
        return cbor.encode({
            "c": self.constellation, "epoch": self.epoch, "round": self.round,
            "state": self.state_hash, "signer": self.signer.key, "sig": self.sig,
        })

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        """Decode and verify; raise DecodeError or SignatureError."""
        _need(len(data) <= MAX_CHECKPOINT_SIZE, "A checkpoint is over the size limit.")
        m = cbor.decode(data, max_size=MAX_CHECKPOINT_SIZE)
        _need(isinstance(m, dict) and set(m) == {"c", "epoch", "round", "state", "signer", "sig"},
              "A checkpoint has missing or unknown fields.")
        assert isinstance(m, dict)
        for k in ("c", "state", "signer"):
            _need(isinstance(m[k], bytes) and len(m[k]) == HASH_LEN, f"A checkpoint's {k} is bad.")
        for k in ("epoch", "round"):
            _need(isinstance(m[k], int) and not isinstance(m[k], bool) and 0 <= m[k] < 1 << 53,
                  f"A checkpoint's {k} is out of range.")
        _need(isinstance(m["sig"], bytes) and len(m["sig"]) == 64, "A checkpoint signature is bad.")
        cp = cls(m["c"], m["epoch"], m["round"], m["state"], MemberId(m["signer"]), m["sig"])
        cp.verify()
        return cp


@dataclass(frozen=True, slots=True)
class CheckpointCertificate:
    """A checkpoint signed by a quorum of its epoch's committee: where a newcomer starts."""

    constellation: bytes
    epoch: int
    round: int
    state_hash: bytes
    signatures: tuple[tuple[MemberId, bytes], ...]

    def verify(self, committee: Committee) -> None:
        """Raise unless distinct members of `committee` holding a quorum signed it."""
        if committee.epoch != self.epoch:
            raise ValidationError("The certificate is of another epoch than the committee given.")
        payload = _checkpoint_payload(self.constellation, self.epoch, self.round, self.state_hash)
        seen: set[MemberId] = set()
        weight = 0
        for signer, sig in self.signatures:
            if signer in seen:
                raise ValidationError("A checkpoint certificate names one signer twice.")
            if signer not in committee:
                raise AuthorizationError("A checkpoint certificate is signed by a non-member.")
            signer.verify(CHECKPOINT_DOMAIN + payload, sig)
            seen.add(signer)
            weight += committee.weight(signer)
        if weight < committee.quorum:
            raise ValidationError("A checkpoint certificate lacks a quorum of signatures.")

    def to_map(self) -> dict[str, object]:
        return {
            "c": self.constellation, "epoch": self.epoch, "round": self.round,
            "state": self.state_hash, "sigs": [[m.key, s] for m, s in self.signatures],
        }


@dataclass(slots=True)
class CheckpointAggregator:
    """Collects checkpoint signatures of one epoch until a quorum agrees on one state."""

    constellation: bytes
    committee: Committee
    _votes: dict[tuple[int, bytes], dict[MemberId, bytes]] = field(default_factory=dict)
    _signed: dict[tuple[MemberId, int], bytes] = field(default_factory=dict)
    _done: set[int] = field(default_factory=set)

    def add(self, cp: Checkpoint) -> CheckpointCertificate | None:
        """Take one verified-on-arrival checkpoint; return the certificate when it completes."""
        if cp.constellation != self.constellation or cp.epoch != self.committee.epoch:
            raise ValidationError("The checkpoint is for another constellation or epoch.")
        if cp.signer not in self.committee:
            raise AuthorizationError("The checkpoint's signer is not a core member of its epoch.")
        cp.verify()
        earlier = self._signed.get((cp.signer, cp.round))
        if earlier is not None and earlier != cp.state_hash:
            raise ValidationError("The member signed two different states for one round.")
        if cp.round in self._done:
            return None
        self._signed[(cp.signer, cp.round)] = cp.state_hash
        votes = self._votes.setdefault((cp.round, cp.state_hash), {})
        votes[cp.signer] = cp.sig
        if sum(self.committee.weight(m) for m in votes) < self.committee.quorum:
            return None
        self._done.add(cp.round)
        sigs = tuple(sorted(votes.items(), key=lambda p: p[0].key))
        return CheckpointCertificate(self.constellation, cp.epoch, cp.round, cp.state_hash, sigs)


@dataclass(frozen=True, slots=True)
class Refounding:
    """A new genesis grown from a lost constellation's last certified checkpoint.

    The survivors state the final ledger they hold (`final_round`, `final_state_hash`,
    which extends the checkpoint with everything that was final after it) and the new core.
    Every new core member signs; the new constellation id is the hash of the payload.
    """

    previous: bytes
    checkpoint: CheckpointCertificate
    final_round: int
    final_state_hash: bytes
    members: tuple[tuple[MemberId, int], ...]
    created: int
    signatures: tuple[tuple[MemberId, bytes], ...] = ()

    def payload(self) -> bytes:
        return cbor.encode({
            "prev": self.previous, "checkpoint": self.checkpoint.to_map(),
            "final_round": self.final_round, "final_state": self.final_state_hash,
            "members": [[m.key, w] for m, w in self.members], "created": self.created,
        })

    @property
    def id(self) -> bytes:
        """The new constellation's id."""
        return blake2b256(REFOUND_DOMAIN + self.payload())

    def sign(self, identity: Identity) -> Refounding:
        if identity.member not in {m for m, _ in self.members}:
            raise LocalError("Only a member of the new core can sign a re-founding.")
        sig = identity.sign(REFOUND_DOMAIN + self.payload())
        sigs = {m: s for m, s in self.signatures}
        sigs[identity.member] = sig
        return Refounding(
            self.previous, self.checkpoint, self.final_round, self.final_state_hash,
            self.members, self.created, tuple(sorted(sigs.items(), key=lambda p: p[0].key)),
        )

    def verify(self, old_committee: Committee) -> Committee:
        """Check it against the lost core's committee; return the new core (epoch 0)."""
        if self.checkpoint.constellation != self.previous:
            raise ValidationError("The re-founding names a checkpoint of another constellation.")
        self.checkpoint.verify(old_committee)
        if self.final_round < self.checkpoint.round:
            raise ValidationError("The re-founding's final round is before its checkpoint.")
        if not 0 < len(self.members) <= MAX_COMMITTEE:
            raise ValidationError("A re-founding must name 1 to 512 core members.")
        new = Committee.of(dict(self.members))
        payload = REFOUND_DOMAIN + self.payload()
        signed = {m: s for m, s in self.signatures}
        for m, _ in self.members:
            if m not in signed:
                raise ValidationError(f"Core member {m.short}… has not signed the re-founding.")
            m.verify(payload, signed[m])
        if len(signed) != len(self.members):
            raise AuthorizationError("The re-founding is signed by someone outside its new core.")
        if not any(m in old_committee for m, _ in self.members):
            raise AuthorizationError("No survivor of the old core signed the re-founding.")
        return new

    def survivor_weight(self, old_committee: Committee) -> int:
        """Old-core weight behind this re-founding; above half, no rival one can exist."""
        return sum(old_committee.weight(m) for m, _ in self.members)


__all__ = [
    "CHECKPOINT_DOMAIN",
    "Checkpoint",
    "CheckpointAggregator",
    "CheckpointCertificate",
    "Refounding",
]
