"""extract: densely trained tensors become exact changes (task vectors); a new head stays whole."""

from __future__ import annotations

import copy

import torch

import surgical as sg
from conftest import cls_batches, tiny_bert


def _trained(new="auto"):
    model = tiny_bert()
    base = copy.deepcopy(model)
    always = ["classifier", "bias", "LayerNorm"]
    plan = sg.select(model, None, method="magnitude", density=0.05, always=always, progress=False)
    sg.prepare(model, plan, new=new)
    sg.fit(model, cls_batches(), lr=0.05, show=False)
    return model, base


def test_dense_trained_tensors_are_changes_and_the_head_is_whole():
    model, base = _trained()
    delta = sg.extract(model)
    assert set(delta.full) == {"classifier.weight", "classifier.bias"}
    assert delta.dense and all("bias" in n or "LayerNorm" in n for n in delta.dense)
    fresh = copy.deepcopy(base)
    sg.apply(fresh, delta)
    sg.sync(model)
    for n, p in fresh.named_parameters():  # bit for bit, float64 changes included
        assert torch.equal(p, dict(model.named_parameters())[n]), n


def test_a_saved_and_reloaded_change_still_applies_exactly(tmp_path):
    model, base = _trained()
    delta = sg.extract(model)
    delta.save(tmp_path / "d")
    again = sg.Delta.load(tmp_path / "d")
    for n, t in delta.dense.items():
        assert again.dense[n].dtype == t.dtype and torch.equal(again.dense[n], t)
    fresh = copy.deepcopy(base)
    sg.apply(fresh, again)
    sg.sync(model)
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in fresh.named_parameters())


def test_wise_ft_scales_every_change_and_keeps_the_head():
    model, base = _trained()
    delta = sg.extract(model)
    half = sg.merge([delta], "wise_ft", alpha=0.5)
    fresh = copy.deepcopy(base)
    sg.apply(fresh, half)
    trained = dict(model.named_parameters())
    for n, p in fresh.named_parameters():
        b = dict(base.named_parameters())[n]
        if n.startswith("classifier"):
            assert torch.equal(p, trained[n])
        elif n in delta.dense:
            assert torch.allclose(p, b + 0.5 * (trained[n] - b), atol=1e-6), n


def test_new_none_makes_every_dense_tensor_a_change():
    model, _ = _trained(new=None)
    assert not sg.extract(model).full
