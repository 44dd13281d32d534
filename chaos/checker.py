"""The history checker, Jepsen style: from the client's recorded operations and each node's
final order (read from its database after healing, and at every fault), find the anomalies.

Invariants: every acknowledged write (the API answered 202 with a record id) is final exactly
once; every node's final order is a prefix of one common order (equal once caught up); a
record a node held final at any snapshot is still final, at the same place, at the end; and
PRAGMA integrity_check answered "ok" on every database every time it was read.
Pure: no I/O, so tests/test_chaos_checker.py feeds it hand-made histories.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Op:
    """One client operation: a write submitted to `node`; result ok (acknowledged, with the
    record id the API answered), fail (refused: no effect) or unknown (no answer)."""

    index: int
    node: str
    invoke_s: float
    complete_s: float
    result: str
    record_id: str | None = None
    error: str = ""


@dataclass(frozen=True)
class Snapshot:
    """A node's final order as read at one moment (after a kill, after a fault)."""

    node: str
    at_s: float
    label: str
    order: tuple[str, ...]
    integrity: str = "ok"


@dataclass
class Verdict:
    anomalies: list[str] = field(default_factory=list)
    acknowledged: int = 0
    refused: int = 0
    unknown: int = 0
    unknown_final: int = 0
    final_len: int = 0
    lagging: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.anomalies


MAX_REPORTED = 20


def _prefix_mismatch(a: Sequence[str], b: Sequence[str]) -> int | None:
    """The first index where two orders differ (within the shorter), or None if one is a
    prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None


def check_orders(finals: Mapping[str, Sequence[str]], snapshots: Sequence[Snapshot] = ()) -> list[str]:
    """The invariants that hold at any moment, with or without the history: no record final
    twice, every order a prefix of the longest, snapshots prefixes of the node's later order,
    integrity ok."""
    out: list[str] = []
    for node, order in sorted(finals.items()):
        twice = [r for r, n in Counter(order).items() if n > 1]
        if twice:
            out.append(f"{node}: {len(twice)} record(s) final more than once, e.g. {twice[0][:16]}")
    if finals:
        longest_node = max(sorted(finals), key=lambda n: len(finals[n]))
        longest = finals[longest_node]
        for node, order in sorted(finals.items()):
            i = _prefix_mismatch(order, longest)
            if i is not None:
                out.append(f"{node} and {longest_node} disagree at final index {i}: "
                           f"{order[i][:16]} vs {longest[i][:16]}")
    for snap in snapshots:
        if snap.integrity != "ok":
            out.append(f"{snap.node} at {snap.at_s:.1f} s ({snap.label}): integrity_check said {snap.integrity!r}")
        later = finals.get(snap.node)
        if later is None:
            continue
        i = _prefix_mismatch(snap.order, later)
        if i is not None:
            out.append(f"{snap.node}: final index {i} was {snap.order[i][:16]} at {snap.at_s:.1f} s "
                       f"({snap.label}), later {later[i][:16]}")
        elif len(snap.order) > len(later):
            out.append(f"{snap.node}: {len(snap.order) - len(later)} record(s) final at {snap.at_s:.1f} s "
                       f"({snap.label}) are no longer final")
    return out


def check(history: Sequence[Op], finals: Mapping[str, Sequence[str]],
          snapshots: Sequence[Snapshot] = (), integrity: Mapping[str, str] | None = None) -> Verdict:
    """Every invariant over a finished run: `finals` are the nodes' final orders after healing
    and catching up, `integrity` each database's integrity_check answer at the end."""
    v = Verdict()
    v.anomalies.extend(check_orders(finals, snapshots))
    for node, answer in sorted((integrity or {}).items()):
        if answer != "ok":
            v.anomalies.append(f"{node} at the end: integrity_check said {answer!r}")
    longest = max(finals.values(), key=len, default=())
    v.final_len = len(longest)
    v.lagging = {n: len(longest) - len(o) for n, o in sorted(finals.items()) if len(o) < len(longest)}
    final_count = Counter(longest)
    lost: list[Op] = []
    seen_ids: set[str] = set()
    for op in history:
        if op.result == "ok":
            v.acknowledged += 1
            if op.record_id is None:
                v.anomalies.append(f"op {op.index} on {op.node}: acknowledged without a record id")
                continue
            if op.record_id in seen_ids:
                v.anomalies.append(f"op {op.index} on {op.node}: the API gave record id "
                                   f"{op.record_id[:16]} to two writes")
            seen_ids.add(op.record_id)
            if final_count[op.record_id] == 0:
                lost.append(op)
        elif op.result == "fail":
            v.refused += 1
        else:
            v.unknown += 1
            if op.record_id is not None and final_count[op.record_id]:
                v.unknown_final += 1
    for op in lost[:MAX_REPORTED]:
        v.anomalies.append(f"acknowledged write lost: op {op.index} on {op.node} at {op.complete_s:.1f} s, "
                           f"record {op.record_id}")
    if len(lost) > MAX_REPORTED:
        v.anomalies.append(f"… and {len(lost) - MAX_REPORTED} more acknowledged writes lost")
    return v
