"""A home never starts as a new node over a database that holds less than it followed, and
the member's own seq never goes backwards: node/held.py (held.json, the store's seq floor)
and the signer's refusal while records of ours are missing. In-process (one real Node,
loopback), plus the CLI's exit status and sentence.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from valuemesh.node.daemon import Node
from valuemesh.node.held import Held, open_home_store
from valuemesh.node.home import HELD_FILE, Home
from valuemesh.protocol.errors import LocalError

WORK = {"op": "record", "action": "work", "quantity": "1", "unit": "h"}
NET = "valuemesh-test-held"


def _node(home: Home, *, recover: bool = False) -> Node:
    return Node(home, home.load_identity(), listen="127.0.0.1:0", api="127.0.0.1:0", network=NET, recover=recover)


def _db_files(home: Home) -> list[Path]:
    return [home.db_file, Path(f"{home.db_file}-wal"), Path(f"{home.db_file}-shm")]


def _backup(home: Home, to: Path) -> None:
    to.mkdir()
    for p in _db_files(home):
        if p.exists():
            shutil.copy(p, to / p.name)


def _restore(home: Home, backup: Path) -> None:
    """What an operator does with an older copy: the database's files replaced by it."""
    for p in _db_files(home):
        p.unlink(missing_ok=True)
        if (backup / p.name).exists():
            shutil.copy(backup / p.name, p)


async def _run(home: Home, body: Callable[[Node], Awaitable[Any]]) -> Any:
    node = _node(home)
    await node.start()
    try:
        return await body(node)
    finally:
        await node.stop()


async def _member_with_records(home: Home, n: int) -> tuple[str, list[Any]]:
    """A member that created a constellation and signed `n` records in it; stopped."""
    home.init("held")
    node = _node(home)
    await node.start()
    try:
        text = (await node.create_constellation("held", ""))["id"]
        eng = node.engine_for(text)
        answers = [await node.submit(eng, "contribution", WORK) for _ in range(n)]
        assert [a["seq"] for a in answers] == list(range(1, n + 1))
        records = list((await node.store.get_records([bytes.fromhex(a["id"]) for a in answers])).values())
    finally:
        await node.stop()
    return text, records


def test_an_emptied_database_refuses_to_start_and_changes_nothing(tmp_path: Path) -> None:
    async def run() -> None:
        home = Home(tmp_path / "home")
        await _member_with_records(home, 2)
        held = json.loads((home.path / HELD_FILE).read_text())
        assert list(held["constellations"].values()) == [3]  # seqs 0 (genesis), 1, 2
        for p in _db_files(home):
            p.unlink(missing_ok=True)
        home.db_file.write_bytes(b"")  # 0 bytes, as the audit left it
        with pytest.raises(LocalError, match="missing or empty") as info:
            await _node(home).start()
        assert "valuemesh daemon --recover" in info.value.message and "valuemesh import" in info.value.message
        assert home.db_file.stat().st_size == 0
        home.db_file.unlink()
        with pytest.raises(LocalError, match="missing or empty"):
            await _node(home).start()
        assert not home.db_file.exists()
        # Recovery, chosen: the node starts with nothing, and the floor waits in the store for a
        # re-join or an import of that constellation.
        node = _node(home, recover=True)
        await node.start()
        try:
            assert node.engines == {}
            cid = bytes.fromhex(next(iter(held["constellations"])))
            assert await node.store.next_seq(cid, node.identity.member) == 3
        finally:
            await node.stop()

    asyncio.run(run())


def test_a_restored_older_database_never_signs_a_seq_twice(tmp_path: Path) -> None:
    async def run() -> None:
        home = Home(tmp_path / "home")
        home.init("held")
        text = (await _run(home, lambda node: node.create_constellation("held", "")))["id"]
        _backup(home, tmp_path / "backup")  # genesis only

        async def sign_three(node: Node) -> list[Any]:
            answers = [await node.submit(node.engine_for(text), "contribution", WORK) for _ in range(3)]
            return list((await node.store.get_records([bytes.fromhex(a["id"]) for a in answers])).values())

        lost = await _run(home, sign_three)
        _restore(home, tmp_path / "backup")

        async def after_restore(node: Node) -> None:
            eng = node.engine_for(text)
            with pytest.raises(LocalError, match=r"up to seq 3 .* no longer holds"):
                await node.submit(eng, "contribution", WORK)
            # Catch-up brings our records back (here straight into the store): signing resumes after them.
            async with node.store.batch() as tx:
                tx.put_records(lost, 1)
            assert (await node.submit(eng, "contribution", WORK))["seq"] == 4

        await _run(home, after_restore)

    asyncio.run(run())


def test_a_database_missing_a_followed_constellation_is_refused(tmp_path: Path) -> None:
    async def run() -> None:
        home = Home(tmp_path / "home")
        home.init("held")
        await _run(home, lambda node: asyncio.sleep(0))
        _backup(home, tmp_path / "backup")  # following nothing yet
        await _run(home, lambda node: node.create_constellation("held", ""))
        _restore(home, tmp_path / "backup")
        before = home.db_file.read_bytes()
        with pytest.raises(LocalError, match="does not hold"):
            await _node(home).start()
        assert home.db_file.read_bytes() == before

    asyncio.run(run())


def test_a_home_from_before_held_json_refuses_an_empty_database(tmp_path: Path) -> None:
    async def run() -> None:
        home = Home(tmp_path / "home")
        home.init("old")
        (home.path / HELD_FILE).unlink()
        with pytest.raises(LocalError, match="nothing records what it held"):
            await _node(home).start()
        assert not home.db_file.exists()
        node = _node(home, recover=True)
        await node.start()
        await node.stop()
        held = Held.load(home)
        assert held is not None and held.floors == {}

    asyncio.run(run())


def test_a_new_home_starts_and_an_upgraded_one_gains_held_json(tmp_path: Path) -> None:
    async def run() -> None:
        home = Home(tmp_path / "home")
        home.init("new")
        store, held = await open_home_store(home, home.load_identity().member)
        await store.close()
        assert held.floors == {}
        (home.path / HELD_FILE).unlink()  # a home whose database exists but that predates held.json
        store, held = await open_home_store(home, home.load_identity().member)
        await store.close()
        assert (home.path / HELD_FILE).exists() and held.floors == {}
        assert (home.path / HELD_FILE).stat().st_mode & 0o777 == 0o600

    asyncio.run(run())


@pytest.mark.parametrize("text", ["", "{", "[]", '{"constellations": {"zz": 1}}', '{"constellations": {"00": -1}}'])
def test_a_damaged_held_json_is_one_sentence(tmp_path: Path, text: str) -> None:
    home = Home(tmp_path / "home")
    home.init("x")
    (home.path / HELD_FILE).write_text(text)
    with pytest.raises(LocalError, match=r"held\.json is damaged"):
        Held.load(home)


def test_the_daemon_exits_with_one_sentence_over_an_emptied_database(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.init("x")
    (home.path / HELD_FILE).write_text(json.dumps({"v": 1, "constellations": {"07" * 32: 5}}))
    home.db_file.write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALUEMESH_")}
    res = subprocess.run([sys.executable, "-m", "valuemesh.cli.main", "--home", str(home.path), "daemon",
                          "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--no-mdns"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("\n") == 1 and "missing or empty" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == "" and home.db_file.stat().st_size == 0
