"""The default recipe (unset selection.targets / always, training.lr) is the benchmarks' rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import tiny_bert, tiny_llama
from surgical.core.patterns import matches
from surgical.recipes.defaults import DEFAULT_DENSITY, DEFAULT_LR, ROWS, default_always, default_targets

BENCH = Path(__file__).resolve().parents[3] / "benchmarks"


def _targeted(model, patterns):
    return {n for n, _ in model.named_parameters() if any(matches(n, p) for p in patterns)}


def test_causal_lm_defaults_are_the_forgetting_benchmarks_surgical_rows():
    sys.path.insert(0, str(BENCH))
    import forgetting

    model = tiny_llama()
    assert default_always(model, "causal_lm") == ["model.norm"]  # the final norm only
    assert _targeted(model, default_targets(model)) == _targeted(model, [forgetting.BLOCK_LINEARS])
    row = forgetting.row_specs()["surgical-gradient-1pct"]
    assert DEFAULT_LR["causal_lm"] == row["lrs"][0] and DEFAULT_DENSITY["causal_lm"] == 0.01


def test_classification_defaults_are_the_quality_benchmarks_surgical_rows():
    sys.path.insert(0, str(BENCH))
    import quality

    model = tiny_bert()
    always = default_always(model, "classification")
    assert always == quality.ALWAYS  # classifier, bias, LayerNorm
    dense = _targeted(model, always)
    # the benchmark's targets minus what trains densely anyway (its pattern also matches norms)
    assert _targeted(model, default_targets(model)) == _targeted(model, [quality.LAYER_LINEARS]) - dense
    row = quality.row_specs()[ROWS["classification"]]  # the best gradient row on validation
    assert row["method"] == "gradient" and DEFAULT_DENSITY["classification"] == row["density"]
    report = json.loads((BENCH / "results" / "quality.json").read_text())["results"]
    assert DEFAULT_LR["classification"] == report[ROWS["classification"]]["lr"]  # chosen on validation
    gradient_rows = [
        n
        for n, r in report.items()
        if "wise-ft" not in n and quality.row_specs().get(n, {}).get("method") == "gradient"
    ]
    best = max(gradient_rows, key=lambda n: report[n]["summary"]["validation"]["mean"])
    assert best == ROWS["classification"]


def test_gpt2_conv1d_blocks_and_models_without_blocks():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    targets = _targeted(gpt2, default_targets(gpt2))
    assert "transformer.h.0.attn.c_attn.weight" in targets and "transformer.h.1.mlp.c_proj.weight" in targets
    assert not any("ln_" in n or "wte" in n for n in targets)
    assert default_always(gpt2, "causal_lm") == ["transformer.ln_f"]
    torch = pytest.importorskip("torch")
    flat = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert default_targets(flat) == []  # no numbered blocks: every Linear weight
