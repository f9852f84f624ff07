"""``ties``: trim each change to its largest values, elect a sign per value, average the agreeing ones."""

from __future__ import annotations

import torch

from surgical.core.registry import Option
from surgical.merge.registry import DENSITY, MERGE_METHODS, NORMALIZE, SCALE, combine, topk_mask
from surgical.merge.support import TensorMerge


@MERGE_METHODS.register(
    "ties",
    help="trim to the top density of each change, elect signs, disjoint mean (TIES-Merging)",
    options=[
        Option("density", float, 0.2, DENSITY.help, low=0, high=1, low_open=True),
        Option(
            "majority_sign_method",
            str,
            "sum",
            "elect the sign by weighted 'sum' or 'count'",
            choices=("sum", "count"),
        ),
        NORMALIZE,
        SCALE,
    ],  # fmt: skip
    reference="https://arxiv.org/abs/2306.01708",
)
def ties(t: TensorMerge) -> torch.Tensor:
    """Trim (top ``density`` of the whole tensor by |v|), elect sign, disjoint weighted mean."""
    k = round(t.options["density"] * t.numel)
    trimmed = t.values * topk_mask(t.values, k)
    if t.options["majority_sign_method"] == "count":
        weighted = trimmed * t.weights[:, None]
        sign = torch.sign(torch.sign(weighted).sum(0))
        keep = (torch.sign(weighted) == sign) & (trimmed != 0)
        total = (weighted * keep).sum(0)
        if t.options["normalize"]:
            denom = (t.weights[:, None] * keep).sum(0)
            total = torch.where(
                denom != 0, total / torch.where(denom != 0, denom, 1), torch.zeros_like(total)
            )
        return total * t.options["scale"]
    return combine(t, trimmed, "ties", t.options["normalize"]) * t.options["scale"]
