"""The vision surgical fine-tuning benchmark's --quick mode runs and writes sane, self-consistent JSON."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))


def test_vision_surgical_quick(tmp_path):
    committed = REPO / "benchmarks" / "results" / "vision_surgical.json"
    before = committed.read_bytes() if committed.exists() else None
    out = tmp_path / "vs.json"
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "vision_surgical.py"), "--quick", "--out", str(out)],
        env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO / "benchmarks",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert (committed.read_bytes() if committed.exists() else None) == before  # results are not touched
    r = json.loads(out.read_text())
    assert set(r["shifts"]) == {"noise", "blur", "rotation", "labels"}
    assert r["setup"]["splits"]["target_test"] == 447
    lrs = r["setup"]["finetune"]["lrs"]
    for shift in r["shifts"].values():
        assert set(shift["units"]) == {"block 1", "block 2", "block 3", "head", "all"}
        for u in shift["units"].values():
            val = {lr: statistics.mean(v) for lr, v in u["val_by_lr"].items()}
            assert set(val) == {f"{lr:g}" for lr in lrs}
            assert val[f"{u['lr']:g}"] == max(val.values())  # chosen on validation, never on test
            assert u["test"] == u["test_by_lr"][f"{u['lr']:g}"]
            assert all(0 <= a <= 1 for a in u["test"])
        for method in ("fim_layer", "rgn"):
            for agg in ("sum", "mean"):
                c = shift["criteria"][method][agg]
                assert len(c["picks"]) == r["setup"]["seeds"]
                for pick, scores in zip(c["picks"], c["scores"], strict=True):
                    assert pick == max(scores, key=scores.get)  # the top-scored unit
    # the relabelled classes leave the images alone: the source model's accuracy collapses
    assert statistics.mean(r["shifts"]["labels"]["before"]) < 0.2
    assert (tmp_path / "vs.png").read_bytes()[:4] == b"\x89PNG"
