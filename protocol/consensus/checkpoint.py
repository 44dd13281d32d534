"""Checkpoints (a ledger state hash signed by a quorum of one epoch's committee) and
re-founding (a new genesis, signed by the survivors of a core that lost quorum for good).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import cbor
from ..errors import AuthorizationError, DecodeError, LocalError, ValidationError
from ..identity import Identity, MemberId
from ..records import HASH_LEN, blake2b256
from .committee import MAX_COMMITTEE, Committee

CHECKPOINT_DOMAIN = b"valuemesh/checkpoint/v2\x00"
COMMITTEE_DOMAIN = b"valuemesh/committee/v1\x00"
REFOUND_DOMAIN = b"valuemesh/refound/v1\x00"
MAX_CHECKPOINT_SIZE = 1024
MAX_REFOUNDING_SIZE = 256 * 1024
_FIELDS = ("c", "epoch", "round", "index", "state", "snapshot", "next")


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise DecodeError(message)


def encode_committee(committee: Committee) -> bytes:
    return cbor.encode({
        "epoch": committee.epoch, "start": committee.start_round,
        "members": [[m.key, w] for m, w in committee.members],
    })


def decode_committee(raw: bytes) -> Committee:
    """Decode a committee sent by a peer; raise DecodeError if it is not one."""
    _need(isinstance(raw, bytes) and len(raw) <= MAX_COMMITTEE * 48 + 64, "A committee is over the size limit.")
    m = cbor.decode(raw)
    _need(isinstance(m, dict) and set(m) == {"epoch", "start", "members"} and isinstance(m["members"], list),
          "A committee has missing or unknown fields.")
    assert isinstance(m, dict)
    pairs = []
    for p in m["members"]:
        _need(isinstance(p, list) and len(p) == 2 and isinstance(p[0], bytes) and len(p[0]) == HASH_LEN
              and isinstance(p[1], int) and not isinstance(p[1], bool), "A committee member entry is malformed.")
        pairs.append((MemberId(p[0]), p[1]))
    for k in ("epoch", "start"):
        _need(isinstance(m[k], int) and not isinstance(m[k], bool) and 0 <= m[k] < 1 << 53,
              f"A committee's {k} is out of range.")
    try:
        return Committee(m["epoch"], tuple(pairs), m["start"])
    except LocalError as exc:
        raise DecodeError(exc.message) from None


def committee_hash(committee: Committee) -> bytes:
    """What a checkpoint attests about the committee that comes next."""
    return blake2b256(COMMITTEE_DOMAIN + encode_committee(committee))


@dataclass(frozen=True, slots=True)
class Content:
    """What one epoch's checkpoint says: where the epoch closed and what it closed with.

    `round` is the anchor that ended the epoch and `index` the number of blocks ordered up
    to it; `state_hash` is the user-visible ledger state hash, `snapshot_hash` the hash of
    the whole snapshot a node can start from (protocol/snapshot.py), and `next_committee`
    the hash of the committee of epoch + 1 (`committee_hash`), which is what lets a newcomer
    check a chain of certificates from the genesis committee without the states between.
    """

    constellation: bytes
    epoch: int
    round: int
    index: int
    state_hash: bytes
    snapshot_hash: bytes
    next_committee: bytes

    def payload(self) -> bytes:
        return cbor.encode(self.to_map())

    def to_map(self) -> dict[str, object]:
        return {"c": self.constellation, "epoch": self.epoch, "round": self.round, "index": self.index,
                "state": self.state_hash, "snapshot": self.snapshot_hash, "next": self.next_committee}

    @classmethod
    def from_map(cls, m: object) -> Content:
        _need(isinstance(m, dict) and all(k in m for k in _FIELDS), "A checkpoint has missing fields.")
        assert isinstance(m, dict)
        for k in ("c", "state", "snapshot", "next"):
            _need(isinstance(m[k], bytes) and len(m[k]) == HASH_LEN, f"A checkpoint's {k} is bad.")
        for k in ("epoch", "round", "index"):
            _need(isinstance(m[k], int) and not isinstance(m[k], bool) and 0 <= m[k] < 1 << 53,
                  f"A checkpoint's {k} is out of range.")
        return cls(m["c"], m["epoch"], m["round"], m["index"], m["state"], m["snapshot"], m["next"])

    def check(self) -> None:
        if min(self.epoch, self.round, self.index) < 0 or any(
                len(h) != HASH_LEN for h in (self.constellation, self.state_hash, self.snapshot_hash,
                                             self.next_committee)):
            raise LocalError("A checkpoint needs 32-byte hashes and non-negative counters.")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One core member's signature over the content that closes an epoch."""

    content: Content
    signer: MemberId
    sig: bytes

    @property
    def epoch(self) -> int:
        return self.content.epoch

    @property
    def constellation(self) -> bytes:
        return self.content.constellation

    @classmethod
    def create(cls, identity: Identity, content: Content) -> Checkpoint:
        content.check()
        return cls(content, identity.member, identity.sign(CHECKPOINT_DOMAIN + content.payload()))

    def verify(self) -> None:
        """Raise SignatureError unless `signer` signed exactly this content."""
        self.signer.verify(CHECKPOINT_DOMAIN + self.content.payload(), self.sig)

    def encode(self) -> bytes:
        return cbor.encode({**self.content.to_map(), "signer": self.signer.key, "sig": self.sig})

    @classmethod
    def decode(cls, data: bytes, *, verify: bool = True) -> Checkpoint:
        """Decode and (unless `verify` is False: the caller checks who signed first, then
        calls `verify`) check the signature; raise DecodeError or SignatureError."""
        _need(len(data) <= MAX_CHECKPOINT_SIZE, "A checkpoint is over the size limit.")
        m = cbor.decode(data, max_size=MAX_CHECKPOINT_SIZE)
        _need(isinstance(m, dict) and set(m) == {*_FIELDS, "signer", "sig"},
              "A checkpoint has missing or unknown fields.")
        assert isinstance(m, dict)
        content = Content.from_map(m)
        _need(isinstance(m["signer"], bytes) and len(m["signer"]) == HASH_LEN, "A checkpoint's signer is bad.")
        _need(isinstance(m["sig"], bytes) and len(m["sig"]) == 64, "A checkpoint signature is bad.")
        cp = cls(content, MemberId(m["signer"]), m["sig"])
        if verify:
            cp.verify()
        return cp


@dataclass(frozen=True, slots=True)
class CheckpointCertificate:
    """A checkpoint signed by a quorum of its epoch's committee: where a newcomer starts."""

    content: Content
    signatures: tuple[tuple[MemberId, bytes], ...]

    @property
    def epoch(self) -> int:
        return self.content.epoch

    @property
    def round(self) -> int:
        return self.content.round

    def verify(self, committee: Committee) -> None:
        """Raise unless distinct members of `committee` holding a quorum signed it."""
        if committee.epoch != self.content.epoch:
            raise ValidationError("The certificate is of another epoch than the committee given.")
        payload = CHECKPOINT_DOMAIN + self.content.payload()
        seen: set[MemberId] = set()
        weight = 0
        for signer, sig in self.signatures:
            if signer in seen:
                raise ValidationError("A checkpoint certificate names one signer twice.")
            if signer not in committee:
                raise AuthorizationError("A checkpoint certificate is signed by a non-member.")
            signer.verify(payload, sig)
            seen.add(signer)
            weight += committee.weight(signer)
        if weight < committee.quorum:
            raise ValidationError("A checkpoint certificate lacks a quorum of signatures.")

    def to_map(self) -> dict[str, object]:
        return {**self.content.to_map(), "sigs": [[m.key, s] for m, s in self.signatures]}

    @classmethod
    def from_map(cls, m: object) -> CheckpointCertificate:
        """Shape only; `verify` checks the signatures against a committee."""
        content = Content.from_map(m)
        assert isinstance(m, dict)
        sigs = m.get("sigs")
        _need(isinstance(sigs, list) and 0 < len(sigs) <= MAX_COMMITTEE, "A certificate's signatures are bad.")
        assert isinstance(sigs, list)
        pairs = []
        for pair in sigs:
            _need(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], bytes)
                  and len(pair[0]) == HASH_LEN and isinstance(pair[1], bytes) and len(pair[1]) == 64,
                  "A certificate's signatures are bad.")
            pairs.append((MemberId(pair[0]), pair[1]))
        return cls(content, tuple(pairs))


def verify_chain(
    first: Committee, links: Sequence[tuple[CheckpointCertificate, Committee]]
) -> Committee:
    """Follow certificates from `first` (the genesis committee); return the last committee.

    Each link is an epoch's certificate, which must be signed by a quorum of the committee
    the chain has reached, and the committee it attests comes next (its hash, epoch + 1,
    starting right after the closing anchor). Raise ValidationError/AuthorizationError/
    SignatureError on the first link that does not hold.
    """
    current = first
    for cert, nxt in links:
        if cert.content.epoch != current.epoch:
            raise ValidationError(f"The checkpoint chain skips from epoch {current.epoch} to {cert.content.epoch}.")
        cert.verify(current)
        if nxt.epoch != current.epoch + 1 or nxt.start_round != cert.content.round + 1 \
                or committee_hash(nxt) != cert.content.next_committee:
            raise ValidationError(f"The committee after epoch {current.epoch} is not the one its checkpoint attests.")
        current = nxt
    return current


@dataclass(slots=True)
class CheckpointAggregator:
    """Collects checkpoint signatures of one epoch until a quorum agrees on one content."""

    constellation: bytes
    committee: Committee
    _votes: dict[Content, dict[MemberId, bytes]] = field(default_factory=dict)
    _signed: dict[MemberId, Content] = field(default_factory=dict)
    _done: bool = False

    def add(self, cp: Checkpoint) -> CheckpointCertificate | None:
        """Take one checkpoint; return the certificate when it completes."""
        if cp.content.constellation != self.constellation or cp.content.epoch != self.committee.epoch:
            raise ValidationError("The checkpoint is for another constellation or epoch.")
        if cp.signer not in self.committee:
            raise AuthorizationError("The checkpoint's signer is not a core member of its epoch.")
        cp.verify()
        earlier = self._signed.get(cp.signer)
        if earlier is not None and earlier != cp.content:
            raise ValidationError("The member signed two different states for one epoch.")
        if self._done:
            return None
        self._signed[cp.signer] = cp.content
        votes = self._votes.setdefault(cp.content, {})
        votes[cp.signer] = cp.sig
        if sum(self.committee.weight(m) for m in votes) < self.committee.quorum:
            return None
        self._done = True
        return CheckpointCertificate(cp.content, tuple(sorted(votes.items(), key=lambda p: p[0].key)))


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
        if self.checkpoint.content.constellation != self.previous:
            raise ValidationError("The re-founding names a checkpoint of another constellation.")
        self.checkpoint.verify(old_committee)
        if self.final_round < self.checkpoint.content.round:
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
    "Content",
    "Refounding",
    "committee_hash",
    "decode_committee",
    "encode_committee",
    "verify_chain",
]
