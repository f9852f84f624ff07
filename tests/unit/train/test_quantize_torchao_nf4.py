"""A torchao NF4 frozen base (``quantize_base(model, bits=4)``), the format FSDP2 can shard: train
entries beside it, extract, apply to the fp32 base; what cannot be sharded is refused in one line."""

from __future__ import annotations

import pytest
import torch

import surgical as sg
from conftest import lm_batches, tiny_llama
from surgical.core.tensors import dequantized, is_quantized
from surgical.train.additive import AdditiveEntryState
from surgical.train.distributed import _check_quantized
from surgical.train.quantize import nf4_scaler_block
from surgical.train.state import stateful_modules
from train_fixtures import (
    assert_delta_applies_to_fp32,
    assert_grads_match_dequantized,
    assert_quantized_resume_is_exact,
)

pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")

Q = "model.layers.0.mlp.up_proj.weight"


def _quantized(density=0.05):
    model = tiny_llama()
    plan = sg.select(model, lm_batches(n=2), method="gradient", density=density, seed=0, progress=False)
    report = sg.quantize_base(model, bits=4)
    return model, plan, report


def test_nf4_packs_two_values_per_byte_with_int8_block_scales():
    model, _, report = _quantized()
    assert report.bits == 4 and report.kept == ["lm_head.weight"] and len(report.quantized) == 14
    w = model.get_parameter(Q)
    assert is_quantized(w) and type(w).__name__ == "NF4Tensor" and tuple(w.shape) == (64, 32)
    assert w.quantized_data.numel() == 64 * 32 // 2 and w.quantized_data.dtype == torch.uint8
    assert w.quantized_scalers.dtype == torch.int8 and w.quantized_scalers.numel() == 64 * 32 // 64
    assert "quantized 14 Linear weights to NF4 (torchao)" in report.summary()
    numel = report.bytes_before // 4
    # half a byte per value and an int8 scale per block of 64, plus per tensor a few fp32 scales
    # and the 16 NF4 levels: under 0.6 bytes per value even at these tiny sizes
    assert numel // 2 + numel // 64 < report.bytes_after < 0.6 * numel
    # NF4: every value within half the widest step between NF4 levels (0.30) of its block's scale,
    # which is itself rounded to int8 (a relative error under 1%)
    ref = tiny_llama().get_parameter(Q).detach().reshape(-1, 64)
    err = (dequantized(w).reshape(-1, 64) - ref).abs().max(1).values
    assert torch.all(err <= 0.17 * ref.abs().max(1).values)


def test_the_scale_groups_divide_the_blocks_and_split_between_processes():
    assert nf4_scaler_block(4096 * 4096) == 256  # QLoRA's own grouping where it divides
    assert nf4_scaler_block(576 * 576) == 216  # SmolLM2-135M: 5,184 blocks, 24 scales
    assert nf4_scaler_block(576 * 1536) == 216  # 13,824 blocks, 64 scales
    for numel in (4096 * 4096, 576 * 576, 576 * 1536, 32 * 32, 64 * 32):
        blocks = numel // 64
        group = nf4_scaler_block(numel)
        assert blocks % group == 0 and (blocks // group) % 8 == 0 and group <= 256


def test_training_on_nf4_decreases_the_loss_and_the_delta_applies_to_fp32():
    model, plan, _ = _quantized()
    sg.prepare(model, plan)  # the additive path, chosen by itself for a quantized weight
    states = [st for _, _, st in stateful_modules(model)]
    assert states and all(isinstance(st, AdditiveEntryState) for st in states)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    batches = lm_batches(n=4)
    result = sg.fit(model, batches, epochs=6, lr=3e-2, show=False)
    assert result.losses[-1] < result.losses[0] - 0.05
    delta = sg.extract(model)
    assert delta.num_entries == plan.num_entries
    base = assert_delta_applies_to_fp32(delta, plan, tiny_llama)
    with torch.no_grad():  # the fp32 model with the delta is close to the NF4 one with it
        lq, lf = model(**batches[0]).loss, base(**batches[0]).loss
    assert abs(float(lq) - float(lf)) < 0.05


def test_nf4_path_gradients_equal_those_of_the_dequantized_weights():
    model, plan, _ = _quantized(density=0.2)
    sg.prepare(model, plan)
    assert_grads_match_dequantized(model, tiny_llama(), plan, dequantized, lm_batches(n=1)[0])


def test_no_full_precision_copy_of_an_nf4_weight_is_kept_for_backward():
    model, plan, _ = _quantized()
    sg.prepare(model, plan)
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    shapes -= {tuple(model.lm_head.weight.shape)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(**lm_batches(n=1)[0]).loss
    # layers without entries run torchao's own linear, which saves the NF4 weight itself (half a
    # byte per value); no dequantized (float) copy of any weight is kept
    dense = [t for t in saved if not is_quantized(t)]
    assert not [t for t in dense if tuple(t.shape) in shapes or tuple(t.shape[::-1]) in shapes]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_resume_and_regrow_on_a_torchao_nf4_base(tmp_path):
    assert_quantized_resume_is_exact(_quantized, lm_batches(n=4), tmp_path)


def test_what_fsdp2_cannot_split_and_an_nf4_weight_cannot_hold_is_refused_in_one_line():
    model, plan, _ = _quantized()
    sg.prepare(model, plan, additive=True)
    _check_quantized(model, 2)  # 2 processes: every NF4 weight splits (rows and 8 scales each)
    with pytest.raises(sg.SurgicalError, match=r"does not split evenly between 3 processes") as e:
        _check_quantized(model, 3)
    assert "quantization exclude" in str(e.value) and "\n" not in str(e.value)
    other, _, _ = _quantized()  # the weights cannot hold trained values: apply to the fp32 base
    with pytest.raises(sg.SurgicalError, match="cannot apply a delta to .* stored as NF4Tensor"):
        sg.apply(other, sg.extract(model))
    with pytest.raises(sg.SurgicalError, match="cannot unprepare"):
        sg.unprepare(model)
    int8 = tiny_llama()
    sg.quantize_base(int8)
    with pytest.raises(sg.SurgicalError, match="is quantized as Int8Tensor, which FSDP2 cannot shard"):
        _check_quantized(int8, 2)
    with pytest.raises(sg.SurgicalError, match="quantizes to 8, 4 bits here, not 2"):
        sg.quantize_base(tiny_llama(), bits=2)
