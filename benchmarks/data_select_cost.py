"""Cost of choosing the data: each data criterion on MiniLM beside one training epoch.

MiniLM (all-MiniLM-L6-v2) on the Rotten Tomatoes training sentences of benchmarks/quality.py's
split (3,000; the 500 validation sentences are the gradient criteria's target set). For each
data criterion (random, loss, learnability, trajectory, diversity, dedup, gradient,
gradient+adam; each keeping 30%, batch 32, 64 tokens, their default options; gradient+adam warms
up at the training's learning rate), one fresh worker process with one torch thread loads the
model and the data, then times ``sg.select_data`` (examples per second = training examples /
seconds; the gradient criteria's seconds include the validation gradients; the plan whose
support they use is scored beforehand and timed apart, as the training needs it anyway) and its
peak RSS. Beside them, in a worker of its own, one training epoch on the same data with
quality.py's ``surgical-gradient-1pct`` recipe (``sg.fit`` only, the plan made before): seconds
and peak RSS. Peak RSS is counted from just before the measured call (the loaded model and data
included, the loading's transient peak not).

    python benchmarks/data_select_cost.py              # full mode (about 15 min on 2 CPU cores)
    python benchmarks/data_select_cost.py --quick      # 96 examples, short proxy trainings (a test)
    python benchmarks/data_select_cost.py --criteria loss,gradient
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _data_select as ds
import torch

HERE = Path(__file__).resolve().parent
FRACTION = 0.3


def measure(what: str, quick: bool) -> dict:
    """One measurement in this process: ``select:<criterion>`` or ``epoch``."""
    torch.set_num_threads(1)
    import surgical as sg
    from surgical.core.runtime import peak_rss_bytes, quiet_transformers, reset_peak_rss
    from surgical.recipes.demo import default_model_path
    from surgical.recipes.models import load_model

    quiet_transformers()
    train, val, _, _ = ds.split(quick)
    model, tok = load_model(default_model_path(), "classification", seed=0)
    batches = ds.train_batches(tok, train, seed=0)
    out: dict = {"examples": len(train)}
    plan = None
    if what == "epoch" or ds.CRITERIA[what.split(":", 1)[1]][0] == "gradient":
        t0 = time.perf_counter()
        plan = ds.plan(model, batches, seed=0)
        out["plan_seconds"] = time.perf_counter() - t0
    if what == "epoch":
        sg.prepare(model, plan)
        reset_peak_rss()
        out["rss_before_bytes"] = peak_rss_bytes()
        t0 = time.perf_counter()
        sg.fit(model, batches, lr=ds.LR, seed=0, show=False)
        out["seconds"] = time.perf_counter() - t0
        out["peak_rss_bytes"] = peak_rss_bytes()
        out["peak_rss_above_start_bytes"] = out["peak_rss_bytes"] - out["rss_before_bytes"]
        out["steps"] = len(batches)
        out["examples_per_second"] = len(train) / out["seconds"]
        return out
    name = what.split(":", 1)[1]
    reset_peak_rss()
    out["rss_before_bytes"] = peak_rss_bytes()
    sel = ds.select(name, model, tok, train, val, plan, fraction=FRACTION, seed=0, quick=quick)
    out.update(
        seconds=sel.meta["seconds"],
        examples_per_second=sel.meta["examples_per_second"],
        peak_rss_bytes=sel.meta["peak_memory_bytes"],
        peak_rss_above_start_bytes=sel.meta["peak_memory_bytes"] - out["rss_before_bytes"],
        selected=len(sel),
        validation_examples=sel.meta["validation_examples"],
        options=sel.options,
    )
    return out


def run_worker(what: str, quick: bool, tmp: Path) -> dict:
    out = tmp / f"{what.replace(':', '_').replace('+', '_')}.json"
    cmd = [sys.executable, __file__, "--worker", what, "--result", str(out)] + (["--quick"] if quick else [])
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--criteria", help=f"comma-separated, of {', '.join(ds.CRITERIA)} (default: all)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "data_select_cost.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.result.write_text(json.dumps(measure(args.worker, args.quick)))
        return
    from surgical.core.io import atomic_write_text

    criteria = ds.parse_criteria(args.criteria, ds.CRITERIA)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        epoch = run_worker("epoch", args.quick, Path(tmp))
        print(f"{'training epoch':16s} {epoch['seconds']:7.1f} s  {epoch['peak_rss_bytes'] / 2**20:6.0f} MiB")
        results = {}
        for name in criteria:
            r = run_worker(f"select:{name}", args.quick, Path(tmp))
            r["time_vs_epoch"] = r["seconds"] / epoch["seconds"]
            r["peak_rss_vs_epoch"] = r["peak_rss_bytes"] / epoch["peak_rss_bytes"]
            results[name] = r
            print(
                f"{name:16s} {r['seconds']:7.1f} s  {r['peak_rss_bytes'] / 2**20:6.0f} MiB  "
                f"{r['examples_per_second']:8.1f} ex/s  time x{r['time_vs_epoch']:.2f} of an epoch, "
                f"peak RSS x{r['peak_rss_vs_epoch']:.2f}",
                flush=True,
            )
    load_end = os.getloadavg()[0]
    busy = max(load_start, load_end) > 2
    report = {
        **ds.header(
            "data_select_cost",
            torch_threads=1,
            load_average_start=round(load_start, 2),
            load_average_end=round(load_end, 2),
            note=(
                "another benchmark ran concurrently (load average above 2): absolute times are inflated"
                if busy
                else "no other load"
            ),
        ),
        "setup": {
            "model": "all-MiniLM-L6-v2",
            "data": f"RT training sentences of quality.py's split ({epoch['examples']})",
            "fraction": FRACTION,
            "batch": ds.BATCH,
            "max_length": ds.MAX_LENGTH,
            "epoch": f"quality.py {ds.RECIPE}, lr {ds.LR}, sg.fit over {epoch['steps']} steps",
            "quick": args.quick,
        },
        "epoch": epoch,
        "results": results,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
