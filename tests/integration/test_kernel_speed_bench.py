"""benchmarks/kernel_speed.py --quick: every method timed, and bf16 operands give the bits of their
fp32 copies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from surgical.train import cpu_kernel

REPO = Path(__file__).resolve().parents[2]


def test_kernel_speed_quick(tmp_path):
    if cpu_kernel.library() is None:
        pytest.skip("no C++ compiler here")
    out = tmp_path / "k.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernel_speed.py"), "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"1 thread, 64 tokens", "2 threads, 64 tokens"}
    for r in report["results"].values():
        assert set(r["ms"]) == {"kernel", "sampled_addmm", "kernel_bf16", "upcast_kernel"}
        assert all(v > 0 for v in r["ms"].values()) and r["bf16_bits_equal_upcast"] is True
        assert r["bf16_vs_upcast"] == r["ms"]["kernel_bf16"] / r["ms"]["upcast_kernel"]
