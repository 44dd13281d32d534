"""Before authentication a stranger holds little for long: handshake slots are counted per
address range and idlers give up theirs to newcomers (node/admission.py), inbound links
per range are bounded, a half-sent HTTP request is closed, and running out of file
descriptors logs one line per interval (node/loglimit.py). Loopback only: 127.0.0.0/8
gives many source addresses in several /24 ranges.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from valuemesh.node import daemon
from valuemesh.node.addresses import address_range
from valuemesh.node.admission import HandshakeSlots
from valuemesh.node.home import Home
from valuemesh.node.link_limits import Limits
from valuemesh.node.loglimit import LogLimiter
from valuemesh.node.testing import QuietHandler
from valuemesh.node.transport import PEER_PATH, Transport
from valuemesh.protocol import wire
from valuemesh.protocol.identity import Identity

NET = b"valuemesh-test"
FAST = Limits(handshake_timeout=3.0, connect_timeout=5.0, ping_interval=0.5, idle_timeout=5.0,
              send_timeout=2.0, close_timeout=1.0, duplicate_probe_timeout=1.0)
DEADLINE = 60.0


@pytest.fixture
async def transports() -> AsyncIterator[list[Transport]]:
    made: list[Transport] = []
    try:
        async with asyncio.timeout(DEADLINE):
            yield made
    finally:
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(*(t.stop() for t in made))


async def listening(made: list[Transport], limits: Limits = FAST) -> Transport:
    t = Transport(Identity(os.urandom(32)), NET, QuietHandler(), limits=limits)
    await t.start("127.0.0.1", 0)
    made.append(t)
    return t


def upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {PEER_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


async def open_from(src: str, server: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(server[0], server[1], local_addr=(src, 0))


async def closed_by_peer(reader: asyncio.StreamReader, within: float) -> bool:
    """Read until EOF; True if the other side closed within `within` seconds."""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
            return True
    return False


class Idlers:
    """Sockets that complete the websocket upgrade and then say nothing, each reopened
    `pause` s after the server drops it (bounded: `max_opens` upgrades in all)."""

    def __init__(self, server: tuple[str, int], sources: list[str], *, pause: float,
                 max_opens: int = 400) -> None:
        self.server = server
        self.pause = pause
        self.sources = sources
        self.left = max_opens
        self.opened = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.writers: set[asyncio.StreamWriter] = set()

    def start(self, per_source: int) -> None:
        for src in self.sources:
            for _ in range(per_source):
                self.tasks.append(asyncio.create_task(self._hold(src)))

    async def _hold(self, src: str) -> None:
        while self.left > 0:
            self.left -= 1
            try:
                reader, writer = await open_from(src, self.server)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            self.writers.add(writer)
            writer.write(upgrade_request(self.server[1]))
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 101"):
                self.opened += 1
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass  # hold the upgraded socket until the server drops it
            self.writers.discard(writer)
            writer.close()
            await asyncio.sleep(self.pause if head.startswith(b"HTTP/1.1 101") else 0.05)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            w.close()


async def wait_for(pred: object, what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if pred():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for: {what}")


# -- pure -------------------------------------------------------------------------------


def test_address_ranges_are_ipv4_24_and_ipv6_48() -> None:
    assert address_range("198.51.100.7") == address_range("198.51.100.250") == "198.51.100.0/24"
    assert address_range("198.51.101.7") != address_range("198.51.100.7")
    assert address_range("::ffff:198.51.100.9") == "198.51.100.0/24"
    assert address_range("2001:db8:1:ff::1") == address_range("2001:db8:1:1234::9") == "2001:db8:1::/48"
    assert address_range("2001:db8:2::1") != address_range("2001:db8:1::1")
    assert address_range("127.0.0.1") == address_range("127.0.0.9") != address_range("127.0.1.1")
    assert address_range("fe80::1%eth0") == "fe80::/48"
    assert address_range("unknown") == "unknown"


def test_a_newcomer_evicts_the_stalest_holder_of_its_own_range_first() -> None:
    slots = HandshakeSlots(total=4, per_range=2)
    evicted: list[str] = []
    a1 = slots.take("10.0.0.1", 0.0, lambda: evicted.append("a1"))
    slots.take("10.0.0.2", 1.0, lambda: evicted.append("a2"))
    b1 = slots.take("10.0.1.1", 2.0, lambda: evicted.append("b1"))
    # Range 10.0.0.0/24 is at its share: its stalest holder makes way, range b keeps its slot.
    slots.moved(a1, 3.0)
    slots.take("10.0.0.3", 4.0, lambda: evicted.append("a3"))
    assert evicted == ["a2"] and len(slots) == 3 and slots.held("10.0.0.77") == 2
    # All full: the fullest range gives up its stalest, never the lone honest one of range b.
    slots.take("10.0.2.1", 5.0, lambda: evicted.append("c1"))
    slots.take("10.0.3.1", 6.0, lambda: evicted.append("d1"))
    assert evicted == ["a2", "a1"] and len(slots) == 4
    slots.release(b1)
    slots.release(b1)  # twice changes nothing
    assert len(slots) == 3 and slots.held("10.0.1.1") == 0 and slots.evictions == 2


def test_log_limiter_writes_one_line_per_interval_with_the_count_left_out(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    lim = LogLimiter(logging.getLogger("valuemesh.test.loglimit"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="valuemesh.test.loglimit"):
        for i in range(100_000):  # 100 000 errors over 50 s
            now[0] = i * 0.0005
            lim.log(logging.ERROR, "cannot accept connections: %s", "Too many open files")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and lim.total == 100_000
    assert lines[0] == "cannot accept connections: Too many open files"
    assert lines[1].startswith("cannot accept connections: Too many open files (and 19999 more like it")


# -- over loopback ----------------------------------------------------------------------


async def test_idlers_from_one_range_and_many_ranges_cannot_keep_an_honest_peer_out(
        transports: list[Transport]) -> None:
    server = await listening(transports)
    assert server.address is not None
    # Idlers from eight addresses of the honest peer's own range and from six other ranges:
    # more than every slot (16) and every range's share (4), each reopened once dropped.
    own_range = [f"127.0.0.{i}" for i in range(2, 10)]
    other_ranges = [f"127.0.{r}.1" for r in range(1, 7)]
    idlers = Idlers(server.address, own_range + other_ranges, pause=0.2)
    idlers.start(per_source=2)
    try:
        for _ in range(5):  # the audit's five rounds
            await wait_for(lambda: len(server.handshakes) == FAST.max_handshakes, "idlers holding every slot")
            honest = await listening(transports)  # dials from 127.0.0.1, the idlers' own range
            link = await honest.connect(*server.address)
            assert not link.closed and server.link(honest.member) is not None
        assert server.handshakes.evictions >= 5 and idlers.opened > FAST.max_handshakes
    finally:
        await idlers.stop()


async def test_idlers_that_push_each_other_out_at_once_are_soon_backed_off(
        transports: list[Transport]) -> None:
    server = await listening(transports)
    assert server.address is not None
    # Reopening the moment they are dropped, idlers of one range evict each other in a loop;
    # each eviction of a socket that sent nothing costs its address, so the loop ends.
    sources = [f"127.0.0.{i}" for i in range(2, 6)]
    idlers = Idlers(server.address, sources, pause=0.0, max_opens=2000)
    idlers.start(per_source=2)
    try:
        await wait_for(lambda: all(server.banned_for(ip) for ip in sources), "every idler backed off", 30.0)
        honest = await listening(transports)
        link = await honest.connect(*server.address)
        assert not link.closed and server.link(honest.member) is not None
        assert server.banned_for("127.0.0.1") == 0
    finally:
        await idlers.stop()


async def raw_handshake(src: str, server: tuple[str, int], identity: Identity,
                        keep: list[asyncio.StreamWriter]) -> int:
    """Upgrade from `src` and run the wire handshake by hand, leaving the socket open in
    `keep`; return the verdict's code (or the HTTP status if the upgrade is refused)."""
    reader, writer = await open_from(src, server)
    keep.append(writer)
    writer.write(upgrade_request(server[1]))
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 101:
        return status
    i = wire.Initiator(identity, NET, os.urandom(32))
    writer.write(_ws_binary(i.start()))
    i.read_response(await _ws_read(reader))
    writer.write(_ws_binary(i.auth()))
    try:
        i.read_verdict(await _ws_read(reader))
    except wire.PeerRefusedError as e:
        return int(e.code)
    return 0


def _ws_binary(data: bytes) -> bytes:
    """One masked client frame (RFC 6455 §5.2), payload under 64 KiB."""
    mask = os.urandom(4)
    head = bytes([0x82, 0x80 | 126]) + len(data).to_bytes(2, "big") if len(data) > 125 else \
        bytes([0x82, 0x80 | len(data)])
    return head + mask + bytes(b ^ mask[n % 4] for n, b in enumerate(data))


async def _ws_read(reader: asyncio.StreamReader) -> bytes:
    _, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    return await reader.readexactly(n)


async def test_inbound_links_per_range_are_bounded(transports: list[Transport]) -> None:
    server = await listening(transports, replace(FAST, max_links_per_range=2))
    assert server.address is not None
    keys = [Identity(os.urandom(32)) for _ in range(4)]
    socks: list[asyncio.StreamWriter] = []
    try:
        assert await raw_handshake("127.0.0.2", server.address, keys[0], socks) == 0
        await wait_for(lambda: len(server.links) == 1, "the first link")
        assert await raw_handshake("127.0.0.3", server.address, keys[1], socks) == 0
        await wait_for(lambda: len(server.links) == 2, "the second link")
        # A third from the same /24, whatever its address, is refused; another range is not.
        assert await raw_handshake("127.0.0.4", server.address, keys[2], socks) == 503
        assert await raw_handshake("127.0.9.1", server.address, keys[3], socks) == 0
    finally:
        for w in socks:
            w.close()


async def still_open_after_half_sent(server: tuple[str, int], sources: list[str], path: str) -> int:
    """Send half a request from each source (headers never finished); how many the server
    has not closed 10 s later."""
    conns = [await open_from(src, server) for src in sources]
    for _, w in conns:
        w.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
    closed = await asyncio.gather(*(closed_by_peer(r, within=10.0) for r, _ in conns))
    for _, w in conns:
        w.close()
    return closed.count(False)


async def test_half_sent_requests_are_closed_within_the_header_timeout(transports: list[Transport]) -> None:
    server = await listening(transports, replace(FAST, header_timeout=0.5))
    assert server.address is not None
    sources = [f"127.0.3.{1 + i % 50}" for i in range(200)]
    assert await still_open_after_half_sent(server.address, sources, PEER_PATH) == 0


_FD_STARVED = """
import asyncio, logging, os, resource, sys
from valuemesh.node.testing import QuietHandler
from valuemesh.node.transport import Transport
from valuemesh.protocol.identity import Identity

async def main():
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    t = Transport(Identity(os.urandom(32)), b"valuemesh-test", QuietHandler())
    host, port = await t.start("127.0.0.1", 0)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await t.stop()

asyncio.run(main())
"""


def test_running_out_of_file_descriptors_logs_one_line_per_interval(tmp_path: Path) -> None:
    script = tmp_path / "starved.py"
    script.write_text(_FD_STARVED)
    err = tmp_path / "stderr.txt"
    with err.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr)
    socks: list[socket.socket] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        for _ in range(200):  # far past its 64 descriptors; the kernel's backlog keeps queueing
            s = socket.socket()
            s.settimeout(5.0)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                s.close()
                break
            socks.append(s)
        time.sleep(3.0)  # let the accept loop fail for a while
        proc.stdin.write(b"stop\n")
        proc.stdin.flush()
        proc.wait(timeout=20)
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = err.read_text().splitlines()
    accept = [ln for ln in lines if "accept" in ln]
    # Unlimited, Python 3.11 wrote about 7 500 lines (a traceback per failed accept) here.
    assert 1 <= len(accept) <= 2 and len(lines) < 50, lines[:20]
    assert "cannot accept connections: Too many open files" in accept[0]


async def test_the_local_api_closes_half_sent_requests_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "HEADER_TIMEOUT", 0.5)
    home = Home(tmp_path / "home")
    node = daemon.Node(home, home.init("api"), listen="127.0.0.1:0", api="127.0.0.1:0", network="valuemesh-test-api")
    await node.start()
    try:
        assert await still_open_after_half_sent((node.api_host, node.api_port), ["127.0.0.1"] * 50, "/v1/status") == 0
    finally:
        await node.stop()
