"""The relay-overhead actors of bench/reach.py, each a process in a namespace of the bed:
three bare transports (node/transport.py with node/relay.py, default limits), no daemon.

`relay PORT`: listens on 0.0.0.0:PORT, relays for anyone, prints {"key"}; runs until stopped.
`target RELAY_HOST PORT RELAY_KEY`: links to the relay, reserves there, prints {"key"}; takes
whatever arrives; runs until stopped.
`opener RELAY_HOST PORT RELAY_KEY TARGET_KEY MB`: links to the relay, opens a circuit to the
target, prints the median ping round trip over each ({"direct_ms", "relayed_ms"}), waits for a
line on stdin, sends MB megabytes over the circuit in 64 KiB messages, waits until the target's
end has acknowledged them by a ping, prints {"seconds"}.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time

from valuemesh.node.link import PeerLink
from valuemesh.node.testing import QuietHandler
from valuemesh.node.transport import Transport
from valuemesh.protocol.identity import Identity, MemberId

NET = b"vm-reach-bench"
PINGS = 50
CHUNK = 64 * 1024
DEADLINE_S = 120.0


def say(doc: dict[str, object]) -> None:
    print(json.dumps(doc), flush=True)


async def median_rtt(link: PeerLink) -> float:
    rtts = [await link.ping(5.0) for _ in range(PINGS)]
    return statistics.median(rtts) * 1000


async def main(argv: list[str]) -> None:
    t = Transport(Identity(os.urandom(32)), NET, QuietHandler())
    role = argv[0]
    try:
        if role == "relay":
            t.may_relay = lambda a, b: True
            await t.start("0.0.0.0", int(argv[1]))
            say({"key": str(t.member)})
            await asyncio.sleep(DEADLINE_S * 3)
            return
        await t.start("0.0.0.0", 0)
        host, port, relay = argv[1], int(argv[2]), MemberId.parse(argv[3])
        relay_link = await t.connect(host, port, expect=relay)
        if role == "target":
            await t.reserve(relay_link)
            say({"key": str(t.member)})
            await asyncio.sleep(DEADLINE_S * 3)
            return
        target, mb = MemberId.parse(argv[4]), int(argv[5])
        relayed = await t.dial_via(relay, target)
        say({"direct_ms": await median_rtt(relay_link), "relayed_ms": await median_rtt(relayed)})
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        started = time.monotonic()
        block = os.urandom(CHUNK)
        for _ in range(mb * 1_000_000 // CHUNK):
            await relayed.send(block)
        await relayed.ping(DEADLINE_S)  # answered after everything before it arrived
        say({"seconds": time.monotonic() - started})
    finally:
        await t.stop()


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1:]), DEADLINE_S * 4))
