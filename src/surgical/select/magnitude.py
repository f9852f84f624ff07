"""``magnitude``: |W|, the data-free baseline (large weights are assumed to matter most)."""

from __future__ import annotations

import torch

from surgical.select.criteria import CRITERIA, ScoreContext


@CRITERIA.register("magnitude", help="|w|: the data-free baseline")
def magnitude_scores(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """|w| for every targeted entry; needs no data and leaves the model untouched."""
    return {name: p.detach().float().abs() for name, p in ctx.params.items()}
