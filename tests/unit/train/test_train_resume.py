"""Resume refuses a checkpoint written with other settings, data, selection or schedule."""

from __future__ import annotations

import json

import pytest
import torch

import surgical as sg
from conftest import cls_batches, tiny_bert
from surgical.core.errors import SurgicalError
from surgical.recipes.config import from_dict
from surgical.recipes.train import RunConfig
from surgical.train.checkpoint import INFO_FILE, latest_checkpoint
from surgical.train.loop import fit
from surgical.train.schedules import Regrow

BATCHES = cls_batches(n=6)
RUN = dict(max_steps=6, lr=1e-2, show=False, checkpoint_every=2)


def _prepared(density=0.1):
    model = tiny_bert(0)
    sg.prepare(model, sg.select(model, BATCHES, method="gradient", density=density, progress=False))
    return model


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint dir holding step 4 of a 6-step run cut at step 5 by a hook that declares no config
    (so it is not part of the run's identity and the resumes below need not repeat it)."""
    from surgical.train.hooks import TrainHook

    class Stop(TrainHook):
        def on_step_end(self, state):
            if state.step == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_prepared(), BATCHES, checkpoint_dir=tmp_path, hooks=[Regrow(every=2), Stop()], **RUN)
    return tmp_path


def _resume(ckpt, model=None, batches=BATCHES, hooks=None, **changes):
    kw = {**RUN, **changes}
    hooks = [Regrow(every=2)] if hooks is None else hooks
    return fit(model or _prepared(), batches, checkpoint_dir=ckpt, resume=True, hooks=hooks, **kw)


def test_unchanged_settings_resume_and_harmless_ones_may_change(ckpt):
    res = _resume(ckpt, checkpoint_every=3)  # how often to checkpoint does not change the result
    assert res.resumed_from == 4 and res.steps == 6


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"lr": 2e-2}, "lr was 0.01, now 0.02"),
        ({"seed": 1}, "seed was 0, now 1"),
        ({"grad_accum": 2, "max_steps": 6}, "grad_accum was 1, now 2"),
        ({"batches": cls_batches(n=6, seed=2)}, 'batches was "6 batches, sha256'),
        ({"density": 0.2}, 'selection was "10 trainable tensors'),
        ({"hooks": [Regrow(every=2, fraction=0.2)]}, '"fraction": 0.1'),
        ({"hooks": []}, 'hooks was [{"every": 2'),
    ],
)
def test_changed_settings_are_refused_naming_old_and_new(ckpt, change, needle):
    model = _prepared(density=change.pop("density", 0.1))  # another plan: other entries
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(SurgicalError) as info:
        _resume(ckpt, model=model, **change)
    msg = str(info.value)
    assert needle in msg and "belongs to a run with other settings" in msg and "\n" not in msg
    assert "start a fresh run in another directory" in msg
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing restored


def test_checkpoint_that_stores_no_identity_resumes_with_a_warning(ckpt):
    path = latest_checkpoint(ckpt) / INFO_FILE  # as save_checkpoint(identity=None) writes it
    info = json.loads(path.read_text())
    info["identity"] = None
    path.write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="stores no run settings"):
        res = _resume(ckpt, lr=5e-2)  # nothing to compare against: allowed
    assert res.resumed_from == 4


def test_cli_trajectory_drops_keys_that_cannot_change_the_result():
    a = RunConfig()
    b = from_dict(RunConfig, {"out": "elsewhere", "training": {"checkpoint_every": 5, "resume": True},
                              "model": {"gradient_checkpointing": True}})  # fmt: skip
    assert a.trajectory() == b.trajectory() and "training.lr" in a.trajectory()
    c = from_dict(RunConfig, {"training": {"max_steps": 10, "epochs": 3}})
    assert "training.epochs" not in c.trajectory() and c.trajectory()["training.max_steps"] == 10


def test_gradient_checkpointing_does_not_change_the_result():
    """Why model.gradient_checkpointing may change on resume: same deltas, dropout included."""
    from transformers import BertConfig, BertForSequenceClassification

    def trained(checkpointing: bool) -> sg.Delta:
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1))  # fmt: skip
        sg.prepare(model, sg.select(model, BATCHES, method="gradient", density=0.1, progress=False))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(1)
        fit(model, BATCHES, max_steps=4, lr=1e-2, show=False)
        return sg.extract(model)

    a, b = trained(False), trained(True)
    assert all(torch.equal(v, b.entries[n][1]) for n, (_, v) in a.entries.items())


class _LrProbe(sg.train.hooks.TrainHook):
    """Records the optimizer's learning rate once the run (and any resume) has begun."""

    def on_train_begin(self, state):
        self.lr = state.optimizer.param_groups[0]["lr"]
        self.initial = state.optimizer.param_groups[0]["initial_lr"]


def test_an_allowed_change_of_lr_and_length_resumes_with_the_new_schedule(ckpt):
    """After a NaN, continue from the last good checkpoint with a lower lr (and run longer)."""
    probe = _LrProbe()
    hooks = [Regrow(every=2), probe]
    res = _resume(ckpt, hooks=hooks, lr=5e-3, max_steps=8, allow_changes=["lr", "max_steps"])
    assert res.resumed_from == 4 and res.steps == 8
    # linear decay over the new 8 steps (no warm-up), continued at step 4 with the new base lr
    assert probe.initial == 5e-3 and probe.lr == pytest.approx(5e-3 * (8 - 4) / 8)


def test_allowing_a_change_outside_the_remedies_or_an_unknown_key_is_refused(ckpt):
    for key in ("seed", "learning_rate"):
        with pytest.raises(SurgicalError, match=f"cannot be allowed to change '{key}'.*lr, max_grad_norm"):
            _resume(ckpt, allow_changes=[key])
    with pytest.raises(SurgicalError, match="lr was 0.01, now 0.02"):  # allowed: max_steps, not lr
        _resume(ckpt, lr=2e-2, allow_changes=["max_steps"])
