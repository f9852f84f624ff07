"""The CPU entry-gradient kernel on its own: one SmolLM2 layer block's entry gradients.

For SmolLM2-135M's seven Linear shapes (q, k, v, o, gate, up, down) at the LoRA-equivalent density
(4.6%, LoRA r=16's values on every projection), the time to compute every weight's gradient at its
entries from an output gradient and an input of ``tokens`` rows, summed over the seven:

- ``kernel``: surgical's CPU kernel on fp32 operands;
- ``sampled_addmm``: ``torch.sparse.sampled_addmm``, what runs without the kernel;
- ``kernel_bf16``: the kernel on bf16 operands (what bf16 autocast hands over), widened as read;
- ``upcast_kernel``: the same bf16 operands cast to fp32 first, then the kernel (what surgical
  did before the kernel took bf16; the result is bit for bit the same, checked here too).

Methods are interleaved within each repetition; the figure is the median over repetitions, with
1 and 2 threads and 512 and 2,048 tokens. Ratios: ``kernel / sampled_addmm`` and
``kernel_bf16 / upcast_kernel``.

    python benchmarks/kernel_speed.py                       # about a minute
    python benchmarks/kernel_speed.py --quick --out X.json  # tiny shapes (a test runs it)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import surgical as sg
from surgical.core.io import atomic_write_text
from surgical.train import cpu_kernel
from surgical.train.sparse import csr_pattern

HERE = Path(__file__).resolve().parent
# (out, in) of SmolLM2-135M's q, k, v, o, gate, up, down projections
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
QUICK_SHAPES = [(48, 32), (16, 32), (64, 32)]
DENSITY = 0.046  # LoRA r=16 on every projection: 162,816 of 3,538,944 values per layer
METHODS = ("kernel", "sampled_addmm", "kernel_bf16", "upcast_kernel")


def block(shapes, tokens: int, seed: int = 0):
    """Per weight: (gy fp32, x fp32, gy bf16, x bf16, pattern) at DENSITY."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n_out, n_in in shapes:
        k = int(DENSITY * n_out * n_in)
        idx = torch.randperm(n_out * n_in, generator=g)[:k].sort().values.to(torch.int32)
        gy, x = torch.randn(tokens, n_out, generator=g), torch.randn(tokens, n_in, generator=g)
        out.append((gy, x, gy.bfloat16(), x.bfloat16(), csr_pattern(idx, (n_out, n_in), torch.float32)))
    return out


def run(method: str, layers) -> list[torch.Tensor]:
    res = []
    for gy, x, gy16, x16, pat in layers:
        if method == "kernel":
            res.append(cpu_kernel.sampled_grad(gy, x, pat))
        elif method == "kernel_bf16":
            res.append(cpu_kernel.sampled_grad(gy16, x16, pat))
        elif method == "upcast_kernel":
            res.append(cpu_kernel.sampled_grad(gy16.float(), x16.float(), pat))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res.append(torch.sparse.sampled_addmm(pat, gy.t(), x, beta=0.0).values())
    return res


def measure(shapes, tokens: int, threads: int, reps: int) -> dict:
    torch.set_num_threads(threads)
    layers = block(shapes, tokens)
    pairs = zip(run("kernel_bf16", layers), run("upcast_kernel", layers), strict=True)
    same = all(torch.equal(a, b) for a, b in pairs)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for rep in range(reps + 1):
        order = METHODS if rep % 2 == 0 else METHODS[::-1]
        for m in order:
            t0 = time.perf_counter()
            run(m, layers)
            if rep:  # the first repetition warms up
                times[m].append((time.perf_counter() - t0) * 1e3)
    ms = {m: statistics.median(v) for m, v in times.items()}
    return {
        "ms": ms,
        "kernel_vs_sampled_addmm": ms["kernel"] / ms["sampled_addmm"],
        "bf16_vs_upcast": ms["kernel_bf16"] / ms["upcast_kernel"],
        "bf16_bits_equal_upcast": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (for tests)")
    ap.add_argument("--reps", type=int, default=9, help="timed repetitions (median)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "kernel_speed.json")
    args = ap.parse_args()
    if cpu_kernel.library() is None:
        raise SystemExit("the CPU kernel could not be built here (no C++ compiler?): nothing to measure")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    reps = 2 if args.quick else args.reps
    before = torch.get_num_threads()
    results = {}
    for threads in (1, 2):
        for tokens in (64,) if args.quick else (512, 2048):
            r = measure(shapes, tokens, threads, reps)
            results[f"{threads} thread{'s' if threads > 1 else ''}, {tokens:,} tokens"] = r
            ms = r["ms"]
            print(
                f"{threads} thread(s), {tokens:5d} tokens: kernel {ms['kernel']:.2f} ms, "
                f"sampled_addmm {ms['sampled_addmm']:.2f} ({r['kernel_vs_sampled_addmm']:.2f}x); "
                f"bf16 {ms['kernel_bf16']:.2f} ms, upcast + kernel {ms['upcast_kernel']:.2f} "
                f"({r['bf16_vs_upcast']:.2f}x)",
                flush=True,
            )
    torch.set_num_threads(before)
    report = {
        "benchmark": "kernel_speed",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "surgical": sg.__version__,
            "avx512": bool(cpu_kernel.library().sg_sampled_grad_avx512()),
        },
        "setup": {
            "shapes": shapes,
            "density": DENSITY,
            "reps": reps,
            "quick": args.quick,
            "figure": "ms per layer block (the shapes summed), median over repetitions",
        },
        "results": results,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
