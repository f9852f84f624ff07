"""``rgn``: relative gradient norm ||g|| / ||W|| per tensor (Auto-RGN, surgical fine-tuning).

A tensor whose gradient is large relative to its weights is one the task wants to move. Each
batch contributes ||g_b||_F / ||W||_F; the score is the sum over batches (a 0-d tensor per
parameter, so scoring keeps no per-entry state). Default granularity ``tensor``; at ``layer``
granularity a block's score is the sum of its tensors' scores.
"""

from __future__ import annotations

import torch

from surgical.select.criteria import CRITERIA, ScoreContext
from surgical.select.scoring import accumulate_gradients


def _norm(grad: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(grad)


@CRITERIA.register(
    "rgn", help="relative gradient norm ||g|| / ||W|| per tensor (Auto-RGN)", granularity="tensor"
)
def rgn_scores(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Per tensor, sum over batches of ||dL/dW||_F / ||W||_F (0-d tensors; a zero weight scores 0)."""
    sums, _ = accumulate_gradients(ctx, _norm)
    out = {}
    for n, p in ctx.params.items():
        w = torch.linalg.vector_norm(p.detach().float())
        out[n] = sums[n] / w if w > 0 else torch.zeros_like(sums[n])
    return out
