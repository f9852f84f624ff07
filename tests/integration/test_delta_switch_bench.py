"""The delta-switch benchmark's --quick mode runs on a tiny random Llama and writes sane numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KEYS = {
    "model", "density", "entries_per_delta", "row_values_per_rows_delta", "forward_1x128_s", "switch_s",
    "switch_without_fingerprint_check_s", "switch_rows_deltas_s", "load_state_dict_s", "switch_over_forward",
    "switch_without_check_over_forward", "switch_rows_deltas_over_forward", "load_state_dict_over_forward",
    "repetitions", "threads", "note",
}  # fmt: skip


def test_delta_switch_quick(tmp_path):
    out = tmp_path / "switch.json"
    results = REPO / "benchmarks" / "results" / "delta_switch.json"
    before = results.read_bytes() if results.exists() else None
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "delta_switch.py"), "--quick", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data) == KEYS and data["model"] == "tiny random Llama (quick)"
    assert data["entries_per_delta"] > 0 and data["row_values_per_rows_delta"] > 0
    for key in (
        "switch_over_forward",
        "switch_without_check_over_forward",
        "switch_rows_deltas_over_forward",
    ):
        assert 0 < data[key] and math.isfinite(data[key]), key
    assert data["forward_1x128_s"] > 0 and data["load_state_dict_s"] > 0
    assert (results.read_bytes() if results.exists() else None) == before  # the real results are kept
