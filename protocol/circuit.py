"""The relay sub-protocol carried in CIRCUIT frames (wire version 2), sans I/O.

A member behind NAT RESERVEs at a relay over a link it dialled; another member OPENs a
circuit to it through the relay; both ends then run the whole peer handshake inside
the circuit's DATA messages, so the relay forwards ciphertext it cannot read.

Every message is `op(1) ‖ circuit id(4, big-endian) ‖ rest`. Circuit ids belong to one
link and to the end that opened the circuit on it: the top bit is 0 when the opener
initiated that link's handshake, 1 when it responded, so ids never collide. Flow is
controlled per circuit and direction by credit (CREDIT messages), end to end.
Byte formats and rules: docs/transport.md §9.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import DecodeError, LocalError
from .identity import KEY_LEN, MemberId

HEADER = 5
MAX_REASON = 200
RESPONDER_BIT = 1 << 31
MAX_CIRCUIT_ID = (1 << 32) - 1
# DATA bytes a sender may have in flight before the receiver credits more. A message may
# be sent while any credit is left, so in flight is at most this plus one message.
INITIAL_WINDOW = 256 * 1024
MAX_CREDIT = (1 << 32) - 1


class Op(enum.IntEnum):
    """The relay sub-protocol's messages (first byte of a CIRCUIT frame's body)."""

    RESERVE = 0x01  # end → relay, circuit 0, no rest: keep me reachable through you
    RESERVED = 0x02  # relay → end, circuit 0: code(1) ‖ reason
    OPEN = 0x03  # opener → relay: the target's key(32)
    INCOMING = 0x04  # relay → target: the opener's key(32)
    OPENED = 0x05  # answer to OPEN or INCOMING on the same circuit: code(1) ‖ reason
    DATA = 0x06  # one carrier message of the end-to-end link (1 .. max payload + 17 bytes)
    CLOSE = 0x07  # either hop: reason (0 .. 200 bytes of UTF-8)
    CREDIT = 0x08  # receiver → sender, end to end: 4-byte big-endian DATA byte increment
    RELEASE = 0x09  # end → relay, circuit 0, no rest: forget my reservation (I am reachable now)


class Code(enum.IntEnum):
    """Answers to RESERVE and OPEN (0 accepts)."""

    OK = 0
    NOT_AUTHORISED = 1
    NO_RESERVATION = 2
    OVER_BUDGET = 3
    REFUSED = 4
    NOT_A_RELAY = 5
    UNREACHABLE = 6
    BUSY = 7

    @property
    def sentence(self) -> str:
        return _SENTENCES[self]


_SENTENCES = {
    Code.OK: "The relay accepted.",
    Code.NOT_AUTHORISED: "The relay does not relay between these members (no constellation in common).",
    Code.NO_RESERVATION: "The target holds no reservation at this relay.",
    Code.OVER_BUDGET: "The relay's budget for this member is spent for now.",
    Code.REFUSED: "The target refused the circuit.",
    Code.NOT_A_RELAY: "The peer does not serve as a relay.",
    Code.UNREACHABLE: "The relay lost its link to the target.",
    Code.BUSY: "The relay has no room for another circuit or reservation.",
}


class CircuitError(DecodeError):
    """Raised when a CIRCUIT frame's body is malformed or breaks the sub-protocol's rules."""


@dataclass(frozen=True, slots=True)
class Message:
    """One relay sub-protocol message; `rest` is already checked for its op."""

    op: Op
    circuit: int
    rest: bytes = b""

    @property
    def member(self) -> MemberId:
        """The key an OPEN or INCOMING names."""
        return MemberId(self.rest)

    @property
    def code(self) -> Code:
        return Code(self.rest[0])

    @property
    def reason(self) -> str:
        """The reason of RESERVED, OPENED (after the code) or CLOSE, printable only."""
        raw = self.rest if self.op is Op.CLOSE else self.rest[1:]
        text = raw.decode("utf-8")
        return "".join(c if c.isprintable() else "?" for c in text)

    @property
    def credit(self) -> int:
        return int.from_bytes(self.rest, "big")


def _reason(text: str) -> bytes:
    return text.encode("utf-8")[:MAX_REASON].decode("utf-8", "ignore").encode("utf-8")


def _head(op: Op, circuit: int) -> bytes:
    if not 0 <= circuit <= MAX_CIRCUIT_ID:
        raise LocalError("A circuit id must fit in 32 bits.")
    return bytes((op,)) + circuit.to_bytes(4, "big")


def reserve() -> bytes:
    return _head(Op.RESERVE, 0)


def release() -> bytes:
    return _head(Op.RELEASE, 0)


def reserved(code: Code, reason: str = "") -> bytes:
    return _head(Op.RESERVED, 0) + bytes((code,)) + _reason(reason or code.sentence)


def open_(circuit: int, member: MemberId) -> bytes:
    return _head(Op.OPEN, circuit) + member.key


def incoming(circuit: int, member: MemberId) -> bytes:
    return _head(Op.INCOMING, circuit) + member.key


def opened(circuit: int, code: Code, reason: str = "") -> bytes:
    return _head(Op.OPENED, circuit) + bytes((code,)) + _reason(reason or code.sentence)


def data(circuit: int, message: bytes) -> bytes:
    if not message:
        raise LocalError("A circuit DATA message carries at least one byte.")
    return _head(Op.DATA, circuit) + message


def close(circuit: int, reason: str) -> bytes:
    return _head(Op.CLOSE, circuit) + _reason(reason)


def credit(circuit: int, amount: int) -> bytes:
    if not 1 <= amount <= MAX_CREDIT:
        raise LocalError("A credit must be 1 to 2^32 - 1 bytes.")
    return _head(Op.CREDIT, circuit) + amount.to_bytes(4, "big")


def decode(body: bytes, max_data: int) -> Message:
    """Parse a CIRCUIT frame's body strictly; `max_data` bounds a DATA message."""
    if len(body) < HEADER:
        raise CircuitError("The peer sent a circuit message too short to hold its header.")
    try:
        op = Op(body[0])
    except ValueError:
        raise CircuitError("The peer sent a circuit message of an unknown kind.") from None
    circuit = int.from_bytes(body[1:5], "big")
    rest = bytes(body[5:])
    if (op in (Op.RESERVE, Op.RESERVED, Op.RELEASE)) != (circuit == 0):
        raise CircuitError("The peer sent a circuit message with a misplaced circuit id.")
    if op in (Op.RESERVE, Op.RELEASE) and rest:
        raise CircuitError("The peer's reservation request or release carries unexpected bytes.")
    if op in (Op.OPEN, Op.INCOMING) and len(rest) != KEY_LEN:
        raise CircuitError("The peer's circuit open does not name one member key.")
    if op in (Op.RESERVED, Op.OPENED):
        if not 1 <= len(rest) <= 1 + MAX_REASON:
            raise CircuitError("The peer's circuit answer has the wrong length.")
        if rest[0] not in Code._value2member_map_:
            raise CircuitError("The peer's circuit answer has an unknown code.")
    if op is Op.DATA and not 1 <= len(rest) <= max_data:
        raise CircuitError(f"The peer sent circuit data of {len(rest)} bytes; at most {max_data} are allowed.")
    if op is Op.CLOSE and len(rest) > MAX_REASON:
        raise CircuitError("The peer's circuit close reason is too long.")
    if op is Op.CREDIT and (len(rest) != 4 or rest == bytes(4)):
        raise CircuitError("The peer's circuit credit is not a positive 4-byte count.")
    if op in (Op.RESERVED, Op.OPENED, Op.CLOSE):
        try:
            (rest if op is Op.CLOSE else rest[1:]).decode("utf-8")
        except UnicodeDecodeError:
            raise CircuitError("The peer's circuit reason is not UTF-8.") from None
    return Message(op, circuit, rest)
