"""The scoring-cost benchmark's --quick mode runs end to end and writes well-formed results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_select_cost_quick(tmp_path):
    out = tmp_path / "select_cost.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "select_cost.py"), "--quick", "--models", "tiny-llama"]
    p = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "time x" in p.stdout and "peak RSS" in p.stdout
    res = json.loads(out.read_text())
    assert res["quick"] is True and res["torch_threads"] == 1
    entry = res["results"]["tiny-llama"]
    assert entry["n"] == 2 and entry["reps"] == 1
    ft, score = entry["full_ft"], entry["score:gradient"]
    assert ft["seconds_median"] > 0 and ft["peak_rss_bytes_median"] > ft["rss_after_load_bytes_median"] * 0.99
    assert score["time_ratio"] == score["seconds_median"] / ft["seconds_median"]
    assert score["peak_rss_ratio"] == score["peak_rss_bytes_median"] / ft["peak_rss_bytes_median"]
    assert 0 < score["peak_rss_ratio"] < 2
