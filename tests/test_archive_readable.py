"""An archive's readable fields are only a view of its signed bytes (#16 finding 8): every
readable field of every kind of item, each record type's body included (the sharing
example plugin's too), edited in a real exported archive, is refused by `verify_archive`
naming the item and the field, in JSONL and CSV alike and through `import --check`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_engine import FOUNDER, NEWCOMER, T0, _engine

from valuemesh.node.archive import archive_csv, archive_jsonl, build_archive, read_archive, verify_archive
from valuemesh.node.daemon import installed_registry
from valuemesh.node.engine import Engine
from valuemesh.protocol.errors import ValuemeshError
from valuemesh.protocol.invite import Invite
from valuemesh.protocol.records import Record

RECORD_TYPES = ("membership", "contribution", "agreement", "revenue", "policy", "distribution", "sharing")
# Ops whose example would end the constellation (or the founder's membership) before the rest.
_ENDING = ("genesis", "dissolve", "leave")


async def _final(eng: Engine, count: int, now: int) -> None:
    for t in range(60):  # a single core member finalises alone; bounded
        await eng.tick(now + 10 * (t + 1))
        if eng.final_count >= count:
            break
    assert eng.final_count >= count
    await eng.settle()


async def _exported(path: Path) -> list[dict[str, Any]]:
    """Every example body of every installed record type, a revenue of 1500.00 and a
    contribution with every optional field, then a second core member joins (epoch 0 closes
    with a certified checkpoint); the archive the export route would send."""
    store, eng = await _engine(path)
    try:
        member = str(FOUNDER.member)
        bodies: list[tuple[str, dict[str, Any]]] = [
            ("revenue", {"op": "record", "amount": "1500.00", "currency": "EUR", "note": "bread for the fair"}),
            ("contribution", {"op": "record", "action": "work", "quantity": "3.5", "unit": "hour", "note": "kneading",
                              "period": {"start": 1, "end": 2}, "payback": "once", "provider": FOUNDER.member.key,
                              "evidence": {"uri": "receipt.pdf", "hash": bytes(range(32))}})]
        for name, plugin in sorted(eng.registry.plugins.items()):
            bodies += [(name, b) for b in plugin.examples() if b.get("op") not in _ENDING]
        assert member and {t for t, _ in bodies} == set(RECORD_TYPES)
        records = [Record.create(FOUNDER, type=t, v=eng.registry.plugins[t].version.major, constellation=eng.cid,
                                 seq=seq, body=b, created=T0 + seq) for seq, (t, b) in enumerate(bodies, start=1)]
        await eng.submit(records, T0 + 100)
        await _final(eng, 1 + len(records), T0 + 100)
        inv = Invite.create(FOUNDER, constellation=eng.cid, name="bakery", tier="core", roles=("producer",), uses=1,
                            expires=T0 + 3_600_000, addrs=(("127.0.0.1", 7300),), nonce=bytes(16))
        invite = Record.create(FOUNDER, type="membership", v=1, constellation=eng.cid, seq=len(records) + 1,
                               body={"op": "invite", "token": inv.raw()}, created=T0 + 2_000)
        await eng.submit([invite], T0 + 2_000)
        await _final(eng, 2 + len(records), T0 + 2_000)
        join = Record.create(NEWCOMER, type="membership", v=1, constellation=eng.cid, seq=0,
                             body={"op": "join", "token": inv.raw()}, created=T0 + 3_000)
        await eng.submit([join], T0 + 3_000)
        for t in range(60):
            await eng.tick(T0 + 3_000 + 100 * (t + 1))
            if eng.committee.epoch == 1:
                break
        await eng.settle()
        assert eng.committee.epoch == 1
        return await build_archive(store, eng, eng.registry)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    items = asyncio.run(_exported(tmp_path_factory.mktemp("archive") / "founder.sqlite"))
    assert [it["kind"] for it in items].count("checkpoint") == 1
    verify_archive(items, installed_registry())  # as exported, it verifies
    return items


def _leaves(value: Any, path: str) -> Iterator[str]:
    """Every readable field under `value`: scalars, and empty lists and objects."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path


def _steps(path: str) -> list[str | int]:
    out: list[str | int] = []
    for part in path.replace("]", "").split("."):
        name, *idx = part.split("[")
        out += [name, *(int(i) for i in idx)]
    return out


def _other_text(v: str) -> str:
    """`v` with its last letter or digit changed (a decimal stays a decimal, hex stays hex)."""
    at = max((i for i, ch in enumerate(v) if ch.isalnum()), default=-1)
    if at < 0:
        return v + "x"
    ch = v[at]
    new = str((int(ch) + 1) % 10) if ch.isdigit() else ("a" if ch != "a" else "b")
    return v[:at] + new + v[at + 1:]


def _edited(item: dict[str, Any], path: str) -> dict[str, Any]:
    """`item` with the field at `path` changed the way a forger would: a digit, a letter or
    a flag different, an empty value filled."""
    out = copy.deepcopy(item)
    *where, last = _steps(path)
    node: Any = out
    for step in where:
        node = node[step]
    v = node[last]
    if isinstance(v, bool):
        node[last] = not v
    elif isinstance(v, int):
        node[last] = v + 1
    elif isinstance(v, str):
        node[last] = _other_text(v)
    elif v is None:
        node[last] = "00" * 32
    elif isinstance(v, list):
        node[last] = ["x"]
    else:
        node[last] = {"x": 1}
    return out


def _refused(items: list[dict[str, Any]], *words: str) -> str:
    with pytest.raises(ValuemeshError) as info:
        verify_archive(items, installed_registry())
    message = info.value.message
    assert all(w in message for w in words) and "\n" not in message, (words, message)
    return message


@pytest.mark.parametrize("rtype", RECORD_TYPES)
def test_every_readable_field_of_every_record_type_is_checked(exported: list[dict[str, Any]], rtype: str) -> None:
    at = [i for i, it in enumerate(exported) if it["kind"] == "record" and it["type"] == rtype]
    assert at
    edited = 0
    for i in at:
        item = exported[i]
        for path in _leaves(item, ""):
            if path in ("kind", "raw"):  # (another kind of line; the signed bytes, checked by signature)
                continue
            changed = [*exported[:i], _edited(item, path), *exported[i + 1:]]
            _refused(changed, f"({item['id'][:12]})", f"field '{'type' if path == 'type' else path}'")
            edited += 1
        # A field added to the readable form, or one taken away.
        _refused([*exported[:i], {**item, "body": {**item["body"], "amount_due": "1"}}, *exported[i + 1:]],
                 f"({item['id'][:12]})", "field 'body.amount_due'")
        _refused([*exported[:i], {k: v for k, v in item.items() if k != "created"}, *exported[i + 1:]],
                 f"({item['id'][:12]})", "field 'created'")
    assert edited >= 10 * len(at) or rtype in ("distribution",), edited


def test_the_audit_s_edits_are_refused_in_jsonl_csv_and_by_import_check(
        exported: list[dict[str, Any]], tmp_path: Path) -> None:
    """Revenue 1500.00 made 15000.00, and a contribution's note, quantity and unit changed."""
    rev = next(i for i, it in enumerate(exported) if it["kind"] == "record" and it["type"] == "revenue"
               and it["body"].get("amount") == "1500.00")
    con = next(i for i, it in enumerate(exported) if it["kind"] == "record" and it["type"] == "contribution"
               and it["body"].get("note") == "kneading")
    edits = [(rev, "amount", "15000.00"), (con, "note", "kneading and baking"), (con, "quantity", "35"),
             (con, "unit", "day")]
    for at, field, value in edits:
        item = exported[at]
        changed = [*exported[:at], {**item, "body": {**item["body"], field: value}}, *exported[at + 1:]]
        for name, text in (("a.jsonl", "".join(archive_jsonl(changed))), ("a.csv", archive_csv(changed))):
            (tmp_path / name).write_text(text)
            _refused(read_archive(tmp_path / name), f"({item['id'][:12]})", f"field 'body.{field}'")
    # The CLI: exit 1 and one sentence naming the record and the field; nothing loaded.
    res = subprocess.run([sys.executable, "-m", "valuemesh.cli.main", "--home", str(tmp_path / "home"),
                          "import", "--check", str(tmp_path / "a.jsonl")], capture_output=True, text=True, timeout=120)
    err = res.stderr.strip()
    assert res.returncode == 1 and err.startswith("error: ") and "\n" not in err, (res.stdout, err)
    assert f"({exported[con]['id'][:12]})" in err and "field 'body.unit'" in err, err


@pytest.mark.parametrize("kind", ["archive", "block", "checkpoint", "end"])
def test_every_readable_field_of_headers_blocks_checkpoints_and_the_end_is_checked(
        exported: list[dict[str, Any]], kind: str) -> None:
    at = [i for i, it in enumerate(exported) if it["kind"] == kind]
    if kind == "block":  # a committed block with records, one without, and one outside the order
        carrying = [i for i in at if exported[i]["commit"] is not None
                    and len(base64.b64decode(exported[i]["raw"])) > 400]
        at = [carrying[0], next(i for i in at if i not in carrying)]
    for i in at:
        item = exported[i]
        for path in _leaves(item, ""):
            if path in ("kind", "raw", "genesis", "exported_at", "exported_by", "format", "v"):
                continue  # signed bytes; the exporter's own word; what makes it an archive at all
            changed = [*exported[:i], _edited(item, path), *exported[i + 1:]]
            message = _refused(changed)
            # A checkpoint's fields are what its signatures cover; the rest name the field.
            named = (f"'{path}'", "signature", "commit sequence", "state hash", "id the archive states",
                     "constellation id", "commit order", "checkpoint of epoch",
                 "member id")
            assert any(w in message for w in named), (path, message)
        _refused([*exported[:i], {**item, "note": "audited"}, *exported[i + 1:]], "field 'note'")


def test_a_csv_cell_a_kind_does_not_have_is_refused(exported: list[dict[str, Any]], tmp_path: Path) -> None:
    """A value put in a CSV column its kind of line has not (a block's `status`) is never silently dropped."""
    lines = archive_csv(exported).splitlines(keepends=True)
    at = next(n for n, line in enumerate(lines) if line.startswith("block,"))
    cells = lines[at].split(",")
    cells[11] = "applied"  # the status column
    (tmp_path / "a.csv").write_text("".join([*lines[:at], ",".join(cells), *lines[at + 1:]]))
    with pytest.raises(ValuemeshError, match=f"Line {at + 1} of the CSV archive has a status cell"):
        read_archive(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text(archive_csv(exported))
    assert read_archive(tmp_path / "b.csv") == exported
