"""Step time and peak memory beyond nn.Linear: GPT-2 (Conv1D) and Mixtral (fused experts).

Two architectures with random weights, scaled to run on 2 CPU cores:

- GPT-2 (``GPT2LMHeadModel``; its blocks use transformers' ``Conv1D``, weights stored (in, out)):
  n_embd 384, 4 layers, 6 heads, vocab 8192;
- Mixtral (``MixtralForCausalLM``; transformers 5 stores each layer's experts as two fused 3-D
  parameters, ``mlp.experts.gate_up_proj`` (experts, 2 x ffn, hidden) and ``down_proj``):
  hidden 256, 4 layers, 4 heads (2 key-value), 4 experts, top-2, intermediate 512, vocab 8192.

Configurations, each trained with AdamW on batches of 4 x 128 random tokens (labels = inputs):

- ``full``: every parameter;
- ``lora``: PEFT LoRA r=8 (alpha 16). GPT-2: ``c_attn``, ``c_proj`` (attention and MLP), ``c_fc``,
  i.e. every Conv1D. Mixtral: the attention projections (``q/k/v/o_proj``) and, through
  ``target_parameters``, both fused expert tensors of every layer (PEFT >= 0.17); the router is
  not covered;
- ``surgical_1``: 1% of surgical's default targets (GPT-2: every Conv1D weight; Mixtral: the
  attention projections and the fused expert tensors) as random entries
  (``sg.select(method="random", density=0.01)``, selected once in the parent process and
  loaded by the workers), trained with ``sg.prepare``: GPT-2's Conv1D
  through the Conv1D entry path, Mixtral's attention through the Linear entry path and its
  experts through the generic path (one transient dense gradient of each expert tensor);
- ``surgical_lora``: the same, at LoRA's number of trainable values.

Each configuration runs in a fresh process (peak RSS is its own, reset after the model is built
and prepared: ``peak`` is the whole process, ``+train`` what training adds to it), one thread;
configurations are interleaved round by round, in alternating order; the step time is the
median over every measured step after warm-up, the memory the median over rounds. Ratios are
printed against full fine-tuning and LoRA.

    nice -n 10 python benchmarks/module_speed.py              # ~5 minutes on 2 busy cores
    python benchmarks/module_speed.py --quick --out X.json    # tiny shapes, seconds (run by a test)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from surgical.core.io import atomic_write_text

HERE = Path(__file__).resolve().parent
MODELS = ("gpt2", "mixtral")
CONFIGS = ("full", "lora", "surgical_1", "surgical_lora")
LORA_R = 8


def build(name: str, quick: bool):
    """The model with random weights (seed 0)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

    from surgical.core.runtime import quiet_transformers

    quiet_transformers()
    torch.manual_seed(0)
    if name == "gpt2":
        e, layers, heads = (64, 2, 4) if quick else (384, 4, 6)
        cfg = GPT2Config(
            vocab_size=8192,
            n_embd=e,
            n_layer=layers,
            n_head=heads,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(cfg)
    h, layers, ffn = (64, 2, 128) if quick else (256, 4, 512)
    cfg = MixtralConfig(
        vocab_size=8192,
        hidden_size=h,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    return MixtralForCausalLM(cfg)


def lora_config(name: str):
    """PEFT LoRA r=8 for ``name`` (``gpt2`` or ``mixtral``, also the configs' ``model_type``)."""
    from peft import LoraConfig

    if name == "gpt2":
        return LoraConfig(
            r=LORA_R, lora_alpha=2 * LORA_R, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
        )
    return LoraConfig(
        r=LORA_R,
        lora_alpha=2 * LORA_R,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )


def lora_trainable(model) -> int:
    """How many values PEFT LoRA trains on ``model`` (which it wraps)."""
    from peft import get_peft_model

    return sum(
        p.numel()
        for p in get_peft_model(model, lora_config(model.config.model_type)).parameters()
        if p.requires_grad
    )


def make_plans(model_name: str, quick: bool, directory: Path) -> dict:
    """Selects the surgical plans once, in this process, and saves them for the workers.

    Selecting in the worker would leave the transient scores of every targeted weight in its
    heap, where training would reuse them and the measured peak would come out too low.
    """
    import surgical as sg

    count = lora_trainable(build(model_name, quick))
    model = build(model_name, quick)
    out = {}
    for config, budget in (("surgical_1", {"density": 0.01}), ("surgical_lora", {"count": count})):
        plan = sg.select(model, None, method="random", progress=False, **budget)
        plan.save(directory / f"{model_name}-{config}")
        out[config] = {"selected": plan.meta["selected"], "targeted": plan.meta["targeted"]}
    return {"lora_trainable": count, **out}


def setup(model_name: str, config: str, model, plans: Path | None):
    """Makes ``model`` trainable as ``config``; returns (model, description of what trains)."""
    import surgical as sg

    if config == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, {}
    if config == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(model_name))
        return model, {"lora_covers": lora_coverage(model)}
    if config not in ("surgical_1", "surgical_lora") or plans is None:
        raise SystemExit(f"unknown configuration {config}")
    plan = sg.Plan.load(plans / f"{model_name}-{config}")
    sg.prepare(model, plan)
    return model, {"paths": surgical_paths(model, plan)}


def lora_coverage(model) -> dict[str, int]:
    """What LoRA adapts: module (or, for ``target_parameters``, parameter) name with the layer
    number as N -> LoRA values it trains, summed over layers."""
    import re

    from peft.tuners.lora import LoraLayer

    out: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        key = re.sub(r"\.\d+\.", ".N.", name.removeprefix("base_model.model.")).replace(".base_layer", "")
        if getattr(module, "parameter_name", None):  # a ParamWrapper (PEFT's target_parameters)
            key = f"{key}.{module.parameter_name}"
        own = [*module.lora_A.parameters(), *module.lora_B.parameters()]
        out[key] = out.get(key, 0) + sum(p.numel() for p in own if p.requires_grad)
    return out


def surgical_paths(model, plan) -> dict[str, dict[str, int]]:
    """Per trainable-state kind (module class / state class): tensors and selected values."""
    from surgical.train.state import state_of

    out: dict[str, dict[str, int]] = {}
    for name, idx in plan.entries.items():
        mname, _, pname = name.rpartition(".")
        module = model.get_submodule(mname)
        key = f"{type(module).__name__} / {type(state_of(module, pname)).__name__}"
        d = out.setdefault(key, {"tensors": 0, "values": 0})
        d["tensors"] += 1
        d["values"] += int(idx.numel())
    return out


def worker(model_name: str, config: str, args) -> dict:
    import torch

    from surgical.core.runtime import peak_rss_bytes, reset_peak_rss

    torch.set_num_threads(1)
    model, what = setup(model_name, config, build(model_name, args.quick), args.plans)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    batch, seq = (2, 32) if args.quick else (4, 128)
    ids = torch.randint(0, 8192, (batch, seq), generator=g)
    model.train()
    reset = reset_peak_rss()  # the peak from here on: training, not building the model
    base = peak_rss_bytes()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    model(input_ids=ids, labels=ids).loss.backward()  # one more step, untimed: which gradients exist
    grads = [p.grad.numel() for p in model.parameters() if p.grad is not None]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {
        "model": model_name,
        "config": config,
        "step_times": times,
        "peak_bytes": peak_rss_bytes(),
        "rss_at_start_bytes": base,
        "peak_from_training": bool(reset),
        "trainable": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        # the gradients alive between backward and the optimizer step (the values trained)
        "gradient_values_after_backward": sum(grads),
        "gradient_tensors_after_backward": len(grads),
        "loss": float(loss),
        **what,
    }


def run_worker(model_name: str, config: str, args, env: dict) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        f"{model_name}:{config}",
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--plans",
        str(args.plans),
    ] + (["--quick"] if args.quick else [])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{model_name}/{config} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    times = [t for r in runs for t in r["step_times"]]
    keep = {
        k: v
        for k, v in runs[-1].items()
        if k not in ("step_times", "peak_bytes", "loss", "rss_at_start_bytes")
    }
    return {
        **keep,
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "steps_measured": len(times),
        "peak_rss_mib": statistics.median(r["peak_bytes"] for r in runs) / 2**20,
        "peak_rss_mib_rounds": [r["peak_bytes"] / 2**20 for r in runs],
        "rss_at_start_mib": statistics.median(r["rss_at_start_bytes"] for r in runs) / 2**20,
        # what training adds to the process (activations, gradients, optimizer state, transients)
        "training_mib": statistics.median(r["peak_bytes"] - r["rss_at_start_bytes"] for r in runs) / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 round (seconds)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--out", type=Path, default=HERE / "results" / "module_speed.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--plans", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        model_name, config = args.worker.split(":")
        print(json.dumps(worker(model_name, config, args)))
        return
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 2, 1
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent / "src"))
    t0 = time.perf_counter()
    raw: dict[str, dict[str, list[dict]]] = {m: {c: [] for c in CONFIGS} for m in args.models}
    tmp = tempfile.TemporaryDirectory()
    args.plans = Path(tmp.name)
    budgets = {m: make_plans(m, args.quick, args.plans) for m in args.models}
    for r in range(args.rounds):
        for m in args.models:
            for c in CONFIGS if r % 2 == 0 else tuple(reversed(CONFIGS)):  # interleaved, order alternating
                out = run_worker(m, c, args, env)
                raw[m][c].append(out)
                print(
                    f"round {r + 1}/{args.rounds} {m:>8} {c:>14}: "
                    f"{statistics.median(out['step_times']):.3f} s/step, "
                    f"peak {out['peak_bytes'] / 2**20:.0f} MiB, {out['trainable']:,} trainable",
                    flush=True,
                )
    tmp.cleanup()
    results = {m: {c: summarise(v) for c, v in cs.items()} for m, cs in raw.items()}
    for cs in results.values():
        for s in cs.values():
            s["time_vs_full"] = s["step_s"] / cs["full"]["step_s"]
            s["time_vs_lora"] = s["step_s"] / cs["lora"]["step_s"]
            s["peak_vs_full"] = s["peak_rss_mib"] / cs["full"]["peak_rss_mib"]
            s["peak_vs_lora"] = s["peak_rss_mib"] / cs["lora"]["peak_rss_mib"]
            s["training_mib_vs_full"] = s["training_mib"] / cs["full"]["training_mib"]
            s["training_mib_vs_lora"] = s["training_mib"] / cs["lora"]["training_mib"]
    import peft
    import torch
    import transformers

    import surgical as sg

    report = {
        "benchmark": "module_speed",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": 1,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "surgical": sg.__version__,
        },
        "setup": {
            "quick": args.quick,
            "gpt2": "n_embd 64, 2 layers, 4 heads, vocab 8192"
            if args.quick
            else "n_embd 384, 4 layers, 6 heads, vocab 8192",
            "mixtral": "hidden 64, 2 layers, ffn 128, 4 experts top-2, vocab 8192"
            if args.quick
            else "hidden 256, 4 layers, 4 heads (2 kv), ffn 512, 4 experts top-2, vocab 8192",
            "batch": [2, 32] if args.quick else [4, 128],
            "lora": f"r={LORA_R}, alpha {2 * LORA_R}; gpt2: c_attn, c_proj, c_fc; mixtral: q/k/v/o_proj and "
            "target_parameters mlp.experts.gate_up_proj, mlp.experts.down_proj",
            "surgical": "random entries of the default targets (sg.select method='random'), sg.prepare",
            "optimizer": "torch.optim.AdamW lr 1e-5",
            "rounds": args.rounds,
            "steps": args.steps,
            "warmup": args.warmup,
            "peak": "VmHWM of the worker, reset after the model is built and prepared",
        },
        "budgets": budgets,
        "results": results,
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print()
    print(
        f"{'model':>8} {'config':>14} {'trainable':>10} {'s/step':>7} {'peak MiB':>8} {'+train':>7} "
        f"{'t/full':>7} {'t/LoRA':>7} {'pk/full':>7} {'pk/LoRA':>7} {'+tr/full':>8} {'+tr/LoRA':>8}"
    )
    for m, cs in results.items():
        for c, s in cs.items():
            print(
                f"{m:>8} {c:>14} {s['trainable']:>10,} {s['step_s']:>7.3f} {s['peak_rss_mib']:>8.0f} "
                f"{s['training_mib']:>7.0f} {s['time_vs_full']:>7.2f} {s['time_vs_lora']:>7.2f} "
                f"{s['peak_vs_full']:>7.2f} {s['peak_vs_lora']:>7.2f} {s['training_mib_vs_full']:>8.2f} "
                f"{s['training_mib_vs_lora']:>8.2f}"
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
