"""Step time and peak memory of training SmolLM2-135M: full FT, PEFT LoRA/SHiRA, surgical, floor.

Usage::

    nice -n 10 python benchmarks/train_speed.py            # SmolLM2-135M, batch 4 x 128, fp32 CPU
    python benchmarks/train_speed.py --quick               # tiny random Llama, seconds (run by a test)

Every configuration runs in its own fresh process (so peak RSS is its own); configurations are
interleaved round by round, and each reports the median step time over all its measured steps
after warm-up. Ratios are printed against full fine-tuning, LoRA and the floor (forward plus
input gradients with every weight frozen), and everything is written to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# most important comparisons first, so that a run cut short still has them
CONFIGS = ["floor", "entries_lora", "lora", "full", "rows_lora", "entries_1", "entries_0.5", "lisa", "shira",
           "entries_lora_addmm"]  # fmt: skip
# entries_lora_addmm: entries_lora with torch.sparse.sampled_addmm instead of surgical's CPU kernel


def load_model(quick: bool):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from surgical.models import smollm2_path
    from surgical.utils import quiet_transformers

    quiet_transformers()
    torch.manual_seed(0)
    if quick:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
        return LlamaForCausalLM(cfg)
    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_path()), local_files_only=True, dtype=torch.float32
    )


def lora_count(model, r: int = 16) -> int:
    """Trainable values of PEFT LoRA r on all linear layers but the head: r * (in + out) each."""
    from surgical.select.core import default_targets

    return sum(r * sum(model.get_parameter(n).shape) for n in default_targets(model))


def setup(name: str, model):
    """Makes ``model`` trainable as configuration ``name``; returns (model, trainable, hooks)."""
    import torch

    import surgical as sg
    from surgical.select.core import default_targets, proportional_counts
    from surgical.select.plan import Plan
    from surgical.train.schedules import LISA

    hooks = []
    targets = default_targets(model)
    total = sum(model.get_parameter(n).numel() for n in targets)
    if name == "full":
        pass
    elif name in ("lora", "shira"):
        from peft import LoraConfig, ShiraConfig, get_peft_model

        kw = {"r": 16, "target_modules": "all-linear"}
        cfg = LoraConfig(**kw, lora_alpha=32) if name == "lora" else ShiraConfig(**kw, random_seed=0)
        model = get_peft_model(model, cfg)
    elif name.startswith("entries_"):
        arg = name.split("_")[1]
        count = lora_count(model) if arg == "lora" else round(float(arg) / 100 * total)
        # random entries drawn tensor by tensor: sg.select would score all 106M weights at once,
        # and that transient peak (~0.9 GB) would hide the training memory we measure here
        g = torch.Generator().manual_seed(0)
        counts = proportional_counts({n: model.get_parameter(n).numel() for n in targets}, count)
        entries = {
            n: torch.sort(torch.randperm(model.get_parameter(n).numel(), generator=g)[:c]).values
            for n, c in counts.items()
        }
        shapes = {n: tuple(model.get_parameter(n).shape) for n in targets}
        sg.prepare(model, Plan(entries=entries, shapes=shapes, meta={"method": "random"}))
    elif name == "rows_lora":
        g = torch.Generator().manual_seed(0)
        share = lora_count(model) / total
        rows = {}
        for n in targets:
            out_f = model.get_parameter(n).shape[0]
            rows[n] = torch.sort(torch.randperm(out_f, generator=g)[: max(1, round(share * out_f))]).values
        shapes = {n: tuple(model.get_parameter(n).shape) for n in targets}
        sg.prepare(model, Plan(rows=rows, shapes=shapes, meta={"method": "random-rows"}))
    elif name == "lisa":
        names = [n for n, _ in model.named_parameters() if ".layers." in n]
        shapes = {n: tuple(model.get_parameter(n).shape) for n in names}
        sg.prepare(model, Plan(dense=names, shapes=shapes, meta={"method": "layers"}))
        hooks = [LISA(gamma=2, every=1000, seed=0)]
    elif name == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
    else:
        raise SystemExit(f"unknown configuration {name}")
    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    return model, hooks


def worker(name: str, steps: int, warmup: int, quick: bool) -> dict:
    """Runs one configuration in this process and returns its measurements."""
    if name.endswith("_addmm"):
        os.environ["SURGICAL_CPU_KERNEL"] = "0"
    import torch

    from surgical.train.hooks import StepState
    from surgical.utils import peak_rss_bytes, reset_peak_rss

    model = load_model(quick)
    model, hooks = setup(name, model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    state = StepState(model=model, optimizer=opt, scheduler=None, step=0, total_steps=steps)
    for h in hooks:
        h.on_train_begin(state)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch, seq = (4, 32) if quick else (4, 128)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    model.train()
    times = []
    # the peak of loading (GGUF dequantization) is not training memory, and its size varied
    # by ~0.2 GiB from process to process: measure from here on
    reset = reset_peak_rss()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"config": name, "step_times": times, "peak_rss_bytes": peak_rss_bytes(), "trainable": trainable,
            "state_bytes": entry_state_bytes(model, opt), "peak_from_training": reset,
            "cpu_kernel": kernel_info()}  # fmt: skip


def kernel_info() -> str:
    """Which code computed the entry gradients in this process."""
    from surgical.train import cpu_kernel

    lib = cpu_kernel._LIB
    if not cpu_kernel.enabled() or cpu_kernel._TRIED and lib is None:
        return "torch.sparse.sampled_addmm"
    if lib is None:  # never asked for: every layer was dense enough for a dense product + gather
        return "dense product + gather"
    return "surgical CPU kernel" + (" (AVX-512)" if lib.sg_sampled_grad_avx512() else " (portable)")


def entry_state_bytes(model, opt) -> int:
    """Bytes held for entry-sparse weights after training: exact, unlike the RSS slope.

    Per selected entry: the value, its gradient (freed by ``zero_grad`` between steps, so
    counted from the value's size) and the optimizer's state, the index, the base
    value, and the cached CSR pattern's row pointers and column indices (its values alias the
    delta). Peak RSS also moves with allocator caching, which makes its slope noisy.
    """
    from surgical.train.sparse import EntryState

    total, seen = 0, set()

    def add(t):
        nonlocal total
        if t is not None and t.data_ptr() not in seen:  # by storage: the CSR getters make new objects
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for module in model.modules():
        state = getattr(module, "_sg_entries", None)
        if not isinstance(state, EntryState):
            continue
        delta = state.delta(module)
        for t in (delta, state.indices(module), state.orig(module)):
            add(t)
        total += delta.numel() * delta.element_size()  # its gradient, alive from backward to the step
        for t in (opt.state.get(delta, {}) if opt is not None else {}).values():
            add(t if t.dim() else None)  # the step counter is one scalar per tensor
        if state.pattern is not None:
            add(state.pattern.crow_indices())
            add(state.pattern.col_indices())
    return total


def run(args, partial: Path | None = None) -> dict:
    steps, warmup, rounds = (2, 1, 1) if args.quick else (args.steps, args.warmup, args.rounds)
    results: dict[str, dict] = {c: {"step_times": [], "peak_rss": []} for c in args.configs}
    # one thread by default: on a busy machine two spinning OpenMP threads per process made a
    # full fine-tuning step ~20x slower (85 s instead of ~4 s) and the ratios meaningless
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # recorded in the report
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    for r in range(rounds):
        for c in args.configs:  # interleaved: each round runs every configuration once
            cmd = [sys.executable, __file__, "--worker", c, "--steps", str(steps), "--warmup", str(warmup)]
            p = subprocess.run(
                cmd + (["--quick"] if args.quick else []), env=env, capture_output=True, text=True
            )
            if p.returncode != 0:
                raise SystemExit(f"{c} failed:\n{p.stderr[-3000:]}")
            out = json.loads(p.stdout.strip().splitlines()[-1])
            results[c]["step_times"] += out["step_times"]
            results[c]["peak_rss"].append(out["peak_rss_bytes"])
            results[c]["trainable"] = out["trainable"]
            results[c]["state_bytes"] = out["state_bytes"]
            results[c]["cpu_kernel"] = out["cpu_kernel"]
            results[c]["peak_from_training"] = out["peak_from_training"]
            med, gib = statistics.median(out["step_times"]), out["peak_rss_bytes"] / 2**30
            n = out["trainable"]
            print(f"round {r + 1}/{rounds} {c:>14}: {med:.3f} s/step, {gib:.2f} GiB, {n:,} trainable")
            sys.stdout.flush()
            if partial is not None:  # keep what is measured so far if the run is cut short
                done = {k: _summarise(v) for k, v in results.items() if v["step_times"]}
                partial.write_text(json.dumps(report(done, args.quick, show=False), indent=2) + "\n")
    return {k: _summarise(v) for k, v in results.items()}


def _summarise(v: dict) -> dict:
    return {
        **v,
        "step_s": statistics.median(v["step_times"]),
        "peak_rss_gib": statistics.median(v["peak_rss"]) / 2**30,
    }


def report(results: dict, quick: bool, show: bool = True) -> dict:
    ref = {k: results[k] for k in ("full", "lora", "floor") if k in results}
    rows = {}
    for c, v in results.items():
        row = {"step_s": round(v["step_s"], 4), "peak_rss_gib": round(v["peak_rss_gib"], 3),
               "trainable": v["trainable"]}  # fmt: skip
        if c.startswith("entries_"):
            row["entry_gradients"] = v.get("cpu_kernel")
        for k, rv in ref.items():
            row[f"time_vs_{k}"] = round(v["step_s"] / rv["step_s"], 3)
            row[f"mem_vs_{k}"] = round(v["peak_rss_gib"] / rv["peak_rss_gib"], 3)
        if "floor" in results and c.startswith("entries_") and v["trainable"]:
            above = (v["peak_rss_gib"] - results["floor"]["peak_rss_gib"]) * 2**30
            row["bytes_above_floor_per_entry"] = round(above / v["trainable"], 1)
            row["state_bytes_per_entry"] = round(v["state_bytes"] / v["trainable"], 2)
        rows[c] = row
    if show:
        print_table(rows)
    import torch

    slope = entry_slope(results)
    if show and slope is not None:
        print(f"memory per selected entry (slope from 0.5% to the LoRA-equivalent count): {slope:.1f} bytes")
    for c, r in rows.items():
        if show and "state_bytes_per_entry" in r:
            print(f"{c}: {r['state_bytes_per_entry']:.2f} bytes of state per entry (counted)")
    return {
        "bytes_per_entry_slope": slope,
        "benchmark": "train_speed",
        "model": "tiny random Llama (quick)" if quick else "SmolLM2-135M-Instruct fp32, batch 4 x 128 tokens",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{os.environ.get('OMP_NUM_THREADS', '?')} thread(s) per worker process",
        "note": "peak RSS is the high-water mark over the training steps (reset after loading and "
        "setup where Linux allows it), so it includes the loaded model and Python/torch (about the "
        "same in every configuration) but not the transient peak of loading; entries_lora trains as "
        "many values as LoRA r=16" + share_note(results) + "; entries_lora_addmm is entries_lora with "
        "torch.sparse.sampled_addmm computing the entry gradients instead of surgical's CPU kernel",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": rows,
    }


def share_note(results: dict) -> str:
    """The LoRA-equivalent count as a share of all parameters (full fine-tuning trains them all)."""
    if "entries_lora" not in results or "full" not in results:
        return ""
    return f" ({results['entries_lora']['trainable'] / results['full']['trainable']:.1%} of all parameters)"


def protocol(args, load_before: tuple, load_after: tuple) -> str:
    """How the figures were taken, with the machine's load averages around the run."""
    steps, warmup, rounds = (2, 1, 1) if args.quick else (args.steps, args.warmup, args.rounds)
    return (
        f"{rounds} interleaved round(s), each configuration in its own fresh process, median of "
        f"{rounds * steps} steps ({steps} per round) after {warmup} warm-up step(s), "
        f"{args.threads} torch thread(s) per process; 1-minute load average "
        f"{load_before[0]:.2f} before and {load_after[0]:.2f} after the run"
    )


def entry_slope(results: dict) -> float | None:
    """Peak-RSS growth per selected entry between the smallest and largest entry configuration.

    Memory above the floor also holds costs that do not depend on the count (the saved layer
    inputs every trained Linear needs for its weight gradient); the slope isolates the part
    that grows with the number of entries.
    """
    pts = sorted(
        (v["trainable"], v["peak_rss_gib"])
        for c, v in results.items()
        if c.startswith("entries_") and not c.endswith("_addmm")
    )
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return None
    return round((pts[-1][1] - pts[0][1]) * 2**30 / (pts[-1][0] - pts[0][0]), 1)


def print_table(rows: dict) -> None:
    """Prints the results as a table of step times, memory and ratios."""
    print(f"{'config':>18} {'s/step':>7} {'GiB':>6} {'trainable':>11} {'t/full':>6} {'t/lora':>6} "
          f"{'t/floor':>7} {'m/lora':>6} {'m/floor':>7}")  # fmt: skip
    keys = ("time_vs_full", "time_vs_lora", "time_vs_floor", "mem_vs_lora", "mem_vs_floor")
    for c, r in rows.items():
        ratios = [r.get(k, 0) for k in keys]
        print(f"{c:>18} {r['step_s']:7.3f} {r['peak_rss_gib']:6.2f} {r['trainable']:11,} "
              + " ".join(f"{x:6.2f}" for x in ratios))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Tiny random model, 2 steps (for tests).")
    ap.add_argument("--steps", type=int, default=3, help="Measured steps per configuration and round.")
    ap.add_argument(
        "--warmup", type=int, default=2,
        help="Unmeasured steps first: a configuration's second step can still pay first-touch page "
        "faults for its gradients and optimizer state (full fine-tuning, many entries).",
    )  # fmt: skip
    ap.add_argument("--rounds", type=int, default=2, help="Interleaved rounds over all configurations.")
    ap.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    ap.add_argument("--threads", type=int, default=1, help="Torch/OpenMP threads per worker process.")
    ap.add_argument("--out", default=None, help="JSON results path (default: benchmarks/results/).")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.quick)))
        return
    load_before = os.getloadavg()
    data = report(run(args), args.quick)
    data["protocol"] = protocol(args, load_before, os.getloadavg())
    out = Path(
        args.out or HERE / "results" / ("train_speed_quick.json" if args.quick else "train_speed.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
