"""Who may hold one of the transport's few pre-authentication handshake slots.

Slots are counted per address range (`addresses.address_range`: IPv4 /24, IPv6 /48), not per
address, so rotating through the addresses of one subnet buys nothing. When a newcomer finds
no room, the slot that has gone longest without progress (no handshake message for the
longest time) is taken from its holder: from the newcomer's own range if that range is at its
quota, else from the range holding the most slots. An honest peer answers within a round trip
and so always has made progress more recently than an idler; it is admitted however many
idlers hold slots, and idlers from one range can only push out each other. A holder evicted before it sent
anything is charged like a dialler that hung up (the transport does that), so idlers that
reconnect at once to push each other out soon find their addresses backed off.

Pure bookkeeping: no I/O, `now` comes in; evicting a holder is its `evict` callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from valuemesh.node.addresses import address_range


@dataclass(slots=True, eq=False)
class Slot:
    """One handshake in progress: whose, and when it last moved forward."""

    ip: str
    range: str
    progress: float
    evict: Callable[[], None] = field(repr=False)
    evicted: bool = False
    messages: int = 0  # handshake messages received so far


class HandshakeSlots:
    """At most `total` handshakes at once, at most `per_range` of them from one range."""

    def __init__(self, total: int, per_range: int) -> None:
        if total < 1 or not 1 <= per_range <= total:
            raise ValueError("Handshake slots need total >= 1 and 1 <= per_range <= total.")
        self.total = total
        self.per_range = per_range
        self.evictions = 0
        self._slots: list[Slot] = []
        self._by_range: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def held(self, ip: str) -> int:
        """Slots now held by the range of `ip`."""
        return self._by_range.get(address_range(ip), 0)

    def take(self, ip: str, now: float, evict: Callable[[], None]) -> Slot:
        """A slot for a new handshake from `ip`, evicting the stalest holder if there is no room."""
        rng = address_range(ip)
        victim: Slot | None = None
        if self._by_range.get(rng, 0) >= self.per_range:
            victim = min((s for s in self._slots if s.range == rng), key=_staleness)
        elif len(self._slots) >= self.total:
            most = max(self._by_range.values())
            victim = min((s for s in self._slots if self._by_range[s.range] == most), key=_staleness)
        if victim is not None:
            self.release(victim)
            victim.evicted = True
            self.evictions += 1
            victim.evict()
        slot = Slot(ip, rng, now, evict)
        self._slots.append(slot)
        self._by_range[rng] = self._by_range.get(rng, 0) + 1
        return slot

    def moved(self, slot: Slot, now: float) -> None:
        """The handshake in `slot` received its next message."""
        slot.progress = max(slot.progress, now)
        slot.messages += 1

    def release(self, slot: Slot) -> None:
        """The handshake ended (or was evicted); a second release changes nothing."""
        if slot.evicted or slot not in self._slots:
            return
        self._slots.remove(slot)
        left = self._by_range[slot.range] - 1
        if left:
            self._by_range[slot.range] = left
        else:
            del self._by_range[slot.range]


def _staleness(s: Slot) -> float:
    return s.progress
