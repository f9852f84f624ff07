"""A quantized frozen base (torchao int8): train entries beside it, extract, apply to the fp32 base."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import surgical as sg
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from surgical.core.tensors import is_quantized
from surgical.select.plan import Plan
from surgical.train.additive import AdditiveEntryState
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
    plan = sg.select(model, method="random", density=density, seed=0, progress=False)
    report = sg.quantize_base(model)
    return model, plan, report


def test_quantize_base_keeps_heads_and_shared_weights_and_shrinks_the_rest():
    model, _, report = _quantized()
    assert report.kept == ["lm_head.weight"]  # the LM head, tied to the embedding
    assert len(report.quantized) == 14 and Q in report.quantized
    assert is_quantized(model.get_parameter(Q)) and not is_quantized(model.lm_head.weight)
    assert report.bytes_after < 0.35 * report.bytes_before  # 1 byte per value plus row scales
    assert "quantized 14 Linear weights to int8 (torchao)" in report.summary()


def test_training_on_the_quantized_base_decreases_the_loss_and_the_delta_applies_to_fp32():
    model, plan, _ = _quantized()
    sg.prepare(model, plan)  # quantized weights: the additive path, chosen by itself
    states = [st for _, _, st in stateful_modules(model)]
    assert states and all(isinstance(st, AdditiveEntryState) for st in states)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    batches = lm_batches(n=4)
    result = sg.fit(model, batches, epochs=6, lr=3e-2, show=False)
    assert result.losses[-1] < result.losses[0] - 0.05
    delta = sg.extract(model)
    # the delta holds what training produced, at the planned entries
    for name, (idx, vals) in delta.entries.items():
        mname, _, _ = name.rpartition(".")
        assert torch.equal(idx, plan.entries[name].to(torch.int64))
        assert torch.equal(vals, model.get_submodule(mname).weight_sg_delta.detach())
    # it names the full-precision base, and applies to it exactly: base + delta at the entries
    base = assert_delta_applies_to_fp32(delta, plan, tiny_llama)
    # the fp32 model with the delta is close to the quantized one with it (int8 rounding apart)
    with torch.no_grad():
        lq, lf = model(**batches[0]).loss, base(**batches[0]).loss
    assert abs(float(lq) - float(lf)) < 0.02
    # saved and loaded, the same
    d2 = copy.deepcopy(delta)
    assert d2.num_entries == delta.num_entries


def test_resume_and_regrow_on_a_quantized_base(tmp_path):
    assert_quantized_resume_is_exact(_quantized, lm_batches(n=4), tmp_path)


def test_what_a_quantized_weight_cannot_do_is_refused_in_one_line():
    model, plan, _ = _quantized()
    dense = Plan(entries=dict(plan.entries), dense=[Q], shapes=dict(plan.shapes))
    dense.entries.pop(Q)
    with pytest.raises(sg.SurgicalError, match=f"'{Q}' cannot train densely: it is quantized") as e:
        sg.prepare(model, dense)
    assert "exclude" in str(e.value) and "\n" not in str(e.value)
    rows = Plan(rows={Q: torch.tensor([1, 2])}, shapes={Q: (64, 32)})
    with pytest.raises(sg.SurgicalError, match="on a quantized weight"):
        sg.prepare(model, rows)
    sg.prepare(model, plan)
    with pytest.raises(sg.SurgicalError, match="cannot unprepare"):
        sg.unprepare(model)
    delta = sg.extract(model)
    other, _, _ = _quantized()
    with pytest.raises(sg.SurgicalError, match="cannot apply a delta to .* stored as Int8Tensor"):
        sg.apply(other, delta)
    with pytest.raises(sg.SurgicalError, match="cannot quantize a prepared model"):
        sg.quantize_base(model)
    with pytest.raises(sg.SurgicalError, match="quantizes to 8, 4 bits here, not 16. Use bits: 8, 4"):
        sg.quantize_base(tiny_llama(), bits=16)
    with pytest.raises(sg.SurgicalError, match="unknown quantization backend 'gptq'"):
        sg.quantize_base(tiny_llama(), backend="gptq")


def test_exclude_keeps_weights_in_full_precision_for_dense_training():
    model = tiny_bert()
    batches = cls_batches()
    plan = sg.select(model, batches, method="gradient", density=0.05, always=["classifier", "pooler"],
                     progress=False)  # fmt: skip
    report = sg.quantize_base(model, exclude=["pooler"])
    assert "bert.pooler.dense.weight" in report.kept and "classifier.weight" in report.kept
    sg.prepare(model, plan)
    result = sg.fit(model, batches, epochs=3, lr=1e-2, show=False)
    assert result.losses[-1] < result.losses[0]
    assert "classifier.weight" in sg.extract(model).full


def test_a_missing_backend_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if absent
    with pytest.raises(sg.SurgicalError, match="quantization backend 'torchao' is not installed") as e:
        sg.quantize_base(tiny_llama())
    assert "pip install 'surgical[quant]'" in str(e.value)


def test_no_full_precision_copy_of_a_quantized_weight_is_kept_for_backward():
    """torchao's own linear saves the dequantized weight for the input gradient; prepared
    layers must not, or a quantized model would hold more than its fp32 base."""
    model, plan, _ = _quantized()
    sg.prepare(model, plan)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    shapes = {tuple(m.weight.shape) for m in linears if is_quantized(m.weight)}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    batch = lm_batches(n=1)[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    assert not [t for t in saved if tuple(t.shape) in shapes or tuple(t.shape[::-1]) in shapes]
    loss.backward()  # and the input gradients still flow: every layer's delta gets a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_quantized_path_gradients_equal_those_of_the_dequantized_weights():
    model, plan, _ = _quantized(density=0.2)
    sg.prepare(model, plan)
    assert_grads_match_dequantized(model, tiny_llama(), plan, lambda q: q.dequantize(), lm_batches(n=1)[0])


def test_selection_on_a_quantized_model_is_random_or_refused():
    model, plan, _ = _quantized()
    assert (
        sg.select(model, method="random", density=0.05, seed=0, progress=False).num_entries
        == plan.num_entries
    )
    with pytest.raises(sg.SurgicalError, match="criterion 'gradient' cannot score .* it is quantized"):
        sg.select(model, lm_batches(n=1), method="gradient", density=0.05, progress=False)
