"""Checkpoints are safetensors + JSON: nothing is unpickled, damage is detected, resume is exact."""

from __future__ import annotations

import json
import os
import pickle
import random
import shlex

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup

import surgical as sg
from conftest import cls_batches, tiny_bert
from surgical.core.errors import SurgicalError
from surgical.train.checkpoint import (
    INFO_FILE,
    STATE_FILE,
    TENSORS_FILE,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from surgical.train.hooks import StepState, TrainHook
from surgical.train.loop import fit
from surgical.train.schedules import Regrow

BATCHES = cls_batches(n=6)


def _prepared(density=0.1, dropout=0.0):
    if dropout:  # dropout draws from the torch RNG, so an exact resume needs its state restored
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout))  # fmt: skip
    else:
        model = tiny_bert(0)
    sg.prepare(model, sg.select(model, BATCHES, method="gradient", density=density, progress=False))
    return model


class _Interrupt(TrainHook):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, state):
        if state.step == self.at:
            raise KeyboardInterrupt


class _Stateful(TrainHook):
    """A hook whose state is nested JSON, drawn from python's ``random`` (restored on resume)."""

    def __init__(self, state=None):
        self.state = state if state is not None else {"draws": [], "meta": {"name": "x", "none": None}}

    def on_step_end(self, state):
        self.state["draws"].append(random.random())

    def state_dict(self):
        return json.loads(json.dumps(self.state))  # a copy

    def load_state_dict(self, state):
        self.state = state


def _step_state(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = get_linear_schedule_with_warmup(opt, 2, 10)
    return StepState(model=model, optimizer=opt, scheduler=sched, step=0, total_steps=10)


def _trained_state(steps=3):
    """A StepState after ``steps`` real optimizer steps (AdamW state and scheduler advanced)."""
    model = _prepared()
    st = _step_state(model)
    for i in range(steps):
        st.optimizer.zero_grad()
        model(**BATCHES[i]).loss.backward()
        st.optimizer.step()
        st.scheduler.step()
        st.step += 1
    return st


@pytest.fixture
def saved(tmp_path):
    """A checkpoint directory written by save_checkpoint, and the state it was written from."""
    st = _trained_state()
    hook = _Stateful({"draws": [0.25, 1e-300], "meta": {"name": "x", "none": None, "flag": True}})
    path = save_checkpoint(tmp_path, st, hooks=[hook])
    return path, st, hook


def _one_line_error(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_checkpoint_directory_holds_json_and_safetensors_only(saved):
    path, _, _ = saved
    assert sorted(p.name for p in path.iterdir()) == sorted([INFO_FILE, TENSORS_FILE])
    for f in path.iterdir():
        head = f.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK"  # neither a pickle nor torch.save's zip
    info = json.loads((path / INFO_FILE).read_text())
    assert info["format"] == "surgical-checkpoint" and info["version"] == 2 and len(info["sha256"]) == 64


def test_save_then_load_restores_optimizer_scheduler_rng_and_hooks_exactly(saved):
    path, st, hook = saved
    torch.manual_seed(123)
    random.seed(456)
    torch_rng, python_rng = torch.get_rng_state(), random.getstate()
    save_checkpoint(path.parent, st, hooks=[hook])  # rewrites step-3 with the RNG states above
    torch.manual_seed(0)
    random.seed(0)
    fresh = _step_state(_prepared())
    again = _Stateful()
    load_checkpoint(path, fresh, hooks=[again])

    a, b = st.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]  # betas a tuple again, every number exact
    assert a["state"].keys() == b["state"].keys()
    for i, entry in a["state"].items():
        assert entry.keys() == b["state"][i].keys()
        for name, v in entry.items():
            w = b["state"][i][name]
            assert v.dtype == w.dtype and v.shape == w.shape and torch.equal(v, w), (i, name)
    assert a["state"][0]["step"].dim() == 0 and a["state"][0]["step"].is_floating_point()
    assert st.scheduler.state_dict() == fresh.scheduler.state_dict()
    assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == python_rng
    assert again.state == hook.state and fresh.step == st.step == 3
    flags = {n: p.requires_grad for n, p in fresh.model.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in st.model.named_parameters()}
    a, b = sg.extract(st.model), sg.extract(fresh.model)  # weights are rebuilt from entries lazily
    assert a.entries.keys() == b.entries.keys()
    for n, (i, v) in a.entries.items():
        assert torch.equal(i, b.entries[n][0]) and torch.equal(v, b.entries[n][1]), n


def test_resume_with_dropout_and_hook_state_is_bit_identical(tmp_path):
    """Dropout and the hook draw from the torch and python RNGs: only restored states match."""
    run = dict(max_steps=7, lr=1e-2, show=False)
    torch.manual_seed(7)
    random.seed(7)
    ref, ref_hook = _prepared(dropout=0.1), _Stateful()
    fit(ref, BATCHES, hooks=[Regrow(every=2), ref_hook], **run)
    torch.manual_seed(7)
    random.seed(7)
    with pytest.raises(KeyboardInterrupt):
        fit(_prepared(dropout=0.1), BATCHES, checkpoint_dir=tmp_path, checkpoint_every=2,
            hooks=[Regrow(every=2), _Stateful(), _Interrupt(5)], **run)  # fmt: skip
    torch.manual_seed(99)  # the resumed process starts from other RNG states
    random.seed(99)
    again, hook = _prepared(dropout=0.1), _Stateful()
    res = fit(again, BATCHES, checkpoint_dir=tmp_path, resume=True, hooks=[Regrow(every=2), hook], **run)
    assert res.resumed_from == 4 and res.steps == 7
    assert hook.state == ref_hook.state and len(hook.state["draws"]) == 7
    a, b = sg.extract(ref), sg.extract(again)
    assert a.entries.keys() == b.entries.keys()
    for n, (i, v) in a.entries.items():
        assert torch.equal(i, b.entries[n][0]) and torch.equal(v, b.entries[n][1]), n


def _malicious_pickle(marker) -> bytes:
    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    return pickle.dumps({"step": 4, "payload": Exploit()})


def test_an_old_pickled_checkpoint_is_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    data = _malicious_pickle(marker)
    pickle.loads(data)  # the planted file is live: unpickling it runs the command
    assert marker.exists()
    marker.unlink()
    ckpt = tmp_path / "ckpt"
    (ckpt / "step-4").mkdir(parents=True)
    (ckpt / "step-4" / STATE_FILE).write_bytes(data)
    assert latest_checkpoint(ckpt) == ckpt / "step-4"  # met by a resume, not silently skipped
    with pytest.raises(SurgicalError) as info:
        fit(_prepared(), BATCHES, max_steps=6, lr=1e-2, show=False, checkpoint_dir=ckpt, resume=True)
    msg = _one_line_error(info)
    assert repr(str(ckpt / "step-4")) in msg and "written by an older surgical" in msg
    assert "could execute code" in msg and "Delete it" in msg
    with pytest.raises(SurgicalError, match="older surgical"):
        load_checkpoint(ckpt / "step-4", _step_state(_prepared()))
    assert not marker.exists()


def test_a_checkpoint_with_flipped_tensor_bytes_is_refused(saved):
    path, _, _ = saved
    data = bytearray((path / TENSORS_FILE).read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: safetensors itself would still parse it
    (path / TENSORS_FILE).write_bytes(bytes(data))
    model = _prepared()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(SurgicalError) as info:
        load_checkpoint(path, _step_state(model))
    msg = _one_line_error(info)
    assert f"checkpoint {str(path)!r} is corrupted (checksum mismatch). Delete it to start over" in msg
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing restored


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        (["step"], "step"),
        (["sha256"], "sha256"),
        (["optimizer"], "optimizer"),
        (["hooks"], "hooks"),
        (["model", "values"], "model.values"),
        (["rng", "python"], "rng.python"),
        (["optimizer", "state", "0", "tensors"], "optimizer.state.0.tensors"),
    ],
)
def test_a_checkpoint_json_with_a_missing_key_is_refused_in_one_line(saved, path, shown):
    ckpt, _, _ = saved
    info = json.loads((ckpt / INFO_FILE).read_text())
    parent = info
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    (ckpt / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(SurgicalError) as err:
        load_checkpoint(ckpt, _step_state(_prepared()))
    msg = _one_line_error(err)
    assert f"checkpoint {str(ckpt)!r} is corrupted ({INFO_FILE} lacks {shown!r})" in msg


def test_a_tensor_missing_or_unlike_what_the_json_lists_is_refused(saved):
    path, _, _ = saved
    info = json.loads((path / INFO_FILE).read_text())
    key = next(k for k in info["tensors"] if k.startswith("values."))
    info["tensors"][key]["shape"] = [1, *info["tensors"][key]["shape"]]
    (path / INFO_FILE).write_text(json.dumps(info))
    shapes = r"is float32 \[(\d+)\] in tensors.safetensors but float32 \[1, \1\]"
    with pytest.raises(SurgicalError, match=shapes):
        load_checkpoint(path, _step_state(_prepared()))
    info["tensors"][key]["shape"] = list(info["tensors"][key]["shape"][1:])  # back to what it was
    info["tensors"]["values.not.there"] = {"dtype": "float32", "shape": [3]}
    (path / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(SurgicalError, match="tensors.safetensors lacks 'values.not.there'"):
        load_checkpoint(path, _step_state(_prepared()))


def test_a_checkpoint_of_another_selection_does_not_fit(saved):
    path, _, _ = saved
    with pytest.raises(SurgicalError) as info:
        load_checkpoint(path, _step_state(_prepared(density=0.2)))  # other entries, other shapes
    msg = _one_line_error(info)
    assert "does not fit this" in msg and "Resume with the same model, plan and config" in msg


def test_another_format_version_is_refused(saved):
    path, _, _ = saved
    info = json.loads((path / INFO_FILE).read_text())
    info["version"] = 3
    (path / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(SurgicalError, match="version 3; this surgical reads 'surgical-checkpoint' version 2"):
        load_checkpoint(path, _step_state(_prepared()))


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (torch.zeros(2), "is a Tensor"),
        ({"seen": {1, 2}}, "is a set"),
        ({"pair": (1, 2)}, "is a tuple"),
        ({3: "x"}, "has the key 3 (int)"),
    ],
)
def test_a_hook_state_that_is_not_json_is_refused_at_save_time(tmp_path, bad, needle):
    class Bad(TrainHook):
        def state_dict(self):
            return bad

    with pytest.raises(SurgicalError) as info:
        save_checkpoint(tmp_path, _trained_state(steps=1), hooks=[Bad()])
    msg = _one_line_error(info)
    assert "cannot write a checkpoint: the state_dict() of hook Bad" in msg and needle in msg
    assert checkpoints(tmp_path) == [] and list(tmp_path.iterdir()) == []  # nothing written
