"""What `peers`, `status` and `valuemesh netcheck` show of the network (issue 17 item 6;
docs/cli.md, docs/operator.md): each link's path and round trip, and the netcheck report —
public reachability, the addresses announced, the NAT behaviour peers observed, the port
mapping, the relays in use and IPv6 — each part as JSON and as one plain sentence.

The functions are pure over what they are handed; `NetView` gathers it from the node's
collaborators and runs netcheck's fresh dial-back round, bounded in time and in how often it
asks the same members (they answer one request per DIALBACK_INTERVAL_S).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from valuemesh.node.addresses import Address, Network, ip_or_none, on_networks
from valuemesh.node.addrspread import AddressSpread
from valuemesh.node.clock import now_ms
from valuemesh.node.dialback import DIALBACK_INTERVAL_S, REACHABLE, UNREACHABLE, DialBack, Reachability, Seen, plain_ip
from valuemesh.node.interfaces import local_addresses
from valuemesh.node.link import PeerLink
from valuemesh.node.portmap import PortMapper, PortMapping
from valuemesh.node.transport import Transport
from valuemesh.protocol.addressrec import AddressRecord, Kind
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import MemberId

# A fresh round is asked for only when the last is older than this: each member asked answers
# one dial-back request per DIALBACK_INTERVAL_S (after a burst of two), and a refused request
# would read as "unknown" and could cost our record its public address.
FRESH_INTERVAL_S = DIALBACK_INTERVAL_S
DEFAULT_WAIT_S = 12.0  # how long netcheck waits for a fresh round (answers take up to 10 s)
MAX_WAIT_S = 20.0  # below the CLI client's 30 s timeout
SHOWN_IDS = 4  # member ids a sentence names before it says "and N more"

NAT_NONE, NAT_EIM, NAT_EDM, NAT_UNKNOWN = "none", "endpoint-independent", "endpoint-dependent", "unknown"


# -- paths ---------------------------------------------------------------------------------------


def link_json(link: PeerLink | None, path: str | None) -> dict[str, Any]:
    """The keys `peers` and `status` add per peer: `path` (node/reach.py `Reach.path`: lan,
    direct, mapped, punched, relayed), `relay` (the relay's member id for a relayed link) and
    `rtt_ms` (the last measured round trip); all None when not connected."""
    if link is None:
        return {"path": None, "relay": None, "rtt_ms": None}
    return {"path": path, "relay": str(link.via) if link.via is not None else None,
            "rtt_ms": round(link.rtt * 1000, 1) if link.rtt is not None else None}


# -- NAT behaviour -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NatView:
    kind: str
    text: str
    outside: tuple[str, ...] = ()  # the outside IPs members see us at
    observations: int = 0  # the views that counted (members outside our networks)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "outside": list(self.outside), "observations": self.observations,
                "text": self.text}


def nat_behaviour(seen: Mapping[MemberId, Seen], own_ips: Collection[str], local: Sequence[Network]) -> NatView:
    """What the addresses members saw us at say of our NAT. Only members outside our own
    networks count (a neighbour sees our LAN address whatever the router does). Seen at our own
    address: no NAT. Behind one, the ports tell how it maps: several connections from one local
    port seen at one outside port (or each connection's own port kept, as a port-preserving NAT
    does, which is what hole punching relies on) is endpoint-independent; each seen at another
    port, endpoint-dependent (symmetric). Fewer than two of our own connections seen: unknown."""
    own = {p for p in (plain_ip(ip) for ip in own_ips) if p is not None}
    views = [s for s in seen.values()
             if not (s.remote_ip is not None and on_networks(plain_ip(s.remote_ip) or s.remote_ip, local))]
    if not views:
        why = "only members on this node's own network have said" if seen else "no member has said yet"
        return NatView(NAT_UNKNOWN, f"NAT behaviour unknown: {why} where they see this node's connections come from.")
    outside = tuple(sorted({plain_ip(s.observed.host) or s.observed.host for s in views}))
    n = len(views)
    if own.intersection(outside):
        at = next(ip for ip in outside if ip in own)
        return NatView(NAT_NONE, f"No NAT: members outside this node's network see it at its own address {at}.",
                       outside, n)
    opened = [s for s in views if s.opened_from is not None]
    by_port: dict[tuple[str, int], list[Seen]] = {}
    for s in opened:
        if s.opened_from is not None:
            by_port.setdefault(s.opened_from, []).append(s)
    shared = [group for group in by_port.values() if len(group) >= 2]
    where = " and ".join(outside) if len(outside) <= SHOWN_IDS else f"{len(outside)} different addresses"
    behind = f"Behind NAT: members see this node at {where}, not at its own address"
    if len(outside) > 1:
        return NatView(NAT_EDM, f"{behind}; its connections leave through different outside addresses, "
                                "as an endpoint-dependent (symmetric) NAT does: hole punching will likely fail.",
                       outside, n)
    if shared:  # one local port towards several members: the exact test
        if all(len({s.observed for s in group}) == 1 for group in shared):
            return NatView(NAT_EIM, f"{behind}; connections from one port of this node reach several members "
                                    "from one outside port, as an endpoint-independent NAT does: hole punching "
                                    "can work.", outside, n)
        return NatView(NAT_EDM, f"{behind}; connections from one port of this node reach different members from "
                                "different outside ports, as an endpoint-dependent (symmetric) NAT does: hole "
                                "punching will likely fail.", outside, n)
    if len(opened) < 2:
        return NatView(NAT_UNKNOWN, f"{behind}; how it maps ports is unknown: members have seen {len(opened)} "
                                    "connection(s) this node opened, and it takes two.", outside, n)
    kept = sum(1 for s in opened if s.opened_from is not None and s.observed.port == s.opened_from[1])
    if kept == len(opened):
        return NatView(NAT_EIM, f"{behind}; the router kept this node's own port on each of the {kept} connections "
                                "members saw, as an endpoint-independent (port-preserving) NAT does: hole punching "
                                "can work.", outside, n)
    if kept == 0:
        return NatView(NAT_EDM, f"{behind}; the router gave each of the {len(opened)} connections members saw "
                                "another port than this node's own, as an endpoint-dependent (symmetric) NAT "
                                "does: hole punching will likely fail, so members reach this node through relays "
                                "unless its router maps its port.", outside, n)
    return NatView(NAT_UNKNOWN, f"{behind}; the router kept this node's port on {kept} of {len(opened)} "
                                "connections and changed it on the others, so how it maps ports is unclear.",
                   outside, n)


# -- the other parts of the report ---------------------------------------------------------------


def ids(members: Iterable[MemberId]) -> str:
    """Member ids as a sentence shows them: the first SHOWN_IDS shortened, then how many more."""
    keys = [f"{m.short}…" for m in members]
    if len(keys) > SHOWN_IDS:
        return ", ".join(keys[:SHOWN_IDS]) + f" and {len(keys) - SHOWN_IDS} more"
    return ", ".join(keys)


def address_lines(record: AddressRecord | None, results: Mapping[Address, str]) -> list[dict[str, Any]]:
    """The addresses our record announces (mapped, direct, then LAN ones), each with its kind,
    dial-back's result and a sentence."""
    if record is None:
        return []
    out = []
    for a in sorted(record.addresses, key=lambda r: (r.kind is Kind.LAN, r.kind is Kind.DIRECT, r.host, r.port)):
        addr = Address(a.host, a.port)
        result = results.get(addr, "unchecked")
        what = {Kind.DIRECT: "a public (direct) address", Kind.MAPPED: "a port-mapped address at its router",
                Kind.LAN: "a LAN address, for members on its own network"}[a.kind]
        said = {REACHABLE: "members dialled it back there", UNREACHABLE: "members could not dial it back there",
                "unknown": "no member could check it"}.get(result, "not checked yet")
        out.append({"address": str(addr), "kind": a.kind.value, "result": result,
                    "text": f"This node announces {addr} as {what}; {said}."})
    return out


def reach_view(state: Reachability, record: AddressRecord | None, nat: NatView, mapping: PortMapping | None,
               listen_port: int, now: int) -> dict[str, Any]:
    """Public reachability: reachable when dial-back reached a direct or mapped address;
    not reachable when it failed, or members see us behind NAT at an address we do not
    announce; reachable on the LAN only; unknown; not checked yet."""
    kinds = {Address(a.host, a.port): a.kind for a in record.addresses} if record is not None else {}
    age = None if state.checked_at is None else max(0, (now - state.checked_at) // 1000)
    when = "never checked" if age is None else f"checked {age} s ago by {len(state.helpers)} member(s)"
    reached = [a for a, r in sorted(state.results.items()) if r == REACHABLE]
    public = [a for a in reached if kinds.get(a) in (Kind.DIRECT, Kind.MAPPED)]
    failed = [a for a, r in sorted(state.results.items()) if r == UNREACHABLE]
    behind = nat.kind != NAT_NONE and bool(nat.outside)
    announced_outside = any(plain_ip(a.host) in nat.outside for a in kinds)
    forward = advice(mapping, listen_port)
    if public:
        state_, text = "reachable", (f"Reachable from the internet: members dialled this node back at "
                                     f"{', '.join(map(str, public))} ({when}).")
    elif behind and not announced_outside:
        state_, text = "unreachable", (f"Not reachable from the internet: members see this node at "
                                       f"{' and '.join(nat.outside)}, behind NAT, where it announces no address "
                                       f"({when}); members reach it through its relays or when it dials them."
                                       f"{forward}")
    elif failed:
        state_, text = "unreachable", (f"Not reachable from the internet: members could not dial this node back at "
                                       f"{', '.join(map(str, failed))} ({when}); members reach it through its "
                                       f"relays or when it dials them.{forward}")
    elif reached:
        state_, text = "lan", (f"Reachable on its own network only: members dialled it back at "
                               f"{', '.join(map(str, reached))}, which is not a public address ({when}).")
    elif age is None:
        state_, text = "unchecked", ("Reachability not checked yet: no linked member that shares a constellation "
                                     "with this node has been asked to dial it back.")
    else:
        state_, text = "unknown", f"Reachability unknown: no member could dial this node's addresses back ({when})."
    return {"state": state_, "checked_at": state.checked_at, "age_s": age,
            "asked": [str(h) for h in state.helpers], "text": text}


def advice(mapping: PortMapping | None, listen_port: int) -> str:
    """What makes a node behind NAT reachable, as this node announces addresses: a mapping its
    router grants (it goes into the signed record; a port forwarded by hand does not)."""
    if mapping is not None and mapping.obtained:
        return ""
    how = "turn on UPnP-IGD, NAT-PMP or PCP on the router" if mapping is not None else \
        "turn on port_mapping and UPnP-IGD, NAT-PMP or PCP on the router"
    return f" To be reachable, {how}, so that it maps TCP port {listen_port} (docs/operator.md)."


def mapping_view(mapping: PortMapping | None, enabled: bool) -> dict[str, Any]:
    if mapping is None:
        reason = ("port mapping is turned off (port_mapping = false)" if not enabled
                  else "the router has not been asked yet")
        mapping_json: dict[str, Any] = {"method": "", "external_ip": "", "external_port": 0, "lifetime_s": 0,
                                        "reason": reason}
        return {"obtained": False, **mapping_json, "text": f"No port mapping: {reason}."}
    doc = mapping.to_json()
    if not mapping.obtained:
        return {"obtained": False, **doc, "text": f"No port mapping: {mapping.reason}."}
    lease = (f"for {mapping.lifetime_s} s, renewed at half that" if mapping.lifetime_s
             else "as a permanent lease")
    method = {"pcp": "PCP", "natpmp": "NAT-PMP", "upnp": "UPnP-IGD"}.get(mapping.method, mapping.method)
    return {"obtained": True, **doc, "text": f"Port mapping: the router forwards {mapping.external} to this "
                                             f"node's port {mapping.internal_port} by {method}, {lease}."}


def relays_view(reserved_at: Sequence[MemberId], relaying_for: Sequence[MemberId], circuits: int, serves: bool,
                public: bool) -> dict[str, Any]:
    if reserved_at:
        held = (f"This node holds relay reservations at {ids(reserved_at)}: members who cannot dial it reach it "
                "through them.")
    elif public:
        held = "This node holds no relay reservation; it needs none while reachable from the internet."
    else:
        held = "This node holds no relay reservation yet; members that cannot dial it cannot reach it."
    if not serves:
        gives = "It relays for no one (serve_relay = false)."
    elif relaying_for:
        gives = f"It relays for {len(relaying_for)} member(s) ({ids(relaying_for)}), {circuits} circuit(s) open now."
    else:
        gives = "It relays for no member now."
    return {"reserved_at": [str(m) for m in reserved_at], "relaying_for": [str(m) for m in relaying_for],
            "circuits": circuits, "serves": serves, "text": f"{held} {gives}"}


def ipv6_view(local_ips: Collection[str], listen_host: str, record: AddressRecord | None) -> dict[str, Any]:
    mine = sorted(ip for ip in local_ips if (p := ip_or_none(ip)) is not None and p.version == 6 and p.is_global)
    announced = [str(Address(a.host, a.port)) for a in (record.addresses if record is not None else ())
                 if ":" in a.host]
    if announced:
        text = f"IPv6: this node announces {', '.join(announced)}."
    elif mine:
        text = (f"IPv6: this host has the global address {', '.join(mine)}, but the node listens on "
                f"{listen_host} and announces no IPv6 address.")
    else:
        text = "IPv6: this host has no global IPv6 address; the node is reached over IPv4."
    return {"host_addresses": mine, "announced": announced, "text": text}


def links_view(paths: Mapping[MemberId, tuple[str, MemberId | None]]) -> dict[str, Any]:
    counts = {p: sum(1 for path, _ in paths.values() if path == p) for p in ("lan", "direct", "mapped", "punched",
                                                                          "relayed")}
    if not paths:
        return {"counts": counts, "text": "Links: none; this node is connected to no member."}
    parts = [f"{n} {p}" for p, n in counts.items() if n]
    relays = sorted({via for path, via in paths.values() if path == "relayed" and via is not None},
                    key=lambda m: m.key)
    tail = f" (relayed via {ids(relays)})" if relays else ""
    return {"counts": counts, "text": f"Links: {len(paths)} member(s) — {', '.join(parts)}{tail}."}


def parse_params(query: Mapping[str, str]) -> tuple[bool, float]:
    """netcheck's query parameters: `fresh` (true/false, default true) and `wait_s` (0 to
    MAX_WAIT_S); anything else is refused with one sentence."""
    if len(query) != len(set(query)):  # a multidict counts each value of a repeated name
        raise LocalError("Give each netcheck parameter at most once.")
    unknown = sorted(set(query) - {"fresh", "wait_s"})
    if unknown:
        raise LocalError(f"netcheck takes only the parameters fresh and wait_s, not {unknown[0][:40]!r}.")
    raw = query.get("fresh", "true").lower()
    if raw not in ("true", "false", "1", "0"):
        raise LocalError("The parameter fresh must be true or false.")
    try:
        wait = float(query.get("wait_s", str(DEFAULT_WAIT_S)))
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT_S:  # (NaN fails this too)
        raise LocalError(f"The parameter wait_s must be a number of seconds from 0 to {MAX_WAIT_S:.0f}.")
    return raw in ("true", "1"), wait


# -- the node's side ------------------------------------------------------------------------------


class NetView:
    """What the daemon's `peer_list`, `status` and `netcheck` ask of the network, gathered from
    the collaborators it is handed (the daemon stays a few lines)."""

    def __init__(
        self, *, transport: Transport, addrs: AddressSpread, dialback: DialBack,
        ask: Callable[[], Coroutine[Any, Any, None]], spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        mapper: Callable[[], PortMapper | None], listen: Callable[[], tuple[str, int]],
        port_mapping: bool, serve_relay: bool,
        path: Callable[[PeerLink], str],
        interface_ips: Callable[[], Collection[str]] = local_addresses,
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], int] = now_ms,
    ) -> None:
        self._transport = transport
        self._addrs = addrs
        self._dialback = dialback
        self._ask = ask
        self._spawn = spawn
        self._mapper = mapper
        self._listen = listen
        self._port_mapping = port_mapping
        self._serve_relay = serve_relay
        self._path = path
        self._interface_ips = interface_ips
        self._clock = clock
        self._wall = wall
        self._round: asyncio.Task[None] | None = None

    def _mapping(self) -> PortMapping | None:
        mapper = self._mapper()
        return mapper.current if mapper is not None else None

    def link_json(self, link: PeerLink | None) -> dict[str, Any]:
        return link_json(link, self._path(link) if link is not None else None)

    async def _refresh(self, fresh: bool, wait_s: float) -> tuple[bool, str]:
        """(whether a round finished during this call, why not in one sentence)."""
        db = self._dialback
        if not fresh:
            return False, "Shown as last checked (fresh=false)."
        if self._round is not None and not self._round.done():
            pass  # one netcheck started a round already: wait for that one, ask nobody again
        elif db.asking:
            # The node's own periodic round is under way: wait for it the same way (bounded).
            deadline = self._clock() + wait_s
            while db.asking and self._clock() < deadline:
                await asyncio.sleep(0.1)
            return (not db.asking), ("" if not db.asking else
                                     f"A check under way had not finished within {wait_s:.0f} s; the last result "
                                     "is shown.")
        else:
            checked = db.state.checked_at
            age = None if checked is None else (self._wall() - checked) / 1000
            if age is not None and age < FRESH_INTERVAL_S:
                return False, (f"The last check is {age:.0f} s old; members answer one check per "
                               f"{FRESH_INTERVAL_S:.0f} s, so it is shown as it is.")
            if not db.can_ask:
                return False, "No linked member shares a constellation with this node, so nobody can check it now."
            self._round = self._spawn(self._ask())
        assert self._round is not None
        done, _ = await asyncio.wait({self._round}, timeout=wait_s)
        if not done:
            return False, (f"The members asked had not all answered within {wait_s:.0f} s; the check goes on in "
                           "the background and the last result is shown.")
        return True, ""

    async def netcheck(self, fresh: bool = True, wait_s: float = DEFAULT_WAIT_S) -> dict[str, Any]:
        ran, note = await self._refresh(fresh, wait_s)
        state = self._dialback.state
        record = self._addrs.own()
        host, port = self._listen()
        local = self._addrs.local()
        ips = self._interface_ips()
        nat = nat_behaviour(state.seen, ips, local)
        mapping = self._mapping()
        reach = reach_view(state, record, nat, mapping, port, self._wall())
        t = self._transport
        relays = relays_view(t.reservations, t.relaying.relayed_for, t.relaying.circuits, self._serve_relay,
                             reach["state"] == "reachable")
        pm = mapping_view(mapping, self._port_mapping)
        v6 = ipv6_view(ips, host, record)
        addresses = address_lines(record, state.results)
        paths = {k: (self._path(lk), lk.via)
                 for k, lk in t.links.items() if not lk.closed}
        links = links_view(paths)
        if not addresses:
            addr_lines = ["This node announces no address yet."]
        else:
            addr_lines = [a["text"] for a in addresses]
        lines = [reach["text"], *addr_lines, nat.text, pm["text"], relays["text"], v6["text"], links["text"]]
        if note:
            lines.insert(0, note)
        return {"checked": "fresh" if ran else "last", "note": note, "reachability": reach, "addresses": addresses,
                "nat": nat.to_json(), "port_mapping": pm, "relays": relays, "ipv6": v6, "links": links,
                "lines": lines}
