"""The table of members' signed address records a node holds, and the screening every
received record passes before it replaces one: membership, freshness, clock skew, per-member
update rate and table size first, the signature last (docs/protocol.md §9.1).

Pure: no I/O; time comes in (`now` monotonic seconds, `wall_ms` the wall clock).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from valuemesh.node.addresses import Address, Network, is_global, on_networks
from valuemesh.node.budgets import ByteWindows
from valuemesh.protocol.addressrec import AddressRecord, Kind, decode_record
from valuemesh.protocol.errors import RemoteError
from valuemesh.protocol.identity import MemberId

# Records held, one per member: as many as the peer table holds members (addressbook.MAX_PEERS).
MAX_RECORDS = 4096
# How far ahead of our clock a record's seq (the member's clock in ms) may be: clocks of
# honest nodes differ by seconds; a record from the far future would pin its member's
# addresses until that time, since no honest later record could replace it.
MAX_SEQ_SKEW_MS = 10 * 60 * 1000
# Accepted updates per member: a burst, then one per interval. A node re-signs its own
# record at most once per OWN_RESIGN_INTERVAL_S (node/addrspread.py), so honest members stay
# under it (the burst's second is for two of its updates whose floods arrive close together);
# a member flooding updates is cut to this rate on every node.
RECORD_UPDATE_BURST = 2
RECORD_UPDATE_INTERVAL_S = 5.0
# Records one sender may make us look at: enough for a link-up sync of a large group.
RECORDS_PER_SENDER_BURST = 256
RECORDS_PER_SENDER_PER_S = 4.0


class Outcome(enum.Enum):
    """What became of one received record, and so what the sender is charged."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # the same seq again: floods cross, no one is charged
    OURS = "ours"  # our own record came back (or an older one of ours): nothing to do
    STALE = "stale"  # an older seq: an honest node may forward one that crossed a newer one
    EARLY = "early"  # a key's own record before we count it a member (a joiner, racing its join)
    UNKNOWN = "unknown"  # a record of a key we do not count a member (yet): our view may lag the sender's
    OVER_BUDGET = "over budget"  # a flood of updates, or a full table
    INVALID = "invalid"  # no honest node sends it: forged, malformed, non-member, far future


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    reason: str = ""  # one plain sentence when refused
    record: AddressRecord | None = None


class RecordTable:
    """The newest record per member. Not thread-safe; one task drives it."""

    def __init__(self, me: MemberId, *, max_records: int = MAX_RECORDS,
                 update_burst: float = RECORD_UPDATE_BURST,
                 update_interval: float = RECORD_UPDATE_INTERVAL_S) -> None:
        self.me = me
        self.max_records = max_records
        self._held: dict[MemberId, AddressRecord] = {}
        self._dropped: dict[MemberId, set[Address]] = {}  # addresses found to be someone else's
        self._updates = ByteWindows(1.0 / update_interval, update_burst, max_keys=max_records)
        self._senders = ByteWindows(RECORDS_PER_SENDER_PER_S, RECORDS_PER_SENDER_BURST)

    def __len__(self) -> int:
        return len(self._held)

    def get(self, member: MemberId) -> AddressRecord | None:
        return self._held.get(member)

    def records(self) -> list[AddressRecord]:
        return list(self._held.values())

    def sender_room(self, sender: MemberId, n: int, now: float) -> int:
        """How many of `n` records from `sender` may be looked at now; charges them."""
        room = int(self._senders.room(sender, now))
        take = max(0, min(n, room))
        self._senders.spend(sender, take, now)
        return take

    def screen(
        self, raw: bytes, sender: MemberId, may_know: Callable[[MemberId], bool], now: float, wall_ms: int
    ) -> Verdict:
        """Decide on one received record; an accepted one replaces the member's record.

        `may_know(member)`: whether `sender` may tell us of `member` (the sender itself, or a
        member of a constellation the sender shares with us). Cheap checks come first, the
        signature last, so a refused record costs no signature check.
        """
        try:
            rec = decode_record(raw, verify=False)
        except RemoteError as e:
            return Verdict(Outcome.INVALID, e.message)
        who = rec.member.short
        if rec.member == self.me:
            return Verdict(Outcome.OURS)
        held = self._held.get(rec.member)
        if held is not None and rec.seq == held.seq:
            return Verdict(Outcome.DUPLICATE, record=held)
        if not may_know(rec.member):
            if rec.member == sender:
                return Verdict(Outcome.EARLY, f"{who}… sent its own address record but is no member of a "
                                              "constellation we share (yet).")
            return Verdict(Outcome.UNKNOWN, f"The address record of {who}… is of no member of a constellation "
                                            "the sender shares with us (yet).")
        if held is not None and rec.seq < held.seq:
            return Verdict(Outcome.STALE, f"The address record of {who}… is older (seq {rec.seq}) than the one "
                                          f"held (seq {held.seq}).")
        if rec.seq > wall_ms + MAX_SEQ_SKEW_MS:
            return Verdict(Outcome.INVALID, f"The address record of {who}… is dated {(rec.seq - wall_ms) // 1000} s "
                                            "in the future.")
        if held is None and len(self._held) >= self.max_records:
            return Verdict(Outcome.OVER_BUDGET, f"The address record of {who}… does not fit: the table holds "
                                                f"{self.max_records} records.")
        if self._updates.room(rec.member, now) < 1:
            return Verdict(Outcome.OVER_BUDGET, f"The address record of {who}… changes too often; at most one "
                                                "update per few seconds is taken.")
        try:
            rec.verify()
        except RemoteError:
            return Verdict(Outcome.INVALID, f"The address record of {who}… carries a signature that does not verify.")
        self._updates.spend(rec.member, 1, now)
        self._put(rec)
        return Verdict(Outcome.ACCEPTED, record=rec)

    def restore(self, rec: AddressRecord) -> bool:
        """Take a record from our own store (already verified); False if one as new is held."""
        held = self._held.get(rec.member)
        if (held is not None and held.seq >= rec.seq) or (held is None and len(self._held) >= self.max_records):
            return False
        self._put(rec)
        return True

    def put_own(self, rec: AddressRecord) -> None:
        self._held[rec.member] = rec

    def drop_address(self, member: MemberId, address: Address) -> bool:
        """`address` in `member`'s record proved to be another key's: never dial it for this
        record again. False if the record does not name it (or it was dropped already)."""
        rec = self._held.get(member)
        if rec is None or address not in record_addresses(rec):
            return False
        dropped = self._dropped.setdefault(member, set())
        if address in dropped:
            return False
        dropped.add(address)
        return True

    def usable(self, member: MemberId, local: Sequence[Network] | None = None) -> list[Address]:
        """The addresses of `member`'s record worth dialing (docs/protocol.md §9.1, Dialing);
        with `local` (this host's networks), its private `lan` addresses only where they are on
        one of them: a home's private address is someone else's, or nobody's, from outside (a
        global one may be public but not yet confirmed by dial-back: worth a try)."""
        rec = self._held.get(member)
        if rec is None:
            return []
        dropped = self._dropped.get(member, set())
        lan_elsewhere = set() if local is None else {
            Address(a.host, a.port) for a in rec.addresses
            if a.kind is Kind.LAN and not is_global(a.host) and not on_networks(a.host, local)}
        return [a for a in usable_addresses(rec) if a not in dropped and a not in lan_elsewhere]

    def kind_of(self, member: MemberId, address: Address) -> Kind | None:
        """What `member`'s record calls `address` (None if it does not name it)."""
        rec = self._held.get(member)
        if rec is None:
            return None
        return next((a.kind for a in rec.addresses if Address(a.host, a.port) == address), None)

    def _put(self, rec: AddressRecord) -> None:
        self._held[rec.member] = rec
        self._dropped.pop(rec.member, None)  # a new seq is the member's new word on each address


def record_addresses(rec: AddressRecord) -> list[Address]:
    return [Address(a.host, a.port) for a in rec.addresses]


def usable_addresses(rec: AddressRecord) -> list[Address]:
    """Loopback addresses only when the record has nothing else (a node on this machine),
    link-local ones never (they need an interface zone a record cannot carry)."""
    addrs = [a for a in record_addresses(rec) if not a.is_link_local]
    if all(a.is_loopback for a in addrs):
        return addrs
    return [a for a in addrs if not a.is_loopback]
