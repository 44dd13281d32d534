"""Address records on a node: the table of members' signed records (node/addrtable.py), our
own record (built from our listen addresses, mapping, relays and dial-back results, re-signed
when they change), spreading them to linked members, storing them, and feeding the dialer.

Registers the `arec` message; the node calls `link_up`, `link_down` and `beat` (docs/protocol.md §9.1).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence

from valuemesh.node.addresses import Address, Network, is_global
from valuemesh.node.addrtable import Outcome, RecordTable, Verdict
from valuemesh.node.budgets import OVER_BUDGET_PENALTY
from valuemesh.node.clock import now_ms
from valuemesh.node.interfaces import local_addresses, local_networks
from valuemesh.node.link import PeerLink
from valuemesh.node.loglimit import LogKinds
from valuemesh.node.messaging import PENALTY_INVALID, Handlers, Send
from valuemesh.node.store import Store
from valuemesh.protocol import messages as m
from valuemesh.protocol.addressrec import (
    MAX_RECORD_ADDRESSES,
    MAX_RECORD_RELAYS,
    AddressRecord,
    Kind,
    RecordAddress,
    decode_record,
    next_seq,
)
from valuemesh.protocol.errors import LocalError, ValuemeshError
from valuemesh.protocol.identity import Identity, MemberId

log = logging.getLogger("valuemesh.discovery")

# Our own record is re-signed at most this often (node/addrtable.py RECORD_UPDATE_INTERVAL_S
# is what receivers allow); a change within it waits for the next beat.
OWN_RESIGN_INTERVAL_S = 5.0
STALE_PENALTY = 1.0  # an older seq (honest floods can cross), or a member we do not know yet
MAX_PENDING = 64  # records of keys not (yet) members, kept to look at again
NETWORKS_TTL_S = 5.0  # this host's networks are read again at most this often
# Our own record is sent to each link again this often even if unchanged: a receiver may have
# refused it (a joiner's record arriving before its join is final there, a full budget).
OWN_REPEAT_S = 30.0
MISCLAIM_PENALTY = float(PENALTY_INVALID)

# The constellations (that we follow) a key may receive data of.
Groups = Callable[[MemberId], Collection[bytes]]
Penalize = Callable[[MemberId, float, str], None]
# Hands a member's usable record addresses to the dialer.
Feed = Callable[[MemberId, Sequence[Address]], None]


def own_addresses(
    listen_host: str, port: int, local_ips: Collection[str], reach: Mapping[Address, str],
    mapped: Address | None,
) -> list[RecordAddress]:
    """What our record announces: each interface address we listen on (all of one family for
    0.0.0.0, both for ::), non-loopback unless we have nothing else, never link-local;
    `direct` where dial-back found a public address reachable, `lan` otherwise; the mapping;
    and any other global address with our port that dial-back found reachable (the router's
    outside address, when the operator forwarded the port by hand)."""
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    if listen_host in ("0.0.0.0", "::"):
        for text in local_ips:
            ip = ipaddress.ip_address(text)
            if (ip.version == 4 or listen_host == "::") and not ip.is_link_local and not ip.is_unspecified \
                    and not ip.is_multicast:
                ips.append(ip)
    else:
        try:
            ips.append(ipaddress.ip_address(listen_host))
        except ValueError:
            return []  # a host name: the operator's, not ours to announce
    mine = {ip.compressed for ip in ips}
    forwarded = [a for a, r in reach.items() if r == "reachable" and a.port == port and a != mapped
                 and a.host not in mine and is_global(a.host)]
    routable = [ip for ip in ips if not ip.is_loopback]
    chosen = sorted(routable or ips, key=lambda ip: (ip.version, ip.packed))
    out = []
    for ip in chosen:
        a = Address(ip.compressed, port)
        kind = Kind.DIRECT if reach.get(a) == "reachable" and ip.is_global else Kind.LAN
        out.append(RecordAddress(kind, a.host, a.port))
    if mapped is not None:
        out.insert(0, RecordAddress(Kind.MAPPED, mapped.host, mapped.port))
    # Our router's outside address with our port, found reachable by dial-back: a port
    # forwarded by hand (or a NAT that keeps the port open), announced as direct.
    out += [RecordAddress(Kind.DIRECT, a.host, a.port) for a in forwarded]
    # Direct and mapped first: if a host has more than fits, those matter most.
    out.sort(key=lambda r: (r.kind is Kind.LAN, r))
    return out[:MAX_RECORD_ADDRESSES]


class AddressSpread:
    """Holds, spreads, stores and uses members' signed address records. One task drives it."""

    def __init__(
        self, identity: Identity, store: Store, links: Mapping[MemberId, PeerLink], *, send: Send,
        groups: Groups, feed: Feed, penalize: Penalize, listen: Callable[[], tuple[str, int]],
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], int] = now_ms,
        interfaces: Callable[[], Collection[str]] = local_addresses,
        networks: Callable[[], Sequence[Network]] = local_networks,
    ) -> None:
        self.identity = identity
        self.me = identity.member
        self.table = RecordTable(self.me)
        self._store = store
        self._links = links
        self._send = send
        self._groups = groups
        self._feed = feed
        self._penalize = penalize
        self._listen = listen
        self._clock = clock
        self._wall = wall
        self._interfaces = interfaces
        self._networks = networks
        self._nets: tuple[float, Sequence[Network]] = (-NETWORKS_TTL_S, ())
        self._told: dict[MemberId, dict[MemberId, int]] = {}  # link's remote -> member -> seq sent
        self._own_sent: dict[MemberId, float] = {}  # link's remote -> when our record was last sent
        # Records of keys we do not count members yet (a joiner racing its join; a member whose
        # join our ledger has not caught up with): member -> (sender, raw), looked at again on
        # each beat while the sender's link lasts; the oldest go beyond MAX_PENDING.
        self._pending: OrderedDict[MemberId, tuple[MemberId, bytes]] = OrderedDict()
        self._own: AddressRecord | None = None
        self._signed_at = -OWN_RESIGN_INTERVAL_S
        self._mapped: Address | None = None
        self._relays: tuple[MemberId, ...] = ()
        self.reach: dict[Address, str] = {}  # dial-back results (node/dialback.py)
        # The IPs members see our links come from (node/dialback.py sets it).
        self.observed: Callable[[], Collection[str]] = lambda: ()
        self._log = LogKinds(log).log

    def register(self, handlers: Handlers) -> None:
        handlers.add(m.AddressRecords, self._on_records)

    # -- what the lead's policy and the dialer set -------------------------------------------

    def set_mapped(self, address: Address | None) -> None:
        """The port mapping our router made (node/portmap.py), or None when it is gone; a
        change is re-signed at once, not after OWN_RESIGN_INTERVAL_S (mappings change rarely)."""
        if address != self._mapped:
            self._signed_at = -OWN_RESIGN_INTERVAL_S
        self._mapped = address

    def set_relays(self, relays: Sequence[MemberId]) -> None:
        """The members that relay for us now (at most 4 are announced)."""
        self._relays = tuple(r for r in dict.fromkeys(relays) if r != self.me)[:MAX_RECORD_RELAYS]

    def set_reach(self, reach: Mapping[Address, str]) -> None:
        """Dial-back's verdict per announced address (reachable / unreachable / unknown)."""
        self.reach = dict(reach)

    def has_record(self, member: MemberId) -> bool:
        return self.table.get(member) is not None

    def own(self) -> AddressRecord | None:
        return self._own

    def own_json(self) -> dict[str, object] | None:
        """Our current record as the local API may show it (for `status` / `netcheck`)."""
        r = self._own
        if r is None:
            return None
        return {"seq": r.seq, "addresses": [{"kind": a.kind.value, "address": str(Address(a.host, a.port))}
                                            for a in r.addresses],
                "relays": [str(k) for k in r.relays], "records_held": len(self.table)}

    def announced(self) -> list[Address]:
        """The addresses our record announces now."""
        return [] if self._own is None else [Address(a.host, a.port) for a in self._own.addresses]

    def to_check(self) -> list[Address]:
        """What dial-back checks: the outside IPs members observe our links come from, with our
        listen port (reachable there only through a forward made by hand, or a mapping), then
        the addresses we announce."""
        port = self._listen()[1]
        seen = [Address(ip, port) for ip in dict.fromkeys(self.observed()) if is_global(ip)]
        announced = self.announced()
        return [a for a in seen if a not in announced] + announced

    def local(self) -> Sequence[Network]:
        """This host's networks (node/interfaces.py), read at most every NETWORKS_TTL_S."""
        at, nets = self._nets
        if self._clock() - at >= NETWORKS_TTL_S:
            try:
                nets = tuple(self._networks())
            except OSError as e:
                log.warning("could not list this host's networks: %s", e)
            self._nets = (self._clock(), nets)
        return nets

    def usable(self, member: MemberId) -> list[Address]:
        """`member`'s record addresses worth dialling from this host (its LAN addresses only
        when on one of our networks)."""
        return self.table.usable(member, self.local())

    def misclaimed(self, member: MemberId, address: Address) -> None:
        """A dial of `address` from `member`'s record met another key: drop the address for
        that record and charge the member who announced it, not the key that answered — unless
        the record calls it a LAN address: another home may number its LAN the same way."""
        lan = self.table.kind_of(member, address) is Kind.LAN
        if not self.table.drop_address(member, address):
            return
        if lan:
            log.info("LAN address %s of %s is another node's here: dropped", address, member.short)
        else:
            self._log("misclaim", "address %s in the record of %s is another node's: dropped, %s penalised",
                      address, member.short, member.short)
            self._penalize(member, MISCLAIM_PENALTY, f"its address record named {address}, another node's address")
        self._feed(member, self.usable(member))

    # -- lifecycle ---------------------------------------------------------------------------

    async def load(self) -> int:
        """Restore the stored records (ours gives the seq to continue from); return how many."""
        n = 0
        for member, _seq, raw in await self._store.address_records():
            try:
                rec = decode_record(raw)
            except ValuemeshError as e:
                log.warning("a stored address record of %s is unreadable: %s", member.short, e.message)
                continue
            if rec.member != member:
                continue
            if member == self.me:
                self._own = rec
                self.table.put_own(rec)
            elif self.table.restore(rec):
                self._feed(member, self.usable(member))
                n += 1
        return n

    async def link_up(self, link: PeerLink) -> None:
        self._told.pop(link.remote, None)
        self._own_sent.pop(link.remote, None)
        await self.offer(link)

    def link_down(self, link: PeerLink) -> None:
        if self._links.get(link.remote) in (None, link):
            self._told.pop(link.remote, None)
            self._own_sent.pop(link.remote, None)

    async def beat(self) -> None:
        """The node's periodic beat: re-sign our record if it changed, offer what each link
        has not heard (a joiner whose join became final now may hear of the others)."""
        await self.refresh_own()
        for member, (sender, raw) in list(self._pending.items()):
            link = self._links.get(sender)
            if link is None:
                del self._pending[member]
            elif self.may_hear(sender, member):
                del self._pending[member]
                await self._on_records(link, m.AddressRecords([raw]))
        for link in list(self._links.values()):
            await self.offer(link)

    async def refresh_own(self) -> bool:
        """Re-sign, store and push our record if its content changed (at most once per
        OWN_RESIGN_INTERVAL_S); True if it did."""
        host, port = self._listen()
        try:
            addrs = tuple(sorted(set(own_addresses(host, port, self._interfaces(), self.reach, self._mapped))))
        except (ValueError, ValuemeshError) as e:
            log.warning("could not list this node's addresses: %s", e)
            return False
        if self._own is not None and self._own.same_content(addrs, self._relays):
            return False
        now = self._clock()
        if now - self._signed_at < OWN_RESIGN_INTERVAL_S:
            return False
        try:
            rec = AddressRecord.sign(self.identity, next_seq(self._own.seq if self._own else None, self._wall()),
                                     addrs, self._relays)
        except LocalError as e:
            log.warning("could not sign this node's address record: %s", e.message)
            return False
        self._own, self._signed_at = rec, now
        self.table.put_own(rec)
        await self._keep(rec)
        log.info("address record seq %d: %s", rec.seq, ", ".join(f"{a.kind} {Address(a.host, a.port)}"
                                                                 for a in rec.addresses) or "no addresses")
        for link in list(self._links.values()):
            await self.offer(link)
        return True

    # -- spreading ---------------------------------------------------------------------------

    def may_hear(self, to: MemberId, member: MemberId) -> bool:
        """Whether `to` may hear of `member`'s record: they share a constellation we follow."""
        theirs = set(self._groups(to))
        if not theirs:
            return False
        return member == self.me or not theirs.isdisjoint(self._groups(member))

    async def offer(self, link: PeerLink) -> None:
        """Send `link` every record it may hear of that we have not sent it at that seq."""
        told = self._told.setdefault(link.remote, {})
        now = self._clock()
        if now - self._own_sent.get(link.remote, -OWN_REPEAT_S) >= OWN_REPEAT_S:
            told.pop(self.me, None)
        out = [r for r in self.table.records()
               if r.member != link.remote and told.get(r.member) != r.seq and self.may_hear(link.remote, r.member)]
        for i in range(0, len(out), m.MAX_RECORDS_PER_MESSAGE):
            part = out[i:i + m.MAX_RECORDS_PER_MESSAGE]
            for r in part:
                told[r.member] = r.seq
                if r.member == self.me:
                    self._own_sent[link.remote] = now
            await self._send(link, m.AddressRecords([r.raw() for r in part]))

    async def _on_records(self, link: PeerLink, msg: m.AddressRecords) -> None:
        sender = link.remote
        now, wall = self._clock(), self._wall()
        take = self.table.sender_room(sender, len(msg.records), now)
        worst: tuple[float, str] = (0.0, "")
        if take < len(msg.records):
            worst = (OVER_BUDGET_PENALTY, f"It sent more address records than {sender.short}… may send per second.")
            self._log("sender budget", "dropped %d address records from %s: over its budget",
                      len(msg.records) - take, sender.short)
        told = self._told.setdefault(sender, {})
        accepted = []
        for raw in msg.records[:take]:
            v = self.table.screen(raw, sender, lambda mm: self.may_hear(sender, mm), now, wall)
            if v.outcome is Outcome.ACCEPTED and v.record is not None:
                accepted.append(v.record)
                told[v.record.member] = v.record.seq  # no echo to who told us
                continue
            if v.outcome is Outcome.DUPLICATE and v.record is not None:
                told[v.record.member] = v.record.seq  # it holds this one: no need to send it back
            if v.outcome in (Outcome.EARLY, Outcome.UNKNOWN):
                self._hold(sender, raw)
            if v.outcome is Outcome.OURS and not self._ours_came_back(raw):
                v = Verdict(Outcome.INVALID, "A record in our own name carries a signature that does not verify.")
            penalty = {Outcome.INVALID: float(PENALTY_INVALID), Outcome.OVER_BUDGET: OVER_BUDGET_PENALTY,
                       Outcome.STALE: STALE_PENALTY, Outcome.UNKNOWN: STALE_PENALTY}.get(v.outcome, 0.0)
            if v.reason:
                self._log(v.outcome, "refused an address record from %s: %s", sender.short, v.reason)
            if penalty > worst[0]:
                worst = (penalty, v.reason)
        if worst[0] > 0:
            link.penalize(worst[0], worst[1])
        for rec in accepted:
            self._feed(rec.member, self.usable(rec.member))
            await self._keep(rec)
        if accepted:
            for other in list(self._links.values()):
                if other.remote != sender:
                    await self.offer(other)

    def _hold(self, sender: MemberId, raw: bytes) -> None:
        try:
            member = decode_record(raw, verify=False).member
        except ValuemeshError:
            return
        self._pending.pop(member, None)
        self._pending[member] = (sender, raw)
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    def _ours_came_back(self, raw: bytes) -> bool:
        """A record in our name came back; False if we never signed it (a forgery).

        One of ours newer than the one we hold is one we signed before losing our store:
        continue above its seq, so our next record replaces it everywhere."""
        try:
            rec = decode_record(raw)
        except ValuemeshError:
            return False
        if self._own is None or rec.seq > self._own.seq:
            self._own = rec
            self.table.put_own(rec)
            self._signed_at = -OWN_RESIGN_INTERVAL_S
        return True

    async def _keep(self, rec: AddressRecord) -> None:
        try:
            async with self._store.batch() as tx:
                tx.put_address_record(rec.member, rec.seq, rec.raw(), self._wall())
        except ValuemeshError as e:
            log.warning("could not store the address record of %s: %s", rec.member.short, e.message)
