"""``dare``: drop each changed value with probability 1 - density, rescale the rest by 1 / density."""

from __future__ import annotations

import torch

from surgical.core.registry import Option
from surgical.merge.registry import CONSENSUS, DENSITY, MERGE_METHODS, SCALE, SEED, combine, random_keep
from surgical.merge.support import TensorMerge


@MERGE_METHODS.register(
    "dare",
    help="random drop and rescale (DARE), then a weighted sum or a TIES sign consensus",
    options=[
        Option(
            "density",
            float,
            0.5,
            DENSITY.help.replace("kept", "kept at random"),
            low=0,
            high=1,
            low_open=True,
        ),
        SEED,
        CONSENSUS,
        Option("normalize", bool, False, "divide by the sum of the weights that contribute"),
        SCALE,
    ],  # fmt: skip
    reference="https://arxiv.org/abs/2311.03099",
)
def dare(t: TensorMerge) -> torch.Tensor:
    """Keep each value with probability ``density`` (a draw seeded by its position), divide by
    ``density`` (unbiased: the expectation is the change itself), then combine."""
    density = t.options["density"]
    keep = random_keep(t, torch.full_like(t.values, density))
    rescaled = t.values * keep / density
    return combine(t, rescaled, t.options["consensus"], t.options["normalize"]) * t.options["scale"]
