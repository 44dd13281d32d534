"""The signer through its own seam: a real store and engine, recording effects and forward.
Requests that queue together are signed with consecutive seqs and stored in one transaction;
a request that fails its checks is refused alone; a non-core node hands its records on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from nodefakes import FOUNDER, Spawned, founded

from valuemesh.node.daemon import installed_registry
from valuemesh.node.engine import Effects, Engine
from valuemesh.node.signer import Signer
from valuemesh.node.store import Store
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.records import Record

WORK = {"op": "record", "action": "work", "quantity": "1", "unit": "h"}


class Seams:
    def __init__(self, store: Store, eng: Engine) -> None:
        self.effects: list[Effects] = []
        self.forwarded: list[list[Record]] = []
        self.spawned = Spawned()

        async def effects(e: Engine, eff: Effects) -> None:
            self.effects.append(eff)

        async def forward(e: Engine, recs: list[Record]) -> None:
            self.forwarded.append(recs)

        self.signer = Signer(FOUNDER, installed_registry(), store, {eng.cid: eng}, spawn=self.spawned,
                             effects=effects, forward=forward)


async def test_requests_queued_together_share_one_transaction_and_consecutive_seqs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        s = Seams(store, eng)
        stores: list[int] = []
        real = eng.store_pending

        async def counted(records: Any, now: int) -> Any:
            stores.append(len(records))
            return await real(records, now)

        monkeypatch.setattr(eng, "store_pending", counted)
        docs = await asyncio.gather(*(s.signer.submit(eng, "contribution", WORK) for _ in range(4)),
                                    s.signer.submit_many(eng, [("contribution", WORK)] * 2))
        assert [d["seq"] for d in docs[:4]] + [d["seq"] for d in docs[4]] == [1, 2, 3, 4, 5, 6]
        assert all(d["status"] == "pending" for d in [*docs[:4], *docs[4]])
        assert stores == [6]  # one transaction (one fsync) for every request queued together
        await s.spawned.settle()
        assert len(s.effects) == 1 and s.forwarded == []  # proposed once; core: nothing to hand on
        assert await store.next_seq(eng.cid, FOUNDER.member) == 7  # stored durably
    finally:
        await store.close()


async def test_a_request_that_fails_its_checks_is_refused_alone(tmp_path: Path) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        s = Seams(store, eng)
        good, bad, after = await asyncio.gather(
            s.signer.submit(eng, "contribution", WORK),
            s.signer.submit_many(eng, [("contribution", WORK), ("no-such-type", {})]),
            s.signer.submit(eng, "contribution", WORK), return_exceptions=True)
        assert isinstance(bad, Exception)
        assert isinstance(good, dict) and isinstance(after, dict)
        assert (good["seq"], after["seq"]) == (1, 2)  # the refused request's seqs go to the next one
    finally:
        await store.close()


async def test_a_node_that_is_not_core_hands_its_records_to_core_members(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        s = Seams(store, eng)
        monkeypatch.setattr(eng, "is_core", lambda: False)
        doc = await s.signer.submit(eng, "contribution", WORK)
        await s.spawned.settle()
        assert [[r.id.hex() for r in recs] for recs in s.forwarded] == [[doc["id"]]]
    finally:
        await store.close()


async def test_an_internal_error_refuses_every_request_of_its_group(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        s = Seams(store, eng)

        async def broken(jobs: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(s.signer, "sign_and_store", broken)
        results = await asyncio.gather(*(s.signer.submit(eng, "contribution", WORK) for _ in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, LocalError) and "could not sign" in r.message for r in results)
    finally:
        await store.close()
