"""The bounds every peer link obeys (`Limits`: sizes, timers, rates, penalties) and the
errors the transport raises when a link closes, a peer is unreachable or backed off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from valuemesh.node.ratelimit import ReputationPolicy
from valuemesh.protocol import wire
from valuemesh.protocol.errors import LocalError, RemoteError

MAX_PAYLOAD = 4 * 1024 * 1024
HANDSHAKE_TIMEOUT = 10.0
HEADER_TIMEOUT = 5.0
CONNECT_TIMEOUT = 15.0
PING_INTERVAL = 15.0
IDLE_TIMEOUT = 45.0
SEND_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0
DUPLICATE_PROBE_TIMEOUT = 3.0
FLOOD_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """What a relay carries for others (node/relay.py), budgeted per end-to-end member:
    a whole home shares one NAT address and relayed members share one link, so neither
    an address nor a link is the unit; the member whose bytes they are is."""

    max_reservations: int = 128
    max_circuits: int = 256
    # Circuits one member may have through this relay, as opener and as target together.
    max_circuits_per_member: int = 16
    # The bytes and circuit messages a member may send through this relay.
    rate_bytes: float = 4 * 1024 * 1024
    burst_bytes: float = 16 * 1024 * 1024
    rate_messages: float = 2_000.0
    burst_messages: float = 4_000.0
    # Over budget this long without a break: that member's circuits close...
    over_budget_grace: float = 3.0
    # ...and its new circuits are refused for this long.
    cooldown: float = 30.0
    # Relayed bytes queued towards one link beyond which circuits into it close (a stalled end).
    max_backlog: int = 32 * 1024 * 1024
    # Inbound circuits this node (as an end) may have mid-handshake at once.
    max_pending: int = 16

    def __post_init__(self) -> None:
        counts = (self.max_reservations, self.max_circuits, self.max_circuits_per_member, self.max_pending)
        rates = (self.rate_bytes, self.burst_bytes, self.rate_messages, self.burst_messages)
        if min(counts) < 1 or min(rates) <= 0 or self.max_backlog < 1:
            raise LocalError("Relay limits must be positive.")


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound a link obeys; tests shorten the timers, operators tune the rates."""

    max_payload: int = MAX_PAYLOAD
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    ping_interval: float = PING_INTERVAL
    idle_timeout: float = IDLE_TIMEOUT
    send_timeout: float = SEND_TIMEOUT
    close_timeout: float = CLOSE_TIMEOUT
    duplicate_probe_timeout: float = DUPLICATE_PROBE_TIMEOUT
    send_queue_frames: int = 256
    send_queue_bytes: int = 16 * 1024 * 1024
    max_links: int = 256
    # Inbound links from one address range (IPv4 /24, IPv6 /48: node/addresses.py).
    max_links_per_range: int = 64
    # Before authentication aiohttp may buffer one message of up to max_frame per
    # socket, so these two bound what strangers can make us hold (16 x 4 MiB); a
    # newcomer evicts the handshake that made no progress for longest (node/admission.py).
    max_handshakes: int = 16
    max_handshakes_per_range: int = 4
    # A connection must finish its HTTP request's headers within this many seconds.
    header_timeout: float = HEADER_TIMEOUT
    rate_messages: float = 5_000.0
    burst_messages: float = 10_000.0
    rate_bytes: float = 64 * 1024 * 1024
    burst_bytes: float = 128 * 1024 * 1024
    flood_grace: float = FLOOD_GRACE
    flood_penalty: float = 25.0
    invalid_message_penalty: float = 20.0
    handshake_failure_penalty: float = 25.0
    handshake_abandon_penalty: float = 5.0
    reputation: ReputationPolicy = field(default_factory=ReputationPolicy)
    relay: RelayLimits = field(default_factory=RelayLimits)

    def __post_init__(self) -> None:
        if self.max_payload < 1 or self.send_queue_frames < 1 or self.send_queue_bytes < 1:
            raise LocalError("Transport limits must be positive.")
        rates = (self.rate_messages, self.burst_messages, self.rate_bytes, self.burst_bytes)
        if min(rates) <= 0:
            raise LocalError("Transport rate limits must be positive.")
        if not 1 <= self.max_handshakes_per_range <= self.max_handshakes or self.max_links_per_range < 1:
            raise LocalError("Handshake and link limits must be at least 1, and a range's share no more than all.")
        if self.header_timeout <= 0:
            raise LocalError("The header timeout must be positive.")
        if self.idle_timeout <= self.ping_interval:
            raise LocalError("The idle timeout must be longer than the ping interval.")

    @property
    def max_frame(self) -> int:
        return self.max_payload + wire.MAX_FRAME_OVERHEAD


class LinkClosedError(LocalError):
    """Raised when sending on a link that is closed (or was closed because it stalled)."""


class PeerUnreachableError(RemoteError):
    """Raised when a peer cannot be reached or does not finish the handshake in time."""


class RelayRefusedError(RemoteError):
    """Raised when a relay (or the target behind it) refuses a reservation or circuit."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class BackedOffError(LocalError):
    """Raised when dialling a key or address that this node is backing off from."""
