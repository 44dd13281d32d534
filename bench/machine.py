"""What machine a benchmark ran on (CPU model, cores, Python, library versions),
plus the small statistics and process-accounting helpers every bench script shares.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version

LIBRARIES = ("valuemesh", "pynacl", "aiohttp", "aiosqlite", "pysyncobj")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, object]:
    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            libs[name] = None
    import sqlite3
    libs["sqlite"] = sqlite3.sqlite_version
    try:
        import nacl.bindings
        libs["libsodium"] = nacl.bindings.sodium_version_string()  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        pass
    return {
        "commit": git_commit(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": f"{sys.version.split()[0]} ({platform.python_implementation()})",
        "libraries": libs,
        "load_average_at_start": load_average(),
    }


def ensure_bytecode() -> None:
    """Compile valuemesh's modules to bytecode once, as installing a package does.

    With PYTHONDONTWRITEBYTECODE set (as in some shells) an editable install never caches
    its bytecode, so every daemon the benchmark starts compiled all of valuemesh again:
    0.25-0.4 s of each start on this host, a cost no installed node pays. Python still
    reads bytecode that exists, so compiling once up front removes it."""
    import compileall
    import importlib

    for name in ("valuemesh.protocol", "valuemesh.node", "valuemesh.cli"):
        for path in importlib.import_module(name).__path__:
            compileall.compile_dir(path, quiet=1)


def git_commit() -> str:
    """HEAD of the working tree the run used, with "+dirty" if tracked files differ from it."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[k]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_threads_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread of a process: "main" (the event loop) and "other" (all the
    rest: SQLite's connection threads, executors)."""
    out = {"main": 0.0, "other": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        out["main" if int(tid) == pid else "other"] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE / 1e6


def raw_verify_rate(seconds: float = 1.0) -> float:
    """Raw PyNaCl VerifyKey.verify calls per second on one core, on 200-byte messages."""
    import nacl.signing
    sk = nacl.signing.SigningKey(b"\x07" * 32)
    vk = sk.verify_key
    msgs = [sk.sign(bytes([i % 256]) * 200) for i in range(256)]
    n = 0
    t0 = time.process_time()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sm in msgs:
            vk.verify(sm)
        n += len(msgs)
    return n / max(time.process_time() - t0, 1e-9)
