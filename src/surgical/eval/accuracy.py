"""Classification predictions and accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from surgical.core.runtime import progress


@torch.no_grad()
def predict(
    model: nn.Module, batches: Sequence[dict], *, desc: str = "evaluating", show: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Runs the model over labelled batches in eval mode.

    Returns:
        (logits of every example, predicted labels, accuracy against the batches' labels).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    with progress(disable=not show) as bar:
        task = bar.add_task(desc, total=len(batches), info="")
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits.append(model(**inputs).logits.float().cpu())
            labels.append(batch["labels"])
            bar.update(task, advance=1)
    model.train(was_training)
    all_logits = torch.cat(logits)
    preds = all_logits.argmax(-1)
    acc = (preds == torch.cat(labels)).float().mean().item()
    return all_logits, preds, acc
