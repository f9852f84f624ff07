"""``breadcrumbs``: drop the largest (outliers) and the smallest changes, keep the band between."""

from __future__ import annotations

import torch

from surgical.core.registry import Option
from surgical.merge.registry import CONSENSUS, MERGE_METHODS, SCALE, combine, topk_mask
from surgical.merge.support import TensorMerge


@MERGE_METHODS.register(
    "breadcrumbs",
    help="per change, drop the top gamma and keep the next density of the tensor by |value|",
    options=[
        Option(
            "density",
            float,
            0.9,
            "fraction of the tensor kept below the dropped outliers",
            low=0,
            high=1,
            low_open=True,
        ),
        Option("gamma", float, 0.01, "fraction of the tensor dropped as largest outliers", low=0, high=1),
        CONSENSUS,
        Option("normalize", bool, False, "divide by the sum of the weights that contribute"),
        SCALE,
    ],  # fmt: skip
    reference="https://arxiv.org/abs/2312.06795",
)
def breadcrumbs(t: TensorMerge) -> torch.Tensor:
    """Keep the values ranked (by |v| over the whole tensor) below the top ``gamma`` and within
    the next ``density``; combine them."""
    top = round(t.options["gamma"] * t.numel)
    band = round(min(1.0, t.options["gamma"] + t.options["density"]) * t.numel)
    keep = topk_mask(t.values, band) & ~topk_mask(t.values, top)
    combined = combine(t, t.values * keep, t.options["consensus"], t.options["normalize"])
    return combined * t.options["scale"]
