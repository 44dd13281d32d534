"""One established, encrypted peer link (`PeerLink`): framing, the bounded send queue,
keep-alive pings, the inbound rate limit and the penalties for a misbehaving peer.

A `Transport` (node/transport.py) makes links, admits them and owns their tasks and scores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from valuemesh.node import trace
from valuemesh.node.carrier import Carrier, CarrierViolation
from valuemesh.node.link_limits import LinkClosedError
from valuemesh.node.ratelimit import TokenBucket
from valuemesh.protocol import circuit as cm
from valuemesh.protocol import wire
from valuemesh.protocol.circuit import CircuitError
from valuemesh.protocol.errors import LocalError, RemoteError, ValuemeshError
from valuemesh.protocol.identity import MemberId

if TYPE_CHECKING:
    from valuemesh.node.transport import Transport

# The transport's logger: link events and transport events read as one story.
log = logging.getLogger("valuemesh.transport")

# Control frames (pong, close) may exceed the data queue's bound, but only by this much.
MAX_CONTROL_BACKLOG = 16
MAX_PING_BODY = 32
# How a link reaches its peer (shown by `status`); whoever creates the link says which.
PATHS = frozenset({"direct", "lan", "mapped", "punched", "relayed"})

# Aborts the raw connection under a carrier that will not close politely.
Abort = Callable[[], None]


def _clean_reason(raw: bytes) -> str:
    text = raw[: wire.MAX_CLOSE_REASON].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text) or "no reason given"


class PeerLink:
    """One established, authenticated link to `remote`; frames are encrypted both ways.

    `send` queues a payload (bounded by frames and bytes; it waits up to
    `send_timeout` for room, then the link is closed as stalled). Incoming frames
    are decrypted, rate limited and handed to the handler in order, one at a time,
    so a slow handler slows the peer down rather than growing a queue.
    """

    def __init__(
        self,
        transport: Transport,
        carrier: Carrier,
        channel: wire.SecureChannel,
        addr: tuple[str, int],
        inbound: bool,
        *,
        path: str = "direct",
        via: MemberId | None = None,
    ) -> None:
        if path not in PATHS:
            raise LocalError(f"Unknown link path {path!r}.")
        self._t = transport
        self._carrier = carrier
        self._chan = channel
        self.remote: MemberId = channel.remote
        self.session_id: bytes = channel.session_id
        self.addr = addr
        self.inbound = inbound
        self.path = path
        # The relay member a relayed link runs through (None for every other path).
        self.via = via
        # The last measured round trip of an encrypted PING, in seconds (None before one).
        self.rtt: float | None = None
        self._ping_sent: tuple[bytes, float] | None = None
        lim = transport.limits
        self._lim = lim
        now = transport.clock()
        self._msg_bucket = TokenBucket(lim.rate_messages, lim.burst_messages, now)
        self._byte_bucket = TokenBucket(lim.rate_bytes, lim.burst_bytes, now)
        self._throttled_since: float | None = None
        self._queue: deque[tuple[int, bytes]] = deque()
        self._queued_at: deque[float] = deque()  # enqueue times of data frames, while tracing
        self.read_at = 0.0  # when the frame being handled was read, while tracing
        self._queued_bytes = 0
        self._data_frames = 0
        self._circuit_frames = 0
        # Bytes of relay sub-protocol frames queued (bounded by circuit credit, not by room).
        self.circuit_bytes = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._pongs: dict[bytes, asyncio.Future[None]] = {}
        self._reason: str | None = None
        self._done = asyncio.Event()
        self._notified = asyncio.Event()
        self._admitted = False
        # The reader waits here until admission decided, so on_connect precedes on_message.
        self._gate = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.throttled = 0
        carrier.set_control(self._control)

    def __repr__(self) -> str:
        way = "in" if self.inbound else "out"
        if self.via is not None:
            return f"PeerLink({self.remote.short}… {way} via {self.via.short}…)"
        return f"PeerLink({self.remote.short}… {way} {self.addr[0]}:{self.addr[1]})"

    @property
    def ip(self) -> str | None:
        """The IP address the peer's bytes come from, if they come straight from it:
        a relayed link has none of its own (the relay's address is not the peer's)."""
        return None if self.via is not None else self.addr[0]

    @property
    def opened_from(self) -> tuple[str, int] | None:
        """Our (IP, port) of a connection this end opened (dialled, or punched from the listen
        port); None for one the peer opened or a relayed link. Only on such a connection does
        the address the peer sees show what our NAT did to it (node/netview.py)."""
        if self.via is not None or (self.inbound and self.path != "punched"):
            return None
        return self._carrier.local_addr()

    @property
    def closed(self) -> bool:
        return self._reason is not None

    @property
    def close_reason(self) -> str | None:
        return self._reason

    @property
    def score(self) -> float:
        return self._t.reputation.score(self.remote, self._t.clock())

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    # -- sending -------------------------------------------------------------

    def _has_room(self, n: int) -> bool:
        if self._data_frames >= self._lim.send_queue_frames:
            return False
        return self._data_frames == 0 or self._queued_bytes + n <= self._lim.send_queue_bytes

    async def send(self, payload: bytes) -> None:
        """Queue one payload; wait (bounded) for room; raise LinkClosedError if closed."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise LocalError("A payload must be bytes.")
        data = bytes(payload)
        if len(data) > self._lim.max_payload:
            raise LocalError(
                f"A payload of {len(data)} bytes exceeds the limit of {self._lim.max_payload}."
            )
        if not self._has_room(len(data)) and not self.closed:
            try:
                async with asyncio.timeout(self._lim.send_timeout):
                    while not self._has_room(len(data)) and not self.closed:
                        self._room.clear()
                        await self._room.wait()
            except TimeoutError:
                self.close(f"the peer did not keep up: send queue full for {self._lim.send_timeout} s")
        if self._reason is not None:
            raise LinkClosedError(f"The link to {self.remote.short}… is closed: {self._reason}.")
        self._enqueue(data)

    def try_send(self, payload: bytes) -> bool:
        """Queue one payload only if there is room now; False if full or closed.

        For callers that must not wait, e.g. a handler replying from on_message,
        where awaiting room could stall two peers that both wait on each other.
        """
        data = bytes(payload)
        if len(data) > self._lim.max_payload:
            raise LocalError(
                f"A payload of {len(data)} bytes exceeds the limit of {self._lim.max_payload}."
            )
        if self.closed or not self._has_room(len(data)):
            return False
        self._enqueue(data)
        return True

    def _enqueue(self, data: bytes) -> None:
        if trace.tracer is not None:
            self._queued_at.append(time.monotonic())
        self._queue.append((wire.FRAME_DATA, data))
        self._queued_bytes += len(data)
        self._data_frames += 1
        self._wake.set()

    def _send_circuit(self, body: bytes) -> bool:
        """Queue one relay sub-protocol message; False if the link is closed.

        Not bounded by the data queue's room: circuit DATA is bounded by credit per circuit
        and circuits per member (node/relay.py), so a full queue never stalls a relay."""
        if self.closed:
            return False
        self._queue.append((wire.FRAME_CIRCUIT, body))
        self._circuit_frames += 1
        self.circuit_bytes += len(body)
        self._wake.set()
        return True

    def _drop_circuit_data(self, cid: int) -> None:
        """Forget the unwritten DATA of one circuit (it ended; the relay would drop it)."""
        head = bytes((cm.Op.DATA,)) + cid.to_bytes(4, "big")
        kept: deque[tuple[int, bytes]] = deque()
        for kind, body in self._queue:
            if kind == wire.FRAME_CIRCUIT and body.startswith(head):
                self._circuit_frames -= 1
                self.circuit_bytes -= len(body)
            else:
                kept.append((kind, body))
        self._queue = kept

    def _take_queued(self) -> list[bytes]:
        """Remove and return the payloads not yet written (for a link that replaces this one)."""
        payloads = [body for kind, body in self._queue if kind == wire.FRAME_DATA]
        self._queue = deque(item for item in self._queue if item[0] != wire.FRAME_DATA)
        self._queued_at.clear()
        self._queued_bytes = 0
        self._data_frames = 0
        self._room.set()
        return payloads

    def _send_control(self, kind: int, body: bytes) -> bool:
        if len(self._queue) - self._data_frames - self._circuit_frames >= MAX_CONTROL_BACKLOG:
            return False
        self._queue.append((kind, body))
        self._wake.set()
        return True

    async def ping(self, timeout: float) -> float:
        """Round-trip time of an encrypted ping; raise LinkClosedError or TimeoutError."""
        if self.closed:
            raise LinkClosedError(f"The link to {self.remote.short}… is closed: {self._reason}.")
        token = os.urandom(8)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs[token] = fut
        start = time.monotonic()
        try:
            if not self._send_control(wire.FRAME_PING, token):
                raise TimeoutError
            async with asyncio.timeout(timeout):
                await fut
        finally:
            self._pongs.pop(token, None)
        self.rtt = time.monotonic() - start
        return self.rtt

    def _keepalive(self) -> None:
        token = os.urandom(8)
        if self._send_control(wire.FRAME_PING, token):
            self._ping_sent = (token, time.monotonic())

    async def _writer(self) -> None:
        try:
            while True:
                if not self._queue:
                    self._wake.clear()
                    try:
                        async with asyncio.timeout(self._lim.ping_interval):
                            await self._wake.wait()
                    except TimeoutError:
                        # Keep-alive: the peer's idle timer needs something from us.
                        self._keepalive()
                    continue
                kind, body = self._queue.popleft()
                if kind == wire.FRAME_DATA:
                    self._queued_bytes -= len(body)
                    self._data_frames -= 1
                    self._room.set()
                elif kind == wire.FRAME_CIRCUIT:
                    self._circuit_frames -= 1
                    self.circuit_bytes -= len(body)
                frame = self._chan.seal(kind, body)
                await self._carrier.send(frame)
                if kind == wire.FRAME_DATA and trace.tracer is not None and self._queued_at:
                    trace.tracer.event("wrote", q=self._queued_at.popleft(), n=len(frame))
                self.frames_out += 1
                self.bytes_out += len(frame)
                if kind == wire.FRAME_CLOSE:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self.closed:
                self.close(f"connection lost while sending ({type(e).__name__})")

    # -- receiving -----------------------------------------------------------

    async def _run(self) -> None:
        """Read frames until the link closes; then finish closing it."""
        self._writer_task = asyncio.create_task(self._writer(), name=f"vm-writer-{self.remote.short}")
        try:
            await self._gate.wait()
            while not self.closed:
                try:
                    data = await self._carrier.receive(self._lim.idle_timeout)
                except TimeoutError:
                    self.close(f"idle: nothing received for {self._lim.idle_timeout} s")
                    break
                except CarrierViolation as e:
                    self._violation(e.message)
                    continue
                except (ConnectionError, OSError):
                    data = None
                if self.closed:
                    break
                if data is None:
                    self.close(self._carrier.reason or "the connection was closed by the peer", notify=False)
                    break
                if trace.tracer is not None:
                    self.read_at = time.monotonic()
                await self._on_frame(data)
        except asyncio.CancelledError:
            self.close("the link task was cancelled", notify=False)
            raise
        except Exception as e:
            log.exception("link %r failed", self)
            self.close(f"internal error ({type(e).__name__})", notify=False)
        finally:
            if self._reason is None:
                self.close("the reader stopped", notify=False)
            await self._done.wait()

    async def _on_frame(self, data: bytes) -> None:
        try:
            frame = self._chan.open(data)
        except wire.FrameError as e:
            self._violation(e.message)
            return
        self.frames_in += 1
        self.bytes_in += len(data)
        await self._throttle(len(data))
        if self.closed:
            return
        if frame.kind == wire.FRAME_DATA:
            if len(frame.body) > self._lim.max_payload:
                self._violation(f"the peer sent a payload larger than {self._lim.max_payload} bytes")
                return
            try:
                await self._t.handler.on_message(self, frame.body)
            except RemoteError as e:
                self.penalize(self._lim.invalid_message_penalty, e.message)
            except ValuemeshError as e:
                log.warning("handler refused a message from %r: %s", self, e)
            except Exception:
                log.exception("handler failed on a message from %r", self)
        elif frame.kind == wire.FRAME_PING:
            if len(frame.body) > MAX_PING_BODY:
                self._violation("the peer sent an oversized ping")
            else:
                self._send_control(wire.FRAME_PONG, frame.body)
        elif frame.kind == wire.FRAME_PONG:
            fut = self._pongs.get(frame.body)
            if fut is not None and not fut.done():
                fut.set_result(None)
            elif self._ping_sent is not None and self._ping_sent[0] == frame.body:
                self.rtt = time.monotonic() - self._ping_sent[1]
                self._ping_sent = None
        elif frame.kind == wire.FRAME_CLOSE:
            self.close(f"closed by the peer: {_clean_reason(frame.body)}", notify=False)
        elif frame.kind == wire.FRAME_CIRCUIT:
            try:
                await self._t.relaying.on_frame(self, frame.body)
            except CircuitError as e:
                log.info("invalid circuit message from %r: %s", self, e.message)
                self.penalize(self._lim.invalid_message_penalty, e.message)

    async def _control(self, size: int) -> bool:
        await self._throttle(size)
        return not self.closed

    async def _throttle(self, size: int) -> None:
        now = self._t.clock()
        msg_wait = self._msg_bucket.charge(1, now)
        wait = max(msg_wait, self._byte_bucket.charge(size, now))
        if msg_wait <= 0:
            self._throttled_since = None
        elif self._throttled_since is None:
            self._throttled_since = now
        elif now - self._throttled_since >= self._lim.flood_grace:
            # Only a sustained *message* rate counts as flooding: bulk catch-up sends
            # few large messages and is slowed by the byte bucket, never punished.
            self._throttled_since = now
            self.penalize(self._lim.flood_penalty, "flooding beyond the rate limit")
            if self.closed:
                return
        if wait > 0:
            self.throttled += 1
            # Not reading is the throttle: aiohttp stops reading the socket, TCP pushes back.
            await asyncio.sleep(min(wait, self._lim.idle_timeout / 2))

    # -- scoring and closing -------------------------------------------------

    def penalize(self, points: float, reason: str) -> None:
        """Lower the remote's score for invalid data; below the threshold it is cut off
        and its key and address are backed off."""
        self._t.penalize(self.remote, points, reason, ip=self.ip)

    def _violation(self, reason: str) -> None:
        # A broken frame leaves the channel unusable (counters desynchronised) and is
        # never an honest mistake: cut the peer off and back off at once.
        self._t.ban(self.remote, reason, ip=self.ip)

    def close(self, reason: str, *, notify: bool = True) -> None:
        """Close the link (idempotent); the handler's on_disconnect runs once."""
        if self._reason is not None:
            return
        self._reason = reason
        self._gate.set()
        self._t._spawn(self._shutdown(notify))

    async def wait_closed(self) -> None:
        await self._done.wait()

    async def _shutdown(self, notify: bool) -> None:
        reason = self._reason or "closed"
        self._room.set()
        for fut in self._pongs.values():
            if not fut.done():
                fut.set_exception(LinkClosedError("The link closed before the ping was answered."))
        self._t._forget(self)
        try:
            if self._admitted:
                log.info("link down %r: %s", self, reason)
                try:
                    await self._t.handler.on_disconnect(self, reason)
                except Exception:
                    log.exception("on_disconnect failed for %r", self)
            self._notified.set()
            await self._close_ws(notify, reason)
        finally:
            self._notified.set()
            self._done.set()

    async def _close_ws(self, notify: bool, reason: str) -> None:
        writer = self._writer_task
        self._queue.clear()
        self._queued_bytes = 0
        self._data_frames = 0
        self._circuit_frames = 0
        self.circuit_bytes = 0
        if notify and writer is not None and not writer.done():
            self._queue.append((wire.FRAME_CLOSE, reason.encode("utf-8")[: wire.MAX_CLOSE_REASON]))
            self._wake.set()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(writer), self._lim.close_timeout)
        if writer is not None and not writer.done():
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
        try:
            await asyncio.wait_for(self._carrier.close(), self._lim.close_timeout)
        except Exception:
            self._carrier.abort()
