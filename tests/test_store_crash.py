"""The store's crash test: SIGKILLs a writing subprocess (tests/store_writer.py) at random
instants and checks that nothing it reported committed was lost and no seq was signed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from valuemesh.node.store import Store
from valuemesh.node.store.checks import MAX_PAGE

WRITER = Path(__file__).with_name("store_writer.py")
KILLS = 15
START_DEADLINE_S = 20.0


def _parse(out: bytes, commits: list[int], sent: dict[int, set[str]]) -> None:
    # A line cut short by the kill was not fully reported, so it promises nothing.
    for line in out.decode().split("\n")[:-1]:
        kind, *rest = line.split()
        if kind == "commit":
            commits.append(int(rest[0]))
        else:
            sent.setdefault(int(rest[0]), set()).add(rest[1])


async def _run_and_kill(path: Path, seed: int, rng: random.Random, mode: str) -> bytes:
    """Start the writer, SIGKILL it at a random instant, return everything it printed.

    mode "early": 0-600 ms after spawn (start-up, schema checks, first transactions);
    "steady": 0-300 ms after its first line; "signed": 0-3 ms after it reports a record
    it signed, aiming at the window between signing and storing.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        str(path),
        str(seed),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        head = b""
        if mode == "early":
            await asyncio.sleep(rng.uniform(0.0, 0.6))
        else:
            skip = rng.randint(0, 20) if mode == "signed" else 0
            for _ in range(skip + 1):
                line = b""
                while not line.startswith(b"sent"):
                    line = await asyncio.wait_for(proc.stdout.readline(), START_DEADLINE_S)
                    assert line.endswith(b"\n"), (await proc.stderr.read()).decode()
                    head += line
            await asyncio.sleep(rng.uniform(0.0, 0.3 if mode == "steady" else 0.003))
        assert proc.returncode is None, (await proc.stderr.read()).decode()
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), START_DEADLINE_S)
        out = head + await asyncio.wait_for(proc.stdout.read(), START_DEADLINE_S)
        await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return out


@pytest.mark.slow
async def test_sigkill_at_random_instants_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite"
    rng = random.Random(20261123)
    reported: list[int] = []
    sent: dict[int, set[str]] = {}
    for i in range(KILLS):
        mode = ("early", "steady", "signed")[i % 3]
        _parse(await _run_and_kill(path, i, rng, mode), reported, sent)
        # Checked before the next run can rewrite anything: the database is intact and holds
        # every index reported so far, with its block.
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            if reported:
                held = db.execute(
                    "SELECT COUNT(*) FROM commits c JOIN blocks b ON b.id = c.block_id WHERE c.idx <= ?",
                    (max(reported),),
                ).fetchone()[0]
                assert held == max(reported) + 1, f"kill {i} lost reported commits"
    assert len(reported) > KILLS, "the writer must have committed before most kills"

    # One clean run proves the store resumes exactly where the last kill left it.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        str(path),
        "99",
        "--count",
        "5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), START_DEADLINE_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    _parse(out, reported, sent)
    # Reserving a seq durably before signing means no seq was ever signed with two contents,
    # however the kills fell between reserving, signing, sending and storing.
    assert sent and all(len(ids) == 1 for ids in sent.values()), "a seq was signed twice"

    sys.path.insert(0, str(WRITER.parent))
    try:
        import store_writer
    finally:
        sys.path.remove(str(WRITER.parent))
    async with await Store.open(path) as s:
        assert await s.integrity_check() == []
        n = await s.commit_count(store_writer.CONSTELLATION)
        assert max(reported) < n
        commits = [e async for e in s.iter_commits(store_writer.CONSTELLATION)]
        assert [e.index for e in commits] == list(range(n)), "the final order has a gap"
        for e in commits:
            want = store_writer.block_for(e.index)
            assert e.block_id == want.id
            block = await s.get_block(e.block_id)
            assert block == want
            stored = await s.get_records([r.id for r in want.records])
            assert len(stored) == len(want.records)
        # Page through every final record. A full page may end inside a block (MAX_PAGE is not
        # a multiple of a block's records), so the next page starts at that block again and
        # each record is counted once by its (commit index, position).
        finals: set[tuple[int, int]] = set()
        start = 0
        for _ in range(n + 1):  # bounded: a full page moves `start` on by many blocks
            page = await s.final_records(store_writer.CONSTELLATION, start=start)
            if not page:
                break
            assert page[0].commit_index == start
            finals.update((f.commit_index, f.position) for f in page)
            if len(page) < MAX_PAGE:
                break
            start = page[-1].commit_index
        assert len(finals) == n * store_writer.RECORDS_PER_BLOCK
        # Records carried by committed blocks left `pending`; only the writer's own remain.
        pending = await s.pending(store_writer.CONSTELLATION)
        assert pending and {r.author for r in pending} == {store_writer.LOCAL.member}
        assert await s.equivocations(store_writer.CONSTELLATION) == []
