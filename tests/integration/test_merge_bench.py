"""The merge-cost and WiSE-FT benchmarks' --quick modes run and write sane, self-consistent JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))


def _run(script: str, out: Path) -> dict:
    committed = REPO / "benchmarks" / "results" / f"{Path(script).stem}.json"
    before = committed.read_bytes() if committed.exists() else None
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--out", str(out)],
        env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO / "benchmarks",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert (committed.read_bytes() if committed.exists() else None) == before  # results are not touched
    return json.loads(out.read_text())


def test_merge_cost_quick(tmp_path):
    r = _run("merge_cost.py", tmp_path / "mc.json")
    s = r["summary"]
    assert s["results_equal"] is True
    assert s["sparse_merge_seconds"] > 0 and s["dense_merge_seconds"] > 0 and s["dense_peak_mib"] >= 0
    assert 0 < r["runs"]["sparse"][0]["values"] < r["runs"]["dense"][0]["values"]  # sparse out


def test_wise_ft_quick(tmp_path):
    r = _run("wise_ft.py", tmp_path / "wf.json")
    assert set(r["runs"]) == {"full fine-tuning", "surgical (demo recipe)"}
    for run in r["runs"].values():
        alphas = [p["alpha"] for p in run["points"]]
        assert alphas == r["setup"]["alphas"]
        best = max(run["points"], key=lambda p: (p["validation"], p["alpha"]))
        assert run["chosen"] == best  # chosen on validation only
        assert all(0 <= p[k] <= 1 for p in run["points"] for k in ("validation", "id", "ood"))
    assert (tmp_path / "wf.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_quality_quick(tmp_path):
    r = _run("merge_quality.py", tmp_path / "mq.json")
    assert r["setup"]["quick"] is True and r["setup"]["complete"] is True and r["setup"]["seeds"] == [0]
    (point,) = r["points"]
    models = point["models"]
    merges = list(r["setup"]["merges"])
    assert list(models) == ["rt-expert", "imdb-expert", "multi-task", *merges, "task_arithmetic-val"]
    assert all(0 <= m[k] <= 1 for m in models.values() for k in ("rt", "imdb"))
    assert str(point["scale_chosen"]) in point["validation_by_scale"]  # chosen on validation only
    best = max(point["validation_by_scale"].values())
    assert point["validation_by_scale"][str(point["scale_chosen"])] == best
    assert set(point["merge_seconds"]) == set(merges) and point["entries"]["rt"] > 0
    inter = point["interference"]  # the recipe trains biases, LayerNorms and the head densely
    # nearly full: an attention key bias has a zero gradient in exact arithmetic (softmax ignores a
    # shift shared by a row's scores), so a few of its values may not move at all in one expert
    assert set(inter) == {"sparse", "dense"} and inter["dense"]["overlap"] > 0.999
    assert 0 <= inter["sparse"]["overlap"] < 1 and inter["sparse"]["tensors"] == 36  # 6 layers x 6 Linear
    s, rt, im = r["summary"]["ties"], models["rt-expert"]["rt"], models["imdb-expert"]["imdb"]
    want = (models["ties"]["rt"] / rt + models["ties"]["imdb"] / im) / 2
    assert abs(s["normalized"]["mean"] - want) < 1e-9 and s["normalized"]["std"] == 0
    assert abs(s["mean"]["mean"] - (models["ties"]["rt"] + models["ties"]["imdb"]) / 2) < 1e-9
    assert (tmp_path / "mq.png").read_bytes()[:4] == b"\x89PNG"
