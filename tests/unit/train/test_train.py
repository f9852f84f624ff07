"""prepare + training: only planned entries change, optimizer state is sparse, Trainer works."""

from __future__ import annotations

import copy

import pytest
import torch

import surgical as sg
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from surgical.train.loop import fit


def _train(model, batches, steps=6, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        loss = model(**batches[i % len(batches)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return opt


def _changed(before, after):
    return (before.reshape(-1) != after.reshape(-1)).nonzero().flatten()


def test_only_planned_entries_change_and_frozen_bits_identical(bert, batches):
    base = copy.deepcopy(bert)
    plan = sg.select(bert, batches, method="gradient", density=0.02, always=["classifier"], progress=False)
    sg.prepare(bert, plan)
    assert sg.trainable_count(bert) == plan.num_trainable
    opt = _train(bert, batches)
    sg.sync(bert)
    base_p = dict(base.named_parameters())
    for name, p in bert.named_parameters():
        if name.endswith("_sg_delta"):
            continue
        changed = _changed(base_p[name].detach(), p.detach())
        if name in plan.entries:
            assert set(changed.tolist()) <= set(plan.entries[name].tolist())
            assert changed.numel() > 0.9 * plan.entries[name].numel()
        elif name in plan.dense:
            assert changed.numel() > 0
        else:
            assert changed.numel() == 0, name  # bit-identical
    # optimizer state exists only for the k trained values and the dense head
    state_numel = sum(s["exp_avg"].numel() for s in opt.state.values())
    assert state_numel == plan.num_trainable
    assert all(p.grad is None for n, p in bert.named_parameters() if not p.requires_grad)


def test_extract_save_load_apply_is_bitwise_exact(bert, batches, tmp_path):
    plan = sg.select(bert, batches, method="gradient", density=0.05, always=["classifier"], progress=False)
    sg.prepare(bert, plan)
    _train(bert, batches)
    delta = sg.extract(bert)
    delta.save(tmp_path / "d")
    fresh = tiny_bert(seed=99)  # same architecture, other random weights everywhere...
    fresh.load_state_dict(tiny_bert(seed=0).state_dict())  # ...then the base's weights
    torch.nn.init.normal_(fresh.classifier.weight)  # and a different head
    sg.apply(fresh, sg.Delta.load(tmp_path / "d"))
    with torch.no_grad():
        for b in batches:
            x = {k: v for k, v in b.items() if k != "labels"}
            assert torch.equal(fresh(**x).logits, bert(**x).logits)
    sg.unprepare(bert)
    ref = dict(fresh.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in bert.named_parameters())


def test_apply_to_wrong_base_is_refused_unless_forced(bert, batches):
    plan = sg.select(bert, batches, method="gradient", density=0.05, always=["classifier"], progress=False)
    sg.prepare(bert, plan)
    _train(bert, batches, steps=2)
    delta = sg.extract(bert)
    other = tiny_bert(seed=5)
    with pytest.raises(sg.SurgicalError, match="is not the base the delta was trained on"):
        sg.apply(other, delta)
    sg.apply(other, delta, force=True)


def test_plan_for_another_model_is_refused(bert):
    plan = sg.select(tiny_llama(), method="random", density=0.1)
    with pytest.raises(sg.SurgicalError, match="does not have"):
        sg.prepare(bert, plan)


def test_causal_lm_with_tied_embeddings_trains(llama):
    data = lm_batches()
    plan = sg.select(llama, data, method="gradient", density=0.05, always=["norm"], progress=False)
    sg.prepare(llama, plan)
    first = llama(**data[0]).loss.item()
    _train(llama, data, steps=10, lr=3e-2)
    assert llama(**data[0]).loss.item() < first


def test_fit_reduces_loss(bert, batches):
    plan = sg.select(bert, batches, method="gradient", density=0.1, always=["classifier"], progress=False)
    sg.prepare(bert, plan)
    res = fit(bert, batches, epochs=5, lr=1e-2, show=False)
    assert res.steps == 20
    assert sum(res.losses[-4:]) < sum(res.losses[:4])


def test_hf_trainer_trains_only_the_plan(bert, batches, tmp_path):
    from transformers import Trainer, TrainingArguments

    base = copy.deepcopy(bert)
    plan = sg.select(bert, batches, method="gradient", density=0.05, always=["classifier"], progress=False)
    sg.prepare(bert, plan)
    rows = [
        {k: v[i] for k, v in b.items()} for b in cls_batches(4, batch=8) for i in range(b["labels"].numel())
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"),
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=bert, args=args, train_dataset=rows)
    trainer.train()
    n_opt = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert n_opt == plan.num_trainable
    delta = sg.extract(bert)
    assert delta.num_entries == plan.num_entries
    assert int((delta.entries[next(iter(delta.entries))][1] != 0).sum()) > 0
    fresh = copy.deepcopy(base)
    sg.apply(fresh, delta)
    sg.sync(bert)
    ref = dict(bert.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in fresh.named_parameters())


def test_rows_and_columns_in_a_plan_train_exactly_those(bert, batches):
    base = copy.deepcopy(bert)
    q, o = "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.output.dense.weight"
    plan = sg.Plan(
        rows={q: torch.tensor([1, 4])},
        cols={o: torch.tensor([0, 63])},
        shapes={q: (32, 32), o: (32, 64)},
        dense=["classifier.weight"],
    )
    plan.shapes["classifier.weight"] = (2, 32)
    assert plan.num_entries == 2 * 32 + 2 * 32
    sg.prepare(bert, plan)
    assert sg.trainable_count(bert) == plan.num_trainable
    _train(bert, batches, steps=3)
    sg.sync(bert)
    p, b = dict(bert.named_parameters()), dict(base.named_parameters())
    changed_q = (p[q] != b[q]).nonzero()[:, 0].unique().tolist()
    changed_o = (p[o] != b[o]).nonzero()[:, 1].unique().tolist()
    assert set(changed_q) <= {1, 4} and changed_q and set(changed_o) <= {0, 63} and changed_o
