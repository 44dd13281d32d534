"""Running a node as the member's daemon process: the home's config read into a Node,
JSON log lines on stderr, one ready line on stdout, and a clean stop on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import sys
from typing import Any

from valuemesh.node.catchup import CHECKPOINT_START_MIN_RECORDS
from valuemesh.node.daemon import Node
from valuemesh.node.home import Home
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


def _config_count(cfg: dict[str, Any], key: str, default: int) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise LocalError(f"The config value '{key}' must be a whole number of 0 or more.")
    return v


def run_daemon(home: Home, *, listen: str | None, api: str | None, bootstrap: list[str], mdns: bool,
               mdns_interfaces: list[str], network: str | None) -> None:
    """Run a node in the foreground until SIGINT or SIGTERM."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=os.environ.get("VALUEMESH_LOG", "INFO").upper(), handlers=[handler])
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    identity = home.load_identity()
    cfg = home.config()
    node = Node(home, identity, listen=listen or cfg.get("listen", "0.0.0.0:7470"),
                api=api or cfg.get("api", "127.0.0.1:7471"), network=network or cfg.get("network", "valuemesh-main"),
                bootstrap=bootstrap or cfg.get("bootstrap", []), mdns=mdns, mdns_interfaces=mdns_interfaces,
                checkpoint_start_min_records=_config_count(cfg, "checkpoint_start_min_records",
                                                           CHECKPOINT_START_MIN_RECORDS),
                retain_epochs=_config_count(cfg, "retain_epochs", 0) or None,
                verify_threads=_config_count(cfg, "verify_threads", 0) or None)

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
