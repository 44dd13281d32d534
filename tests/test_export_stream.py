"""The export is streamed (#16 finding 9): the daemon sends the archive as JSONL while it
reads the store, and `valuemesh export` writes it to the file as it arrives, renaming it into
place only when the closing line came; an export that fails halfway leaves no file and
says why in one sentence.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web
from test_engine import _engine, _finalise

from valuemesh.node.api import make_app
from valuemesh.node.archive import build_archive, read_archive, verify_archive
from valuemesh.node.daemon import installed_registry
from valuemesh.node.engine import Engine
from valuemesh.node.home import Home
from valuemesh.node.store import Store
from valuemesh.protocol.errors import NotFoundError
from valuemesh.protocol.records import Block

TOKEN = "export-secret"


class _Node:
    """What the export route asks of the node: its store, its plugins and its engine."""

    def __init__(self, store: Any, eng: Engine) -> None:
        self.store, self.registry, self._eng = store, eng.registry, eng

    def engine_for(self, text: str) -> Engine:
        if text != self._eng.text_id:
            raise NotFoundError(f"This node does not follow constellation {text}.")
        return self._eng


class _LosesBlocks:
    """A store that, from its `after`-th read of committed blocks on, no longer has them."""

    def __init__(self, store: Store, after: int) -> None:
        self._store, self._left = store, after

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def get_blocks(self, ids: list[bytes]) -> dict[bytes, Block]:
        self._left -= 1
        return await self._store.get_blocks(ids) if self._left >= 0 else {}


async def _cli(home: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "valuemesh.cli.main", "--home", str(home),
                                                *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _serve(node: _Node, home: Path) -> web.AppRunner:
    runner = web.AppRunner(make_app(node, TOKEN))  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    home.mkdir()
    Home(home).write_api_address("127.0.0.1", port, 0)
    (home / "api.token").write_text(TOKEN)
    return runner


async def test_the_export_streams_and_the_cli_writes_a_verifiable_archive(tmp_path: Path) -> None:
    store, eng = await _engine(tmp_path / "founder.sqlite")
    runner = None
    try:
        await _finalise(eng, 30)
        runner = await _serve(_Node(store, eng), tmp_path / "home")
        port = runner.addresses[0][1]
        async with ClientSession() as http:
            resp = await http.get(f"http://127.0.0.1:{port}/v1/constellations/{eng.text_id}/export",
                                  headers={"Authorization": f"Bearer {TOKEN}"})
            assert resp.status == 200 and resp.content_type == "application/x-ndjson"
            assert resp.headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in resp.headers
            streamed = [json.loads(line) for line in (await resp.read()).splitlines()]
        whole = await build_archive(store, eng, eng.registry)
        assert [{**it, "exported_at": 0} for it in streamed[:1]] == [{**whole[0], "exported_at": 0}]
        assert streamed[1:] == whole[1:]
        registry = installed_registry()
        for fmt in ("jsonl", "csv"):
            target = tmp_path / f"out.{fmt}"
            code, out, err = await _cli(tmp_path / "home", "--json", "export", eng.text_id, "--format", fmt,
                                        "--output", str(target))
            assert code == 0, err
            doc = json.loads(out)
            assert doc["bytes"] == target.stat().st_size and doc["records"] == eng.final_count
            checked = verify_archive(read_archive(target), registry)
            assert checked.replay.ledger.state_hash() == eng.ledger.state_hash()
            assert doc["state_hash"] == eng.ledger.state_hash().hex()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        code, _, err = await _cli(tmp_path / "home", "export", eng.text_id, "-o", str(tmp_path / "no" / "a.jsonl"))
        assert code == 1 and err.startswith("error: Cannot write") and "\n" not in err.strip(), err
    finally:
        if runner is not None:
            await runner.cleanup()
        await store.close()


async def test_an_export_that_fails_halfway_leaves_no_file_and_says_why(tmp_path: Path) -> None:
    store, eng = await _engine(tmp_path / "founder.sqlite")
    runner = None
    try:
        await _finalise(eng, 10)
        # The blocks are sent, then the replay finds a committed block gone: too late for a status.
        runner = await _serve(_Node(_LosesBlocks(store, 1), eng), tmp_path / "home")
        target = tmp_path / "out.jsonl"
        code, _, err = await _cli(tmp_path / "home", "export", eng.text_id, "--output", str(target))
        assert code == 1 and err.strip() == "error: The database lacks a committed block; the archive cannot be " \
            "complete.", err
        assert not target.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
        # The same in CSV, the blocks gone from the start (after the header line).
        await runner.cleanup()
        runner = None
        (tmp_path / "home").rename(tmp_path / "home-1")
        runner = await _serve(_Node(_LosesBlocks(store, 0), eng), tmp_path / "home")
        code, _, err = await _cli(tmp_path / "home", "export", eng.text_id, "--format", "csv", "-o", str(target))
        assert code == 1 and "lacks a committed block" in err and "\n" not in err.strip(), err
        assert not target.exists()
    finally:
        if runner is not None:
            await runner.cleanup()
        await store.close()
