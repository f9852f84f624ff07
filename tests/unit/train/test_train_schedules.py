"""Dynamic schedules change the selection as specified: LISA, HFT, prune-and-regrow."""

from __future__ import annotations

import copy

import torch

import surgical as sg
from conftest import cls_batches, tiny_bert
from surgical.select.plan import Plan
from surgical.train.callback import SurgicalCallback
from surgical.train.hooks import TrainHook
from surgical.train.loop import fit
from surgical.train.schedules import HFT, LISA, Regrow

BATCHES = cls_batches(n=4)


def _layer_plan(model) -> Plan:
    """Every encoder weight and the head trained densely (what LISA samples from)."""
    names = [n for n, _ in model.named_parameters() if ".layer." in n or n.startswith("classifier")]
    shapes = {n: tuple(model.get_parameter(n).shape) for n in names}
    return Plan(shapes=shapes, dense=names, meta={"method": "layers"})


class _Record(TrainHook):
    """Records, after every step, which parameters train and how many optimizer state tensors exist."""

    def __init__(self):
        self.active, self.state_tensors, self.state_params = [], [], []

    def on_step_end(self, state):
        self.active.append({n for n, p in state.model.named_parameters() if p.requires_grad})
        st = state.optimizer.state
        self.state_tensors.append(
            sum(torch.is_tensor(v) and v.dim() > 0 for s in st.values() for v in s.values())
        )
        ids = {id(p) for p in st}
        self.state_params.append({n for n, p in state.model.named_parameters() if id(p) in ids})


def test_lisa_samples_gamma_layers_and_frees_optimizer_state():
    model = tiny_bert()
    sg.prepare(model, _layer_plan(model))
    lisa, rec = LISA(gamma=1, every=2, seed=0), _Record()
    fit(model, BATCHES, max_steps=8, show=False, hooks=[lisa, rec])
    layer_params = {n for n, _ in model.named_parameters() if ".layer.0." in n}
    per_layer = len(layer_params)  # both tiny layers have the same parameters
    head = {"classifier.weight", "classifier.bias"}
    layers_seen = set()
    for step, active in enumerate(rec.active, start=1):
        assert head <= active  # the head trains throughout
        layers = {n.split(".layer.")[1].split(".")[0] for n in active if ".layer." in n}
        assert len(layers) == 1 and len(active) == per_layer + 2
        layers_seen |= layers
        # after a resample (even steps) the state of the layer just switched off is gone: only
        # the active parameters hold Adam moments (exp_avg, exp_avg_sq)
        if step % 2 == 0:
            assert rec.state_params[step - 1] <= active
    assert layers_seen == {"0", "1"}  # both layers got their turn over 4 periods
    # records are taken after the schedule acted: steps 2-3, 4-5, 6-7 each share one sample
    assert (
        rec.active[1] == rec.active[2] and rec.active[3] == rec.active[4] and rec.active[5] == rec.active[6]
    )
    assert max(rec.state_tensors) <= 2 * (per_layer + 2)


def test_hft_trains_a_random_half_per_stage():
    model = tiny_bert()
    plan = sg.select(model, BATCHES, method="random", density=0.1, always=["classifier"], progress=False)
    sg.prepare(model, plan)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    hft, rec = HFT(every=3, seed=1), _Record()
    fit(model, BATCHES, max_steps=9, show=False, hooks=[hft, rec])
    # records are taken after the schedule acted: a new stage begins after steps 3 and 6
    stages = [rec.active[i] for i in (0, 2, 5)]
    assert rec.active[0] == rec.active[1] and rec.active[2] == rec.active[3] == rec.active[4]
    for s in stages:
        assert s <= trained and len(s) == len(trained) // 2
    assert len({frozenset(s) for s in stages}) > 1  # the half changes between stages


def test_regrow_drops_smallest_and_grows_by_gradient():
    model = tiny_bert()
    base = copy.deepcopy(model)
    plan = sg.select(model, BATCHES, method="random", density=0.1, seed=0, progress=False)
    sg.prepare(model, plan)
    name = next(iter(plan.entries))
    module = model.get_submodule(name.rsplit(".", 1)[0])
    st = module._sg_entries
    seen = {}

    class Spy(TrainHook):  # runs before Regrow's on_step_end at step 2: capture its inputs
        def on_step_end(self, state):
            if state.step == 2:
                seen["idx"] = st.indices(module).clone()
                seen["delta"] = st.delta(module).detach().clone()
                seen["grad"] = st.grad_acc.clone()

    regrow = Regrow(every=2, fraction=0.25)
    opt_box = {}

    class Grab(TrainHook):
        def on_step_end(self, state):
            opt_box["opt"] = state.optimizer

    fit(model, BATCHES, max_steps=2, show=False, hooks=[Spy(), regrow, Grab()])
    k = seen["idx"].numel()
    n = int(0.25 * k)
    new_idx = st.indices(module)
    assert new_idx.numel() == k and torch.equal(new_idx, torch.sort(new_idx).values)
    dropped_pos = torch.topk(seen["delta"].abs(), n, largest=False).indices
    kept = set(seen["idx"].tolist()) - set(seen["idx"][dropped_pos].tolist())
    score = seen["grad"].reshape(-1).abs().clone()
    score[list(kept)] = -1
    grown = set(torch.topk(score, n).indices.tolist())
    assert set(new_idx.tolist()) == kept | grown
    assert regrow.changes > 0
    # kept entries keep their delta, grown ones start at 0 with zero Adam moments
    pos = {int(i): j for j, i in enumerate(new_idx.tolist())}
    old_pos = {int(i): j for j, i in enumerate(seen["idx"].tolist())}
    d = st.delta(module).detach()
    exp_avg = opt_box["opt"].state[st.delta(module)]["exp_avg"]
    for i in kept:
        assert d[pos[i]] == seen["delta"][old_pos[i]]
    for i in grown - kept:
        assert d[pos[i]] == 0 and exp_avg[pos[i]] == 0
    # everything outside the new selection holds the exact base value
    sg.sync(model)
    w, w0 = module.weight.detach().reshape(-1), base.get_parameter(name).detach().reshape(-1)
    outside = torch.ones_like(w, dtype=torch.bool)
    outside[new_idx] = False
    assert torch.equal(w[outside], w0[outside])


def test_schedule_runs_inside_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_bert()
    plan = _layer_plan(model)
    sg.prepare(model, plan)
    rows = [{k: v[i] for k, v in b.items()} for b in BATCHES for i in range(len(b["labels"]))]
    lisa = LISA(gamma=1, every=2, seed=0)
    rec = _Record()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, learning_rate=1e-3,
        report_to=[], save_strategy="steps", save_steps=2, use_cpu=True, logging_strategy="no",
        save_only_model=True,
    )  # fmt: skip
    cb = SurgicalCallback(lisa, rec, save_delta=True)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[cb]).train()
    assert len(rec.active) == 4
    final = sg.Delta.load(tmp_path / "surgical-delta")
    mid = sg.Delta.load(tmp_path / "checkpoint-2" / "surgical-delta")
    assert (
        set(final.full) == {n for n, _ in model.named_parameters() if n in final.full} and final.num_full > 0
    )
    assert any(not torch.equal(final.full[n], mid.full[n]) for n in final.full)  # training went on
    for active in rec.active:
        layers = {n.split(".layer.")[1].split(".")[0] for n in active if ".layer." in n}
        assert len(layers) == 1
