"""The quality benchmark's --quick mode runs end to end and writes a consistent report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _quality(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO / "benchmarks",
    )


def test_quality_quick(tmp_path):
    out, cache = tmp_path / "q.json", tmp_path / "runs"
    p = _quality(
        "--rows", "surgical-gradient-1pct", "--curves", "surgical-gradient-1pct", "--out", str(out),
        "--cache", str(cache),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    r = report["results"]
    row = r["surgical-gradient-1pct"]
    run = row["runs"][0]
    assert row["lr"] in row["lr_grid"] and 0 < run["trainable"] < 300_000
    assert all(0 <= run[k] <= 1 for k in ("validation", "id", "ood")) and run["artifact_kib"] > 0
    wf = r["surgical-gradient-1pct + wise-ft"]
    alphas = {float(a): v["validation"] for a, v in run["wise_ft"].items()}
    assert wf["alpha"] == max(alphas, key=lambda a: (alphas[a], a))  # chosen on validation only
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # the curve: its own run (same seed and lr), ID and OOD at every alpha; alpha 1 is the row's run
    curve = report["wise_ft_curves"]["surgical-gradient-1pct"]
    assert curve["lr"] == row["lr"] and curve["seeds"] == [0]
    assert list(curve["alphas"]) == ["0.5", "0.7", "0.9", "1.0"]
    assert all(set(v) == {"validation", "id", "ood"} for v in curve["alphas"].values())
    assert {k: curve["alphas"]["1.0"][k]["mean"] for k in ("id", "ood")} == {k: run[k] for k in ("id", "ood")}

    # --cached-only assembles the same report from the cache, trains nothing, lists what is missing
    again = tmp_path / "again.json"
    p = _quality(
        "--rows", "surgical-gradient-1pct,head", "--out", str(again), "--cache", str(cache), "--cached-only"
    )
    assert p.returncode == 0 and "not in the cache (left out): head" in p.stdout, p.stderr[-3000:]
    report = json.loads(again.read_text())
    assert (
        report["results"]["surgical-gradient-1pct"]
        == json.loads(out.read_text())["results"]["surgical-gradient-1pct"]
    )
    assert report["setup"]["missing_rows"] == ["head"] and not report["setup"]["complete"]
    assert len(list(cache.glob("*.json"))) == 2  # the row's run and its curve's, read back
    assert _quality("--cached-only", "--out", str(again)).returncode != 0  # needs --cache
    p = _quality("--rows", "head", "--curves", "full", "--out", str(again))
    assert p.returncode != 0 and "add them to --rows" in p.stderr
