"""FSDP2 on CPU: 2 gloo processes under torchrun train a tiny Llama sharded with
``surgical.train.shard``; both ranks end with the delta a single process computes on the same data."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import surgical as sg
from train_fixtures import run_two_processes

SCRIPT = Path(__file__).with_name("fsdp_train_script.py")


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """One torchrun of the script; its outputs serve every test of this file."""
    out = tmp_path_factory.mktemp("fsdp")
    run_two_processes(SCRIPT, str(out))
    return out


def test_two_process_fsdp2_matches_one_process_bit_for_bit(ran):
    tmp_path = ran
    d0, d1, single = (sg.Delta.load(tmp_path / k) for k in ("rank0", "rank1", "single"))
    assert d0.meta["world_size"] == 2 and d0.num_entries > 0
    # the sharded run names the same (unsharded) base
    assert d0.meta["base"]["fingerprint"] == single.meta["base"]["fingerprint"]
    # bit for bit: each rank's gradient is that of its half, FSDP averages the two (a sum of two
    # and a halving, both exact in any order), and the single process sums the halves' losses / 2
    for d in (d0, d1):
        assert d.entries.keys() == single.entries.keys() and d.dense.keys() == single.dense.keys() == {
            "model.norm.weight"
        }
        for name, (idx, vals) in single.entries.items():
            assert torch.equal(d.entries[name][0], idx) and torch.equal(d.entries[name][1], vals), name
        assert torch.equal(d.dense["model.norm.weight"], single.dense["model.norm.weight"])
    changed = sum(int((vals != 0).sum()) for _, vals in single.entries.values())
    assert changed > 0.9 * single.num_entries  # training happened
    for rank in (0, 1):
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert info["frozen_held"] <= 0.55 * info["frozen_total"]  # each rank holds about half
        refused = info["refused"]
        assert "trains by writing its weight" in refused["shard_in_place"]
        assert "additive=True" in refused["step_in_place_sharded"]
        assert "already sharded" in refused["prepare_sharded"]
        assert "prune-and-regrow cannot run on a sharded model" in refused["regrow_sharded"]


def test_an_nf4_base_shards_and_trains_the_delta_of_one_process(ran):
    """torchao NF4 weights split by rows under FSDP2 (each rank holds half their bytes), and the
    delta trained beside them is the one-process NF4 run's within float rounding; torchao int8,
    which FSDP2 cannot split, is refused by ``shard`` in one line."""
    pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")
    single = sg.Delta.load(ran / "nf4-single")
    assert sum(int((v != 0).sum()) for _, v in single.entries.values()) > 0.9 * single.num_entries
    for rank in (0, 1):
        d = sg.Delta.load(ran / f"nf4-rank{rank}")
        assert d.meta["base"]["fingerprint"] == single.meta["base"]["fingerprint"]  # the fp32 base
        for name, (idx, vals) in single.entries.items():
            assert torch.equal(d.entries[name][0], idx), name
            torch.testing.assert_close(d.entries[name][1], vals, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(d.dense["model.norm.weight"], single.dense["model.norm.weight"])
        info = json.loads((ran / f"nf4-rank{rank}.json").read_text())
        assert info["types"] == ["NF4Tensor"]
        assert 0.45 * info["total"] <= info["held"] <= 0.55 * info["total"], info
        refused = info["int8_refused"]
        assert "is quantized as Int8Tensor, which FSDP2 cannot shard" in refused and "bits 4" in refused
        assert "\n" not in refused


def test_base_values_on_the_shards_is_the_base_and_puts_the_trained_values_back(ran):
    """FSDP2 keeps the root's gathered parameters after a forward without gradients; base_values
    drops them on the way in and out, so the body runs on the base (not the trained final norm)
    and the next forward on the trained values again."""
    for rank in (0, 1):
        info = json.loads((ran / f"rank{rank}.json").read_text())
        assert info["trained_vs_base"] > 1e-2  # training moved the logits: the check can fail
        assert info["base_gap"] < 1e-5 and info["trained_gap"] == 0.0, info


def test_sharded_checkpoints_resume_bit_for_bit_and_are_one_file_set(ran):
    """``sg.fit`` on the FSDP2-sharded model with ``checkpoint_dir``: process 0 writes one checkpoint
    (sharded values and Adam moments gathered whole, every process's RNG state); a run resumed from
    the step-2 checkpoint ends on both ranks with the uninterrupted run's delta, bit for bit."""
    tmp_path = ran
    whole = [sg.Delta.load(tmp_path / f"fit-whole-rank{r}") for r in (0, 1)]
    resumed = [sg.Delta.load(tmp_path / f"fit-resumed-rank{r}") for r in (0, 1)]
    assert whole[0].digest() == whole[1].digest() == resumed[0].digest() == resumed[1].digest()
    for rank in (0, 1):
        runs = json.loads((tmp_path / f"fit-rank{rank}.json").read_text())
        assert runs["whole"][:2] == [None, 4] and runs["resumed"][:2] == [2, 4]  # it did resume at 2
        assert runs["resumed"][2] == runs["whole"][2][2:]  # the same last two losses
    assert sum(int((v != 0).sum()) for _, v in whole[0].entries.values()) > 0.9 * whole[0].num_entries
    step = tmp_path / "ckpt" / "step-4"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-4"]
    info = json.loads((step / "checkpoint.json").read_text())
    assert info["rng"]["processes"] == 2 and "rng.rank1.torch" in info["tensors"]
    # whole values, not shards: the sharded tensors have their full shapes in the file
    norm = info["tensors"]["values.model.norm.weight"]
    assert norm["shape"] == [32]

    def numel(keys):
        return sum(math.prod(info["tensors"][k]["shape"]) for k in keys)

    moments = [k for k in info["tensors"] if k.startswith("optimizer.state.") and k.endswith(".exp_avg")]
    assert numel(moments) == numel([k for k in info["tensors"] if k.startswith("values.")]) > 0
    # one process cannot take over a checkpoint of two: one line, before anything is restored
    spec = importlib.util.spec_from_file_location("fsdp_train_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model, plan = script.model_and_plan()
    sg.prepare(model, plan, additive=True)
    before = sg.extract(model).digest()
    with pytest.raises(sg.SurgicalError, match=r"written by 2 process\(es\), this run has 1"):
        sg.fit(model, script.global_batches(), lr=script.LR, max_steps=script.STEPS, warmup=0.0, seed=0,
               checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, resume=True, show=False)  # fmt: skip
    assert sg.extract(model).digest() == before
