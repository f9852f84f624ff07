"""The TRL parity benchmark's --quick mode: surgical train and SFTTrainer end with the same delta."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("trl")


def test_trl_parity_quick(tmp_path):
    out = tmp_path / "p.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "trl_parity.py"), "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO / "benchmarks",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    r, lr = report["results"], report["setup"]["lr"]
    assert r["passed"] and r["same_batches"] and r["delta"]["same_support"] and r["delta"]["entries"] > 0
    assert r["delta"]["relative_l2"] <= r["tolerance"]["relative_l2"]
    assert r["delta"]["max_abs_diff"] <= r["tolerance"]["max_abs_diff_over_lr"] * lr
    assert r["losses"]["max_abs_diff"] < 1e-4 and len(r["losses"]["trl"]) == len(r["losses"]["surgical"])
