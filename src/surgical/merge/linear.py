"""``linear``: the weighted mean (or sum) of the changes; with one delta and weight a, a x delta."""

from __future__ import annotations

import torch

from surgical.merge.registry import MERGE_METHODS, NORMALIZE
from surgical.merge.support import TensorMerge


@MERGE_METHODS.register(
    "linear",
    help="weighted mean of the changes (a uniform soup with equal weights)",
    options=[NORMALIZE],
    reference="https://arxiv.org/abs/2203.05482",
)
def linear(t: TensorMerge) -> torch.Tensor:
    """sum_i w_i v_i / sum_i w_i (over the deltas that change the value when normalizing)."""
    if not t.options["normalize"]:
        return (t.values * t.weights[:, None]).sum(0)
    w = t.weights[:, None] * t.present[:, None]  # a delta that leaves a tensor alone does not dilute it
    denom = float(w.sum())
    return (t.values * w).sum(0) / denom if denom else torch.zeros(t.values.shape[1])
