"""DeepSpeed ZeRO through accelerate on CPU (2 gloo processes under torchrun): stage 2 with entries
trained in place, stage 3 (weights partitioned) with additive entries; both ranks end with the
single-process delta. Skipped unless deepspeed is installed (it is not in `make test`: it builds
from source, needs --no-build-isolation, and compiles a CPU communication op on first use)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import surgical as sg
from train_fixtures import run_two_processes

SCRIPT = Path(__file__).with_name("deepspeed_train_script.py")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_ranks_end_with_the_single_process_delta(tmp_path, stage):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    run_two_processes(SCRIPT, str(tmp_path), str(stage), timeout=400)
    d0, d1, single = (sg.Delta.load(tmp_path / k) for k in ("rank0", "rank1", "single"))
    assert (
        d0.meta["zero_stage"] == stage
        and d0.meta["base"]["fingerprint"] == single.meta["base"]["fingerprint"]
    )
    # stage 2: bit for bit; stage 3 reduces partitioned gradients in another order: measured
    # 4e-8 at values up to 0.04, asserted within 1e-6
    tol = 0.0 if stage == 2 else 1e-6
    for d in (d0, d1):
        assert d.entries.keys() == single.entries.keys() and set(d.dense) == {"model.norm.weight"}
        for name, (idx, vals) in single.entries.items():
            assert torch.equal(d.entries[name][0], idx), name
            torch.testing.assert_close(d.entries[name][1], vals, rtol=0, atol=tol)
        torch.testing.assert_close(
            d.dense["model.norm.weight"], single.dense["model.norm.weight"], rtol=0, atol=tol
        )
    assert sum(int((v != 0).sum()) for _, v in single.entries.values()) > 0.9 * single.num_entries
