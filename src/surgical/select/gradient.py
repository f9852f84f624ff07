"""``gradient``: accumulated absolute gradient over calibration batches (SPEFT's best static score)."""

from __future__ import annotations

import torch

from surgical.select.criteria import CRITERIA, ScoreContext
from surgical.select.scoring import accumulate_gradients


@CRITERIA.register("gradient", help="sum over calibration batches of |dL/dw| (SPEFT's best static score)")
def gradient_scores(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Sum over calibration batches of |dL/dw| for every targeted entry."""
    sums, _ = accumulate_gradients(ctx, torch.abs)
    return sums
