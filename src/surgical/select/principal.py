"""``principal`` (LIFT): |entries| of the best rank-r approximation of each weight.

LIFT argues that the entries that carry a weight's principal directions are the ones worth
tuning. The rank-r approximation ``U_r S_r V_r^T`` comes from an exact SVD in fp32 (deterministic;
a few milliseconds for a 576x1536 weight). Non-matrix parameters fall back to |w|.
"""

from __future__ import annotations

import torch

from surgical.core.registry import Option
from surgical.select.criteria import CRITERIA, ScoreContext


def low_rank(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of a 2-D ``weight`` (Eckart-Young), in fp32."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]) @ vh[:r]


@CRITERIA.register(
    "principal",
    help="|entries| of the best rank-r approximation of each weight (LIFT)",
    options=[Option("rank", int, 8, "rank of the approximation (capped at the smaller dimension)", low=1)],
)
def principal_scores(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """|(U_r S_r V_r^T)_ij| per entry; option ``rank`` (default 8, capped at the smaller dimension)."""
    rank = ctx.options["rank"]
    out = {}
    for name, p in ctx.params.items():
        out[name] = low_rank(p, rank).abs() if p.dim() == 2 else p.detach().float().abs()
    return out
