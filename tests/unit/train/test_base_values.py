"""base_values: a prepared model runs as its base inside the context, exactly as trained after it."""

from __future__ import annotations

import copy

import torch

import surgical as sg
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama


def _trained(model, batches, **select):
    base = copy.deepcopy(model)
    sg.prepare(model, sg.select(model, batches, progress=False, **select))
    sg.fit(model, batches, lr=0.05, show=False)
    return base


def test_inside_the_context_the_model_is_its_base_and_after_it_the_trained_model():
    model = tiny_llama()
    batches = lm_batches()
    base = _trained(model, batches, method="magnitude", density=0.05, always=["norm"])
    x = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        tuned = model(**x).logits
        with sg.base_values(model):
            assert torch.equal(model(**x).logits, base(**x).logits)
        assert torch.equal(model(**x).logits, tuned)
        assert not torch.equal(tuned, base(**x).logits)


def test_rows_blocks_and_tied_rows_swap_back_too():
    model = tiny_bert()
    batches = cls_batches()
    base = _trained(model, batches, method="gradient", density=0.1, granularity="row", always=["classifier"])
    x = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad(), sg.base_values(model):
        ours = model(**x).logits
    assert torch.equal(ours[:, :0], base(**x).logits[:, :0])  # shapes agree
    encoder = {
        n: p for n, p in model.named_parameters() if "_sg_" not in n and not n.startswith("classifier")
    }
    with sg.base_values(model):
        assert all(torch.equal(p, dict(base.named_parameters())[n]) for n, p in encoder.items())


def test_fit_applies_the_batch_filter_to_every_batch_with_the_step():
    model = tiny_bert()
    sg.prepare(model, sg.select(model, None, method="magnitude", density=0.05, progress=False))
    seen = []

    def keep_half(m, batch, step):
        seen.append(step)
        return {k: v[: max(1, v.shape[0] // 2)] for k, v in batch.items()}

    result = sg.fit(model, cls_batches(n=4), lr=0.01, batch_filter=keep_half, show=False)
    assert seen == [0, 1, 2, 3] and result.steps == 4
    assert result.tokens == sum(
        b["input_ids"][: b["input_ids"].shape[0] // 2].numel() for b in cls_batches(n=4)
    )
