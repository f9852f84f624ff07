"""Deltas from two checkpoints and from PEFT LoRA adapters."""

from __future__ import annotations

import pytest
import torch

import surgical as sg
from conftest import cls_batches, tiny_bert


def _logits(model, batch):
    x = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**x).logits


def _perturbed(seed=0, scale=1e-3):
    ft = tiny_bert()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "encoder.layer.1" in name or "classifier" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return ft


def test_from_models_dense_reproduces_the_finetuned_model():
    base, ft = tiny_bert(), _perturbed()
    d = sg.Delta.from_models(base, ft)
    assert not d.entries and all("encoder.layer.1" in n or "classifier" in n for n in d.dense)
    sg.apply(base, d)
    ref = dict(ft.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in base.named_parameters())


def test_from_models_topk_keeps_the_largest_changes():
    base, ft = tiny_bert(), _perturbed()
    d = sg.Delta.from_models(base, ft, density=0.1)
    name = "bert.encoder.layer.1.output.dense.weight"
    diff = (ft.get_parameter(name) - base.get_parameter(name)).detach().reshape(-1)
    idx, vals = d.entries[name]
    assert idx.numel() == round(0.1 * diff.numel())
    assert torch.equal(vals, diff[idx])
    assert vals.abs().min() >= diff.abs().kthvalue(diff.numel() - idx.numel()).values


def test_from_models_new_head_is_stored_in_full():
    base = tiny_bert()
    ft = tiny_bert()
    ft.classifier = torch.nn.Linear(32, 5)
    d = sg.Delta.from_models(base, ft)
    assert set(d.full) == {"classifier.weight", "classifier.bias"} and d.shapes["classifier.weight"] == (
        5,
        32,
    )


def _lora(tmp_path, **kw):
    peft = pytest.importorskip("peft")
    model = tiny_bert()
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "dense"],
        modules_to_save=["classifier"],
        init_lora_weights=False,
        **kw,
    )
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    pm.save_pretrained(str(tmp_path / "lora"))
    return pm


@pytest.mark.parametrize(
    "kw", [{}, {"use_rslora": True, "rank_pattern": {"value": 2}, "alpha_pattern": {"query": 3}}]
)
def test_peft_lora_import_matches_the_merged_adapter(tmp_path, kw):
    pm = _lora(tmp_path, **kw)
    d = sg.Delta.from_peft_lora(tmp_path / "lora", base=tiny_bert())
    assert {"classifier.weight", "classifier.bias"} == set(d.full)
    assert "bert.encoder.layer.0.attention.self.query.weight" in d.dense
    ours = sg.apply(tiny_bert(), d)
    merged = pm.merge_and_unload()
    b = cls_batches(1)[0]
    torch.testing.assert_close(_logits(ours, b), _logits(merged, b), atol=1e-5, rtol=1e-5)
    with pytest.raises(sg.SurgicalError, match="not the base"):
        sg.apply(tiny_bert(seed=4), d)


def test_peft_lora_import_refuses_broken_dirs(tmp_path):
    with pytest.raises(sg.SurgicalError, match="is missing"):
        sg.Delta.from_peft_lora(tmp_path)
    _lora(tmp_path)
    (tmp_path / "lora" / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(sg.SurgicalError, match="corrupted"):
        sg.Delta.from_peft_lora(tmp_path / "lora")
