"""A real daemon whose home is on a real file system that fills up and empties again: it stops
taking anything while the disk refuses, and once space returns it finalises again on its own,
without a restart, every write it acknowledged (docs/storage.md, "A step whose write fails").

Needs root (a small tmpfs is mounted for the home); skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chaos/ is a folder of scripts, not installed

from chaos.faults import fill
from valuemesh.node.testing import Daemon, free_port, wait_until
from valuemesh.protocol.errors import LocalError

pytestmark = pytest.mark.slow
DISK = "32m"
FULL_FOR_S = 20.0  # bounded: how long to keep offering writes until one fails for want of room
RECOVER_S = 60.0  # the back-off waits 5, then 10, 20 s: a disk full for a few seconds is retried within 30 s
BODY = {"type": "contribution", "body": {"op": "record", "action": "work", "quantity": "1", "unit": "hour"}}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("Mounting a small file system for the home needs root.")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "tmpfs", str(where)],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        pytest.skip(f"Cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def _final(d: Daemon, cid: str) -> set[str]:
    return {r["id"] for r in d.cli_json("ledger", cid)["final"]}


def _write(d: Daemon, cid: str, acked: list[str]) -> None:
    """One contribution through the local API; its id kept if the daemon acknowledged it."""
    try:
        acked.append(str(d.api("POST", f"/v1/constellations/{cid}/records", BODY)["id"]))
    except LocalError:
        pass  # refused: no effect, allowed


def test_a_node_whose_disk_fills_and_empties_finalises_again_without_a_restart(
        small_disk: Path, tmp_path: Path) -> None:
    """Two core members, so nothing is final without both: b's disk fills while a writes, b's
    steps fail on a's blocks, and once space returns b must rebuild on its own for anything
    acknowledged since to become final anywhere."""
    ports = [free_port(), free_port()]
    log = tmp_path / "b.log"
    a = Daemon("a", tmp_path / "a", ports[0], "valuemesh-test", [f"127.0.0.1:{ports[1]}"])
    b = Daemon("b", small_disk / "home", ports[1], "valuemesh-test", [f"127.0.0.1:{ports[0]}"], log=log)
    try:
        a.start()
        b.start()
        assert b.proc is not None
        pid = b.proc.pid
        cid = a.cli_json("constellation", "create", "disk")["id"]
        b.cli("constellation", "join", a.cli("constellation", "invite", cid, "--tier", "core", "--role",
                                             "producer").stdout.strip())
        acked: list[str] = []
        _write(a, cid, acked)
        wait_until(lambda: set(acked) <= _final(b, cid), RECOVER_S, "the first write to be final on b")

        filler = fill(small_disk)
        deadline = time.monotonic() + FULL_FOR_S
        while b"a step's write failed" not in log.read_bytes() and time.monotonic() < deadline:
            _write(a, cid, acked)
            time.sleep(0.2)
        assert b"a step's write failed" in log.read_bytes(), "the disk never refused one of b's writes"
        assert b.alive, "a full disk must not take the daemon down"

        filler.unlink()
        _write(a, cid, acked)
        # Every acknowledged write final on both, b still the same process: it rebuilt itself.
        wait_until(lambda: set(acked) <= _final(b, cid) and set(acked) <= _final(a, cid), RECOVER_S,
                   "every acknowledged write to be final on both")
        assert b.alive and b.proc.pid == pid
        assert b"rebuilt from the store after a failed write" in log.read_bytes()
    finally:
        b.stop()
        a.stop()
