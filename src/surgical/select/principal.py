"""``principal`` (LIFT): |entries| of the best rank-r approximation of each weight.

LIFT argues that the entries that carry a weight's principal directions are the ones worth
tuning. The rank-r approximation ``U_r S_r V_r^T`` comes from an exact SVD in fp32 (deterministic;
a few milliseconds for a 576x1536 weight). A fused 3-D expert tensor ``(E, out, in)`` is
approximated expert by expert (a batched SVD); a convolution ``(out, in, k...)`` as its
``(out, in * k...)`` matrix; 1-D parameters fall back to |w|.
"""

from __future__ import annotations

import torch

from surgical.core.registry import Option
from surgical.select.criteria import CRITERIA, ScoreContext


def low_rank(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of a 2-D ``weight`` (Eckart-Young), in fp32; a 3-D
    weight is a batch of matrices, each approximated on its own."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    r = min(rank, s.shape[-1])
    return (u[..., :, :r] * s[..., None, :r]) @ vh[..., :r, :]


def principal_of(p: torch.Tensor, rank: int) -> torch.Tensor:
    """|low-rank approximation| of a parameter, shaped like it (see the module docstring)."""
    if p.dim() in (2, 3):
        return low_rank(p, rank).abs()
    if p.dim() > 3:  # a convolution: its (out, in * k...) matrix
        return low_rank(p.reshape(p.shape[0], -1), rank).abs().reshape(p.shape)
    return p.detach().float().abs()


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
        out[name] = principal_of(p, rank)
    return out
