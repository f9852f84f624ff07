"""What merging sparse deltas costs, against the same merge of the densified deltas.

Four random deltas, each holding 1% of every Linear weight of SmolLM2-135M (the real shapes
from its config: 30 layers, hidden 576, MLP 1536, 9 query / 3 key-value heads; LM head and
embeddings excluded) as entries, merged by TIES (density 0.005 of each tensor: half of each
delta's entries survive the trim). The sparse merge runs on the union of the supports
(``sg.merge``); the dense one runs the same method on the deltas densified first (what a
dense-checkpoint tool holds). Each run is a fresh process, so peak memory (VmHWM, reset after
the inputs are built) covers the merge alone plus, for the dense run, the densified inputs.
Medians of several runs; the two results are checked to be equal.

    python benchmarks/merge_cost.py                       # SmolLM2-135M shapes (a few minutes)
    python benchmarks/merge_cost.py --quick --out X.json  # tiny shapes, seconds (run by a test)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import surgical as sg
from surgical.core.io import atomic_write_text
from surgical.core.runtime import peak_rss_bytes, reset_peak_rss

HERE = Path(__file__).resolve().parent


def shapes(quick: bool) -> dict[str, tuple[int, int]]:
    """Linear weight name -> shape of SmolLM2-135M (or a tiny Llama in quick mode)."""
    layers, hidden, mlp, heads, kv = (2, 64, 128, 4, 2) if quick else (30, 576, 1536, 9, 3)
    hd = hidden // heads
    out = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        out[f"{p}.self_attn.q_proj.weight"] = (heads * hd, hidden)
        out[f"{p}.self_attn.k_proj.weight"] = (kv * hd, hidden)
        out[f"{p}.self_attn.v_proj.weight"] = (kv * hd, hidden)
        out[f"{p}.self_attn.o_proj.weight"] = (hidden, heads * hd)
        out[f"{p}.mlp.gate_proj.weight"] = (mlp, hidden)
        out[f"{p}.mlp.up_proj.weight"] = (mlp, hidden)
        out[f"{p}.mlp.down_proj.weight"] = (hidden, mlp)
    return out


def random_delta(shp: dict[str, tuple[int, int]], density: float, seed: int) -> sg.Delta:
    g = torch.Generator().manual_seed(seed)
    d = sg.Delta(meta={"base": {"fingerprint": "0" * 16, "fingerprint_excludes": []}})
    for name, (o, i) in shp.items():
        k = round(density * o * i)
        d.entries[name] = (
            torch.randperm(o * i, generator=g)[:k].sort().values,
            torch.randn(k, generator=g) * 1e-3,
        )
        d.shapes[name] = (o, i)
    return d


def worker(mode: str, quick: bool, out: Path) -> None:
    torch.set_num_threads(1)
    shp = shapes(quick)
    deltas = [random_delta(shp, 0.01, seed) for seed in range(4)]
    reset_peak_rss()
    before = peak_rss_bytes()
    t0 = time.perf_counter()
    inputs = [d.to_dense() for d in deltas] if mode == "dense" else deltas
    t1 = time.perf_counter()
    merged = sg.merge(inputs, "ties", density=0.005)
    t2 = time.perf_counter()
    peak = peak_rss_bytes()
    result = {
        "mode": mode,
        "densify_seconds": t1 - t0,
        "merge_seconds": t2 - t1,
        "peak_rss_over_inputs_bytes": peak - before,
        "values": int(merged.num_values),
        "digest_of_dense_form": merged.to_dense().digest(),
        "entries_per_delta": deltas[0].num_entries,
        "targeted": sum(o * i for o, i in shp.values()),
    }
    out.write_text(json.dumps(result))


def run(mode: str, quick: bool, tmp: Path) -> dict:
    out = tmp / f"{mode}.json"
    cmd = [sys.executable, __file__, "--worker", mode, "--result", str(out)] + (["--quick"] if quick else [])
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "merge_cost.json")
    p.add_argument("--worker", choices=("sparse", "dense"), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.quick, args.result)
        return
    import tempfile

    rounds = 1 if args.quick else args.rounds
    runs: dict[str, list[dict]] = {"sparse": [], "dense": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for mode in ("sparse", "dense") if r % 2 == 0 else ("dense", "sparse"):
                runs[mode].append(run(mode, args.quick, Path(tmp)))
                print(
                    f"round {r + 1} {mode}: {runs[mode][-1]['merge_seconds']:.2f} s, "
                    f"{runs[mode][-1]['peak_rss_over_inputs_bytes'] / 2**20:.0f} MiB",
                    flush=True,
                )
    same = runs["sparse"][0]["digest_of_dense_form"] == runs["dense"][0]["digest_of_dense_form"]

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[mode])

    summary = {
        "sparse_merge_seconds": med("sparse", "merge_seconds"),
        "dense_merge_seconds": med("dense", "merge_seconds"),
        "dense_densify_seconds": med("dense", "densify_seconds"),
        "sparse_peak_mib": med("sparse", "peak_rss_over_inputs_bytes") / 2**20,
        "dense_peak_mib": med("dense", "peak_rss_over_inputs_bytes") / 2**20,
    }
    summary["time_ratio_dense_over_sparse"] = summary["dense_merge_seconds"] / summary["sparse_merge_seconds"]
    summary["memory_ratio_dense_over_sparse"] = summary["dense_peak_mib"] / max(
        summary["sparse_peak_mib"], 1e-9
    )
    summary["results_equal"] = same
    report = {
        "benchmark": "merge_cost",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
        "setup": {
            "shapes": "tiny Llama" if args.quick else "SmolLM2-135M Linear weights",
            "deltas": 4,
            "delta_density": 0.01,
            "method": "ties",
            "ties_density": 0.005,
            "rounds": rounds,
        },
        "summary": summary,
        "runs": runs,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    if not same:
        raise SystemExit("the sparse and dense merges differ")


if __name__ == "__main__":
    main()
