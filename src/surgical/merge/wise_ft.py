"""``wise_ft``: alpha x the change of one delta (replaced tensors such as a new head are kept)."""

from __future__ import annotations

import torch

from surgical.core.registry import Option
from surgical.merge.registry import MERGE_METHODS
from surgical.merge.support import TensorMerge


@MERGE_METHODS.register(
    "wise_ft",
    help="interpolate toward the base: alpha * delta; replaced tensors are kept",
    options=[
        Option(
            "alpha",
            float,
            0.5,
            "share of the change kept (0: the base, 1: the fine-tuned model)",
            low=0,
            high=1,
        )
    ],  # fmt: skip
    reference="https://arxiv.org/abs/2109.01903",
    max_inputs=1,
    keeps_full=True,
)
def wise_ft(t: TensorMerge) -> torch.Tensor:
    """alpha * v (the weight of the one delta multiplies too)."""
    return t.values[0] * t.weights[0] * t.options["alpha"]
