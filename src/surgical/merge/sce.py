"""``sce``: select the positions where the changes differ most, weight each change by its energy,
then elect signs and average the agreeing values (FuseChat's SCE: select, calculate, erase).

Per tensor, over the union of the supports:

1. **Select**: the variance of the changes across the inputs at each position; only the
   ``select_topk`` fraction of the whole tensor with the largest variance is kept (positions
   outside the union have variance zero and count as the smallest; ``1`` keeps every position).
2. **Calculate**: each input's coefficient is the mean square of its selected change (times its
   weight), normalized so that their magnitudes sum to one: the change that moved this tensor
   most weighs most.
3. **Erase**: TIES' sign election by the weighted sum, and the mean of the values that agree
   with it (divided by the coefficients that contribute, unless ``normalize`` is false).
"""

from __future__ import annotations

import dataclasses

import torch

from surgical.core.registry import Option
from surgical.merge.registry import MERGE_METHODS, NORMALIZE, SCALE, combine
from surgical.merge.support import TensorMerge


@MERGE_METHODS.register(
    "sce",
    help="keep the positions of highest variance across the changes, weight each change by its "
    "mean square, elect signs, disjoint mean (FuseChat's SCE)",
    options=[
        Option(
            "select_topk",
            float,
            1.0,
            "fraction of each tensor kept by variance across the changes",
            low=0,
            high=1,
            low_open=True,
        ),  # fmt: skip
        NORMALIZE,
        SCALE,
    ],
    reference="https://arxiv.org/abs/2408.07990",
    min_inputs=2,
)
def sce(t: TensorMerge) -> torch.Tensor:
    """Select by variance, coefficients from the mean squares, TIES' sign election."""
    values = t.values
    n, m = values.shape
    k = round(t.options["select_topk"] * t.numel)
    if k < m:  # the union holds more positions than the budget: keep those of largest variance
        var = values.double().var(dim=0, unbiased=False)
        keep = torch.zeros(m, dtype=torch.bool)
        keep[torch.topk(var, k, sorted=False).indices] = True
        values = values * keep
    energy = values.double().pow(2).mean(dim=1) * t.weights.double()  # a negative weight subtracts
    total = float(energy.abs().sum())
    coef = (energy / total if total > 0 else torch.zeros(n, dtype=torch.float64)).float()
    scored = dataclasses.replace(t, values=values, weights=coef)
    return combine(scored, values, "ties", t.options["normalize"]) * t.options["scale"]
