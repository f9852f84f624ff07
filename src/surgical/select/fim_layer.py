"""``fim_layer``: rank whole layers by their Fisher information (surgical fine-tuning, FIM score).

Each targeted tensor's score is the trace of its diagonal Fisher, sum over batches of
||dL/dW||^2, a 0-d tensor: per-tensor accumulation keeps no per-entry state at all. At the
default ``layer`` granularity a block's score is the sum over its tensors, i.e. the trace of the
block's diagonal Fisher. Takes the same ``labels`` option as ``fisher``.
"""

from __future__ import annotations

import torch

from surgical.select.criteria import CRITERIA, ScoreContext
from surgical.select.fisher import LABELS, fisher_loss
from surgical.select.scoring import accumulate_gradients


def _squared_norm(grad: torch.Tensor) -> torch.Tensor:
    return grad.square().sum()


@CRITERIA.register(
    "fim_layer",
    help="rank whole layers by the trace of their Fisher (surgical fine-tuning's FIM score)",
    options=[LABELS],
    granularity="layer",
)
def fim_layer_scores(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Per tensor, sum over calibration batches of ||dL/dW||_F^2 (0-d tensors)."""
    sums, _ = accumulate_gradients(ctx, _squared_norm, fisher_loss(ctx))
    return sums
