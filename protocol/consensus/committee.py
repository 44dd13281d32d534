"""One epoch's committee: the core members that take part in agreement, their weights,
the quorum thresholds derived from them and the anchor-slot rotation over rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LocalError
from ..identity import MemberId

# A committee larger than this cannot fit its quorum into one block's parents list.
MAX_COMMITTEE = 512
MAX_WEIGHT = 1 << 32


@dataclass(frozen=True, slots=True)
class Committee:
    """The core members of one epoch, in force from `start_round` until the next epoch.

    `members` holds (member, weight > 0) pairs sorted by key. Thresholds count
    weight, never heads: f = floor((total-1)/3), quorum = ceil((total+f+1)/2).
    """

    epoch: int
    members: tuple[tuple[MemberId, int], ...]
    start_round: int = 0
    # Derived once: the machine asks for weights and thresholds on every vote it counts.
    _weights: dict[bytes, int] = field(default_factory=dict, init=False, compare=False, repr=False)
    _total: int = field(default=0, init=False, compare=False, repr=False)
    _quorum: int = field(default=0, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.epoch < 0 or self.start_round < 0:
            raise LocalError("A committee's epoch and start round must not be negative.")
        if not 0 < len(self.members) <= MAX_COMMITTEE:
            raise LocalError(f"A committee needs 1 to {MAX_COMMITTEE} members.")
        keys = [m.key for m, _ in self.members]
        if keys != sorted(set(keys)):
            raise LocalError("A committee's members must be distinct and sorted by key.")
        for _, w in self.members:
            if isinstance(w, bool) or not isinstance(w, int) or not 0 < w <= MAX_WEIGHT:
                raise LocalError("Every committee member needs a positive integer weight.")
        self._weights.update((m.key, w) for m, w in self.members)
        total = sum(w for _, w in self.members)
        object.__setattr__(self, "_total", total)
        object.__setattr__(self, "_quorum", (total + (total - 1) // 3 + 2) // 2)

    @classmethod
    def of(
        cls, members: dict[MemberId, int] | list[MemberId], *, epoch: int = 0, start_round: int = 0
    ) -> Committee:
        """Build a committee from a member list (weight 1 each) or a member->weight map."""
        pairs = members.items() if isinstance(members, dict) else ((m, 1) for m in members)
        return cls(epoch, tuple(sorted(pairs, key=lambda p: p[0].key)), start_round)

    @property
    def total(self) -> int:
        return self._total

    @property
    def f(self) -> int:
        """The Byzantine weight the committee tolerates."""
        return (self.total - 1) // 3

    @property
    def quorum(self) -> int:
        return self._quorum

    @property
    def validity(self) -> int:
        """Weight that surely includes one honest member."""
        return self.f + 1

    @property
    def guarantee(self) -> str:
        """What the committee survives, as a short label the CLI and API show."""
        if self.f > 0:
            return f"byzantine-tolerant({self.f})"
        if len(self.members) == 1:
            return "single-node"
        crash = self.total - self.quorum
        return f"crash-tolerant({crash})" if crash > 0 else "no-fault-tolerance"

    def weight(self, member: MemberId) -> int:
        return self._weights.get(member.key, 0)

    def __contains__(self, member: object) -> bool:
        return isinstance(member, MemberId) and member.key in self._weights

    def leader(self, round: int) -> MemberId:
        """The anchor-slot owner of `round`: plain rotation over all members by key order.

        Rotation, not weighted election, keeps every member's slot frequency equal and
        lets anyone compute it with no state; weights act only through quorums.
        """
        return self.members[round % len(self.members)][0]
