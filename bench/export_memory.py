"""Peak memory of an export: one real daemon on loopback with a large single-node ledger,
then `valuemesh export` of it, measuring the daemon's peak RSS during the export (Linux:
the peak is reset through /proc/PID/clear_refs first) and the CLI process's peak RSS.

    .venv/bin/python bench/export_memory.py --records 20000 --keep /tmp/vm-export-bench

With --keep, the daemon's home is built once and reused, so code before and after a
change is measured on the same ledger. The daemon is started and stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from valuemesh.node.testing import Daemon, free_port, wait_until

BATCH = 256  # records per API request (the API's batch limit)
NOTE = "x" * 200  # a contribution's note, so records are of a realistic size


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for {pid}")


def _final_count(d: Daemon, cid: str) -> int:
    doc: dict[str, Any] = d.api("GET", f"/v1/constellations/{cid}")
    return int(doc.get("final_count", doc.get("final", 0)))


def build(d: Daemon, records: int) -> str:
    cid: str = d.cli_json("constellation", "create", "bench")["id"]
    body = {"op": "record", "action": "work", "quantity": "1", "unit": "hour", "note": NOTE}
    for first in range(0, records, BATCH):
        n = min(BATCH, records - first)
        d.api("POST", f"/v1/constellations/{cid}/records", {"records": [{"type": "contribution", "body": body}] * n})
    wait_until(lambda: _final_count(d, cid) > records, 1800, f"{records} records to be final")
    return cid


def measure(d: Daemon, cid: str, out: Path) -> dict[str, Any]:
    assert d.proc is not None
    pid = d.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the daemon's peak RSS to its current RSS
    before = _status_kb(pid, "VmRSS")
    cmd = [sys.executable, "-m", "valuemesh.cli.main", "--home", str(d.home), "--json", "export", cid,
           "--output", str(out)]
    started = time.monotonic()
    cli = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(cli.pid, 0)
    seconds = time.monotonic() - started
    assert cli.stdout is not None and cli.stderr is not None
    stdout, stderr = cli.stdout.read(), cli.stderr.read()
    cli.stdout.close()
    cli.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(stderr.decode())
    return {"records": json.loads(stdout)["records"], "archive_mb": round(out.stat().st_size / 1e6, 1),
            "seconds": round(seconds, 1), "daemon_rss_before_mb": round(before / 1024, 1),
            "daemon_peak_rss_mb": round(_status_kb(pid, "VmHWM") / 1024, 1),
            "daemon_peak_growth_mb": round((_status_kb(pid, "VmHWM") - before) / 1024, 1),
            "cli_peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--keep", type=Path, default=None, help="Build the daemon's home here once and reuse it.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        d = Daemon("bench", root / "home", free_port(), "valuemesh-bench")
        d.start()
        try:
            saved = root / "cid.txt"
            if not saved.exists():
                saved.write_text(build(d, args.records))
            cid = saved.read_text().strip()
            wait_until(lambda: _final_count(d, cid) > args.records, 600, "the ledger to be replayed")
            print(json.dumps(measure(d, cid, Path(tmp) / "archive.jsonl")))
        finally:
            d.stop()


if __name__ == "__main__":
    main()
