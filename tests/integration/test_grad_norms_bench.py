"""benchmarks/grad_norms.py --quick: one quality run retrained with its loss and gradient norm per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "grad_norms.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


def test_grad_norms_quick(tmp_path):
    out = tmp_path / "g.json"
    p = _run(tmp_path, "--quick", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    (r,) = json.loads(out.read_text())["results"]
    assert r["row"] == "surgical-random-1pct" and r["steps"] == 3  # 96 quick sentences / 32
    assert len(r["losses"]) == len(r["grad_norms"]) == 3
    assert all(n > 0 for n in r["grad_norms"]) and abs(r["grad_norm_max"] - max(r["grad_norms"])) < 1e-4


def test_bad_runs_are_one_line(tmp_path):
    for arg, needle in (("nope:1e-3:0", "unknown row 'nope'"), ("full:x:0", "ROW:LR:SEED")):
        p = _run(tmp_path, "--runs", arg, "--out", str(tmp_path / "x.json"))
        assert p.returncode != 0 and needle in p.stderr and "Traceback" not in p.stderr
