"""The training benchmark's --quick mode: every listed configuration runs and ratios come out right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from surgical.train import cpu_kernel

REPO = Path(__file__).resolve().parents[2]


def test_train_speed_quick(tmp_path):
    out = tmp_path / "speed.json"
    # a subset: each one is a fresh process
    configs = ["lora", "entries_1", "entries_lora", "rows_lora", "floor"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_speed.py"), "--quick", "--out", str(out),
         "--configs", *configs],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.read_text())
    res = data["results"]
    assert list(res) == configs and "bytes_per_entry_slope" in data
    assert "1 interleaved round(s)" in data["protocol"] and "load average" in data["protocol"]
    assert res["floor"]["trainable"] == 0 and res["floor"]["time_vs_floor"] == 1.0
    assert res["lora"]["time_vs_lora"] == 1.0
    # the LoRA-equivalent row plan trains about as many values as LoRA r=16 (rounding per tensor)
    assert abs(res["rows_lora"]["trainable"] - res["lora"]["trainable"]) < 0.05 * res["lora"]["trainable"]
    assert res["entries_1"]["bytes_above_floor_per_entry"] is not None
    # counted state: value, gradient, two Adam moments, int32 index, base value = 28 bytes per
    # entry, plus the CSR row pointers, which weigh a lot on this tiny model's short rows
    assert 28 <= res["entries_1"]["state_bytes_per_entry"] < 40
    # the JSON says which code computed the entry gradients
    kernel = "surgical CPU kernel" if cpu_kernel.compiler() else "torch.sparse.sampled_addmm"
    assert res["entries_1"]["entry_gradients"].startswith(kernel)
    # LoRA's count is over a quarter of this tiny model's Linear weights: no sampled product ran
    assert res["entries_lora"]["entry_gradients"].startswith("dense product + gather")
    assert "high-water mark over the training steps" in data["note"]
    # the live-memory pass (fixed mmap threshold) runs the entry configurations, floor and LoRA again
    live = data["live_memory"]
    assert set(live["peak_rss_gib"]) == {"floor", "entries_1", "entries_lora", "lora"}
    assert live["vs_lora"]["lora"] == 1.0 and live["bytes_per_entry_slope"] is not None
    assert live["malloc_mmap_threshold"] == 65536 and live["rounds"] == 1
    for r in res.values():
        assert r["step_s"] > 0 and r["peak_rss_gib"] > 0
