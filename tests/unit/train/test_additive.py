"""The additive entries path (weights that cannot be written: quantized, or sharded by FSDP2),
on plain weights with ``additive=True``: the same gradients, deltas and results as in place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgical as sg
from conftest import lm_batches, tiny_bert, tiny_llama
from surgical.select.plan import Plan
from surgical.train import LISA, shard, sparse
from surgical.train.additive import AdditiveEntryState, attach_additive
from surgical.train.state import state_of, stateful_modules
from train_fixtures import assert_resume_with_regrow_is_exact


@pytest.mark.parametrize("force_sampled", [True, False])
def test_delta_and_input_gradients_equal_the_dense_ones(force_sampled, monkeypatch):
    if force_sampled:
        monkeypatch.setattr(sparse, "DENSE_GATHER_DENSITY", 2.0)
    torch.manual_seed(0)
    dense = nn.Linear(16, 24)
    idx = torch.tensor([0, 3, 17, 100, 383])
    with torch.no_grad():
        dense.weight.view(-1)[idx] += torch.tensor([0.1, -0.2, 0.3, 0.05, -0.4])
    add = nn.Linear(16, 24)
    add.load_state_dict(dense.state_dict())
    delta = attach_additive(add, idx)
    with torch.no_grad():  # the base at the entries, the change in the delta
        add.weight.view(-1)[idx] -= torch.tensor([0.1, -0.2, 0.3, 0.05, -0.4])
        delta.copy_(torch.tensor([0.1, -0.2, 0.3, 0.05, -0.4]))
    x = torch.randn(2, 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = dense(x), add(x2)
    torch.testing.assert_close(y2, y)
    y.sin().sum().backward()
    y2.sin().sum().backward()
    torch.testing.assert_close(delta.grad, dense.weight.grad.reshape(-1)[idx])
    torch.testing.assert_close(x2.grad, x.grad)  # gy @ (W + D), with D added sparsely
    assert add.weight.grad is None and not add.weight.requires_grad


def _unchanged(base: nn.Module, model: nn.Module) -> bool:
    """Whether every parameter of ``base`` has the same values in ``model`` (deltas aside)."""
    params = dict(model.named_parameters())
    return all(torch.equal(p, params[n]) for n, p in base.named_parameters())


def _pair(density=0.05):
    a, b = tiny_llama(), tiny_llama()
    plan = sg.select(a, method="random", density=density, seed=0, progress=False)
    return a, b, plan


def test_additive_training_matches_in_place_training_and_names_the_same_base():
    a, b, plan = _pair()
    sg.prepare(a, plan)
    sg.prepare(b, plan, additive=True)
    assert all(not st.in_place for _, _, st in stateful_modules(b))
    ra = sg.fit(a, lm_batches(n=4), epochs=2, lr=1e-2, show=False)
    rb = sg.fit(b, lm_batches(n=4), epochs=2, lr=1e-2, show=False)
    assert rb.losses[-1] < rb.losses[0]
    torch.testing.assert_close(torch.tensor(rb.losses), torch.tensor(ra.losses), rtol=1e-5, atol=1e-6)
    da, db = sg.extract(a), sg.extract(b)
    assert db.meta["base"]["fingerprint"] == da.meta["base"]["fingerprint"]
    for name, (idx, vals) in da.entries.items():
        assert torch.equal(db.entries[name][0], idx)
        torch.testing.assert_close(db.entries[name][1], vals, rtol=1e-4, atol=1e-6)
    # the weights were never written; the delta applied to a fresh base reproduces the model
    base = tiny_llama()
    assert _unchanged(base, b)
    out = b(**lm_batches(n=1)[0]).logits
    sg.apply(base, db)
    torch.testing.assert_close(base(**lm_batches(n=1)[0]).logits, out, rtol=1e-5, atol=1e-5)


def test_base_values_leave_the_delta_out_and_unprepare_writes_it_in():
    a, b, plan = _pair()
    sg.prepare(b, plan, additive=True)
    sg.fit(b, lm_batches(n=2), epochs=1, lr=1e-2, show=False)
    batch = lm_batches(n=1)[0]
    trained = b(**batch).logits
    with sg.base_values(b):
        torch.testing.assert_close(b(**batch).logits, a(**batch).logits)
    torch.testing.assert_close(b(**batch).logits, trained)
    delta = sg.extract(b)
    sg.unprepare(b)
    sg.apply(a, delta)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n  # unprepare writes base + delta as apply does


def test_resume_and_regrow_give_the_uninterrupted_result(tmp_path):
    def prepared():
        m = tiny_llama()
        plan = sg.select(m, method="random", density=0.05, seed=0, progress=False)
        return sg.prepare(m, plan, additive=True)

    run = dict(max_steps=6, lr=1e-2, show=False, checkpoint_every=2)
    whole = assert_resume_with_regrow_is_exact(prepared, lm_batches(n=6), tmp_path, stop_at=5, **run)
    assert _unchanged(tiny_llama(), whole)  # entries moved, and the weights still hold the base


def test_a_frozen_delta_still_counts_in_the_forward_pass():
    """LISA freezes some deltas for a while: their trained values must stay in the model."""
    _, b, plan = _pair()
    sg.prepare(b, plan, additive=True)
    sg.fit(b, lm_batches(n=2), epochs=2, lr=1e-2, show=False)
    batch = lm_batches(n=1)[0]
    want = b(**batch).logits
    for p in b.parameters():
        p.requires_grad_(False)
    torch.testing.assert_close(b(**batch).logits, want)
    sg.fit(sg.prepare(tiny_llama(), plan, additive=True), lm_batches(n=2), epochs=1, lr=1e-2, show=False,
           hooks=[LISA(gamma=1, every=1)])  # fmt: skip


def test_additive_refuses_what_cannot_train_without_writing_the_weight():
    model = tiny_llama()
    rows = Plan(rows={"model.layers.0.mlp.up_proj.weight": torch.tensor([1, 2])},
                shapes={"model.layers.0.mlp.up_proj.weight": (64, 32)})  # fmt: skip
    with pytest.raises(sg.SurgicalError, match="rows of 'model.layers.0.mlp.up_proj.weight' cannot train"):
        sg.prepare(model, rows, additive=True)
    bert = tiny_bert()
    name = "bert.embeddings.word_embeddings.weight"
    emb = Plan(entries={name: torch.tensor([3, 40])}, shapes={name: (100, 32)})
    with pytest.raises(sg.SurgicalError, match="only entries of an unshared nn.Linear weight"):
        sg.prepare(bert, emb, additive=True)
    assert all(p.requires_grad for p in bert.parameters())  # refused before any change


def test_shard_needs_two_processes():
    model = sg.prepare(tiny_llama(), sg.select(tiny_llama(), method="random", density=0.05, progress=False),
                       additive=True)  # fmt: skip
    with pytest.raises(sg.SurgicalError, match="FSDP sharding needs at least 2 processes, this run has 1"):
        shard(model)
    assert isinstance(state_of(model.model.layers[0].mlp.up_proj), AdditiveEntryState)


def test_additive_bf16_autocast_gradients_follow_fp32():
    _, b, plan = _pair(density=0.2)
    sg.prepare(b, plan, additive=True)
    batch = lm_batches(n=1)[0]
    b(**batch).loss.backward()
    want = {n: p.grad.clone() for n, p in b.named_parameters() if p.requires_grad}
    b.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = b(**batch).loss
    loss.backward()
    for n, p in b.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32
            rel = (p.grad - want[n]).norm() / want[n].norm().clamp_min(1e-12)
            assert rel < 0.05, (n, float(rel))
