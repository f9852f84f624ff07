"""Hooks into the training loop.

A hook is any object with the methods of :class:`TrainHook`. The same hook object (a dynamic
schedule such as LISA) runs inside :func:`surgical.train.loop.fit` and, wrapped in
:class:`surgical.train.callback.SurgicalCallback`, inside ``transformers.Trainer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


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
    #: the loss of every step since the run began (restored from a checkpoint on resume)
    history: list[float] = field(default_factory=list)


class TrainHook:
    """Base class of training hooks; every method is optional.

    Hooks that keep state across steps implement ``state_dict``/``load_state_dict`` so that a
    checkpoint can restore them; the contract is that a restored hook behaves exactly as the
    uninterrupted one would from that step on.
    """

    def on_train_begin(self, state: StepState) -> None:
        """Called once before the first step (after a resume, with the restored step)."""

    def on_before_step(self, state: StepState) -> None:
        """Called once the step's gradients are computed (every micro-batch), before they are
        clipped and the optimizer steps (``state.step`` does not count the step yet). Under the
        HF ``Trainer`` it runs after the Trainer's clipping (its ``on_pre_optimizer_step``).
        Optional: a hook without it is not called here."""

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
