"""bench/soak.py runs schedules in worker processes and reports each size's count and
violations; bad options are refused with one sentence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def test_a_small_soak_reports_every_size(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    res = subprocess.run([sys.executable, str(SOAK), "--sizes", "4,5", "--seeds", "2", "--workers", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert [(s["nodes"], s["seeds"], s["violations"]) for s in doc["sizes"]] == [(4, 2, 0), (5, 2, 0)]
    assert "all 4 schedules" in res.stdout and "0 with a violation" in res.stdout


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(SOAK), "--sizes", "four"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "comma-separated integers" in res.stderr
