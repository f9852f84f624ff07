"""The adapter that runs surgical hooks from the HF ``Trainer`` (its own module: importing
``transformers.TrainerCallback`` pulls in the Trainer's stack, peft and bitsandbytes, seconds that
``import surgical`` and the command line do not pay until the callback is used)."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import TrainerCallback

from surgical.train.extract import extract
from surgical.train.hooks import StepState, TrainHook


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

    def on_pre_optimizer_step(
        self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw
    ):
        s = self._sync_state(args, state, model, optimizer, lr_scheduler)
        for h in self.hooks:
            if (before := getattr(h, "on_before_step", None)) is not None:
                before(s)

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
