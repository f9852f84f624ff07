"""The one training loop: AdamW over pre-built batches, with hooks, checkpoints and resume.

Everything a run can vary (gradient accumulation, bf16 autocast, dynamic schedules, periodic
checkpoints, resuming) plugs into :func:`fit`; there is no second loop to drift from it.

Determinism: the batch order of epoch ``e`` is a permutation drawn from ``seed + e`` alone, and
a checkpoint stores every RNG state, so a run resumed from a checkpoint takes exactly the steps
an uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.loss import batch_to, model_loss
from surgical.core.processes import all_true, mean_over_ranks
from surgical.core.registry import check_range
from surgical.core.runtime import progress
from surgical.train.hooks import StepState, TrainHook


@dataclass
class FitResult:
    """What a training run did.

    Attributes:
        steps: Optimizer steps taken in total (including those before a resume).
        seconds: Wall time of this call.
        losses: Loss of each optimizer step taken in this call (mean over accumulated batches).
        history: Loss of every step of the run, those before a resume included (the checkpoint
            carries them): ``len(history) == steps`` when no loss was non-finite.
        resumed_from: Step of the checkpoint this call resumed from, or None.
        stopped: Why training stopped early, or None: ``"nan"`` (a non-finite loss), or the
            reason ``fit``'s ``stop`` callback returned (e.g. ``"sigint"``).
        tokens: Input tokens processed in this call.
    """

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    stopped: str | None = None
    tokens: int = 0
    history: list[float] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, len(self.losses))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Batch order of an epoch: depends on (seed, epoch) only, so a resumed run can recompute it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def _autocast(bf16: bool, device: torch.device):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _check_settings(**settings: float | None) -> None:
    """Range checks of fit's numbers, before any work: a SurgicalError naming the first bad one.

    ``epochs`` counts only without ``max_steps`` (which replaces it); ``None`` means not set.
    """
    ranges = {
        "lr": dict(low=0, low_open=True),
        "weight_decay": dict(low=0),
        "warmup": dict(low=0, high=1),
        "checkpoint_every": dict(low=0),
        "max_steps": dict(low=1),
        "epochs": dict(low=1),
        "max_grad_norm": dict(low=0, low_open=True),
    }
    if settings.get("max_steps") is not None:
        settings.pop("epochs")
    for name, value in settings.items():
        if value is None:
            continue
        if isinstance(value, float) and math.isinf(value):
            raise SurgicalError(f"{name} must be a finite number, got {value!r}", "Fix the value")
        check_range(value, name, **ranges[name])


def fit(
    model: nn.Module,
    batches: Sequence[dict],
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: float = 0.1,
    grad_accum: int = 1,
    max_grad_norm: float | None = None,
    bf16: bool = False,
    seed: int = 0,
    hooks: Sequence[TrainHook] = (),
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    allow_changes: Sequence[str] = (),
    run_config: Mapping[str, Any] | None = None,
    on_nan: str = "raise",
    stop: Callable[[], str | None] | None = None,
    batch_filter: Callable[[nn.Module, dict, int], dict] | None = None,
    show: bool = True,
) -> FitResult:
    """Trains the parameters that require grad with AdamW (warm-up then linear decay).

    One optimizer step consumes ``grad_accum`` batches; the total is ``epochs * len(batches) //
    grad_accum`` steps, or ``max_steps``. The optimizer is given every parameter that requires
    grad at the start, so hooks may freeze and unfreeze them later (see
    :mod:`surgical.train.schedules`); a frozen parameter has no gradient and AdamW skips it.
    Run on every process of a process group (each with its share of every batch, the model
    sharded as ``surgical train``'s ``training.fsdp`` does), the ranks stop on a non-finite loss
    together and the losses reported are means over the ranks.

    Args:
        model: A model (usually prepared with :func:`surgical.prepare`) returning ``.loss``.
        batches: Batches of tensors, reused every epoch in a seeded order.
        bf16: Run forward passes under bf16 autocast (the trained values stay fp32).
        hooks: Objects with ``on_train_begin(state)`` / ``on_step_end(state)`` (see
            :class:`surgical.train.hooks.TrainHook`).
        checkpoint_dir: Where checkpoints go (``step-N`` directories, written atomically).
        checkpoint_every: Write a checkpoint every this many optimizer steps (0: only at the end).
        resume: Continue from the latest checkpoint in ``checkpoint_dir`` if there is one, into
            a freshly prepared model. Refused (a SurgicalError naming each difference) unless
            the settings, the batches and the selection are those the checkpoint was written
            with (see :mod:`surgical.train.identity`); the model is left untouched then.
        allow_changes: Settings a resume may change (some of ``lr``, ``max_grad_norm``,
            ``max_steps``, ``epochs``; with ``run_config``, its keys such as ``training.lr``),
            e.g. to continue a run that stopped on a NaN loss from its last checkpoint with a
            lower learning rate. The schedule then continues from the checkpoint's step with the
            new learning rate and length.
        run_config: The settings that define the run, stored in checkpoints and compared on
            resume instead of this function's own arguments (lr, max_steps or epochs,
            weight_decay, warmup, grad_accum, max_grad_norm, bf16, seed and the configs of
            hooks that declare one). ``surgical train`` passes its config here.
        on_nan: What a non-finite loss does: ``"raise"`` a SurgicalError, or ``"stop"`` and
            return with ``stopped="nan"``. Either way the bad step is not applied and the last
            checkpoint written is left as it was.
        batch_filter: ``(model, batch, step) -> batch``, applied to every batch before its
            forward pass (``step``: optimizer steps taken so far): token selection (new labels),
            online batch selection (a sub-batch). It must be deterministic in ``step`` for a
            resumed run to equal an uninterrupted one.
        stop: Called after each optimizer step; a non-empty string it returns (the reason, e.g.
            ``"sigint"`` from a signal handler that set a flag) ends training at that step
            boundary (after the last step there is nothing left to stop, and the run just
            ends): a checkpoint of that step is written (with ``checkpoint_dir``) exactly as
            a periodic one would be, so a resume continues as if uninterrupted, and the result
            has ``stopped`` set to the reason.

    Returns:
        A :class:`FitResult`.
    """
    from surgical.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from surgical.train.identity import check_allowed, fit_settings, run_identity

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SurgicalError(
            "the model has no trainable parameters", "Call surgical.prepare(model, plan) first"
        )
    if not batches:
        raise SurgicalError("the training data yielded no batches", "Pass a non-empty dataset")
    if on_nan not in ("raise", "stop"):
        raise SurgicalError(f"on_nan must be 'raise' or 'stop', got {on_nan!r}", "Pass one of them")
    if grad_accum < 1:
        raise SurgicalError(f"grad_accum must be at least 1, got {grad_accum}", "Pass a positive number")
    _check_settings(lr=lr, weight_decay=weight_decay, warmup=warmup, checkpoint_every=checkpoint_every,
                    epochs=epochs, max_steps=max_steps, max_grad_norm=max_grad_norm)  # fmt: skip
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    per_epoch = max(1, len(batches) // grad_accum)
    total = max_steps if max_steps is not None else epochs * per_epoch
    # imported here: transformers.optimization pulls in the Trainer's utilities, peft and
    # bitsandbytes (seconds), which `import surgical` and the command line should not pay
    from transformers import get_linear_schedule_with_warmup

    sched = get_linear_schedule_with_warmup(opt, int(warmup * total), total)
    state = StepState(model=model, optimizer=opt, scheduler=sched, step=0, total_steps=total)
    identity = None
    if checkpoint_dir is not None:  # computed before a checkpoint moves any entry
        settings = run_config
        if settings is None:
            args = dict(lr=lr, max_steps=max_steps, weight_decay=weight_decay, warmup=warmup,
                        grad_accum=grad_accum, max_grad_norm=max_grad_norm, bf16=bf16, seed=seed)  # fmt: skip
            if max_steps is None:  # epochs are ignored when max_steps is set
                args["epochs"] = epochs
            settings = fit_settings(args, hooks)
        identity = run_identity(model, batches, settings)
        check_allowed(allow_changes, identity)
    resumed_from = None
    if resume and checkpoint_dir is not None:
        ckpt = latest_checkpoint(checkpoint_dir)
        if ckpt is not None:
            load_checkpoint(ckpt, state, hooks, identity=identity, allow_changes=allow_changes)
            resumed_from = state.step
            if allow_changes:  # the checkpoint's learning rates follow the old lr and length
                sched.base_lrs = [lr] * len(opt.param_groups)
                for group, factor in zip(opt.param_groups, sched.lr_lambdas, strict=True):
                    group["initial_lr"] = lr
                    group["lr"] = lr * factor(sched.last_epoch)
    for h in hooks:
        h.on_train_begin(state)
    model.train()
    losses: list[float] = []
    tokens = 0
    stopped = None
    start = time.perf_counter()
    with progress(disable=not show) as bar:
        task = bar.add_task("training", total=total, completed=state.step, info="")
        while state.step < total:
            epoch, pos = divmod(state.step, per_epoch)
            order = epoch_order(len(batches), seed, epoch)
            micro = [order[(pos * grad_accum + j) % len(order)] for j in range(grad_accum)]
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for i in micro:
                batch = batch_to(batches[i], device)
                if batch_filter is not None:
                    batch = batch_filter(model, batch, state.step)
                with _autocast(bf16, device):
                    loss = model_loss(model, batch)
                if not all_true(bool(torch.isfinite(loss))):  # every rank stops together
                    stopped = "nan"
                    break
                (loss / grad_accum).backward()
                step_loss += loss.item() / grad_accum
                tokens += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
            if stopped:
                opt.zero_grad(set_to_none=True)
                if on_nan == "raise":
                    raise SurgicalError(
                        f"the loss became NaN/inf at step {state.step + 1}; training stopped",
                        "Lower the learning rate or set max_grad_norm",
                    )
                break
            for h in hooks:  # optional: a hook is any object with TrainHook's methods
                if (before := getattr(h, "on_before_step", None)) is not None:
                    before(state)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in opt.param_groups for p in g["params"]], max_grad_norm
                )
            opt.step()
            sched.step()
            state.step += 1
            step_loss = mean_over_ranks(step_loss)  # several processes: each trained its share
            state.loss = step_loss
            losses.append(step_loss)
            state.history.append(step_loss)
            for h in hooks:
                h.on_step_end(state)
            if checkpoint_dir is not None and checkpoint_every and state.step % checkpoint_every == 0:
                save_checkpoint(checkpoint_dir, state, hooks, identity=identity)
            elapsed = time.perf_counter() - start
            recent = sum(losses[-20:]) / len(losses[-20:])
            bar.update(
                task,
                advance=1,
                info=f"loss {recent:.3f}  {len(losses) / elapsed:.2f} step/s  {tokens / elapsed:,.0f} tok/s",
            )
            if stop is not None and state.step < total and (reason := stop()):  # not after the last
                stopped = str(reason)
                break
    model.eval()
    if (
        stopped != "nan"  # finished, or stopped on request: the last step is checkpointed
        and checkpoint_dir is not None
        and not (checkpoint_every and state.step % checkpoint_every == 0)
    ):
        save_checkpoint(checkpoint_dir, state, hooks, identity=identity)
    return FitResult(
        steps=state.step,
        seconds=time.perf_counter() - start,
        losses=[x for x in losses if math.isfinite(x)],
        history=[x for x in state.history if math.isfinite(x)],
        resumed_from=resumed_from,
        stopped=stopped,
        tokens=tokens,
    )
