"""Token rows of an embedding tied to the LM head: one block, two gradient paths, saved once."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import surgical as sg
from conftest import lm_batches, tiny_llama
from surgical.core.errors import SurgicalError
from surgical.select.plan import Plan
from surgical.train.checkpoint import checkpoints
from surgical.train.hooks import TrainHook
from surgical.train.loop import fit

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
BATCHES = lm_batches(n=4)
VOCAB, DIM = 100, 32


def _rows() -> torch.Tensor:
    """Tokens that occur in the first batch and tokens that occur in no batch."""
    seen = torch.unique(torch.cat([b["input_ids"].reshape(-1) for b in BATCHES]))
    absent = [t for t in range(VOCAB) if t not in set(seen.tolist())][:2]
    present = torch.unique(BATCHES[0]["input_ids"])[:4].tolist()
    assert absent, "the fixture batches use every token"
    return torch.tensor(sorted(present + absent))


def _plan(rows: torch.Tensor, name: str = EMB) -> Plan:
    return Plan(rows={name: rows}, shapes={name: (VOCAB, DIM)}, meta={"method": "manual"})


def _prepared(name: str = EMB, seed: int = 0):
    model = tiny_llama(seed)
    sg.prepare(model, _plan(_rows(), name))
    return model


def _block(model) -> torch.nn.Parameter:
    return model.model.embed_tokens.weight_sg_delta


@pytest.mark.parametrize("name", [EMB, HEAD])
def test_block_grad_is_the_dense_tied_grad_at_the_rows(name):
    rows = _rows()
    dense = tiny_llama()
    for n, p in dense.named_parameters():
        p.requires_grad_(n == EMB)
    dense(**BATCHES[0]).loss.backward()
    model = _prepared(name)
    model(**BATCHES[0]).loss.backward()
    got = _block(model).grad
    want = dense.get_parameter(EMB).grad[rows]
    assert got.shape == (len(rows), DIM)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # rows absent from the batch still get the head's gradient (their logits), and only that
    assert got.abs().sum(1).min() > 0
    # memory floor: the shared weight is frozen, one (r, dim) parameter trains, reported once
    trainable = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [("model.embed_tokens.weight_sg_delta", (len(rows), DIM))]
    assert model.lm_head.weight.grad is None and model.lm_head.weight is model.model.embed_tokens.weight


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.shapes.append((str(func), tuple(o.shape)))
        return out


def test_backward_forms_no_vocab_by_dim_tensor():
    """Neither the lookup's nor the head's backward makes a dense weight gradient (dense does)."""
    found = {}
    for kind in ("dense", "rows"):
        model = tiny_llama()
        if kind == "rows":
            sg.prepare(model, _plan(_rows()))
        else:
            for n, p in model.named_parameters():
                p.requires_grad_(n == EMB)
        loss = model(**BATCHES[0]).loss
        with _Shapes() as rec:
            loss.backward()
        found[kind] = [f for f, s in rec.shapes if s == (VOCAB, DIM)]
    assert found["dense"] and found["rows"] == []


def _sgd(model, steps: int = 4, mask: torch.Tensor | None = None) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for i in range(steps):
        opt.zero_grad()
        model(**BATCHES[i % len(BATCHES)]).loss.backward()
        if mask is not None:  # the reference: the dense tied weight trained only at the rows
            model.get_parameter(EMB).grad.mul_(mask)
        opt.step()


def test_training_equals_masked_dense_training_and_frozen_rows_stay_bit_identical():
    rows = _rows()
    base = tiny_llama()
    ref = tiny_llama()
    for n, p in ref.named_parameters():
        p.requires_grad_(n == EMB)
    mask = torch.zeros(VOCAB, 1)
    mask[rows] = 1.0
    _sgd(ref, mask=mask)
    model = _prepared()
    _sgd(model)
    sg.sync(model)
    w, w0 = model.get_parameter(EMB), base.get_parameter(EMB)
    torch.testing.assert_close(w, ref.get_parameter(EMB), rtol=1e-5, atol=1e-6)
    frozen = torch.ones(VOCAB, dtype=torch.bool)
    frozen[rows] = False
    assert torch.equal(w[frozen], w0[frozen]) and not torch.equal(w[rows], w0[rows])
    logits = model(**BATCHES[1]).logits  # both forwards read the same synced weight
    torch.testing.assert_close(logits, ref(**BATCHES[1]).logits, rtol=1e-4, atol=1e-5)


def test_extract_apply_and_unprepare_reproduce_the_trained_model_bit_for_bit(tmp_path):
    model = _prepared(HEAD)  # the LM head's name works too: it is the same parameter
    fit(model, BATCHES, max_steps=3, lr=1e-2, grad_accum=2, show=False)
    delta = sg.extract(model)
    assert list(delta.shapes) == [EMB] and list(delta.rows) == [EMB]  # the shared weight, once
    sel, block = delta.rows[EMB]
    assert sel.tolist() == sorted(_rows()) and tuple(block.shape) == (len(_rows()), DIM)
    delta.save(tmp_path / "d")
    sg.unprepare(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie intact
    assert not hasattr(model.lm_head, "_sg_entries") and not hasattr(model.model.embed_tokens, "_sg_entries")
    fresh = tiny_llama()
    sg.apply(fresh, sg.Delta.load(tmp_path / "d"))
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    trained = dict(model.named_parameters())
    for n, p in fresh.named_parameters():
        assert torch.equal(p, trained[n]), n
    assert torch.equal(fresh(**BATCHES[0]).logits, model(**BATCHES[0]).logits)


def test_bf16_autocast_and_accumulation_train_only_the_rows():
    rows = _rows()
    base = tiny_llama()
    model = _prepared()
    res = fit(model, BATCHES, max_steps=2, lr=1e-2, grad_accum=2, bf16=True, show=False)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert _block(model).dtype == torch.float32
    sg.unprepare(model)
    changed = (model.get_parameter(EMB) != base.get_parameter(EMB)).any(1).nonzero().flatten()
    assert set(changed.tolist()) <= set(rows.tolist()) and changed.numel() > 0
    for n, p in model.named_parameters():
        if n != EMB:
            assert torch.equal(p, base.get_parameter(n)), n


class _Interrupt(TrainHook):
    def on_step_end(self, state):
        if state.step == 3:
            raise KeyboardInterrupt


def test_resume_equals_an_uninterrupted_run(tmp_path):
    ref = _prepared()
    fit(ref, BATCHES, max_steps=5, lr=1e-2, show=False)
    run = _prepared()
    with pytest.raises(KeyboardInterrupt):
        fit(run, BATCHES, max_steps=5, lr=1e-2, show=False, checkpoint_dir=tmp_path, checkpoint_every=2,
            hooks=[_Interrupt()])  # fmt: skip
    assert [p.name for p in checkpoints(tmp_path)] == ["step-2"]
    again = _prepared()
    res = fit(again, BATCHES, max_steps=5, lr=1e-2, show=False, checkpoint_dir=tmp_path, resume=True)
    assert res.resumed_from == 2
    (i, v), (j, w) = sg.extract(ref).rows[EMB], sg.extract(again).rows[EMB]
    assert torch.equal(i, j) and torch.equal(v, w)
    other = tiny_llama()  # the same number of rows, but other ones: the values would be meaningless
    sg.prepare(other, _plan(_rows() + 1))
    with pytest.raises(SurgicalError, match="selection was"):  # the run identity names the change
        fit(other, BATCHES, max_steps=5, lr=1e-2, show=False, checkpoint_dir=tmp_path, resume=True)


def test_other_sparse_kinds_and_double_naming_of_a_tied_weight_are_refused():
    model = tiny_llama()
    entries = Plan(entries={EMB: torch.tensor([0, 5])}, shapes={EMB: (VOCAB, DIM)})
    with pytest.raises(SurgicalError, match="shared by 2 modules"):
        sg.prepare(model, entries)
    both = Plan(rows={EMB: torch.tensor([1])}, dense=[HEAD], shapes={EMB: (VOCAB, DIM), HEAD: (VOCAB, DIM)})
    with pytest.raises(SurgicalError, match="twice"):
        sg.prepare(model, both)
    assert getattr(model, "_sg_prepared", None) is None  # refused before anything changed
    dense = Plan(dense=[HEAD], shapes={HEAD: (VOCAB, DIM)})  # the other name, trained densely
    sg.prepare(model, dense)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [EMB]


def test_state_dict_after_a_step_holds_the_trained_rows_under_both_names():
    model = _prepared()
    before = copy.deepcopy(model.state_dict())
    _sgd(model, steps=1)
    sd = model.state_dict()  # the pre-hook syncs before anything reads the weight
    rows = _rows()
    assert torch.equal(sd[EMB], sd[HEAD])
    assert not torch.equal(sd[EMB][rows], before[EMB][rows])


def test_row_selection_targets_the_tied_embedding_by_gradient():
    model = tiny_llama()
    plan = sg.select(
        model, BATCHES, method="gradient", granularity="row", targets=["embed_tokens", "q_proj"],
        count=5 * DIM, allocation="per_tensor", max_batches=2, progress=False,
    )  # fmt: skip
    assert EMB in plan.rows and HEAD not in plan.rows and plan.shapes[EMB] == (VOCAB, DIM)
    dense = tiny_llama()  # the same score by hand: |dense tied gradient| summed per row
    for n, p in dense.named_parameters():
        p.requires_grad_(n == EMB)
    score = torch.zeros(VOCAB, DIM)
    for b in BATCHES[:2]:
        dense(**b).loss.backward()
        score += dense.get_parameter(EMB).grad.abs()
        dense.zero_grad()
    want = torch.topk(score.sum(1), len(plan.rows[EMB])).indices.sort().values
    assert torch.equal(plan.rows[EMB], want)
    sg.prepare(model, plan)
    fit(model, BATCHES, max_steps=2, lr=1e-2, show=False)
    assert sg.extract(model).num_block_values == plan.num_entries
    with pytest.raises(SurgicalError, match="matches no nn.Linear weight"):
        sg.select(model, BATCHES, method="random", targets=["embed_tokens"], count=10)


def test_hf_trainer_trains_the_one_block(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _prepared(HEAD)
    base = tiny_llama()
    rows = [{k: v[i] for k, v in b.items()} for b in BATCHES for i in range(len(b["input_ids"]))]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    shapes = [tuple(p.shape) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert shapes == [(len(_rows()), DIM)]  # one parameter for the tied weight, not two
    sg.apply(base, sg.extract(model))
    sg.sync(model)
    assert torch.equal(base.get_parameter(EMB), model.get_parameter(EMB))
    assert not torch.equal(base.get_parameter(EMB), tiny_llama().get_parameter(EMB))
