"""Address records between real daemons formed by invites alone: every member's node ends up
holding, on disk, the signed record of every other member (the joiners never met each other
but through the founder), and each record names where that member really listens."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import pytest

from valuemesh.node.home import DB_FILE
from valuemesh.node.testing import Daemon, free_port, wait_until
from valuemesh.protocol.addressrec import decode_record
from valuemesh.protocol.identity import MemberId

pytestmark = pytest.mark.slow
DEADLINE_S = 60.0
NET = "valuemesh-arec-daemons"


def records_on_disk(d: Daemon) -> dict[MemberId, list[tuple[str, int]]]:
    path = d.home / DB_FILE
    if not path.exists():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            rows = db.execute("SELECT raw FROM address_records").fetchall()
    except sqlite3.OperationalError:
        return {}  # not migrated yet
    recs = [decode_record(bytes(r[0])) for r in rows]
    return {r.member: [(a.host, a.port) for a in r.addresses] for r in recs}


def test_every_member_holds_every_members_signed_record(tmp_path: Path) -> None:
    daemons = [Daemon(f"a{i}", tmp_path / f"a{i}", free_port(), NET) for i in range(3)]
    founder, others = daemons[0], daemons[1:]
    try:
        for d in daemons:
            d.start()
        cid = founder.cli_json("constellation", "create", "spread")["id"]
        for d in others:
            token = founder.cli("constellation", "invite", cid, "--tier", "core").stdout.strip()
            d.cli("constellation", "join", token)
            wait_until(lambda d=d: d.api("GET", f"/v1/constellations/{cid}")["my_tier"] == "core", DEADLINE_S,
                       f"{d.name}'s join to be final")
        ids = {MemberId.parse(d.api("GET", "/v1/id")["member"]): d for d in daemons}

        def complete() -> bool:
            return all(set(records_on_disk(d)) == set(ids) for d in daemons)

        started = time.monotonic()
        wait_until(complete, DEADLINE_S, "every node to hold every member's record on disk", interval=0.05)
        print(f"every record on every disk {time.monotonic() - started:.2f} s after the last join was final")
        for d in daemons:
            for member, addrs in records_on_disk(d).items():
                assert ("127.0.0.1", ids[member].port) in addrs  # where that member listens
    finally:
        for d in daemons:
            d.stop()
