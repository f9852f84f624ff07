"""The GPT-2 / Mixtral step-time benchmark's --quick mode runs and writes sane JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))


def test_module_speed_quick(tmp_path):
    committed = REPO / "benchmarks" / "results" / "module_speed.json"
    before = committed.read_bytes() if committed.exists() else None
    out = tmp_path / "ms.json"
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "module_speed.py"), "--quick", "--out", str(out)],
        env=ENV, capture_output=True, text=True, timeout=900, cwd=REPO / "benchmarks",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert (committed.read_bytes() if committed.exists() else None) == before  # results are not touched
    r = json.loads(out.read_text())
    assert {"torch", "transformers", "peft"} <= set(r["machine"])
    for model in ("gpt2", "mixtral"):
        res, budget = r["results"][model], r["budgets"][model]
        assert set(res) == {"full", "lora", "surgical_1", "surgical_lora"}
        for s in res.values():
            assert s["step_s"] > 0 and s["peak_rss_mib"] > 0 and s["steps_measured"] >= 1
            assert s["gradient_values_after_backward"] == s["trainable"]  # no gradient beyond the trained
        assert res["full"]["time_vs_full"] == 1.0 and res["lora"]["peak_vs_lora"] == 1.0
        assert res["lora"]["trainable"] == budget["lora_trainable"] == res["surgical_lora"]["trainable"]
        assert res["surgical_1"]["trainable"] == round(0.01 * budget["surgical_1"]["targeted"])
    gpt2 = r["results"]["gpt2"]
    assert set(gpt2["lora"]["lora_covers"]) == {
        "transformer.h.N.attn.c_attn", "transformer.h.N.attn.c_proj", "transformer.h.N.mlp.c_fc",
        "transformer.h.N.mlp.c_proj",
    }  # fmt: skip
    assert set(gpt2["surgical_1"]["paths"]) == {"Conv1D / Conv1DEntryState"}
    mix = r["results"]["mixtral"]
    assert "model.layers.N.mlp.experts.gate_up_proj" in mix["lora"]["lora_covers"]
    assert "model.layers.N.mlp.experts.down_proj" in mix["lora"]["lora_covers"]
    assert any(k.startswith("MixtralExperts / Generic") for k in mix["surgical_1"]["paths"])
