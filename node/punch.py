"""Hole punching, the I/O half: the CONNECT/SYNC exchange of protocol/punch.py over an
existing link, then a synchronised TCP dial from the listen port to every candidate at once.

`Puncher.upgrade(channel, peer)` starts an upgrade (up to MAX_TRIES tries, then the pair backs
off) and `Puncher.answer(channel, peer, connect)` answers one; both return `Punched` (a
connected stream and the wire-handshake role this end takes on it) or `PunchFailed` (why, in
one sentence). The caller runs the handshake over the stream (the lead wires it to a PeerLink
with path "punched") and stays on the relay when the punch fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from valuemesh.protocol import punch
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.punch import Candidate, PunchError

if TYPE_CHECKING:
    from valuemesh.node.link import PeerLink
    from valuemesh.node.transport import Transport

log = logging.getLogger("valuemesh.punch")

# After a refused SYN (the far NAT answered with RST), dial the same candidate again this soon.
REDIAL_INTERVAL = 0.05
# The handshake responder waits this long past the dial window for the first handshake bytes.
FIRST_BYTES_GRACE = punch.REPLY_TIMEOUT
STREAM_LIMIT = 2**20


class PunchChannel(Protocol):
    """Punch messages to and from one peer over a link that already exists (usually relayed):
    `recv` returns the next punch message from that peer or raises TimeoutError; both raise
    ConnectionError once the link is gone."""

    async def send(self, payload: bytes) -> None: ...

    async def recv(self, timeout: float) -> bytes: ...


@dataclass(frozen=True)
class Punched:
    """A TCP stream to the peer, opened by simultaneous dials; `initiator`: this end speaks
    first in the wire handshake (the lower member id)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    initiator: bool
    remote: Candidate
    rtt: float
    # What `adopt` returned (the PeerLink, with `into_transport`); None without adopt.
    adopted: object = None


@dataclass(frozen=True)
class PunchFailed:
    """The punch did not connect; `reason` is one sentence. The link stays on the relay.
    `link_lost`: the link it was coordinated over closed meanwhile (the relay went away):
    not the pair's failure, so it does not count towards the back-off."""

    reason: str
    link_lost: bool = False


class PunchDialError(Exception):
    """Raised when no candidate connected within the dial window."""


def enable_reuse(sock: socket.socket) -> None:
    """Let the punch sockets share the listen port with the node's listening socket (which
    must set SO_REUSEPORT too; Linux allows it only between sockets of one user)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def check_port_free(host: str | None, port: int) -> None:
    """Raise OSError if another socket already listens on host:port. The node's listening
    socket sets SO_REUSEPORT (so punch sockets can dial from its port), which would otherwise
    let a second daemon of the same user share the port silently instead of failing."""
    if port == 0:
        return
    for family, type_, proto, _, addr in socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        probe = socket.socket(family, type_, proto)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(addr)
        finally:
            probe.close()


def _bind_host(local_host: str, family: int) -> str:
    """The local address to bind for a target of `family`: the listen host if it is of that
    family, else that family's wildcard (a node listening on 0.0.0.0 punches IPv6 from ::)."""
    try:
        if ipaddress.ip_address(local_host).version == (6 if family == socket.AF_INET6 else 4):
            return local_host
    except ValueError:
        pass
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


async def _connect_from(local: tuple[str, int], target: Candidate, deadline: float) -> socket.socket:
    """Dial `target` from the local port until it connects or `deadline` (loop time) passes;
    a refused SYN is retried (the peer's own SYN may not have opened its NAT yet)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if target.family == 6 else socket.AF_INET
    last = "it did not answer"
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise PunchDialError(f"{target.host}:{target.port}: {last}")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            enable_reuse(sock)
            sock.setblocking(False)
            sock.bind((_bind_host(local[0], family), local[1]))
            async with asyncio.timeout(left):
                await loop.sock_connect(sock, (target.host, target.port))
            return sock
        except TimeoutError:
            sock.close()
            raise PunchDialError(f"{target.host}:{target.port}: {last}") from None
        except (ConnectionRefusedError, ConnectionResetError) as e:
            sock.close()
            last = f"refused ({e.strerror or e})"
        except OSError as e:
            # Unreachable network, address in use by another connection: no retry helps.
            sock.close()
            raise PunchDialError(f"{target.host}:{target.port}: {e.strerror or e}") from None
        except BaseException:
            sock.close()
            raise
        await asyncio.sleep(min(REDIAL_INTERVAL, max(0.0, deadline - loop.time())))


async def _first_bytes(sock: socket.socket, deadline: float) -> None:
    """Wait until the peer has sent something on `sock` (left unread for the stream)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        async with asyncio.timeout(max(0.0, deadline - loop.time())):
            await ready
    finally:
        loop.remove_reader(sock.fileno())
    if not sock.recv(1, socket.MSG_PEEK):
        raise ConnectionResetError("the peer closed this connection")


async def dial_together(
    local: tuple[str, int],
    targets: tuple[Candidate, ...],
    *,
    window: float = punch.DIAL_WINDOW,
    wait_for_bytes: bool = False,
) -> tuple[socket.socket, Candidate]:
    """Dial every target at once from `local` (the listen port); return the winner.

    The handshake initiator keeps the first connection; the responder keeps the first on
    which the initiator has spoken (with `wait_for_bytes`), so both ends keep the same one
    when several candidates connect. The rest are closed. Raises PunchDialError naming why
    each candidate failed, within `window` (+ FIRST_BYTES_GRACE when waiting for bytes).
    """
    if not targets:
        raise PunchDialError("the peer offered no address")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window

    async def one(target: Candidate) -> tuple[socket.socket, Candidate]:
        sock = await _connect_from(local, target, deadline)
        try:
            if wait_for_bytes:
                await _first_bytes(sock, deadline + FIRST_BYTES_GRACE)
        except BaseException:
            sock.close()
            raise
        return sock, target

    tasks = [asyncio.ensure_future(one(t)) for t in targets]
    errors: list[str] = []
    winner: tuple[socket.socket, Candidate] | None = None
    try:
        for done in asyncio.as_completed(tasks):
            try:
                winner = await done
                break
            except PunchDialError as e:
                errors.append(str(e))
            except (TimeoutError, OSError) as e:
                errors.append(f"connected but no handshake came ({e or 'timed out'})")
    finally:
        for t in tasks:
            t.cancel()
        for r in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(r, tuple) and (winner is None or r[0] is not winner[0]):
                r[0].close()
    if winner is None:
        raise PunchDialError("; ".join(errors))
    return winner


Clock = Callable[[], float]
Adopt = Callable[[Punched], Awaitable[object]]


class Puncher:
    """Hole punching for one node: its identity, listen address and candidate addresses, the
    pair back-off and the responder budget. One upgrade per peer at a time is the caller's rule."""

    def __init__(
        self,
        me: MemberId,
        local: tuple[str, int],
        addrs: Callable[[], tuple[Candidate, ...]],
        *,
        clock: Clock = time.monotonic,
        random_bytes: Callable[[int], bytes] = os.urandom,
        tries: int = punch.MAX_TRIES,
        dial_window: float = punch.DIAL_WINDOW,
    ) -> None:
        if not 0 < local[1] < 65536:
            raise LocalError("Hole punching needs the node's listen port.")
        self.me = me
        self.local = local
        self.addrs = addrs
        self.clock = clock
        self.random = random_bytes
        self.tries = tries
        self.dial_window = dial_window
        self.backoff = punch.PairBackoff()
        self.budget = punch.ResponderBudget()

    def _jitter(self) -> float:
        return int.from_bytes(self.random(4), "big") / 2**32

    async def upgrade(self, channel: PunchChannel, peer: MemberId, adopt: Adopt | None = None) -> Punched | PunchFailed:
        """Try to open a direct stream to `peer`, coordinating over `channel`: up to `tries`
        tries, then back off from this peer. With `adopt` (the wire handshake over the stream),
        a try whose handshake fails counts as failed."""
        wait = self.backoff.wait(peer, self.clock())
        if wait:
            return PunchFailed(f"Hole punching to {peer.short}… is backed off for {wait:.0f} more s.")
        reasons: list[str] = []
        for _ in range(self.tries):
            got = await self._try(channel, peer)
            if isinstance(got, Punched) and adopt is not None:
                got = await _adopted(got, adopt)
            if isinstance(got, Punched):
                self.backoff.succeeded(peer)
                return got
            if got.link_lost:  # nothing learnt of the pair: the next relayed link tries afresh
                return got
            reasons.append(got.reason)
        waits = self.backoff.failed(peer, self.clock(), self._jitter())
        log.info("punch to %s failed %d times, staying on the relay for %.0f s: %s",
                 peer.short, self.tries, waits, reasons[-1])
        tries = "1 try" if self.tries == 1 else f"{self.tries} tries"
        return PunchFailed(f"{reasons[-1].rstrip('.')}; gave up after {tries}, next in {waits:.0f} s.")

    async def _try(self, channel: PunchChannel, peer: MemberId) -> Punched | PunchFailed:
        try:
            attempt = punch.Initiator(self.random(punch.ATTEMPT_ID_LEN), self.addrs())
            await channel.send(attempt.connect(self.clock()))
            reply = await channel.recv(punch.REPLY_TIMEOUT)
            msg = punch.decode(reply)
            if isinstance(msg, punch.Connect) and msg.id != attempt.id:
                # Both ends started at once: the higher id answers the lower one's attempt.
                if not punch.handshake_initiator(self.me, peer):
                    return await self._answer(channel, peer, msg)
                reply = await channel.recv(punch.REPLY_TIMEOUT)
            plan = attempt.on_reply(reply, self.clock())
            await channel.send(plan.sync)
            await asyncio.sleep(plan.wait)
            return await self._dial(peer, plan.dial, plan.rtt)
        except TimeoutError:
            return PunchFailed(f"{peer.short}… did not answer the hole-punch request in time.")
        except ConnectionError:
            return PunchFailed(f"The link to {peer.short}… closed during the hole-punch exchange.", link_lost=True)
        except (PunchError, LocalError) as e:
            return PunchFailed(str(e))

    async def answer(
        self, channel: PunchChannel, peer: MemberId, connect: bytes, adopt: Adopt | None = None
    ) -> Punched | PunchFailed:
        """Answer the peer's CONNECT (already received on `channel`): send ours, wait for SYNC,
        dial, then run `adopt` (the wire handshake) if given. Refused past the responder budget."""
        try:
            msg = punch.decode(connect)
        except PunchError as e:
            return PunchFailed(str(e))
        if not isinstance(msg, punch.Connect):
            return PunchFailed("The peer sent punch-sync for an attempt this node is not answering.")
        if not self.budget.allow(peer, self.clock()):
            log.info("refused a hole-punch request from %s: too many recently", peer.short)
            return PunchFailed(f"{peer.short}… asked to punch a hole too often; request refused.")
        got = await self._answer(channel, peer, msg)
        return await _adopted(got, adopt) if isinstance(got, Punched) and adopt is not None else got

    async def _answer(self, channel: PunchChannel, peer: MemberId, msg: punch.Connect) -> Punched | PunchFailed:
        try:
            resp = punch.Responder(self.addrs())
            await channel.send(resp.on_connect(msg, self.clock()))
            targets = resp.on_sync(await channel.recv(punch.SYNC_TIMEOUT), self.clock())
            return await self._dial(peer, targets, 0.0)
        except TimeoutError:
            return PunchFailed(f"{peer.short}… did not send punch-sync in time.")
        except ConnectionError:
            return PunchFailed(f"The link to {peer.short}… closed during the hole-punch exchange.", link_lost=True)
        except (PunchError, LocalError) as e:
            return PunchFailed(str(e))

    async def _dial(self, peer: MemberId, targets: tuple[Candidate, ...], rtt: float) -> Punched | PunchFailed:
        initiator = punch.handshake_initiator(self.me, peer)
        try:
            sock, remote = await dial_together(
                self.local, targets, window=self.dial_window, wait_for_bytes=not initiator
            )
        except PunchDialError as e:
            return PunchFailed(f"No direct connection to {peer.short}… opened: {e}.")
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=STREAM_LIMIT)
        except OSError as e:
            sock.close()
            return PunchFailed(f"The direct connection to {peer.short}… broke at once ({e}).")
        log.info("punched a direct connection to %s at %s:%d", peer.short, remote.host, remote.port)
        return Punched(reader, writer, initiator, remote, rtt)


def into_transport(transport: Transport, peer: MemberId) -> Callable[[Punched], Awaitable[PeerLink]]:
    """The `adopt` that makes a punched stream a live PeerLink to `peer` with path "punched":
    the wire handshake over it in this end's role, expecting `peer`'s key."""

    async def adopt(got: Punched) -> PeerLink:
        return await transport.adopt_stream(
            got.reader, got.writer, initiator=got.initiator, expect=peer, path="punched"
        )

    return adopt


async def _adopted(got: Punched, adopt: Adopt) -> Punched | PunchFailed:
    """Run the caller's handshake over the punched stream; close it if that fails."""
    try:
        adopted = await adopt(got)
    except Exception as e:
        got.writer.close()
        with contextlib.suppress(Exception):
            await got.writer.wait_closed()
        return PunchFailed(f"The punched connection's handshake failed: {e}")
    return replace(got, adopted=adopted)
