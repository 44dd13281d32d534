"""The chaos suite's history checker on hand-made histories: each anomaly is found, a clean
history passes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chaos/ is a folder of scripts, not installed

from chaos.checker import Op, Snapshot, check, check_orders


def ok(i: int, node: str, rid: str) -> Op:
    return Op(i, node, float(i), float(i) + 0.1, "ok", rid)


HISTORY = [ok(1, "n0", "a"), ok(2, "n1", "b"), Op(3, "n2", 3.0, 3.1, "fail", None, "connection refused"),
           ok(4, "n2", "c"), Op(5, "n0", 5.0, 10.0, "unknown", None, "timed out")]


def test_a_clean_history_passes() -> None:
    finals = {"n0": ["j", "a", "b", "c"], "n1": ["j", "a", "b", "c"], "n2": ["j", "a", "b", "c"]}
    snaps = [Snapshot("n1", 2.0, "kill 1", ("j", "a"))]
    v = check(HISTORY, finals, snaps, {"n0": "ok", "n1": "ok", "n2": "ok"})
    assert v.ok, v.anomalies
    assert (v.acknowledged, v.refused, v.unknown, v.final_len) == (3, 1, 1, 4)


def test_a_lagging_node_with_a_prefix_passes() -> None:
    v = check(HISTORY, {"n0": ["a", "b", "c"], "n1": ["a", "b"]})
    assert v.ok, v.anomalies
    assert v.lagging == {"n1": 1}


def test_a_lost_acknowledged_write_is_found() -> None:
    v = check(HISTORY, {"n0": ["a", "c"], "n1": ["a", "c"]})
    assert not v.ok
    assert any(a.startswith("acknowledged write lost: op 2 on n1") for a in v.anomalies)


def test_a_write_final_twice_is_found() -> None:
    v = check(HISTORY, {"n0": ["a", "b", "c", "b"], "n1": ["a", "b", "c", "b"]})
    assert any("final more than once" in a for a in v.anomalies)


def test_two_nodes_with_different_orders_are_found() -> None:
    v = check(HISTORY, {"n0": ["a", "b", "c"], "n1": ["a", "c", "b"]})
    assert any("disagree at final index 1" in a for a in v.anomalies)


def test_a_final_record_lost_after_a_kill_is_found() -> None:
    # n1 held a, b, c final when it was killed; after the restart it holds only a, b.
    snaps = [Snapshot("n1", 4.5, "kill 1", ("a", "b", "c"))]
    v = check(HISTORY, {"n0": ["a", "b", "c"], "n1": ["a", "b"]}, snaps)
    assert any("no longer final" in a for a in v.anomalies)


def test_a_final_record_replaced_after_a_kill_is_found() -> None:
    snaps = [Snapshot("n1", 4.5, "kill 1", ("a", "x"))]
    assert any("final index 1 was x" in a for a in check_orders({"n1": ["a", "b", "c"]}, snaps))


def test_a_failed_integrity_check_is_found() -> None:
    snaps = [Snapshot("n2", 1.0, "kill 3", ("a",), "*** in database main *** Page 7: btreeInitPage() error")]
    v = check(HISTORY, {"n0": ["a", "b", "c"], "n2": ["a", "b", "c"]}, snaps, {"n0": "ok", "n2": "malformed"})
    assert sum("integrity_check" in a for a in v.anomalies) == 2


def test_one_record_id_given_to_two_writes_is_found() -> None:
    v = check([ok(1, "n0", "a"), ok(2, "n1", "a")], {"n0": ["a"]})
    assert any("two writes" in a for a in v.anomalies)
