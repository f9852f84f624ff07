"""``random``: uniform random scores from a seeded generator (Random Masking baseline)."""

from __future__ import annotations

import torch

from surgical.select.criteria import CRITERIA, ScoreContext


@CRITERIA.register("random", help="uniform random scores from a seeded generator (Random Masking)")
def random_scores(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """One uniform score per entry, drawn in parameter-name order from ``torch.Generator(seed)``."""
    gen = torch.Generator().manual_seed(ctx.seed)
    return {name: torch.rand(p.shape, generator=gen) for name, p in ctx.params.items()}
