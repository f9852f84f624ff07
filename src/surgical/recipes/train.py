"""``surgical train``: config -> model, data, plan -> prepared training -> delta + run summary.

Run directory layout (``cfg.out``)::

    plan/          the plan trained (reused by --resume, so a resumed run trains the same entries)
    checkpoints/   step-N checkpoints (atomic; the newest is kept), each with the run config that
                   --resume must match (RunConfig.trajectory)
    delta/         the delta (written at the end)
    summary.json   config, counts, losses, timings, status ("done", "nan" or "interrupted")

SIGINT (Ctrl-C) and SIGTERM stop training at the next step boundary: a checkpoint of that step
is written, summary.json says "interrupted", one line on stderr says how to continue
(``--resume``), and the process exits with 130 (SIGINT) or 143 (SIGTERM). A resumed run ends
with the same delta, bit for bit, as an uninterrupted one. Repeated signals while stopping are
absorbed (the checkpoint write is atomic either way).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console

from surgical.core.errors import SurgicalError
from surgical.core.io import atomic_write_text, check_output
from surgical.core.processes import RankShares, launched_processes, on_first_rank, start_process_group
from surgical.core.runtime import peak_rss_bytes, plain_console
from surgical.data.tokens import ReferenceLosses
from surgical.delta import Delta, applied, apply
from surgical.recipes.config import (
    DataConfig,
    ScheduleConfig,
    SelectionConfig,
    TrainingConfig,
    TrainModelConfig,
    _f,
)
from surgical.recipes.data import make_batches
from surgical.recipes.defaults import DEFAULT_LR
from surgical.recipes.models import detect_task, load_model
from surgical.recipes.select_data import (
    DataSelectionConfig,
    TokenSelectionConfig,
    selected_batches,
    selection_dir,
    token_filter,
)
from surgical.select import CRITERIA, Plan, select
from surgical.train import base_values, extract, fit, prepare, shard, trainable_count
from surgical.train.checkpoint import latest_checkpoint
from surgical.train.prepare import check_plan
from surgical.train.quantize import FORMATS, check_backend, quantize_base
from surgical.train.schedules import SCHEDULES, make_schedule

# Keys that cannot change what a run computes, so ``--resume`` accepts a change to them: where
# the run lives (a moved run directory resumes), how often it checkpoints (saving touches no
# value or RNG state), the resume flag itself, and gradient checkpointing (it recomputes the
# same forward with the same RNG state; switching it on after running out of memory is a
# reason to resume). Every other key is part of the run's identity.
RESUMABLE_CHANGES = frozenset(
    {"out", "training.checkpoint_every", "training.resume", "model.gradient_checkpointing"}
)


@dataclass(frozen=True)
class RunConfig:
    """A whole ``surgical train`` run."""

    out: str = _f("surgical-run", "Run directory: delta/, plan/, checkpoints/, summary.json.")
    model: TrainModelConfig = field(default_factory=TrainModelConfig, metadata={"help": "The model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "The training data."})
    selection: SelectionConfig = field(default_factory=SelectionConfig, metadata={"help": "What to train."})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "Dynamic schedule."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "Optimisation."})
    data_selection: DataSelectionConfig = field(
        default_factory=DataSelectionConfig, metadata={"help": "Train on a selection of the examples."}
    )
    token_selection: TokenSelectionConfig = field(
        default_factory=TokenSelectionConfig, metadata={"help": "Causal LM: which target tokens are trained."}
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (tuples become lists)."""
        return dataclasses.asdict(self)

    def trajectory(self) -> dict[str, Any]:
        """The settings a resumed run must share with the checkpoint's: every key as a dotted
        path, minus :data:`RESUMABLE_CHANGES` (and ``training.epochs`` when max_steps is set)."""
        flat: dict[str, Any] = {}
        for section, value in self.to_dict().items():
            if isinstance(value, dict):
                flat.update({f"{section}.{k}": v for k, v in value.items()})
            else:
                flat[section] = value
        if self.training.max_steps is not None:
            flat.pop("training.epochs")
        return {k: v for k, v in flat.items() if k not in RESUMABLE_CHANGES}

    def check(self) -> None:
        """Checks what the dataclasses alone cannot, before any work: that model and data paths
        are set, and the criterion's and schedule's names and options."""
        if not self.model.path:
            raise SurgicalError("model.path is not set", "Pass --model DIR or set model.path in the config")
        if not self.data.path:
            raise SurgicalError("data.path is not set", "Pass --data FILE or set data.path in the config")
        if not self.selection.plan:
            CRITERIA.resolve(self.selection.method, self.selection.options, "selection.options.")
        if self.schedule.name != "none":
            SCHEDULES.resolve(self.schedule.name, self.schedule.options, "schedule.options.")
        elif self.schedule.options:
            raise SurgicalError("schedule 'none' takes no options", "Remove schedule.options")
        self.data_selection.check()
        self.token_selection.check_reference()
        if self.model.quantization.backend != "none":  # a missing backend shows before any work
            check_backend(self.model.quantization.backend, self.model.quantization.bits)
        if self.training.fsdp:
            self._check_fsdp()

    def _check_fsdp(self) -> None:
        """What a sharded run needs: a launch of 2+ processes that split every batch evenly, and
        none of the features not yet carried over to sharded training."""
        n = launched_processes()
        if n < 2:
            raise SurgicalError(
                f"training.fsdp needs at least 2 processes, this run has {n}",
                "Launch it with torchrun --nproc_per_node N -m surgical train ... (N >= 2), "
                "or set training.fsdp: false",
            )
        if self.data.batch_size % n:
            raise SurgicalError(
                f"data.batch_size {self.data.batch_size} does not split evenly between {n} processes",
                f"Use a multiple of {n}",
            )
        if self.schedule.name == "regrow":
            raise SurgicalError(
                "training.fsdp does not support schedule.name: regrow (it ranks and moves each "
                "tensor's entries on one process)",
                "Use lisa or hft, or train without training.fsdp",
            )
        quant = self.model.quantization
        if quant.backend != "none" and (quant.backend, quant.bits) != ("torchao", 4):
            bits = quant.bits if quant.bits is not None else "its default"
            raise SurgicalError(
                f"training.fsdp cannot shard model.quantization.backend: {quant.backend} with bits: "
                f"{bits} (FSDP2 splits only torchao's NF4 weights)",
                "Set model.quantization to {backend: torchao, bits: 4}, or train without training.fsdp",
            )
        if self.data_selection.manifest is None and self.data_selection.method != "none":
            raise SurgicalError(
                "training.fsdp does not select data itself (data_selection.method)",
                "Select it first with `surgical select-data` and pass data_selection.manifest",
            )


def select_training_data(
    cfg: RunConfig, model, tokenizer, task: str, plan: Plan, show: bool, every: Sequence[dict]
) -> Sequence[dict]:
    """The batches the run trains on: ``every`` (the batches of every example, already built),
    or the ``data_selection`` made on the base model (kept as ``data-selection/`` in the run
    directory and reused by ``--resume``)."""
    section = cfg.data_selection
    own = selection_dir(cfg.out)
    if cfg.training.resume and (own / "selection.json").is_file():
        section = dataclasses.replace(section, manifest=str(own))
    if section.manifest is None and section.method == "none":
        return every  # not built (tokenized) twice
    batches, sel = selected_batches(
        section,
        model,
        tokenizer,
        cfg.data,
        task,
        num_labels=cfg.model.num_labels,
        seed=cfg.training.seed,
        params=plan,
        show=show,
    )
    if sel is not None and not (own / "selection.json").is_file():
        sel.save(own)
    return batches


def _base_logits(model):
    """``(batch) -> logits`` of the prepared model with its trained values swapped back to the base
    (the free reference of excess-loss token selection)."""

    def logits(batch: dict) -> Any:
        with base_values(model), torch.no_grad():
            return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    return logits


def token_reference(section: TokenSelectionConfig, model, sharded: bool = False) -> Any:
    """``excess_loss``'s reference: the base (``(batch) -> logits`` of the prepared model with its
    trained values swapped back, no second copy) or, with ``reference: DELTA_DIR``, a frozen copy
    of the base with that delta applied (Rho-1's reference tuned on target data). Call it before
    ``model`` is quantized or prepared: the copy is taken of the full-precision base.

    ``sharded``: no copy; the delta itself, checked against the base, whose losses
    :func:`reference_losses` computes before the model is sharded."""
    if section.method != "excess_loss" or section.reference == "base":
        return _base_logits(model)
    delta = Delta.load(section.reference)
    if sharded:
        with applied(model, delta):  # refuses a delta made on another base
            return delta
    reference = copy.deepcopy(model)
    apply(reference, delta)  # refuses a delta made on another base
    return reference.requires_grad_(False).eval()


def reference_losses(model, delta: Delta, batches: Sequence[dict], show: bool) -> ReferenceLosses:
    """The losses of ``model`` with ``delta`` applied on ``batches``, computed once (the model is
    restored exactly after): a sharded run's tuned reference, with no second model kept."""
    with applied(model, delta):
        return ReferenceLosses.compute(model, batches, show=show)


def task_of(cfg: RunConfig) -> str:
    """The run's task, with ``auto`` resolved from the model directory."""
    return detect_task(cfg.model.path) if cfg.model.task == "auto" else cfg.model.task


def make_plan(cfg: RunConfig, model, batches) -> Plan:
    """The plan to train: the run's own saved plan on resume, a given plan, or a fresh selection."""
    own = Path(cfg.out) / "plan"
    if cfg.training.resume and (own / "plan.json").is_file():
        return Plan.load(own)
    if cfg.selection.plan:
        return Plan.load(cfg.selection.plan)
    kwargs = cfg.selection.select_kwargs(cfg.training.seed, model, task_of(cfg))
    return select(model, batches, progress=False, **kwargs)


RUN_FILES = ("plan", "checkpoints", "delta", "summary.json", "data-selection")


def claim_run_dir(out: Path, resume: bool, overwrite: bool) -> list[str]:
    """Makes sure a run never mixes with or destroys another run's files; returns the earlier
    run's files that ``overwrite`` will replace (removed by :func:`clear_run_files` once the run's
    input has been checked, so a refused run leaves them as they were).

    A fresh run needs an empty (or absent) directory, unless ``overwrite`` says to replace the
    earlier run's files; a resume needs something to resume.
    """
    if out.exists() and not out.is_dir():
        raise SurgicalError(f"out {str(out)!r} is a file, not a run directory", "Choose another out")
    present = [f for f in RUN_FILES if (out / f).exists()]
    if resume:
        if latest_checkpoint(out / "checkpoints") is None:
            raise SurgicalError(
                f"nothing to resume in {str(out)!r} (no checkpoint)", "Start the run without --resume"
            )
        return []
    if present and not overwrite:
        raise SurgicalError(
            f"run directory {str(out)!r} already holds a run ({', '.join(present)})",
            "Continue it with --resume, replace it with --overwrite, or choose another out",
        )
    return present


def clear_run_files(out: Path, files: Sequence[str]) -> None:
    """Removes the earlier run's ``files`` (names from :func:`claim_run_dir`) from ``out``."""
    for f in files:
        shutil.rmtree(out / f) if (out / f).is_dir() else (out / f).unlink(missing_ok=True)


# exit status of a run stopped by a signal: 128 + the signal's number, as a shell reports it
SIGNAL_EXIT = {"sigint": 130, "sigterm": 143}


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], str | None]]:
    """Yields a ``stop`` callback for :func:`surgical.fit`: while inside, SIGINT and SIGTERM
    only record their name ("sigint"/"sigterm", the first one received), which the callback
    returns, so training stops at the next step boundary instead of wherever the signal lands.

    The previous handlers are restored on exit. Signal handlers can only be set in the main
    thread; elsewhere the callback never asks to stop and signals keep their handlers.
    """
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum, frame) -> None:
        received.append("sigint" if signum == signal.SIGINT else "sigterm")

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        yield lambda: received[0] if received else None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def resume_command(out: Path) -> str:
    """The command that continues this run: the ``surgical train`` command line it was started
    with (``--overwrite`` dropped) plus ``--resume``, or a generic hint outside the CLI."""
    argv = list(sys.argv)
    name = Path(argv[0]).name if argv else ""
    via_cli = name == "surgical" or (name == "__main__.py" and Path(argv[0]).parent.name == "surgical")
    if via_cli and argv[1:2] == ["train"]:
        args = [a for a in argv[1:] if a not in ("--overwrite", "--resume")]
        return shlex.join(["surgical", *args, "--resume"])
    return f"surgical train with the same config and --resume (out {str(out)!r})"


def run_train(
    cfg: RunConfig,
    console: Console | None = None,
    show: bool = True,
    allow_changes: Sequence[str] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Runs a whole training job; returns the summary also written to ``summary.json``.

    ``allow_changes``: config keys a resume may change (``training.lr``, ``training.max_grad_norm``,
    ``training.max_steps``, ``training.epochs``; see :func:`surgical.fit`). ``overwrite``: replace
    the files of an earlier run in ``cfg.out`` (otherwise a non-empty run directory is refused).

    Raises:
        SurgicalError: for bad input, and when the loss became non-finite (after the summary is
            written; the last good checkpoint is kept and the delta is not written).
        SystemExit: 130 (SIGINT) or 143 (SIGTERM) when a signal stopped training, after the
            checkpoint of the last step and an "interrupted" summary are written and one line
            on stderr has said how to resume; no delta is written.
    """
    cfg.check()
    fsdp = cfg.training.fsdp
    own_group = fsdp and not dist.is_initialized()
    device = start_process_group() if fsdp else None
    rank = dist.get_rank() if fsdp else 0
    console = (console or plain_console()) if rank == 0 else plain_console(quiet=True)
    show = show and rank == 0
    out = Path(cfg.out)
    check_output(out, {"model": cfg.model.path, "data": cfg.data.path}, "out")
    replaced = on_first_rank(lambda: claim_run_dir(out, cfg.training.resume, overwrite))
    t0 = time.perf_counter()
    m = cfg.model
    task = task_of(cfg)
    cfg.token_selection.check(task)
    model, tokenizer = load_model(
        m.path,
        task,
        num_labels=m.num_labels,
        seed=cfg.training.seed,
        label="model.path",
        gradient_checkpointing=m.gradient_checkpointing,
    )
    # first: a reference delta made on another base is refused before any scoring time is spent
    reference = token_reference(cfg.token_selection, model, sharded=fsdp)
    batches = make_batches(cfg.data, task, tokenizer, num_labels=m.num_labels)
    plan = on_first_rank(lambda: make_plan(cfg, model, batches))  # scored on all the data, once
    check_plan(model, plan)  # a given plan made for another model: refused before anything is lost
    # the input is checked: the earlier run's files (--overwrite) go before this run writes its own
    on_first_rank(lambda: clear_run_files(out, replaced))
    batches = select_training_data(cfg, model, tokenizer, task, plan, show, batches)
    quant, quantized = m.quantization, None
    if quant.backend != "none":  # selected on the full-precision model; the base trains quantized
        report = quantize_base(model, quant.bits, quant.backend, exclude=[*quant.exclude, *plan.dense])
        console.print(report.summary())
        quantized = {
            "backend": report.backend,
            "bits": report.bits,
            "format": FORMATS[report.backend, report.bits],
            "quantized": len(report.quantized),
            "kept": len(report.kept),
            "bytes_before": report.bytes_before,
            "bytes_after": report.bytes_after,
        }
    if fsdp:
        model.to(device)
        batches = RankShares(batches, rank, dist.get_world_size())
        if isinstance(reference, Delta):  # while each process still holds the whole model
            console.print("computing the reference's token losses (token_selection.reference)")
            reference = reference_losses(model, reference, batches, show)
    # a plan for another model fails here with the mismatching shape; sharding needs the additive path
    prepare(model, plan, additive=fsdp)
    if rank == 0 and not (out / "plan" / "plan.json").is_file():
        plan.save(out / "plan")
    if fsdp:
        shard(model)
    hooks = make_schedule(cfg.schedule.name, cfg.schedule.options, seed=cfg.training.seed)
    t = cfg.training
    lr = t.lr if t.lr is not None else DEFAULT_LR[task]
    plan_summary = plan.summary()
    del plan  # its int64 indices (8 bytes per entry) are not needed while training
    console.print(f"training {trainable_count(model):,} values: {plan_summary}")
    # sharded: signals are the launcher's (it stops every rank; one rank stopping alone would hang)
    with stop_on_signals() if not fsdp else contextlib.nullcontext(None) as stop:
        result = fit(
            model,
            batches,
            epochs=t.epochs,
            max_steps=t.max_steps,
            lr=lr,
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
            stop=stop,
            batch_filter=token_filter(cfg.token_selection, reference=reference, seed=t.seed),
            show=show,
        )
        summary: dict[str, Any] = {
            "status": "nan" if result.stopped == "nan" else "done",
            "lr": lr,
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "trainable": trainable_count(model),
            "plan": plan_summary,
            "final_loss": result.history[-1] if result.history else None,
            "losses": result.history,  # every step of the run, those before a resume included
            "seconds": round(result.seconds, 3),
            "seconds_per_step": round(result.seconds_per_step, 4),
            "tokens_per_second": round(result.tokens / max(result.seconds, 1e-9), 1),
            "total_seconds": round(time.perf_counter() - t0, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "config": cfg.to_dict(),
        }
        if quantized:
            summary["quantization"] = quantized
        if fsdp:
            n = dist.get_world_size()
            rss: list[Any] = [None] * n
            dist.all_gather_object(rss, peak_rss_bytes())
            summary["tokens_per_second"] = round(summary["tokens_per_second"] * n, 1)
            summary["fsdp"] = {"processes": n, "peak_rss_bytes": rss}
        # still inside: a repeated signal is absorbed until everything is written
        if result.stopped in SIGNAL_EXIT:
            ckpt, name = latest_checkpoint(out / "checkpoints"), result.stopped.upper()
            summary.update(status="interrupted", signal=name, checkpoint=str(ckpt) if ckpt else None)
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
            plain_console(stderr=True).print(
                f"interrupted ({name}) at step {result.steps}; checkpoint written to {ckpt}; "
                f"continue with: {resume_command(out)}",
                soft_wrap=True,
                highlight=False,
                markup=False,
            )
            raise SystemExit(SIGNAL_EXIT[result.stopped])
    if result.stopped == "nan":
        ckpt = latest_checkpoint(out / "checkpoints")
        summary["last_good_checkpoint"] = str(ckpt) if ckpt else None
        if rank == 0:
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        kept = f"kept the last good checkpoint {ckpt}" if ckpt else "no checkpoint had been written yet"
        raise SurgicalError(
            f"the loss became NaN/inf at step {result.steps + 1}; training stopped, {kept}, no delta written",
            "Lower training.lr or set training.max_grad_norm, then continue from that checkpoint "
            "with --resume --allow-change training.lr (or training.max_grad_norm)",
        )
    # the plan's selection scores ride along for Fisher merging (read back: not held while training)
    # sharded: every rank gathers the values (a collective), rank 0 writes them
    delta = extract(
        model,
        scores=Plan.load(out / "plan") if rank == 0 else None,
        training={k: v for k, v in summary.items() if k != "losses"},
    )
    summary["delta"] = str(out / "delta")
    if rank == 0:
        delta.save(out / "delta")
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if fsdp:
        dist.barrier()  # no rank returns before the files are written
        if own_group:
            dist.destroy_process_group()
    if result.resumed_from is not None and result.resumed_from == result.steps:
        console.print(f"the run had already finished at step {result.steps}: nothing to train")
    loss = "" if summary["final_loss"] is None else f", final loss {summary['final_loss']:.4f}"
    console.print(
        f"{result.steps} steps{loss}, "
        f"{summary['seconds_per_step']:.3f} s/step; wrote {out / 'delta'} and {out / 'summary.json'}"
    )
    return summary
