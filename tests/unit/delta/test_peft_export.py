"""Export to PEFT SHiRA: PeftModel.from_pretrained gives our outputs."""

from __future__ import annotations

import json

import pytest
import torch

import surgical as sg
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from surgical.delta.export import export_shira

peft = pytest.importorskip("peft")


def _logits(model, batch):
    x = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**x).logits


def _trained_delta(model, batches, density=0.05, always=(), granularity="entry"):
    plan = sg.select(
        model, batches, method="random", density=density, always=list(always), granularity=granularity,
        progress=False,
    )  # fmt: skip
    sg.prepare(model, plan)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for b in batches:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    delta = sg.extract(model)
    sg.unprepare(model)
    return delta


@pytest.mark.parametrize(
    ("kind", "granularity"), [("bert", "entry"), ("llama", "entry"), ("bert", "row"), ("llama", "column")]
)
def test_shira_export_loads_in_peft_and_matches(tmp_path, kind, granularity):
    """Rows and columns are exported as their entries."""
    make, batches = (tiny_bert, cls_batches()) if kind == "bert" else (tiny_llama, lm_batches())
    always = ["classifier"] if kind == "bert" else ["norm.weight"]
    delta = _trained_delta(make(), batches, always=always, granularity=granularity)
    assert bool(delta.rows or delta.cols) == (granularity != "entry")
    delta.save(tmp_path / "ours")
    export_shira(sg.Delta.load(tmp_path / "ours"), make(), tmp_path / "shira")
    cfg = json.loads((tmp_path / "shira" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SHIRA"
    loaded = peft.PeftModel.from_pretrained(make(), str(tmp_path / "shira")).eval()
    ours = sg.apply(make(), sg.Delta.load(tmp_path / "ours"))
    for b in batches[:2]:
        torch.testing.assert_close(_logits(loaded, b), _logits(ours, b), atol=1e-5, rtol=1e-5)
    merged = loaded.merge_and_unload()
    ref = dict(ours.named_parameters())
    for n, p in merged.named_parameters():
        torch.testing.assert_close(p, ref[n], atol=1e-6, rtol=0)


def test_shira_export_refuses_wrong_base(tmp_path):
    delta = _trained_delta(tiny_bert(), cls_batches(2), always=["classifier"])
    with pytest.raises(sg.SurgicalError, match="not the base"):
        export_shira(delta, tiny_bert(seed=3), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_shira_export_of_a_delta_whose_linears_all_have_dense_biases_is_a_clear_error(tmp_path):
    """As in the demo: every Linear's bias trains densely, so PEFT would save every module whole."""
    delta = _trained_delta(tiny_bert(), cls_batches(2), always=["classifier", "bias"])
    with pytest.raises(sg.SurgicalError, match="no Linear weight of this delta can become SHiRA"):
        export_shira(delta, tiny_bert(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
