"""What the peer table tells the node: the liveness states, the actions to carry out (dial,
ping), the liveness events to gossip, and the records and views it hands out to store and serve.

Plain frozen values with no behaviour beyond their JSON form; the table in `peers` makes them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from valuemesh.node.addresses import Address, Source
from valuemesh.protocol.identity import MemberId


class State(enum.StrEnum):
    """A member's liveness in our view (SWIM): dead is a proposal, never a removal."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


# --- actions and events (outputs) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DialTarget:
    """An address to dial; `member` is None for a bootstrap address whose key is unknown."""

    address: Address
    member: MemberId | None
    source: Source


@dataclass(frozen=True, slots=True)
class Dial:
    target: DialTarget


@dataclass(frozen=True, slots=True)
class Ping:
    member: MemberId
    probe: int


@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask each helper to ping `member` for us and relay its ack (SWIM indirect probe)."""

    member: MemberId
    helpers: tuple[MemberId, ...]
    probe: int


@dataclass(frozen=True, slots=True)
class Suspected:
    member: MemberId
    incarnation: int


@dataclass(frozen=True, slots=True)
class Died:
    """Our suspicion timer ran out: a proposal to the constellation, never a removal."""

    member: MemberId
    incarnation: int


@dataclass(frozen=True, slots=True)
class Revived:
    member: MemberId
    incarnation: int


@dataclass(frozen=True, slots=True)
class Refute:
    """Someone says we are suspect or dead: gossip that we are alive at this incarnation."""

    incarnation: int


Action = Dial | Ping | PingReq | Suspected | Died | Revived | Refute


@dataclass(frozen=True, slots=True)
class MergeReport:
    accepted: int
    ignored: int


@dataclass(frozen=True, slots=True)
class SavedAddress:
    """One address as the node persists it; `age` is seconds since last confirmed."""

    member: MemberId
    address: Address
    source: Source
    age: float
    reached: bool
    dial_failures: int


# --- snapshot (output structs, stable for the API) -------------------------------------------

SNAPSHOT_VERSION = 1


@dataclass(frozen=True, slots=True)
class AddressView:
    host: str
    port: int
    source: str
    seen_ago: float
    ok_ago: float | None


@dataclass(frozen=True, slots=True)
class PeerView:
    member: str
    state: str
    incarnation: int
    state_for: float  # seconds in the current state
    linked: bool
    via: AddressView | None  # the address of the open link, if any
    addresses: tuple[AddressView, ...]
    dial_in: float | None  # seconds until the next dial, None while linked
    dial_failures: int

    def to_json(self) -> dict[str, object]:
        def addr(a: AddressView) -> dict[str, object]:
            return {
                "host": a.host,
                "port": a.port,
                "source": a.source,
                "seen_ago": round(a.seen_ago, 3),
                "ok_ago": None if a.ok_ago is None else round(a.ok_ago, 3),
            }

        return {
            "member": self.member,
            "state": self.state,
            "incarnation": self.incarnation,
            "state_for": round(self.state_for, 3),
            "linked": self.linked,
            "via": None if self.via is None else addr(self.via),
            "addresses": [addr(a) for a in self.addresses],
            "dial_in": None if self.dial_in is None else round(self.dial_in, 3),
            "dial_failures": self.dial_failures,
        }
