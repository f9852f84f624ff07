"""Classification predictions and accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from surgical.core.runtime import progress
from surgical.eval.metrics import Batch, check_batches, eval_mode, forward_logits, model_device


def predict(
    model: nn.Module, batches: Sequence[Batch], *, desc: str = "evaluating", show: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Runs a classifier over labelled batches in eval mode, without gradients.

    The model is left in the train/eval mode it had. For accuracy and loss over several named
    sets (and language models), use :func:`surgical.eval.evaluate`.

    Returns:
        (float32 logits of every example on the CPU, predicted labels, accuracy against the
        batches' labels).

    Raises:
        SurgicalError: if the batches are empty or have no labels.
    """
    check_batches(desc, batches)
    device = model_device(model)
    logits, labels = [], []
    with eval_mode(model), progress(disable=not show) as bar:
        task = bar.add_task(desc, total=len(batches), info="")
        for batch in batches:
            logits.append(forward_logits(model, batch, device).float().cpu())
            labels.append(batch["labels"])
            bar.update(task, advance=1)
    all_logits = torch.cat(logits)
    preds = all_logits.argmax(-1)
    acc = (preds == torch.cat(labels)).float().mean().item()
    return all_logits, preds, acc
