"""Socket-level hole-punch actors for tests/test_punch*.py, run as processes in namespaces.

`coordinator HOST PORT`: the public host. Each peer connects from its listen port; it answers
with the address it saw (the peer's observed address, as a NAT rewrote it), then relays
frames between the first two peers, standing in for a relayed link.

`peer COORD_HOST COORD_PORT MEMBER_BYTE LISTEN_HOST LISTEN_PORT upgrade|answer [--lan] [--link]
[--tries N]`:
listens on its port with SO_REUSEPORT (as the node's server does), learns its observed
address, then punches (upgrade) or answers, says its member byte over the stream, and prints
one JSON line: {"ok", "reason", "elapsed", "remote", "initiator", "heard", "stolen"}. With
--link the listener is a real Transport, the punched stream becomes a PeerLink through the
wire handshake, and the byte goes over that link (the report adds "path").
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from valuemesh.node.link import PeerLink
from valuemesh.node.punch import Punched, Puncher, PunchFailed, enable_reuse, into_transport
from valuemesh.node.transport import Transport
from valuemesh.protocol import punch
from valuemesh.protocol.identity import Identity, MemberId

if TYPE_CHECKING:
    from chaos.internet import Internet

MAX_FRAME = 4096
ANSWER_WAIT = 30.0
NETWORK = b"punch-bed"


class Inbox:
    """A link handler that takes every key and keeps what it hears."""

    def __init__(self) -> None:
        self.heard: asyncio.Queue[bytes] = asyncio.Queue()

    def authorize(self, remote: MemberId, inbound: bool) -> bool:
        return True

    async def on_connect(self, link: PeerLink) -> None:
        pass

    async def on_message(self, link: PeerLink, payload: bytes) -> None:
        self.heard.put_nowait(payload)

    async def on_disconnect(self, link: PeerLink, reason: str) -> None:
        pass


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    if n > MAX_FRAME:
        raise ValueError(f"A frame of {n} bytes is over the {MAX_FRAME}-byte bound.")
    return await reader.readexactly(n)


def write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(struct.pack(">I", len(data)) + data)


class FrameChannel:
    """A PunchChannel over the coordinator's relay."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, payload: bytes) -> None:
        write_frame(self.writer, payload)
        await self.writer.drain()

    async def recv(self, timeout: float) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await read_frame(self.reader)
        except asyncio.IncompleteReadError:
            raise ConnectionError("the coordinator closed the relay") from None


async def coordinator(host: str, port: int) -> None:
    waiting: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    paired = asyncio.Event()

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                write_frame(dst, await read_frame(src))
                await dst.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            dst.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = writer.get_extra_info("peername")
        write_frame(writer, json.dumps({"observed": [seen[0], seen[1]]}).encode())
        await writer.drain()
        waiting.append((reader, writer))
        if len(waiting) == 2:
            (r1, w1), (r2, w2) = waiting
            paired.set()
            await asyncio.gather(pipe(r1, w2), pipe(r2, w1))

    server = await asyncio.start_server(serve, host, port, reuse_address=True)
    print(json.dumps({"listening": port}), flush=True)
    async with server:
        await server.serve_forever()


async def peer(
    coord: tuple[str, int], me_byte: int, listen: tuple[str, int], role: str, lan: bool, link: bool,
    tries: int = punch.MAX_TRIES,
) -> dict[str, object]:
    ident, other = Identity(bytes([me_byte]) * 32), Identity(bytes([_other(me_byte)]) * 32).member
    stolen: list[str] = []
    inbox = Inbox()
    transport = Transport(ident, NETWORK, inbox) if link else None

    def steal(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A punched SYN that reached the listener instead of the dialling socket.
        stolen.append(str(writer.get_extra_info("peername")))
        writer.close()

    if transport is not None:
        await transport.start(*listen)
    else:
        server = await asyncio.start_server(steal, listen[0], listen[1], reuse_address=True, reuse_port=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    enable_reuse(sock)
    sock.bind(listen)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, coord)
    reader, writer = await asyncio.open_connection(sock=sock)
    observed = json.loads(await read_frame(reader))["observed"]
    offer = [(str(observed[0]), int(observed[1]))] + ([listen] if lan else [])
    puncher = Puncher(ident.member, listen, lambda: punch.candidates(offer), tries=tries)
    adopt = into_transport(transport, other) if transport is not None else None
    channel = FrameChannel(reader, writer)
    t0 = time.monotonic()
    out: dict[str, object] = {"observed": observed}
    if role == "upgrade":
        got = await puncher.upgrade(channel, other, adopt)
    else:
        # Answer each of the upgrader's tries until one connects or it stops asking.
        got = PunchFailed("The upgrading peer never asked.")
        for n in range(tries):
            try:
                first = await channel.recv(ANSWER_WAIT)
            except (TimeoutError, ConnectionError):
                break
            if n == 0:
                t0 = time.monotonic()
            got = await puncher.answer(channel, other, first, adopt)
            if isinstance(got, Punched):
                break
    out["elapsed"] = round(time.monotonic() - t0, 4)
    if isinstance(got, Punched):
        try:
            if isinstance(got.adopted, PeerLink):
                out.update(path=got.adopted.path, member=str(got.adopted.remote))
                await got.adopted.send(bytes([me_byte]))
                heard = await asyncio.wait_for(inbox.heard.get(), 5)
            elif got.initiator:
                got.writer.write(bytes([me_byte]))
                heard = await asyncio.wait_for(got.reader.readexactly(1), 5)
            else:
                heard = await asyncio.wait_for(got.reader.readexactly(1), 5)
                got.writer.write(bytes([me_byte]))
            await got.writer.drain()
            out.update(ok=True, remote=[got.remote.host, got.remote.port], initiator=got.initiator,
                       heard=heard[0], local=list(got.writer.get_extra_info("sockname")[:2]))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as e:
            out.update(ok=False, reason=f"the punched stream broke at once ({type(e).__name__})")
        if got.adopted is None:
            got.writer.close()
    else:
        out.update(ok=False, reason=got.reason)
    out["stolen"] = stolen
    writer.close()
    if transport is not None:
        # Both ends must hear each other before either hangs up: linger a moment.
        await asyncio.sleep(0.5)
        await transport.stop()
    else:
        server.close()
    return out


def run_pair(
    net: Internet, answerer: str, upgrader: str, port: int, extra: tuple[str, ...] = (), deadline: float = 120.0
) -> tuple[dict[str, object], dict[str, object]]:
    """On the internet bed: the coordinator on pub1, member 1 answering on `answerer`, member
    2 upgrading on `upgrader`, both listening on `port`; (answer report, upgrade report)."""
    py = [sys.executable, str(Path(__file__).resolve())]
    coord = net.host("pub1").ip
    cport = str(7800 + port % 100)
    c = net.popen("pub1", [*py, "coordinator", coord, cport], stdout=subprocess.PIPE)
    try:
        if c.stdout is None or "listening" not in c.stdout.readline():
            raise RuntimeError("The coordinator did not start.")
        procs = [
            net.popen(h, [*py, "peer", coord, cport, str(i + 1), net.host(h).ip, str(port), role, *extra],
                      stdout=subprocess.PIPE)
            for i, (h, role) in enumerate(((answerer, "answer"), (upgrader, "upgrade")))
        ]
        try:
            outs = [p.communicate(timeout=deadline)[0] for p in procs]
        finally:
            for p in procs:
                net.stop(p)
    finally:
        net.stop(c)
    a, u = (json.loads(o.strip().splitlines()[-1]) for o in outs)
    return a, u


def _other(b: int) -> int:
    # The tests pair member bytes 1 and 2.
    return 3 - b


def main(argv: list[str]) -> None:
    if argv[0] == "coordinator":
        asyncio.run(coordinator(argv[1], int(argv[2])))
        return
    _, ch, cp, mb, lh, lp, role, *rest = argv
    tries = int(rest[rest.index("--tries") + 1]) if "--tries" in rest else punch.MAX_TRIES
    result = asyncio.run(
        peer((ch, int(cp)), int(mb), (lh, int(lp)), role, "--lan" in rest, "--link" in rest, tries)
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
