"""The scale-memory benchmark's --quick mode (FSDP2 vs DDP on 2 processes, int8 vs fp32 base) runs
end to end and writes well-formed results."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_scale_memory_quick(tmp_path):
    pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")
    pytest.importorskip("bitsandbytes", reason="the quant extra (bitsandbytes) is not installed")
    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("no torchrun next to the interpreter")
    out = tmp_path / "scale_memory.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "scale_memory.py"), "--quick", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "FSDP2/DDP" in p.stdout and "int8/fp32" in p.stdout and "nf4/fp32" in p.stdout
    res = json.loads(out.read_text())
    assert res["quick"] is True and res["versions"]["torchao"] and "--quick" in res["command"]
    dist = res["fsdp_vs_ddp"]
    for mode in ("ddp", "fsdp", "fsdp-nf4"):
        ranks = dist[mode]["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
        assert ranks[0]["delta_entries"] == ranks[1]["delta_entries"] > 0
    # each FSDP2 process holds half the frozen weights DDP holds (one shard of two)
    assert 0.45 < dist["fsdp_over_ddp"]["frozen_bytes_held"] < 0.55
    # on a torchao NF4 base each process holds half the NF4 bytes (and half the fp32 embedding)
    assert dist["fsdp_nf4_over_ddp"]["frozen_bytes_held"] < 0.5 * dist["fsdp_over_ddp"]["frozen_bytes_held"]
    assert "FSDP2+NF4/DDP" in p.stdout
    quant = res["quantized_vs_fp32"]
    assert quant["int8_over_fp32"]["linear_weight_bytes"] < 0.4  # 1 byte per value + row scales
    fp, q = quant["fp32"], quant["int8"]
    assert fp["delta_entries"] == q["delta_entries"] > 0
    assert (
        q["last_loss"] < q["first_loss"] + 1e-3 and q["eval_after"]["loss"] <= q["eval_before"]["loss"] + 1e-3
    )
    assert abs(q["eval_after_delta_on_fp32"]["loss"] - q["eval_after"]["loss"]) < 0.05
    # NF4: half a byte per value plus 8-bit block scales, below int8 (the tied LM head stays fp32
    # in both, and the tiny weights carry each about 1 KiB of fixed scales)
    n4 = quant["nf4"]
    ratio = {base: quant[f"{base}_over_fp32"]["linear_weight_bytes"] for base in ("int8", "nf4")}
    assert ratio["nf4"] < 0.8 * ratio["int8"]
    assert n4["delta_entries"] == fp["delta_entries"] and n4["last_loss"] < n4["first_loss"] + 1e-3
    assert abs(n4["eval_after_delta_on_fp32"]["loss"] - n4["eval_after"]["loss"]) < 0.1
    # torchao NF4 (the format FSDP2 shards): the same storage as bitsandbytes' within the scales
    ta = quant["nf4-torchao"]
    assert quant["nf4-torchao_over_fp32"]["linear_weight_bytes"] < 0.8 * ratio["int8"]
    assert ta["delta_entries"] == fp["delta_entries"] and ta["last_loss"] < ta["first_loss"] + 1e-3
    assert abs(ta["eval_after_delta_on_fp32"]["loss"] - ta["eval_after"]["loss"]) < 0.1
    assert quant["run"]["command"] == res["command"]
