"""``fisher``: the diagonal Fisher information, accumulated squared gradients.

Two flavours, chosen by the option ``labels``:

- ``"data"`` (default, the empirical Fisher): gradients of the loss on the batch's own labels.
- ``"sampled"`` (the true Fisher's Monte-Carlo estimate): labels are drawn from the model's own
  predictive distribution, seeded, one per example for classification logits ``(B, C)`` and one
  per position for causal-LM logits ``(B, T, V)`` (positions with ``attention_mask == 0`` are
  skipped); the loss is the mean cross-entropy on those labels.

Each batch contributes the square of its mean-loss gradient (a batch-level estimate; with batch
size 1 it is the per-example diagonal Fisher).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.loss import LossFn, model_loss
from surgical.core.registry import Option
from surgical.select.criteria import CRITERIA, ScoreContext
from surgical.select.scoring import accumulate_gradients


def sampled_label_loss(generator: torch.Generator) -> LossFn:
    """A loss function that samples labels from the model's predictive distribution.

    Args:
        generator: Source of the samples (its device must match the model's logits).
    """

    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs)
        logits = getattr(out, "logits", None)
        if logits is None or logits.dim() not in (2, 3) or logits.shape[-1] < 2:
            raise SurgicalError(
                "sampled-label Fisher needs classification logits (B, C) or LM logits (B, T, V)",
                "Use labels='data' for this model",
            )
        flat = logits.reshape(-1, logits.shape[-1])
        probs = torch.softmax(flat.detach().float(), dim=-1)
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if logits.dim() == 3 and "attention_mask" in batch:
            keep = batch["attention_mask"].reshape(-1).bool()
            flat, sampled = flat[keep], sampled[keep]
        return F.cross_entropy(flat.float(), sampled)

    return loss_fn


LABELS = Option(
    "labels",
    str,
    "data",
    "'data': the empirical Fisher on the batches' labels; 'sampled': labels drawn from the model",
    choices=("data", "sampled"),
)


def fisher_loss(ctx: ScoreContext) -> LossFn:
    """The loss the Fisher is taken of, from the ``labels`` option (``data`` or ``sampled``)."""
    if ctx.options["labels"] == "data":
        return model_loss
    device = next(iter(ctx.params.values())).device
    return sampled_label_loss(torch.Generator(device=device).manual_seed(ctx.seed))


@CRITERIA.register("fisher", help="sum over batches of (dL/dw)^2 (diagonal Fisher)", options=[LABELS])
def fisher_scores(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Sum over calibration batches of (dL/dw)^2 for every targeted entry."""
    sums, _ = accumulate_gradients(ctx, torch.square, fisher_loss(ctx))
    return sums
