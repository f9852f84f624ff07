"""Hooks into the training loop, and the adapter that runs them from the HF ``Trainer``.

A hook is any object with the methods of :class:`TrainHook`. The same hook object (a dynamic
schedule such as LISA) runs inside :func:`surgical.train.loop.fit` and, wrapped in
:class:`SurgicalCallback`, inside ``transformers.Trainer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from surgical.train.extract import extract


@dataclass
class StepState:
    """What a hook sees: the live model, optimizer and scheduler, and the step count.

    ``step`` counts optimizer steps taken so far (1 after the first step).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: int
    total_steps: int
    loss: float = float("nan")


class TrainHook:
    """Base class of training hooks; every method is optional.

    Hooks that keep state across steps implement ``state_dict``/``load_state_dict`` so that a
    checkpoint can restore them; the contract is that a restored hook behaves exactly as the
    uninterrupted one would from that step on.
    """

    def on_train_begin(self, state: StepState) -> None:
        """Called once before the first step (after a resume, with the restored step)."""

    def on_step_end(self, state: StepState) -> None:
        """Called after each optimizer step (``state.step`` already counts it)."""

    def state_dict(self) -> dict[str, Any]:
        """State to store in checkpoints: JSON values (str keys, lists, numbers, strings, bools, None)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""

    def config(self) -> dict[str, Any] | None:
        """The settings that change the training trajectory (JSON values), or None if none do.

        Checkpoints store the configs of the hooks that return one (with the class name); a
        resume with other hooks or other settings is refused. Hooks returning None (the
        default: loggers, probes) are not checked and may differ between runs.
        """
        return None


class SurgicalCallback(TrainerCallback):
    """Runs surgical hooks (dynamic schedules) inside ``transformers.Trainer``.

    Usage::

        sg.prepare(model, plan)
        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          callbacks=[SurgicalCallback(LISA(gamma=2, every=5))])

    The Trainer already trains exactly the parameters that require grad, and surgical's
    optimizer step hook keeps the weights in sync, so the callback is only needed for schedules.
    The Trainer must be given the optimizer's parameters at creation, which it does for every
    parameter that requires grad at that time; schedules that unfreeze parameters later
    (LISA, HFT) need them to require grad when the Trainer builds its optimizer: they are
    switched off in ``on_train_begin``, after the optimizer exists.
    """

    def __init__(self, *hooks: TrainHook, save_delta: bool = False) -> None:
        """Args:
        hooks: Schedules or other hooks to run.
        save_delta: Also write the delta (``sg.extract(model).save``) into each Trainer
            checkpoint directory as ``surgical-delta/``, and into ``output_dir`` at the end.
        """
        self.hooks = list(hooks)
        self.save_delta = save_delta
        self._state: StepState | None = None

    def _sync_state(self, args, state, model, optimizer, lr_scheduler) -> StepState:
        if self._state is None:
            self._state = StepState(model, optimizer, lr_scheduler, state.global_step, state.max_steps)
        s = self._state
        s.model, s.optimizer, s.scheduler = model, optimizer, lr_scheduler
        s.step, s.total_steps = state.global_step, state.max_steps
        return s

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        s = self._sync_state(args, state, model, optimizer, lr_scheduler)
        for h in self.hooks:
            h.on_train_begin(s)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        s = self._sync_state(args, state, model, optimizer, lr_scheduler)
        for h in self.hooks:
            h.on_step_end(s)

    def on_save(self, args, state, control, model=None, **kw):
        if self.save_delta and model is not None and state.is_world_process_zero:
            self._write(model, Path(args.output_dir) / f"checkpoint-{state.global_step}" / "surgical-delta")

    def on_train_end(self, args, state, control, model=None, **kw):
        if self.save_delta and model is not None and state.is_world_process_zero:
            self._write(model, Path(args.output_dir) / "surgical-delta")

    @staticmethod
    def _write(model: nn.Module, path: Path) -> None:
        extract(model).save(path)

