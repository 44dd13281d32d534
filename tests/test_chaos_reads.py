"""The chaos runner's reads of a node's database: one it cannot read (a full disk made SQLite
answer "disk I/O error" in a long run, and the runner crashed) is a finding naming the node
and SQLite's words, and the run goes on."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chaos/ is a folder of scripts, not installed

from chaos.bed import Host
from chaos.daemons import Node, Unreadable, db_bytes, final_count, read_db
from chaos.run import Runner, disk_mib, parse, percentile


def _db(path: Path, ids: list[bytes]) -> Path:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE final_records (constellation BLOB, commit_idx INTEGER, pos INTEGER, record_id BLOB)")
    con.executemany("INSERT INTO final_records VALUES (?, ?, ?, ?)", [(b"c", i, 0, r) for i, r in enumerate(ids)])
    con.commit()
    con.close()
    return path


def test_reads_of_a_good_database(tmp_path: Path) -> None:
    db = _db(tmp_path / "node.db", [b"\x01", b"\x02"])
    assert read_db(db) == ("ok", ["01", "02"])
    assert read_db(db, integrity=False) == ("", ["01", "02"])
    assert final_count(db) == 2
    assert db_bytes(db) == db.stat().st_size


@pytest.mark.parametrize("content", [b"", b"not a database, just bytes " * 200])
def test_an_unreadable_database_raises_one_error_kind(tmp_path: Path, content: bytes) -> None:
    db = tmp_path / "node.db"
    db.write_bytes(content)
    with pytest.raises(Unreadable, match="Error"):
        read_db(db)
    with pytest.raises(Unreadable):
        final_count(db)
    with pytest.raises(Unreadable):
        final_count(tmp_path / "missing.db")


def test_the_runner_reports_an_unreadable_database_and_goes_on(tmp_path: Path) -> None:
    runner = Runner(parse(["--workdir", str(tmp_path)]))
    home = tmp_path / "home0"
    home.mkdir()
    node = Node(Host(0, "vmchaos-test-n0", "10.213.0.1", "p0"), home)
    (home / "node.db").write_bytes(b"garbage " * 512)
    assert runner.snapshot(node, "kill 7") is None
    assert runner.final_count(node) == -1
    assert runner.checks == {"ok": 0, "failed": 0, "unreadable": 1}
    assert len(runner.findings) == 1  # once per node and error, however often it is asked
    assert runner.findings[0].startswith("n0 database unreadable (kill 7): DatabaseError")
    (home / "node.db").unlink()
    _db(home / "node.db", [b"\x07"])
    snap = runner.snapshot(node, "kill 8")
    assert snap is not None and snap.order == ("07",) and runner.checks["ok"] == 1


def test_the_disk_images_are_sized_from_the_time_budget() -> None:
    assert disk_mib(60) == 512 + int(2 * 0.2 * (3600 + 180))
    assert disk_mib(130) > disk_mib(60) > disk_mib(1) >= 512


def test_percentiles_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (50.0, 95.0, 100.0)
    assert percentile([], 95) == 0.0 and percentile([3.0], 95) == 3.0


def test_a_node_that_does_not_start_again_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    """A restart replays the whole store; at kill 160 of a long run one took over the 30 s the
    runner allowed, and the runner crashed with every figure of the run unchecked."""
    runner = Runner(parse(["--workdir", str(tmp_path)]))
    home = tmp_path / "home0"
    home.mkdir()
    node = Node(Host(0, "vmchaos-absent-n0", "10.213.0.1", "p0"), home)  # no such namespace: it cannot start
    _db(home / "node.db", [b"\x01"])
    assert runner.start(node, "kill 3") is False
    assert not node.alive and runner.startups == []
    assert len(runner.findings) == 1 and runner.findings[0].startswith("n0 did not start again after kill 3")
    assert "final count 1" in runner.findings[0]
