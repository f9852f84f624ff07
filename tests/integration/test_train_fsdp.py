"""FSDP2 on CPU: 2 gloo processes under torchrun train a tiny Llama sharded with
``surgical.train.shard``; both ranks end with the delta a single process computes on the same data."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import surgical as sg
from train_fixtures import run_two_processes

SCRIPT = Path(__file__).with_name("fsdp_train_script.py")


def test_two_process_fsdp2_matches_one_process_bit_for_bit(tmp_path):
    run_two_processes(SCRIPT, str(tmp_path))
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
