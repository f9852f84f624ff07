"""A 4-bit frozen base (bitsandbytes NF4, QLoRA's format): train entries beside it, extract, apply
to the fp32 base; what a packed 4-bit weight cannot do is refused in one line."""

from __future__ import annotations

import sys

import pytest
import torch

import surgical as sg
from conftest import lm_batches
from surgical.core.tensors import is_quantized, logical_shape
from surgical.train.additive import AdditiveEntryState
from surgical.train.state import stateful_modules
from train_fixtures import (
    assert_delta_applies_to_fp32,
    assert_grads_match_dequantized,
    assert_quantized_resume_is_exact,
)

bnb = pytest.importorskip("bitsandbytes", reason="the quant extra (bitsandbytes) is not installed")

Q = "model.layers.0.mlp.up_proj.weight"


def tiny_llama(seed: int = 0):
    """conftest's tiny Llama at width 64: rows of whole NF4 blocks (see surgical.train.quantize)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _quantized(density=0.05):
    model = tiny_llama()
    plan = sg.select(model, lm_batches(n=2), method="gradient", density=density, seed=0, progress=False)
    report = sg.quantize_base(model, backend="bnb")
    return model, plan, report


def _dequantized(w) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(w.data, w.quant_state)


def test_nf4_packs_two_values_per_byte_and_keeps_the_logical_shape():
    model, _, report = _quantized()
    assert report.bits == 4 and report.kept == ["lm_head.weight"] and len(report.quantized) == 14
    w = model.get_parameter(Q)
    assert is_quantized(w) and isinstance(model.get_submodule(Q[: -len(".weight")]), bnb.nn.Linear4bit)
    assert logical_shape(w) == (128, 64) and w.numel() == 128 * 64 // 2
    # half a byte per value, an 8-bit scale per block of 64 (double quantization, QLoRA's), and
    # per tensor the 16 NF4 levels, an offset, the scales' own 256 levels and one fp32 scale
    numel = report.bytes_before // 4
    assert report.bytes_after == numel // 2 + numel // 64 + 14 * (16 * 4 + 4 + 256 * 4 + 4)
    assert "quantized 14 Linear weights to NF4 (bnb)" in report.summary()
    # NF4: every value within half the widest step between NF4 levels (0.30) of its block's scale
    ref = tiny_llama().get_parameter(Q).detach().reshape(-1, 64)
    err = (_dequantized(w).reshape(-1, 64) - ref).abs().max(1).values
    assert torch.all(err <= 0.16 * ref.abs().max(1).values)
    # a width that is not a multiple of 64 stays in full precision (bitsandbytes' CPU kernel)
    from conftest import tiny_llama as narrow

    assert sg.quantize_base(narrow(), backend="bnb").quantized == [
        f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)
    ]


def test_training_on_nf4_decreases_the_loss_and_the_delta_applies_to_fp32():
    model, plan, _ = _quantized()
    sg.prepare(model, plan)  # the additive path, chosen by itself for a quantized weight
    states = [st for _, _, st in stateful_modules(model)]
    assert states and all(isinstance(st, AdditiveEntryState) for st in states)
    batches = lm_batches(n=4)
    result = sg.fit(model, batches, epochs=6, lr=3e-2, show=False)
    assert result.losses[-1] < result.losses[0] - 0.05
    delta = sg.extract(model)
    assert delta.num_entries == plan.num_entries
    # it names the full-precision base and applies to it: base + delta at the entries
    assert_delta_applies_to_fp32(delta, plan, tiny_llama)


def test_nf4_path_gradients_equal_those_of_the_dequantized_weights():
    model, plan, _ = _quantized(density=0.2)
    sg.prepare(model, plan)
    assert_grads_match_dequantized(model, tiny_llama(), plan, _dequantized, lm_batches(n=1)[0])


def test_resume_and_regrow_on_an_nf4_base(tmp_path):
    assert_quantized_resume_is_exact(_quantized, lm_batches(n=4), tmp_path)


def test_what_a_packed_weight_cannot_do_is_refused_in_one_line(monkeypatch):
    model, plan, _ = _quantized()
    # packed bytes have no entries to rank, not even at random: select before quantizing
    with pytest.raises(sg.SurgicalError, match=r"criterion 'random' cannot score .* \(Params4bit\)") as e:
        sg.select(model, method="random", density=0.05, progress=False)
    assert "Select on the full-precision model before surgical.quantize_base" in str(e.value)
    sg.prepare(model, plan)
    other, _, _ = _quantized()
    with pytest.raises(sg.SurgicalError, match="cannot apply a delta to .* stored as Params4bit"):
        sg.apply(other, sg.extract(model))
    with pytest.raises(sg.SurgicalError, match="backend 'bnb' quantizes to 4 bits here, not 8. Use bits: 4"):
        sg.quantize_base(tiny_llama(), backend="bnb", bits=8)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if absent
    with pytest.raises(sg.SurgicalError, match="quantization backend 'bnb' is not installed") as e:
        sg.quantize_base(tiny_llama(), backend="bnb")
    assert "pip install 'surgical[quant]' (bitsandbytes)" in str(e.value)
