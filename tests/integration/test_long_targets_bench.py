"""The long-targets benchmark's --quick mode (the forgetting benchmark's tiny Llama) writes a
consistent report: review loss, sentiment accuracy and forgetting for the token-selection rows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_long_targets_quick(tmp_path):
    out = tmp_path / "lt.json"
    rows = "all-tokens,random60,excess60-tuned-ref"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    script = str(REPO / "benchmarks" / "long_targets.py")
    p = subprocess.run(
        [sys.executable, script, "--quick", "--rows", rows, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO / "benchmarks",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    r = report["results"]
    assert report["setup"]["complete"] and list(r) == rows.split(",")
    base = report["base"]["test"]  # the first row's first run also measured the base
    assert math.isfinite(base["loss"]) and 0 <= base["accuracy"] <= 1
    plain, rand, tuned = (r[n]["runs"][0] for n in rows.split(","))
    for run in (plain, rand, tuned):
        assert 0 < run["test_loss"] < 20 and 0 <= run["test_accuracy"] <= 1
        assert run["validation"] == -run["validation_loss"]  # the lr choice minimises the loss
        assert run["steps"] == 4 and run["kl"] >= 0  # 16 reviews / 4
        # the same data and plan size: the rows differ only in which tokens train
        assert run["target_tokens"] == plain["target_tokens"] > 4 * 16
        assert run["trainable"] == plain["trainable"]
    assert plain["kl"] > 0 and plain["test_loss"] < base["loss"]  # the delta moved the model
    # dropping tokens changed the training: other deltas, other losses
    assert len({plain["test_loss"], rand["test_loss"], tuned["test_loss"]}) == 3
    assert tuned["reference_seconds"] > 0 and "reference_seconds" not in rand
    for name in ("random60", "excess60-tuned-ref"):
        assert r[name]["lr_from"] == "all-tokens" and r[name]["lr"] == r["all-tokens"]["lr"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
