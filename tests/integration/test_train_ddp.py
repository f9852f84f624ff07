"""DDP on CPU, 2 gloo processes launched by torchrun and by `accelerate launch`: same delta on both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import surgical as sg
from train_fixtures import run_two_processes

SCRIPT = Path(__file__).with_name("ddp_train_script.py")


LAUNCHERS = {
    "torchrun": ["torchrun", "--standalone", "--nproc_per_node", "2"],
    # accelerate's --cpu flag alone starts one process; --multi_gpu with ACCELERATE_USE_CPU=1
    # starts two CPU processes under gloo (DistributedType.MULTI_CPU)
    "accelerate": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_ddp_ranks_end_with_identical_deltas(tmp_path, launcher):
    run_two_processes(SCRIPT, str(tmp_path), launcher=LAUNCHERS[launcher], env={"ACCELERATE_USE_CPU": "1"})
    d0, d1 = sg.Delta.load(tmp_path / "rank0"), sg.Delta.load(tmp_path / "rank1")
    assert d0.meta["world_size"] == 2 and "MULTI_CPU" in d0.meta["distributed_type"]
    assert d0.num_entries > 0 and d0.entries.keys() == d1.entries.keys()
    changed = 0
    for name, (idx, vals) in d0.entries.items():
        assert torch.equal(idx, d1.entries[name][0]) and torch.equal(vals, d1.entries[name][1]), name
        changed += int((vals != 0).sum())
    assert changed > 0.9 * d0.num_entries  # training happened
    for name, t in d0.full.items():
        assert torch.equal(t, d1.full[name]), name


def test_two_process_ddp_with_a_tied_embedding_row_block(tmp_path):
    """The shared (r, dim) block of a tied embedding gets its gradient from the lookup and the
    head on each rank; DDP must still end with the same block (and entries) on both."""
    run_two_processes(SCRIPT, str(tmp_path), "tied")
    d0, d1 = sg.Delta.load(tmp_path / "rank0"), sg.Delta.load(tmp_path / "rank1")
    assert d0.meta["world_size"] == 2
    emb = "model.embed_tokens.weight"
    (r0, b0), (r1, b1) = d0.rows[emb], d1.rows[emb]
    assert torch.equal(r0, r1) and torch.equal(b0, b1)
    assert (b0 != 0).any(dim=1).sum() >= len(r0) // 2  # rows of tokens the batches use were trained
    assert d0.entries.keys() == d1.entries.keys() and d0.num_entries > 0
    for name, (idx, vals) in d0.entries.items():
        assert torch.equal(idx, d1.entries[name][0]) and torch.equal(vals, d1.entries[name][1]), name
