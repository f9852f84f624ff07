"""Serving several tasks from one base: the cost of switching deltas vs one forward pass.

Two random 1% deltas over SmolLM2-135M's Linear weights (LM head excluded) are switched with
``sg.revert`` + ``sg.apply`` (what ``with sg.applied(...)`` does on exit and entry); the time is
compared side by side with one forward pass (batch 1 x 128 tokens) and with reloading the model's
state dict (what swapping merged checkpoints costs). Median of several repetitions.

Two more deltas holding the same share of values as whole rows (the ``rows`` kind that row
training produces) are switched too.

    nice -n 10 python benchmarks/delta_switch.py            # SmolLM2-135M (minutes)
    python benchmarks/delta_switch.py --quick --out X.json  # tiny random Llama, seconds (run by a test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from train_speed import load_model  # the same SmolLM2 / tiny random Llama as the training benchmark

import surgical as sg
from surgical.core.fingerprint import base_identity

HERE = Path(__file__).resolve().parent


def random_delta(model, density: float, seed: int, rows: bool = False) -> sg.Delta:
    """Random changes to ``density`` of every Linear weight but the head: entries, or whole rows."""
    g = torch.Generator().manual_seed(seed)
    d = sg.Delta()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            out_f, in_f = module.weight.shape
            if rows:
                r = max(1, round(density * out_f))
                idx = torch.randperm(out_f, generator=g)[:r].sort().values
                d.rows[f"{name}.weight"] = (idx, torch.randn(r, in_f, generator=g) * 1e-3)
            else:
                k = round(density * out_f * in_f)
                idx = torch.randperm(out_f * in_f, generator=g)[:k].sort().values
                d.entries[f"{name}.weight"] = (idx, torch.randn(k, generator=g) * 1e-3)
            d.shapes[f"{name}.weight"] = (out_f, in_f)
    d.meta["base"] = base_identity(model)
    return d


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="Tiny random Llama, 3 repetitions (for tests).")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--out", default=None, help="JSON results path (default: benchmarks/results/).")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    model = load_model(args.quick).eval()
    d1, d2 = random_delta(model, args.density, 1), random_delta(model, args.density, 2)
    r1, r2 = random_delta(model, args.density, 3, rows=True), random_delta(model, args.density, 4, rows=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def forward():
        with torch.no_grad():
            model(input_ids=ids)

    current = [d1]
    sg.apply(model, d1)

    def switch_to(target: sg.Delta, force: bool = False):
        def run():  # revert the active delta, apply the other one (the fingerprint check unless force)
            sg.revert(model, current[0])
            sg.apply(model, target, force=force)
            current[0] = target

        return run

    def reload_state():
        model.load_state_dict(state)

    forward()  # warm-up
    switch_to(d2)()
    switch_to(d1)()
    times: dict[str, list[float]] = {k: [] for k in ("forward", "switch", "unchecked", "rows", "reload")}
    for _ in range(reps):  # interleaved, so that load from other processes hits all alike
        times["forward"].append(median_time(forward, 1))
        times["switch"].append(median_time(switch_to(d2), 1))
        times["unchecked"].append(median_time(switch_to(d1, force=True), 1))
        switch_to(r1)()  # untimed: set up a switch between two rows deltas
        times["rows"].append(median_time(switch_to(r2), 1))
        switch_to(d1)()
        times["reload"].append(median_time(reload_state, 1))
    sg.revert(model)
    med = {k: statistics.median(t) for k, t in times.items()}
    fwd, sw = med["forward"], med["switch"]
    result = {
        "model": "tiny random Llama (quick)" if args.quick else "SmolLM2-135M-Instruct (float32, CPU)",
        "density": args.density,
        "entries_per_delta": d1.num_entries,
        "row_values_per_rows_delta": r1.num_block_values,
        "forward_1x128_s": fwd,
        "switch_s": sw,
        "switch_without_fingerprint_check_s": med["unchecked"],
        "switch_rows_deltas_s": med["rows"],
        "load_state_dict_s": med["reload"],
        "switch_over_forward": sw / fwd,
        "switch_without_check_over_forward": med["unchecked"] / fwd,
        "switch_rows_deltas_over_forward": med["rows"] / fwd,
        "load_state_dict_over_forward": med["reload"] / fwd,
        "repetitions": reps,
        "threads": torch.get_num_threads(),
        "note": "median of interleaved repetitions; 1-minute load average "
        f"{os.getloadavg()[0]:.2f} at the end ({os.cpu_count()} CPU cores)",
    }
    print(json.dumps(result, indent=2))
    print(
        f"switching two {args.density:.0%} deltas ({d1.num_entries:,} entries each): {sw * 1e3:.1f} ms "
        f"= {sw / fwd:.2f} x one forward pass ({fwd * 1e3:.1f} ms, 1x128 tokens); "
        f"reloading a state dict: {med['reload'] / fwd:.2f} x"
    )
    out = Path(
        args.out or HERE / "results" / ("delta_switch_quick.json" if args.quick else "delta_switch.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
