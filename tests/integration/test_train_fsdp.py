"""FSDP2 on CPU: 2 gloo processes under torchrun train a tiny Llama sharded with
``surgical.train.shard``; both ranks end with the delta a single process computes on the same data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgical as sg

SCRIPT = Path(__file__).with_name("fsdp_train_script.py")
REPO = Path(__file__).resolve().parents[2]


def test_two_process_fsdp2_matches_one_process_bit_for_bit(tmp_path):
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("no torchrun next to the interpreter")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    p = subprocess.Popen(
        [exe, "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, err = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and both workers: never leave them running
        p.communicate()
        pytest.fail("the two-process run did not finish in 240 s")
    assert p.returncode == 0, err[-3000:]
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
