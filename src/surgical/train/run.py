"""``surgical train``: config -> model, data, plan -> prepared training -> delta + run summary.

Run directory layout (``cfg.out``)::

    plan/          the plan trained (reused by --resume, so a resumed run trains the same entries)
    checkpoints/   step-N checkpoints (atomic; the newest is kept), each with the run config that
                   --resume must match (RunConfig.trajectory)
    delta/         the delta (written at the end)
    summary.json   config, counts, losses, timings, status
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from surgical.errors import SurgicalError
from surgical.train.config import RunConfig
from surgical.utils import atomic_write_text, peak_rss_bytes

TASKS = ("classification", "causal_lm")


def load_model(cfg: RunConfig):
    """Loads the model and tokenizer from a local directory, offline."""
    from surgical.hf import load_model

    m = cfg.model
    if m.task not in TASKS:
        raise SurgicalError(f"unknown model.task {m.task!r}", f"Use one of: {', '.join(TASKS)}")
    model, tokenizer = load_model(
        m.path, m.task, num_labels=m.num_labels, seed=cfg.training.seed, label="model.path"
    )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if m.gradient_checkpointing:
        # non-reentrant: gradients must reach trained values even when the block's input is frozen
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def load_batches(cfg: RunConfig, tokenizer) -> list[dict[str, torch.Tensor]]:
    """Reads the data (a file, or a ``save_to_disk`` directory's ``data.split``) into batches."""
    from surgical.data.instruct import instruction_batches, load_instructions
    from surgical.data.text import TextExamples, text_batches

    d = cfg.data
    if cfg.model.task == "classification":
        ex = TextExamples.load(d.path, d.text_column, d.label_column, split=d.split, limit=d.limit)
        bad = [x for x in ex.labels if not 0 <= x < cfg.model.num_labels]
        if bad:
            raise SurgicalError(
                f"label {bad[0]} is outside 0..{cfg.model.num_labels - 1}", "Set model.num_labels"
            )
        return text_batches(tokenizer, ex, d.batch_size, d.max_length)
    prompts, responses = load_instructions(
        d.path, d.prompt_column, d.response_column, split=d.split, limit=d.limit
    )
    return instruction_batches(tokenizer, prompts, responses, d.batch_size, d.max_length)


def make_plan(cfg: RunConfig, model, batches):
    """The plan to train: the run's own saved plan on resume, a given plan, or a fresh selection."""
    from surgical.select import Plan, select

    s = cfg.selection
    own = Path(cfg.out) / "plan"
    if cfg.training.resume and (own / "plan.json").is_file():
        return Plan.load(own)
    if s.plan:
        return Plan.load(s.plan)
    density = s.density if s.count is None else None
    return select(
        model,
        batches,
        method=s.method,
        density=density,
        count=s.count,
        targets=list(s.targets) or None,
        exclude=list(s.exclude) or None,
        always=list(s.always) or None,
        allocation=s.allocation,
        max_batches=s.max_batches,
        seed=cfg.training.seed,
        progress=False,
    )


def run_train(
    cfg: RunConfig, console: Console | None = None, show: bool = True, allow_changes: Sequence[str] = ()
) -> dict[str, Any]:
    """Runs a whole training job; returns the summary also written to ``summary.json``.

    ``allow_changes``: config keys a resume may change (``training.lr``, ``training.max_grad_norm``,
    ``training.max_steps``, ``training.epochs``; see :func:`surgical.fit`).

    Raises:
        SurgicalError: for bad input, and when the loss became non-finite (after the summary is
            written; the last good checkpoint is kept and the delta is not written).
    """
    from surgical.delta import extract
    from surgical.train.loop import fit
    from surgical.train.prepare import prepare, trainable_count
    from surgical.train.schedules import make_schedule

    console = console or Console()
    out = Path(cfg.out)
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg)
    batches = load_batches(cfg, tokenizer)
    plan = make_plan(cfg, model, batches)
    prepare(model, plan)  # a plan for another model fails here with the mismatching shape
    if not (out / "plan" / "plan.json").is_file():
        plan.save(out / "plan")
    hooks = make_schedule(cfg.schedule, seed=cfg.training.seed)
    t = cfg.training
    plan_summary = plan.summary()
    del plan  # its int64 indices (8 bytes per entry) are not needed while training
    console.print(f"training {trainable_count(model):,} values: {plan_summary}")
    result = fit(
        model,
        batches,
        epochs=t.epochs,
        max_steps=t.max_steps,
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup=t.warmup,
        grad_accum=t.grad_accum,
        max_grad_norm=t.max_grad_norm,
        bf16=t.bf16,
        seed=t.seed,
        hooks=hooks,
        checkpoint_dir=out / "checkpoints",
        checkpoint_every=t.checkpoint_every,
        resume=t.resume,
        allow_changes=allow_changes,
        run_config=cfg.trajectory(),  # a resume with other settings is refused, naming them
        on_nan="stop",
        show=show,
    )
    summary: dict[str, Any] = {
        "status": "nan" if result.stopped == "nan" else "done",
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "trainable": trainable_count(model),
        "plan": plan_summary,
        "final_loss": result.losses[-1] if result.losses else None,
        "losses": result.losses,
        "seconds": round(result.seconds, 3),
        "seconds_per_step": round(result.seconds_per_step, 4),
        "tokens_per_second": round(result.tokens / max(result.seconds, 1e-9), 1),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "config": cfg.to_dict(),
    }
    if result.stopped == "nan":
        from surgical.train.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(out / "checkpoints")
        summary["last_good_checkpoint"] = str(ckpt) if ckpt else None
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        kept = f"kept the last good checkpoint {ckpt}" if ckpt else "no checkpoint had been written yet"
        raise SurgicalError(
            f"the loss became NaN/inf at step {result.steps + 1}; training stopped, {kept}, no delta written",
            "Lower training.lr or set training.max_grad_norm, then continue from that checkpoint "
            "with --resume --allow-change training.lr (or training.max_grad_norm)",
        )
    delta = extract(model, training={k: v for k, v in summary.items() if k != "losses"})
    delta.save(out / "delta")
    summary["delta"] = str(out / "delta")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    # a resume of a finished run takes no step and has no loss to report
    loss = "" if summary["final_loss"] is None else f", final loss {summary['final_loss']:.4f}"
    console.print(
        f"{result.steps} steps{loss}, "
        f"{summary['seconds_per_step']:.3f} s/step; wrote {out / 'delta'} and {out / 'summary.json'}"
    )
    return summary
