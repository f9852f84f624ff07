"""Serving several tasks from one base: the cost of switching deltas vs one forward pass.

Two random 1% deltas over SmolLM2-135M's Linear weights (LM head excluded) are switched with
``sg.revert`` + ``sg.apply`` (what ``with sg.applied(...)`` does on exit and entry); the time is
compared side by side with one forward pass (batch 1 x 128 tokens) and with reloading the model's
state dict (what swapping merged checkpoints costs). Median of several repetitions.

    nice -n 10 python benchmarks/delta_switch.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import surgical as sg
from surgical.models import smollm2_path


def random_delta(model, density: float, seed: int) -> sg.Delta:
    g = torch.Generator().manual_seed(seed)
    d = sg.Delta()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            numel = module.weight.numel()
            k = round(density * numel)
            idx = torch.randperm(numel, generator=g)[:k].sort().values
            d.entries[f"{name}.weight"] = (idx, torch.randn(k, generator=g) * 1e-3)
            d.shapes[f"{name}.weight"] = tuple(module.weight.shape)
    d.meta["base"] = sg.delta.ops.base_identity(model)
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
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "delta_switch.json"))
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path()), local_files_only=True).eval()
    d1, d2 = random_delta(model, args.density, 1), random_delta(model, args.density, 2)
    ids = torch.randint(0, model.config.vocab_size, (1, 128))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def forward():
        with torch.no_grad():
            model(input_ids=ids)

    current = [d1]
    sg.apply(model, d1)

    def switch():  # revert the active delta, apply the other one (the checks included)
        nxt = d2 if current[0] is d1 else d1
        sg.revert(model, current[0])
        sg.apply(model, nxt)
        current[0] = nxt

    def switch_unchecked():
        nxt = d2 if current[0] is d1 else d1
        sg.revert(model, current[0])
        sg.apply(model, nxt, force=True)
        current[0] = nxt

    def reload_state():
        model.load_state_dict(state)

    forward()  # warm-up
    switch()
    t_fwd, t_switch, t_switch_nc, t_reload = [], [], [], []
    for _ in range(reps):  # interleaved, so that load from other processes hits all alike
        t_fwd.append(median_time(forward, 1))
        t_switch.append(median_time(switch, 1))
        t_switch_nc.append(median_time(switch_unchecked, 1))
        t_reload.append(median_time(reload_state, 1))
    sg.revert(model)
    fwd, sw, sw_nc, rl = (statistics.median(t) for t in (t_fwd, t_switch, t_switch_nc, t_reload))
    result = {
        "model": "SmolLM2-135M-Instruct (float32, CPU)",
        "density": args.density,
        "entries_per_delta": d1.num_entries,
        "forward_1x128_s": fwd,
        "switch_s": sw,
        "switch_without_fingerprint_check_s": sw_nc,
        "load_state_dict_s": rl,
        "switch_over_forward": sw / fwd,
        "switch_without_check_over_forward": sw_nc / fwd,
        "load_state_dict_over_forward": rl / fwd,
        "repetitions": reps,
        "threads": torch.get_num_threads(),
        "note": "median of interleaved repetitions; machine shared with other jobs (2 CPU cores)",
    }
    print(json.dumps(result, indent=2))
    print(
        f"switching two {args.density:.0%} deltas ({d1.num_entries:,} entries each): {sw * 1e3:.1f} ms "
        f"= {sw / fwd:.2f} x one forward pass ({fwd * 1e3:.1f} ms, 1x128 tokens); "
        f"reloading a state dict: {rl / fwd:.2f} x"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
