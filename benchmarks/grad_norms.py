"""The loss and gradient norm of every step of quality benchmark runs: why a run stays at one class.

Retrains runs of ``quality.py``'s rows (same data, model, plan and loop; no evaluation) and
records, after each optimizer step, the training loss and the global norm of the trainable
values' gradients (before any clipping). A run that stays at one class keeps its loss at ln 2;
comparing its norms with those of a run that learns says whether clipping could have helped.

    python benchmarks/grad_norms.py --runs surgical-random-1pct:5e-3:1 surgical-random-1pct:5e-3:0
    python benchmarks/grad_norms.py --quick --out X.json   # tiny subsets (a test runs it)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import torch

import surgical as sg
from surgical.core.io import atomic_write_text
from surgical.data.text import text_batches
from surgical.recipes.demo import default_model_path
from surgical.recipes.models import load_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402  (benchmarks/ is a directory of scripts)


class _Norms:
    """A training hook that records the gradient norm of ``params`` at the end of each step."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params, self.norms = params, []

    def on_train_begin(self, state) -> None:
        pass

    def on_step_end(self, state) -> None:  # the step's gradients are still there (zeroed next step)
        sq = sum(float(p.grad.double().pow(2).sum()) for p in self.params if p.grad is not None)
        self.norms.append(math.sqrt(sq))


def run(name: str, lr: float, seed: int, quick: bool) -> dict:
    spec = quality.row_specs()[name]
    if spec["kind"] != "surgical":
        raise SystemExit(f"{name}: only surgical rows (entries, rows, layers) are supported here")
    train, _, _, _ = quality.split(quick)
    model, tok = load_model(default_model_path(), "classification", seed=seed)
    batches = text_batches(tok, train, 32, 64, shuffle=True, seed=seed)
    sg.prepare(model, quality._plan(spec, model, batches, seed))
    hook = _Norms([p for p in model.parameters() if p.requires_grad])
    res = sg.fit(model, batches, lr=lr, seed=seed, hooks=[hook], show=False)
    tail = res.losses[len(res.losses) // 2 :]
    return {
        "row": name,
        "lr": lr,
        "seed": seed,
        "steps": res.steps,
        "losses": [round(x, 4) for x in res.losses],
        "grad_norms": [round(x, 4) for x in hook.norms],
        "grad_norm_max": max(hook.norms),
        "grad_norm_median": statistics.median(hook.norms),
        "loss_second_half_mean": statistics.fmean(tail),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=[], help="ROW:LR:SEED, e.g. surgical-random-1pct:5e-3:1")
    ap.add_argument("--quick", action="store_true", help="tiny subsets, one run (for tests)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "grad_norms.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    specs = args.runs or (["surgical-random-1pct:5e-3:0"] if args.quick else [])
    if not specs:
        raise SystemExit("name the runs: --runs ROW:LR:SEED ...")
    results = []
    for item in specs:
        try:
            name, lr, seed = item.split(":")
            parsed = (name, float(lr), int(seed))
        except ValueError:
            raise SystemExit(f"--runs takes ROW:LR:SEED, got {item!r}") from None
        if parsed[0] not in quality.row_specs():
            raise SystemExit(f"unknown row {parsed[0]!r}; known: {', '.join(quality.row_specs())}")
        r = run(*parsed, args.quick)
        results.append(r)
        print(
            f"{item}: gradient norm max {r['grad_norm_max']:.3f}, median {r['grad_norm_median']:.3f}; "
            f"loss over the second half {r['loss_second_half_mean']:.3f}",
            flush=True,
        )
    report = {
        "benchmark": "grad_norms",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "surgical": sg.__version__},
        "setup": {"quick": args.quick, "norm": "global L2 norm of the trainable values' gradients, per step"},
        "results": results,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
