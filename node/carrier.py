"""Carriers: what a handshake and a `PeerLink` run over — one binary message at a time.

Three kinds: a WebSocket (`GET /vm/peer`, client or server side), a length-prefixed
stream (a hole-punched TCP connection where both ends dialled), and a relayed circuit
(node/relay.py). The wire format above a carrier is the same for all (docs/transport.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp
from aiohttp import WSMsgType, web

from valuemesh.protocol.errors import RemoteError

# Length prefix of the stream carrier: 4 bytes, big-endian.
STREAM_PREFIX = 4
# WebSocket pings tolerated (never answered) while the handshake runs.
MAX_HANDSHAKE_WS_PINGS = 4
_WS_MESSAGE_TOO_BIG = 1009
_WS_POLICY_VIOLATION = 1008

# Called with the size of each carrier-level control message (a WebSocket ping or pong)
# once the link is up; it may wait (the rate limit) and says whether to still answer.
ControlHook = Callable[[int], Awaitable[bool]]
# Aborts the raw connection under a carrier that will not close politely.
Abort = Callable[[], None]


class CarrierViolation(RemoteError):
    """Raised when the peer broke the carrier's own framing (text, oversize, garbage)."""


class Carrier(Protocol):
    """One bidirectional channel of binary messages between two nodes."""

    # (ip, port) as seen on the socket; None when there is no socket of our own (a circuit).
    addr: tuple[str, int] | None
    # Why the carrier ended, when it knows more than "closed by the peer" (a circuit does).
    reason: str | None

    async def send(self, data: bytes) -> None:
        """Send one message; raises ConnectionError (or OSError) if the carrier is gone."""
        ...

    async def receive(self, timeout: float | None) -> bytes | None:
        """The next message; None once the peer closed; TimeoutError after `timeout` s;
        CarrierViolation when the peer broke the framing."""
        ...

    async def close(self) -> None:
        """Close politely (the caller bounds the wait and aborts after it)."""
        ...

    def abort(self) -> None:
        """Drop the connection at once."""
        ...

    def set_control(self, hook: ControlHook) -> None:
        """Once the link is up: how carrier-level pings are charged and answered."""
        ...

    def local_addr(self) -> tuple[str, int] | None:
        """This end's (IP, port) of the connection; None when it has no socket of its own."""
        ...


class WebSocketCarrier:
    """The WebSocket carrier (RFC 6455 over aiohttp), either side of `/vm/peer`."""

    def __init__(
        self,
        ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        addr: tuple[str, int] | None,
        abort: Abort,
        max_message: int,
    ) -> None:
        self._ws = ws
        self.addr = addr
        self._abort = abort
        self._max = max_message
        self._control: ControlHook | None = None
        self._handshake_pings = 0
        self.reason: str | None = None

    def set_control(self, hook: ControlHook) -> None:
        self._control = hook

    def local_addr(self) -> tuple[str, int] | None:
        return _endpoint(self._ws.get_extra_info("sockname"))

    async def send(self, data: bytes) -> None:
        await self._ws.send_bytes(data)

    async def receive(self, timeout: float | None) -> bytes | None:
        while True:
            msg = await self._ws.receive(timeout=timeout)
            if msg.type == WSMsgType.BINARY:
                return bytes(msg.data)
            if msg.type in (WSMsgType.PING, WSMsgType.PONG):
                if self._control is None:
                    # During the handshake: meaningless; a few are tolerated, none answered.
                    self._handshake_pings += 1
                    if self._handshake_pings > MAX_HANDSHAKE_WS_PINGS:
                        raise CarrierViolation("the peer sent websocket pings instead of a handshake message")
                    continue
                # Answered by hand so that WebSocket pings, too, pass the rate limiter.
                answer = await self._control(len(msg.data))
                if msg.type == WSMsgType.PING and answer:
                    await self._ws.pong(msg.data)
                continue
            if msg.type == WSMsgType.TEXT:
                raise CarrierViolation("the peer sent a text message instead of an encrypted frame")
            if msg.type == WSMsgType.ERROR:
                if getattr(msg.data, "code", None) == _WS_MESSAGE_TOO_BIG:
                    raise CarrierViolation(f"the peer sent a frame larger than {self._max} bytes")
                raise CarrierViolation("the peer sent invalid websocket framing")
            return None

    async def close(self) -> None:
        await self._ws.close()

    async def close_refused(self) -> None:
        """Close after a failed handshake (policy violation), as before the link existed."""
        await self._ws.close(code=_WS_POLICY_VIOLATION)

    def abort(self) -> None:
        self._abort()


class StreamCarrier:
    """Messages over a raw byte stream: each one a 4-byte big-endian length, then the bytes.

    For TCP connections without HTTP, e.g. hole punched ones where both ends called
    connect(); a length above `max_message` is a violation (nothing is buffered for it).
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_message: int
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._max = max_message
        peer = writer.get_extra_info("peername")
        self.addr: tuple[str, int] | None = (
            (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None
        )
        self._send_lock = asyncio.Lock()
        self.reason: str | None = None

    def set_control(self, hook: ControlHook) -> None:
        """A stream has no control messages of its own."""

    def local_addr(self) -> tuple[str, int] | None:
        return _endpoint(self._writer.get_extra_info("sockname"))

    async def send(self, data: bytes) -> None:
        if len(data) > self._max:
            raise ValueError(f"A message of {len(data)} bytes exceeds the carrier's {self._max}.")
        async with self._send_lock:
            if self._writer.is_closing():
                raise ConnectionResetError("the stream is closed")
            self._writer.write(len(data).to_bytes(STREAM_PREFIX, "big") + data)
            await self._writer.drain()

    async def receive(self, timeout: float | None) -> bytes | None:
        async with asyncio.timeout(timeout):
            try:
                head = await self._reader.readexactly(STREAM_PREFIX)
                size = int.from_bytes(head, "big")
                if size > self._max:
                    raise CarrierViolation(f"the peer sent a frame larger than {self._max} bytes")
                return await self._reader.readexactly(size)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    def abort(self) -> None:
        transport = self._writer.transport
        if transport is not None:
            transport.abort()


def _endpoint(name: object) -> tuple[str, int] | None:
    """(IP, port) of a socket name as asyncio gives it (IPv6 names carry two more fields)."""
    if isinstance(name, tuple) and len(name) >= 2 and isinstance(name[0], str) and isinstance(name[1], int):
        return name[0], name[1]
    return None
