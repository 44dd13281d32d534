"""The load generator: one client thread per daemon, inside that daemon's namespace, submitting
contribution records through the local API and recording each operation (invoke and complete
time, node, ok with the record id the API answered, fail, or unknown) for the checker.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence

from chaos.bed import enter_netns
from chaos.checker import Op
from chaos.daemons import Node, Refused, Unknown

MIN_GAP_S = 0.1
MAX_GAP_S = 0.4
JOIN_TIMEOUT_S = 15.0


class Load:
    """Writes to every node until `stop`; the history is `ops` (completed operations)."""

    def __init__(self, nodes: Sequence[Node], cid: str, seed: int, t0: float) -> None:
        self.nodes = nodes
        self.cid = cid
        self.seed = seed
        self.t0 = t0
        self.ops: list[Op] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._next = 0

    def start(self) -> None:
        for i, node in enumerate(self.nodes):
            t = threading.Thread(target=self._client, args=(node, random.Random(self.seed * 1000 + i)),
                                 name=f"load-{node.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(JOIN_TIMEOUT_S)

    def acknowledged(self) -> list[str]:
        with self._lock:
            return [op.record_id for op in self.ops if op.result == "ok" and op.record_id]

    def _take_index(self) -> int:
        with self._lock:
            self._next += 1
            return self._next

    def _client(self, node: Node, rng: random.Random) -> None:
        enter_netns(node.host.netns)
        path = f"/v1/constellations/{self.cid}/records"
        while not self._stop.is_set():
            index = self._take_index()
            body = {"type": "contribution",
                    "body": {"op": "record", "action": "work", "quantity": str(1 + index % 9), "unit": "hour",
                             "note": f"chaos {self.seed} op {index}"}}
            invoke = time.monotonic() - self.t0
            result, rid, error = "unknown", None, ""
            try:
                answer = node.call("POST", path, body)
                result, rid = "ok", str(answer["id"])
            except Refused as exc:
                result, error = "fail", str(exc)
            except Unknown as exc:
                error = str(exc)
            except (KeyError, TypeError) as exc:
                error = f"odd answer: {exc}"
            op = Op(index, node.name, invoke, time.monotonic() - self.t0, result, rid, error)
            with self._lock:
                self.ops.append(op)
            self._stop.wait(rng.uniform(MIN_GAP_S, MAX_GAP_S))
