"""A minimal process that runs Discovery on one interface and prints what it finds as JSON lines.

Used by tests/test_discovery.py inside network namespaces; stops cleanly on SIGTERM/SIGINT
(unregistering its mDNS service) and on its own after --max-seconds, so it can never linger.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from valuemesh.node.announcement import Found
from valuemesh.node.discovery import Discovery
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import Identity, MemberId


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> int:
    member = Identity(bytes.fromhex(args.seed)).member
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def found(f: Found) -> None:
        emit(event="found", member=str(f.member), host=f.host, port=f.port)

    def lost(m: MemberId) -> None:
        emit(event="lost", member=str(m))

    disc = Discovery(
        member, bytes.fromhex(args.network), args.port, found,
        interfaces=[args.interface], on_lost=lost,
    )
    try:
        await disc.start()
    except LocalError as e:
        emit(event="refused", reason=str(e))
        return 3
    emit(event="started", member=str(member), service=disc.service_name)
    try:
        await asyncio.wait_for(stop.wait(), args.max_seconds)
    except TimeoutError:
        emit(event="timeout")
    await disc.stop()
    emit(event="stopped", ignored=disc.ignored)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--interface", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--network", required=True)
    p.add_argument("--seed", required=True)
    p.add_argument("--max-seconds", type=float, default=120.0)
    sys.exit(asyncio.run(main(p.parse_args())))
