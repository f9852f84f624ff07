"""``loss`` and ``learnability``: how the model's loss on each example ranks it.

- ``loss``: the per-example loss of the model (mean over target tokens for a causal LM), kept
  high (hard examples) or low (easy, often cleaner ones).
- ``learnability`` (after LoBaSS): the loss under the model minus the loss under a reference
  briefly tuned on a seeded random ``reference_fraction`` of the examples, so the examples the
  model can still learn most from rank first, and the ones it already knows (low base loss) or
  that stay hard after tuning (noise) rank last. With ``select_data(..., reference=...)`` that
  reference (a tuned model or a ``(batch) -> logits`` function) is used instead and nothing is
  tuned. The reference is tuned on a copy; the model is never changed.
"""

from __future__ import annotations

import torch

from surgical.core.registry import Option
from surgical.data.criteria import DATA_CRITERIA, DataContext
from surgical.data.examples import batches_of, budget_of
from surgical.data.losses import brief_tune

STEPS = Option("steps", int, 20, "AdamW steps of the brief tuning", low=1)
LR = Option("lr", float, 1e-4, "learning rate of the brief tuning", low=0, low_open=True)


@DATA_CRITERIA.register(
    "loss",
    help="per-example loss of the model, kept high or low",
    options=[
        Option("keep", str, "high", "'high': hardest examples first; 'low': easiest", choices=("high", "low"))
    ],
    needs_model=True,
)
def loss_scores(ctx: DataContext) -> torch.Tensor:
    """The model's loss per example (its negative with ``keep="low"``)."""
    losses = ctx.losses(ctx.model, what="loss")
    return losses if ctx.options["keep"] == "high" else -losses


@DATA_CRITERIA.register(
    "learnability",
    help="loss under the model minus loss under a briefly tuned reference (LoBaSS-like)",
    options=[
        Option("reference_fraction", float, 0.2, "share of the examples the reference is tuned on",
               low=0, high=1, low_open=True),
        STEPS,
        LR,
    ],
    needs_model=True,
)  # fmt: skip
def learnability_scores(ctx: DataContext) -> torch.Tensor:
    """``loss(model) - loss(reference)`` per example."""
    base = ctx.losses(ctx.model, what="loss (model)")
    reference = ctx.reference
    if reference is None:
        n = len(ctx.examples)
        chosen = torch.randperm(n, generator=ctx.generator(1))[
            : budget_of(ctx.options["reference_fraction"], n)
        ]
        ctx.info["reference_examples"] = int(chosen.numel())
        reference = brief_tune(
            ctx.model,
            batches_of(ctx.examples, chosen.sort().values, ctx.batch_size, ctx.pad_id),
            steps=ctx.options["steps"],
            lr=ctx.options["lr"],
            seed=ctx.seed,
        )
    return base - ctx.losses(reference, what="loss (reference)")
