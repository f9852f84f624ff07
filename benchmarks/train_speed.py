"""Step time and peak memory of training SmolLM2-135M: full FT, PEFT LoRA/SHiRA, surgical, floor.

Usage::

    nice -n 10 python benchmarks/train_speed.py            # SmolLM2-135M, batch 4 x 128, fp32 CPU
    python benchmarks/train_speed.py --quick               # tiny random Llama, seconds (run by a test)
    python benchmarks/train_speed.py --device cuda --random-init --batch 16 --seq 512   # on a GPU

``--random-init`` builds SmolLM2-135M's architecture with random weights (step time and memory
do not depend on the weights), for machines without the model package. On CUDA each step is
timed between ``torch.cuda.synchronize()`` calls and memory is the peak of
``torch.cuda.max_memory_allocated()`` instead of RSS; ``--profile`` adds a ``torch.profiler``
breakdown of two more steps per configuration (the share of the entry gradients' sampled
matmul) and counts the host synchronisations of one step. ``--dense-gather`` computes every entry
gradient as the dense product gathered at the entries (an experiment; see the README's GPU figures).

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


def smollm2_config():
    """SmolLM2-135M's architecture (its real sizes), for a model with random weights."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)  # fmt: skip


def load_model(quick: bool, random_init: bool = False, device: str = "cpu"):
    """The benchmark's model on ``device``: SmolLM2-135M, its architecture with random weights, or
    a tiny random Llama (``quick``)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from surgical.core.runtime import quiet_transformers
    from surgical.recipes.smollm2 import smollm2_path

    quiet_transformers()
    torch.manual_seed(0)
    if quick:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
        return LlamaForCausalLM(cfg).to(device)
    if random_init:
        with torch.device(device):  # initialised where it runs: seconds instead of a CPU init and a copy
            return LlamaForCausalLM(smollm2_config())
    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_path()), local_files_only=True, dtype=torch.float32
    ).to(device)


def lora_count(model, r: int = 16) -> int:
    """Trainable values of PEFT LoRA r on all linear layers but the head: r * (in + out) each."""
    from surgical.select.api import default_targets

    return sum(r * sum(model.get_parameter(n).shape) for n in default_targets(model))


def setup(name: str, model):
    """Makes ``model`` trainable as configuration ``name``; returns (model, trainable, hooks)."""
    import torch

    import surgical as sg
    from surgical.select.allocate import proportional_counts
    from surgical.select.api import default_targets
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


def batch_shape(args) -> tuple[int, int]:
    """(sequences, tokens per sequence) of a training batch: 4 x 128 unless given (4 x 32 quick)."""
    return args.batch or 4, args.seq or (32 if args.quick else 128)


def worker(name: str, args) -> dict:
    """Runs one configuration in this process and returns its measurements."""
    import contextlib

    if name.endswith("_addmm"):
        os.environ["SURGICAL_CPU_KERNEL"] = "0"
    import torch

    from surgical.core.runtime import peak_rss_bytes, reset_peak_rss
    from surgical.train.hooks import StepState

    cuda = args.device == "cuda"
    if args.dense_gather:  # every entry gradient as the dense product gathered at the entries
        from surgical.train import sparse

        sparse.DENSE_GATHER_DENSITY = 0.0
    model = load_model(args.quick, args.random_init, args.device)
    model, hooks = setup(name, model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    state = StepState(model=model, optimizer=opt, scheduler=None, step=0, total_steps=args.steps)
    for h in hooks:
        h.on_train_begin(state)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch, seq = batch_shape(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(args.device)
    model.train()

    def step():
        bf16 = torch.autocast(args.device, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        with bf16:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:  # from here on: the weights (already there) plus everything training allocates
        torch.cuda.reset_peak_memory_stats()
    # on CPU likewise: the peak of loading (GGUF dequantization) is not training memory, and its
    # size varied by ~0.2 GiB from process to process
    reset = not cuda and reset_peak_rss()
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    out = {"config": name, "step_times": times, "peak_bytes": peak, "trainable": trainable,
           "state_bytes": entry_state_bytes(model, opt), "peak_from_training": cuda or reset,
           "cpu_kernel": kernel_info(model, args.device)}  # fmt: skip
    if args.profile:
        out["profile"] = profile_steps(step, sync, cuda, statistics.median(times))
    return out


def kernel_info(model, device: str) -> str | None:
    """Which code computed the entry gradients of ``model`` (None: it has no entry-sparse weight)."""
    from surgical.train import cpu_kernel, sparse

    states = [getattr(m, "_sg_entries", None) for m in model.modules()]
    states = [s for s in states if isinstance(s, sparse.EntryState)]
    if not states:
        return None
    threshold = sparse.CUDA_DENSE_GATHER_DENSITY if device == "cuda" else sparse.DENSE_GATHER_DENSITY
    if all(s.pattern is None for s in states):  # the pattern is built only for a sampled product
        return f"dense product + gather (above {threshold:.0%} density)"
    lib = cpu_kernel.library() if device == "cpu" else None
    if lib is None:
        return "torch.sparse.sampled_addmm"
    return "surgical CPU kernel" + (" (AVX-512)" if lib.sg_sampled_grad_avx512() else " (portable)")


def profile_steps(step, sync, cuda: bool, step_s: float, steps: int = 2) -> dict:
    """Where ``steps`` more steps spend their time, by torch.profiler; on CUDA also the host syncs.

    Reports the time of the entry gradients' sampled matmul (``aten::sparse_sampled_addmm``:
    device time of its kernels, and host time of the call) against the step's (``step_s``, the
    median unprofiled step time; the profiler slows the host side), the kernels it launched, the
    synchronising CUDA runtime calls the profiler saw, and those ``torch.cuda.set_sync_debug_mode``
    reports in one more step.
    """
    import warnings

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    wall = (time.perf_counter() - t0) / steps
    averages = prof.key_averages()

    def dev(a, own: bool = False) -> float:  # device time in microseconds (cuda_* before torch 2.4)
        prefix = "self_" if own else ""
        return getattr(a, f"{prefix}device_time_total", None) or getattr(a, f"{prefix}cuda_time_total", 0)

    def self_time(a):  # device time on CUDA, host time on CPU
        return dev(a, own=True) if cuda else a.self_cpu_time_total

    sampled = [a for a in averages if a.key == "aten::sparse_sampled_addmm"]
    kernels = set()  # names of the kernels the sampled matmul launched, itself or through its callees
    todo = [e for e in prof.events() if e.name == "aten::sparse_sampled_addmm"]
    while todo:
        e = todo.pop()
        kernels.update(k.name for k in e.kernels)
        todo += e.cpu_children
    top = sorted(averages, key=lambda a: -self_time(a))[:12]
    out = {
        "steps": steps,
        "step_wall_s": round(wall, 5),
        "sampled_addmm_calls_per_step": sum(a.count for a in sampled) // steps,
        "sampled_addmm_host_s_per_step": round(sum(a.cpu_time_total for a in sampled) / steps / 1e6, 5),
        "top_ops_by_self_time": [
            {
                "op": a.key[:120],
                "calls_per_step": a.count // steps,
                "self_s": round(self_time(a) / steps / 1e6, 5),
            }
            for a in top
        ],
    }
    if cuda:
        # kernels and copies on the GPU (the ops that launch them carry the same time again)
        device_total = (
            sum(dev(a, own=True) for a in averages if a.device_type == DeviceType.CUDA) / steps / 1e6
        )
        sampled_dev = sum(dev(a) for a in sampled) / steps / 1e6
        sampled_host = sum(a.cpu_time_total for a in sampled) / steps / 1e6
        blocking = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
        out.update(
            device_busy_s_per_step=round(device_total, 5),
            step_s=round(step_s, 5),
            sampled_addmm_device_s_per_step=round(sampled_dev, 5),
            sampled_addmm_share_of_device_time=round(sampled_dev / device_total, 4) if device_total else None,
            sampled_addmm_device_share_of_step=round(sampled_dev / step_s, 4),
            sampled_addmm_host_share_of_profiled_step=round(sampled_host / wall, 4),
            sampled_addmm_kernels=sorted(k[:160] for k in kernels),
            # the profiled block ends with one torch.cuda.synchronize() of its own
            blocking_runtime_calls_in_profile={a.key: a.count for a in averages if a.key in blocking},
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]
        out["host_syncs_in_one_step"] = len(syncs)
        out["host_sync_messages"] = sorted(set(syncs))[:5]
    return out


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


def run_worker(config: str, steps: int, warmup: int, extra: list[str], env: dict, what: str = "") -> dict:
    """Runs one configuration in a fresh process and returns the measurements it prints."""
    cmd = [sys.executable, __file__, "--worker", config, "--steps", str(steps), "--warmup", str(warmup)]
    p = subprocess.run(cmd + extra, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{config}{what} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(args, partial: Path | None = None) -> dict:
    steps, warmup, rounds = (2, 1, 1) if args.quick else (args.steps, args.warmup, args.rounds)
    results: dict[str, dict] = {c: {"step_times": [], "peak": []} for c in args.configs}
    passed = [f"--device={args.device}"] + (["--random-init"] if args.random_init else [])
    passed += (["--bf16"] if args.bf16 else []) + (["--profile"] if args.profile else [])
    passed += ["--dense-gather"] if args.dense_gather else []
    passed += [f"--batch={args.batch}"] if args.batch else []
    passed += [f"--seq={args.seq}"] if args.seq else []
    # one thread by default: on a busy machine two spinning OpenMP threads per process made a
    # full fine-tuning step ~20x slower (85 s instead of ~4 s) and the ratios meaningless
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # recorded in the report
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    for r in range(rounds):
        for c in args.configs:  # interleaved: each round runs every configuration once
            out = run_worker(c, steps, warmup, (["--quick"] if args.quick else []) + passed, env)
            results[c]["step_times"] += out["step_times"]
            results[c]["peak"].append(out["peak_bytes"])
            results[c]["trainable"] = out["trainable"]
            results[c]["state_bytes"] = out["state_bytes"]
            results[c]["cpu_kernel"] = out["cpu_kernel"]
            results[c]["peak_from_training"] = out["peak_from_training"]
            if "profile" in out:
                results[c]["profile"] = out["profile"]
            med, gib = statistics.median(out["step_times"]), out["peak_bytes"] / 2**30
            n = out["trainable"]
            print(f"round {r + 1}/{rounds} {c:>14}: {med:.3f} s/step, {gib:.2f} GiB, {n:,} trainable")
            sys.stdout.flush()
            if partial is not None:  # keep what is measured so far if the run is cut short
                done = {k: _summarise(v) for k, v in results.items() if v["step_times"]}
                partial.write_text(json.dumps(report(done, args, show=False), indent=2) + "\n")
    return {k: _summarise(v) for k, v in results.items()}


#: glibc's mmap threshold for the live-memory pass: allocations from 64 KiB up get their own
#: mapping and go back to the system when freed, so peak RSS follows the live tensors instead of
#: the heap's fragmentation (which moved one configuration's peak by up to 0.25 GiB between runs)
LIVE_MMAP_THRESHOLD = 65536
LIVE_CONFIGS = ("floor", "entries_0.5", "entries_1", "entries_lora", "lora", "shira")


def live_memory(args) -> dict | None:
    """Peak RSS of the entry configurations (and floor, LoRA, SHiRA) with a fixed mmap threshold.

    A separate pass of ``args.memory_rounds`` interleaved rounds (two warm-up steps, so that the
    optimizer state exists, and one measured step): its step times are not reported, since
    mapping every large allocation afresh slows every configuration. Returns None on CUDA (the
    CUDA figures already count live tensors) or when there are no rounds.
    """
    if args.device == "cuda" or args.memory_rounds <= 0:
        return None
    configs = [c for c in LIVE_CONFIGS if c in args.configs]
    rounds = 1 if args.quick else args.memory_rounds
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    env["MALLOC_MMAP_THRESHOLD_"] = str(LIVE_MMAP_THRESHOLD)
    peaks: dict[str, list[int]] = {c: [] for c in configs}
    trainable: dict[str, int] = {}
    for r in range(rounds):
        for c in configs:
            out = run_worker(c, 1, 2, ["--quick"] if args.quick else [], env, " (live-memory pass)")
            peaks[c].append(out["peak_bytes"])
            trainable[c] = out["trainable"]
            print(f"live memory {r + 1}/{rounds} {c:>14}: {out['peak_bytes'] / 2**30:.3f} GiB")
            sys.stdout.flush()
    gib = {c: statistics.median(v) / 2**30 for c, v in peaks.items()}
    live = {"peak_rss_gib": {c: round(v, 3) for c, v in gib.items()}, "rounds": rounds,
            "malloc_mmap_threshold": LIVE_MMAP_THRESHOLD}  # fmt: skip
    for ref in ("lora", "shira", "floor"):
        if ref in gib:
            live[f"vs_{ref}"] = {c: round(v / gib[ref], 3) for c, v in gib.items()}
    slope = entry_slope({c: {"trainable": trainable[c], "peak_gib": v} for c, v in gib.items()})
    if slope is not None:
        live["bytes_per_entry_slope"] = slope
        print(f"live memory per selected entry (slope): {slope:.1f} bytes")
    return live


def _summarise(v: dict) -> dict:
    return {
        **v,
        "step_s": statistics.median(v["step_times"]),
        "peak_gib": statistics.median(v["peak"]) / 2**30,
    }


def report(results: dict, args, show: bool = True) -> dict:
    cuda = args.device == "cuda"
    mem_key = "peak_cuda_gib" if cuda else "peak_rss_gib"
    ref = {k: results[k] for k in ("full", "lora", "floor") if k in results}
    rows = {}
    for c, v in results.items():
        row = {"step_s": round(v["step_s"], 4), mem_key: round(v["peak_gib"], 3), "trainable": v["trainable"]}
        if c.startswith("entries_"):
            row["entry_gradients"] = v.get("cpu_kernel")
        for k, rv in ref.items():
            row[f"time_vs_{k}"] = round(v["step_s"] / rv["step_s"], 3)
            row[f"mem_vs_{k}"] = round(v["peak_gib"] / rv["peak_gib"], 3)
        if "floor" in results and c.startswith("entries_") and v["trainable"]:
            above = (v["peak_gib"] - results["floor"]["peak_gib"]) * 2**30
            row["bytes_above_floor_per_entry"] = round(above / v["trainable"], 1)
            row["state_bytes_per_entry"] = round(v["state_bytes"] / v["trainable"], 2)
        rows[c] = row
    if show:
        print_table(rows, mem_key)
    import torch

    slope = entry_slope(results)
    if show and slope is not None:
        print(f"memory per selected entry (slope from 0.5% to the LoRA-equivalent count): {slope:.1f} bytes")
    for c, r in rows.items():
        if show and "state_bytes_per_entry" in r:
            print(f"{c}: {r['state_bytes_per_entry']:.2f} bytes of state per entry (counted)")
    batch, seq = batch_shape(args)
    name = "SmolLM2-135M architecture with random weights" if args.random_init else "SmolLM2-135M-Instruct"
    precision = "fp32 weights, bf16 autocast" if args.bf16 else "fp32"
    model = f"{name} {precision}, batch {batch} x {seq} tokens"
    data = {
        "bytes_per_entry_slope": slope,
        "benchmark": "train_speed",
        "model": "tiny random Llama (quick)" if args.quick else model,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{os.environ.get('OMP_NUM_THREADS', '?')} thread(s) per worker process",
        "note": "peak RSS is the high-water mark over the training steps (reset after loading and "
        "setup where Linux allows it), so it includes the loaded model and Python/torch (about the "
        "same in every configuration) but not the transient peak of loading; entries_lora trains as "
        "many values as LoRA r=16" + share_note(results) + "; entries_lora_addmm is entries_lora with "
        "torch.sparse.sampled_addmm computing the entry gradients instead of surgical's CPU kernel",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": rows,
    }  # fmt: skip
    if cuda:
        data["device"] = "cuda"
        data["machine"] = gpu_description() + ", " + data["machine"]
        data["memory"] = (
            "peak_cuda_gib is torch.cuda.max_memory_allocated() after torch.cuda.reset_peak_memory_stats() "
            "once the model was on the GPU and prepared: the weights plus everything training allocated "
            "(activations, gradients, optimizer state), not the CUDA context or the allocator's unused cache"
        )
        data["note"] = "entries_lora trains as many values as LoRA r=16" + share_note(results)
        data["timing"] = "each step timed between torch.cuda.synchronize() calls"
    if args.dense_gather:
        data["entry_gradients"] = "dense product gy^T x gathered at the entries (DENSE_GATHER_DENSITY = 0)"
    profiles = {c: v["profile"] for c, v in results.items() if "profile" in v}
    if profiles:
        data["profile"] = profiles
    return data


def gpu_description() -> str:
    """The GPU, its memory, CUDA and driver versions."""
    import torch

    props = torch.cuda.get_device_properties(0)
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    except OSError:
        driver = "?"
    return (
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
        f"CUDA {torch.version.cuda}, driver {driver or '?'}"
    )


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
        (v["trainable"], v["peak_gib"])
        for c, v in results.items()
        if c.startswith("entries_") and not c.endswith("_addmm")
    )
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return None
    return round((pts[-1][1] - pts[0][1]) * 2**30 / (pts[-1][0] - pts[0][0]), 1)


def print_table(rows: dict, mem_key: str = "peak_rss_gib") -> None:
    """Prints the results as a table of step times, memory and ratios."""
    print(f"{'config':>18} {'s/step':>7} {'GiB':>6} {'trainable':>11} {'t/full':>6} {'t/lora':>6} "
          f"{'t/floor':>7} {'m/lora':>6} {'m/floor':>7}")  # fmt: skip
    keys = ("time_vs_full", "time_vs_lora", "time_vs_floor", "mem_vs_lora", "mem_vs_floor")
    for c, r in rows.items():
        ratios = [r.get(k, 0) for k in keys]
        print(f"{c:>18} {r['step_s']:7.3f} {r[mem_key]:6.2f} {r['trainable']:11,} "
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
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Where to train.")
    ap.add_argument(
        "--random-init", action="store_true",
        help="SmolLM2-135M's architecture with random weights (no model package needed).",
    )  # fmt: skip
    ap.add_argument("--batch", type=int, default=None, help="Sequences per batch (default 4).")
    ap.add_argument("--seq", type=int, default=None, help="Tokens per sequence (default 128; quick: 32).")
    ap.add_argument("--bf16", action="store_true", help="Forward under bf16 autocast (weights stay fp32).")
    ap.add_argument("--profile", action="store_true", help="Profile two more steps per configuration.")
    ap.add_argument(
        "--dense-gather", action="store_true",
        help="Entry gradients by the dense product gathered at the entries instead of the sampled matmul "
        "(an experiment: surgical switches to it only above DENSE_GATHER_DENSITY).",
    )  # fmt: skip
    ap.add_argument(
        "--memory-rounds", type=int, default=2,
        help="Rounds of the live-memory pass after the timed rounds (CPU; 0 skips it): peak RSS with "
        f"glibc's mmap threshold fixed at {LIVE_MMAP_THRESHOLD} bytes, for the per-entry slope.",
    )  # fmt: skip
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    load_before = os.getloadavg()
    default = "train_speed_quick.json" if args.quick else "train_speed.json"
    if args.device == "cuda":
        default = default.replace("train_speed", "train_speed_cuda")
    out = Path(args.out or HERE / "results" / default)
    out.parent.mkdir(parents=True, exist_ok=True)
    # on a lent GPU machine a run may be cut short: keep each finished configuration
    data = report(run(args, partial=out if args.device == "cuda" else None), args)
    live = live_memory(args)
    if live is not None:
        data["live_memory"] = live
    data["protocol"] = protocol(args, load_before, os.getloadavg())
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
