"""A plain training loop over pre-built batches (AdamW, warm-up then linear decay)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from surgical.errors import SurgicalError
from surgical.utils import progress


@dataclass
class FitResult:
    """What a training run did."""

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, self.steps)


def fit(
    model: nn.Module,
    batches: Sequence[dict],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: float = 0.1,
    seed: int = 0,
    show: bool = True,
) -> FitResult:
    """Trains the parameters that require grad with AdamW over ``batches`` for ``epochs``.

    Batches are reshuffled each epoch with ``seed``. A non-finite loss stops training with a
    SurgicalError before the step is applied.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SurgicalError(
            "the model has no trainable parameters", "Call surgical.prepare(model, plan) first"
        )
    if not batches:
        raise SurgicalError("the training data yielded no batches", "Pass a non-empty dataset")
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = epochs * len(batches)
    sched = get_linear_schedule_with_warmup(opt, int(warmup * total), total)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    with progress(disable=not show) as bar:
        task = bar.add_task("training", total=total, info="")
        for _epoch in range(epochs):
            for i in torch.randperm(len(batches), generator=gen).tolist():
                batch = {k: v.to(device) for k, v in batches[i].items()}
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise SurgicalError(
                        f"the loss became {loss.item()} at step {len(losses) + 1}",
                        "Lower the learning rate",
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                rate = len(losses) / (time.perf_counter() - start)
                recent = sum(losses[-20:]) / len(losses[-20:])
                bar.update(task, advance=1, info=f"loss {recent:.3f}  {rate:.2f} step/s")
    model.eval()
    return FitResult(steps=len(losses), seconds=time.perf_counter() - start, losses=losses)
