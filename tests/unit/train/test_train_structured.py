"""Rows/columns as dense sub-blocks, whole layers via requires_grad: gradients and parity vs dense."""

from __future__ import annotations

import copy

import torch
from torch import nn

import surgical as sg
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from surgical.select.plan import Plan

BATCHES = cls_batches(n=3)


def _linear_weights(model):
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layer." in n]


def _block_plan(model, rows=None, cols=None, dense=()):
    rows, cols = rows or {}, cols or {}
    shapes = {n: tuple(model.get_parameter(n).shape) for n in [*rows, *cols, *dense]}
    return Plan(rows=rows, cols=cols, dense=list(dense), shapes=shapes, meta={"method": "manual"})


def test_row_and_column_grads_equal_dense_grads_gathered():
    model = tiny_llama()
    batch = lm_batches(n=1)[0]
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"
    rows, cols = torch.tensor([1, 5, 30]), torch.tensor([0, 7, 63])
    dense = copy.deepcopy(model)
    for n, p in dense.named_parameters():
        p.requires_grad_(n in (q, o))
    dense(**batch).loss.backward()
    sg.prepare(model, _block_plan(model, rows={q: rows}, cols={o: cols}))
    model(**batch).loss.backward()
    gq = model.get_submodule(q[: -len(".weight")]).weight_sg_delta.grad
    go = model.get_submodule(o[: -len(".weight")]).weight_sg_delta.grad
    assert gq.shape == (3, 32) and go.shape == (32, 3)
    torch.testing.assert_close(gq, dense.get_parameter(q).grad[rows], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(go, dense.get_parameter(o).grad[:, cols], rtol=1e-5, atol=1e-7)
    assert sg.trainable_count(model) == 3 * 32 + 32 * 3


def _adamw(model, steps=5):
    # no weight decay: ours decays the delta towards the base, dense training decays towards 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for i in range(steps):
        loss = model(**BATCHES[i % len(BATCHES)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_all_rows_train_like_dense_training_and_extract_exactly():
    """Full-density parity: every row of every encoder Linear == training those weights densely."""
    model = tiny_bert()
    base = copy.deepcopy(model)
    names = _linear_weights(model)
    dense = copy.deepcopy(model)
    for n, p in dense.named_parameters():
        p.requires_grad_(n in names or n.startswith("classifier"))
    rows = {n: torch.arange(model.get_parameter(n).shape[0]) for n in names}
    sg.prepare(model, _block_plan(model, rows=rows, dense=["classifier.weight", "classifier.bias"]))
    _adamw(model)
    _adamw(dense)
    sg.sync(model)
    for n in names:
        torch.testing.assert_close(model.get_parameter(n), dense.get_parameter(n), rtol=1e-5, atol=1e-6)
    delta = sg.extract(model)
    assert set(delta.rows) == set(names) and not delta.entries  # stored as rows, not expanded
    assert delta.num_block_values == sum(model.get_parameter(n).numel() for n in names)
    sg.apply(base, delta)
    trained = dict(model.named_parameters())
    for n, p in base.named_parameters():
        assert torch.equal(p, trained[n]), n  # bit-exact: base + delta computed the same way


def test_frozen_rows_stay_bit_identical_and_unprepare_keeps_training():
    model = tiny_bert()
    base = copy.deepcopy(model)
    w = _linear_weights(model)[0]
    sg.prepare(
        model,
        _block_plan(
            model, rows={w: torch.tensor([2, 9])}, cols={_linear_weights(model)[1]: torch.tensor([4])}
        ),
    )
    _adamw(model, steps=3)
    sg.unprepare(model)
    for n, p in model.named_parameters():
        changed = (p != base.get_parameter(n)).nonzero()
        if n == w:
            assert set(changed[:, 0].tolist()) == {2, 9}
        elif n == _linear_weights(model)[1]:
            assert set(changed[:, 1].tolist()) == {4}
        else:
            assert changed.numel() == 0, n


def test_backward_stops_below_the_lowest_trainable_layer():
    model = tiny_bert()
    top = [n for n, _ in model.named_parameters() if ".layer.1." in n or n.startswith("classifier")]
    sg.prepare(model, _block_plan(model, dense=top))
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = output[0].requires_grad if isinstance(output, tuple) else output.requires_grad

        return hook

    model.bert.encoder.layer[0].register_forward_hook(record("layer0"))
    model.bert.encoder.layer[1].register_forward_hook(record("layer1"))
    model.train()
    model(**BATCHES[0]).loss.backward()
    # nothing below layer 1 is in the graph: layer 0 keeps no activations for backward
    assert seen == {"layer0": False, "layer1": True}
    assert all(p.grad is None for n, p in model.named_parameters() if n not in top)


def test_embedding_token_rows_grads_equal_dense_grads_padding_included():
    model = tiny_bert()
    assert model.bert.embeddings.word_embeddings.padding_idx == 0
    batch = dict(BATCHES[0])
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][:, -3:] = 0  # padding positions: F.embedding gives their row no gradient
    name = "bert.embeddings.word_embeddings.weight"
    rows = torch.cat([torch.tensor([0]), torch.unique(batch["input_ids"][0])[1:5]])  # occurring tokens
    dense = copy.deepcopy(model)
    for n, p in dense.named_parameters():
        p.requires_grad_(n == name)
    dense(**batch).loss.backward()
    sg.prepare(model, _block_plan(model, rows={name: rows}))
    model(**batch).loss.backward()
    got = model.bert.embeddings.word_embeddings.weight_sg_delta.grad
    assert got.shape == (5, 32) and got[1:].abs().sum() > 0 and not got[0].any()
    torch.testing.assert_close(got, dense.get_parameter(name).grad[rows], rtol=1e-5, atol=1e-7)
