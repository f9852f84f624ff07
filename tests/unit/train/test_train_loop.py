"""fit: resume equals an uninterrupted run, gradient accumulation, NaN stop, bf16, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

import surgical as sg
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from surgical.core.errors import SurgicalError
from surgical.train.checkpoint import checkpoints, latest_checkpoint
from surgical.train.hooks import TrainHook
from surgical.train.loop import fit
from surgical.train.schedules import LISA, Regrow

BATCHES = cls_batches(n=6)


def _prepared(density=0.1, seed=0):
    model = tiny_bert(seed)
    plan = sg.select(
        model, BATCHES, method="gradient", density=density, always=["classifier"], progress=False
    )
    sg.prepare(model, plan)
    return model


class _Interrupt(TrainHook):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, state):
        if state.step == self.at:
            raise KeyboardInterrupt


def _same(a, b):
    assert a.entries.keys() == b.entries.keys() and a.full.keys() == b.full.keys()
    for n, (i, v) in a.entries.items():
        assert torch.equal(i, b.entries[n][0]) and torch.equal(v, b.entries[n][1]), n
    for n, t in a.full.items():
        assert torch.equal(t, b.full[n]), n


def _schedule(name):
    return {"none": [], "regrow": [Regrow(every=2, fraction=0.2)], "lisa": [LISA(gamma=1, every=3)]}[name]


@pytest.mark.parametrize("schedule", ["none", "regrow", "lisa"])
def test_resume_after_interruption_is_bit_identical(tmp_path, schedule):
    ref = _prepared()
    whole = fit(ref, BATCHES, max_steps=9, lr=1e-2, show=False, hooks=_schedule(schedule))
    run = _prepared()
    with pytest.raises(KeyboardInterrupt):
        fit(run, BATCHES, max_steps=9, lr=1e-2, show=False, checkpoint_dir=tmp_path, checkpoint_every=2,
            hooks=[*_schedule(schedule), _Interrupt(5)])  # fmt: skip
    assert [p.name for p in checkpoints(tmp_path)] == ["step-4"]  # only the newest is kept
    (tmp_path / ".step-6.tmp-xyz").mkdir()  # what a kill during a save leaves: ignored
    again = _prepared()
    res = fit(again, BATCHES, max_steps=9, lr=1e-2, show=False, checkpoint_dir=tmp_path, checkpoint_every=2,
              resume=True, hooks=_schedule(schedule))  # fmt: skip
    assert res.resumed_from == 4 and res.steps == 9 and len(res.losses) == 5
    assert res.history == whole.history == whole.losses  # the checkpoint carried the first 4 losses
    _same(sg.extract(ref), sg.extract(again))
    assert latest_checkpoint(tmp_path).name == "step-9"


def test_grad_accumulation_matches_one_big_batch():
    big = [{k: torch.cat([b[k] for b in BATCHES[:2]]) for k in BATCHES[0]}]
    a, b = _prepared(), _prepared()
    fit(a, BATCHES[:2], max_steps=1, grad_accum=2, lr=1e-2, warmup=0, show=False)
    fit(b, big, max_steps=1, lr=1e-2, warmup=0, show=False)
    da, db = sg.extract(a), sg.extract(b)
    for n, (_, v) in da.entries.items():
        torch.testing.assert_close(v, db.entries[n][1], rtol=1e-4, atol=1e-6)
    res = fit(_prepared(), BATCHES, epochs=2, grad_accum=3, show=False)
    assert res.steps == 4  # 6 batches / 3 per step * 2 epochs


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    class Poison(TrainHook):
        def on_step_end(self, state):
            if state.step == 3:
                with torch.no_grad():
                    state.model.classifier.weight.fill_(float("nan"))

    model = _prepared()
    res = fit(model, BATCHES, max_steps=8, show=False, checkpoint_dir=tmp_path, checkpoint_every=2,
              hooks=[Poison()], on_nan="stop")  # fmt: skip
    assert res.stopped == "nan" and res.steps == 3
    assert [p.name for p in checkpoints(tmp_path)] == ["step-2"]  # no checkpoint after the bad step
    with pytest.raises(SurgicalError, match="the loss became NaN/inf at step 4"):  # the default
        fit(_prepared(), BATCHES, max_steps=8, show=False, hooks=[Poison()])


def _grads(model, batch, bf16=False, ckpt=False):
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["bf16", "checkpointing"])
def test_sparse_grads_equal_dense_grads_gathered(mode):
    """Under bf16 autocast or gradient checkpointing, the delta's grad is the dense grad at the entries."""
    batch = lm_batches(n=1)[0]
    base = tiny_llama()
    plan = sg.select(base, [batch], method="random", density=0.2, seed=3, progress=False)
    dense = copy.deepcopy(base)
    for p in dense.parameters():
        p.requires_grad_(False)
    for n in plan.entries:
        dense.get_parameter(n).requires_grad_(True)
    sg.prepare(base, plan)
    kw = {"bf16": mode == "bf16", "ckpt": mode == "checkpointing"}
    gs, gd = _grads(base, batch, **kw), _grads(dense, batch, **kw)
    for name, idx in plan.entries.items():
        got = gs[name.replace(".weight", ".weight_sg_delta")]
        want = gd[name].reshape(-1)[idx]
        if mode == "bf16":  # both in bf16 autocast; ours accumulates in fp32
            torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_on_before_step_sees_the_step_gradients_once_and_before_the_update():
    """The hook runs once per optimizer step, after every micro-batch's backward (the gradients
    are there) and before the step: a gradient it drops is not applied. A hook without the
    method (any object with TrainHook's others) still runs."""

    class Drop(TrainHook):
        def __init__(self, name):
            self.name, self.calls = name, []

        def on_before_step(self, state):
            p = dict(state.model.named_parameters())[self.name]
            self.calls.append((state.step, p.grad is not None))
            p.grad = None

    class Plain:  # duck-typed: no on_before_step
        def on_train_begin(self, state):
            pass

        def on_step_end(self, state):
            pass

    model = _prepared()
    name = "classifier.weight"
    before = dict(model.named_parameters())[name].detach().clone()
    hook = Drop(name)
    fit(
        model,
        BATCHES,
        max_steps=3,
        grad_accum=2,
        lr=1e-2,
        weight_decay=0.0,
        show=False,
        hooks=[hook, Plain()],
    )
    assert hook.calls == [(0, True), (1, True), (2, True)]
    assert torch.equal(dict(model.named_parameters())[name].detach(), before)  # never updated
    assert sg.extract(model).num_entries > 0


def test_a_sharded_freezer_keeps_requires_grad_and_returns_the_inactive():
    from surgical.train.schedules import set_active

    model = _prepared()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values())
    active = set(list(params)[:2])
    inactive = set_active(opt, params, active, keep_requires_grad=True)
    assert all(p.requires_grad for p in params.values())
    assert {id(p) for p in inactive} == {id(p) for n, p in params.items() if n not in active}
    set_active(opt, params, active)  # one process: requires_grad follows the active set
    assert {n for n, p in params.items() if p.requires_grad} == active
