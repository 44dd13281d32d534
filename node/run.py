"""Running a node as the member's daemon process: the home's config read into a Node,
JSON log lines on stderr, one ready line on stdout, and a clean stop on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import sys

from valuemesh.node.daemon import Node, installed_registry
from valuemesh.node.home import Home
from valuemesh.node.settings import Settings
from valuemesh.protocol.errors import LocalError


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"t": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        for k in ("c", "epoch", "start_round"):
            if hasattr(record, k):
                doc[k] = getattr(record, k)
        if record.exc_info:  # an internal error is useless to an operator without its traceback
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def run_daemon(home: Home, settings: Settings, *, recover: bool = False) -> None:
    """Run a node with `settings` (checked already, node/settings.py) until SIGINT or SIGTERM;
    `recover`: start even if the database holds less than the home remembers (node/held.py)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    identity = home.load_identity()
    node = Node(home, identity, listen=settings.listen, api=settings.api, network=settings.network,
                bootstrap=settings.bootstrap, mdns=settings.mdns, mdns_interfaces=settings.mdns_interfaces,
                registry=installed_registry(settings.disable_plugins),
                checkpoint_start_min_records=settings.checkpoint_start_min_records,
                retain_epochs=settings.retain_epochs or None,
                verify_threads=settings.verify_threads or None, name=settings.name, recover=recover,
                serve_relay=settings.serve_relay,
                port_mapping=settings.port_mapping)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await node.start()
        # Everything so far (modules, the replayed ledger and DAG) lives as long as the process:
        # keep it out of the cycle collector's scans. A full collection over it paused the loop
        # for 36-76 ms at light load on 4 daemons, a latency spike on every node it hit.
        gc.freeze()
        print(json.dumps({"ready": True, "member": str(identity.member), "listen": node.addresses()[0],
                          "api": f"{node.api_host}:{node.api_port}"}), flush=True)
        try:
            await stop.wait()
        finally:
            await node.stop()

    try:
        asyncio.run(main())
    except OSError as exc:
        raise LocalError(f"The daemon could not start: {exc.strerror or exc}.") from None
