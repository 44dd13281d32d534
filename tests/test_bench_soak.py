"""bench/soak.py runs schedules in worker processes and reports each size's count and
violations; bad options are refused with one sentence."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
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


def test_a_stopped_soak_still_reports_what_ran(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.Popen([sys.executable, str(SOAK), "--sizes", "4", "--seeds", "100000", "--workers", "1",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)  # a few dozen schedules at n = 4
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, stderr
    doc = json.loads(out.read_text())
    assert doc["stopped_early"] and doc["sizes"][0]["seeds"] > 0 and "interrupted" in stdout
