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


def test_run_row_chooses_on_the_first_seed_or_on_the_mean_over_seeds():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    # lr 1e-3 wins seed 0 by a little and fails at seed 1; 1e-4 holds at both
    val = {(1e-4, 0): 0.80, (1e-4, 1): 0.78, (1e-3, 0): 0.81, (1e-3, 1): 0.50}
    calls = []

    def run(spec, lr, seed):
        calls.append((lr, seed))
        return {"validation": val[(lr, seed)], "seed": seed}

    spec = {"lrs": [1e-4, 1e-3]}
    first = quality.run_row(spec, {}, [0, 1], run, search=True)
    assert first["lr"] == 1e-3 and calls == [(1e-4, 0), (1e-3, 0), (1e-3, 1)]
    assert (
        first["lr_chosen_on"] == "validation at the first seed" and first["validation_by_lr"]["0.001"] == 0.81
    )
    calls.clear()
    mean = quality.run_row(spec, {}, [0, 1], run, search=True, choose="mean")
    assert mean["lr"] == 1e-4 and sorted(calls) == [(1e-4, 0), (1e-4, 1), (1e-3, 0), (1e-3, 1)]
    assert [r["seed"] for r in mean["runs"]] == [0, 1] and len(mean["grid_runs"]["0.001"]) == 2
    assert mean["validation_by_lr"]["0.001"] == (0.81 + 0.50) / 2
    calls.clear()  # one rate (from another row): nothing to choose, seeds in order
    one = quality.run_row(
        {**spec, "lr_from": "x"}, {"x": {"lr": 1e-3}}, [0, 1], run, search=True, choose="mean"
    )
    assert one["lr"] == 1e-3 and calls == [(1e-3, 0), (1e-3, 1)] and one["lr_from"] == "x"
