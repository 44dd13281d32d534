"""An opt-in event trace of the block and record path, for measuring where a DAG round's
time goes (bench/hops.py reads it). Off unless VALUEMESH_TRACE names a directory; then
each daemon appends JSON lines to `<dir>/<member short>.jsonl`.

Times are `time.monotonic()` seconds: CLOCK_MONOTONIC is one clock for every process
of a host, so traces of daemons on one machine line up with each other and with the
benchmark client. Tracing costs one buffered write per event; it is a measuring tool,
not something to leave on in production.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, Any

TRACE_ENV = "VALUEMESH_TRACE"
# With the trace on, also profile the whole daemon (cProfile) into <dir>/<name>.prof.
PROFILE_ENV = "VALUEMESH_TRACE_PROFILE"


class Tracer:
    def __init__(self, path: Path) -> None:
        self._f: IO[str] | None = open(path, "a", buffering=1 << 16)  # lives as long as the node

    def event(self, ev: str, **fields: Any) -> None:
        if self._f is not None:
            fields["t"] = time.monotonic()
            fields["e"] = ev
            self._f.write(json.dumps(fields, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


tracer: Tracer | None = None
_profile: tuple[Any, Path] | None = None


def start(name: str) -> None:
    """Open this process's trace file if VALUEMESH_TRACE asks for one."""
    global tracer
    where = os.environ.get(TRACE_ENV)
    if where and tracer is None:
        Path(where).mkdir(parents=True, exist_ok=True)
        tracer = Tracer(Path(where) / f"{name}.jsonl")
        if os.environ.get(PROFILE_ENV):
            import cProfile
            global _profile
            prof = cProfile.Profile()
            prof.enable()
            _profile = (prof, Path(where) / f"{name}.prof")


def stop() -> None:
    global tracer, _profile
    if _profile is not None:
        _profile[0].disable()
        _profile[0].dump_stats(str(_profile[1]))
        _profile = None
    if tracer is not None:
        tracer.close()
        tracer = None
