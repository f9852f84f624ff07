"""``salience``: |W * grad| summed over batches (SNIP's connection sensitivity).

For batch b the score of an entry is |w * g_b|; summed over batches that is |w| * sum_b |g_b|,
so it costs exactly what ``gradient`` costs, plus one multiply at the end.
"""

from __future__ import annotations

import torch

from surgical.select.criteria import CRITERIA, ScoreContext
from surgical.select.scoring import accumulate_gradients


@CRITERIA.register("salience", help="sum over batches of |w * dL/dw| (SNIP)")
def salience_scores(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Sum over calibration batches of |w * dL/dw| for every targeted entry."""
    sums, _ = accumulate_gradients(ctx, torch.abs)
    return {n: sums[n].mul_(p.detach().float().abs()) for n, p in ctx.params.items()}
