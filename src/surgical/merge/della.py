"""``della``: drop with probabilities that fall with magnitude rank, rescale what is kept (DELLA)."""

from __future__ import annotations

import torch

from surgical.core.registry import Option
from surgical.merge.registry import CONSENSUS, MERGE_METHODS, SCALE, SEED, combine, random_keep
from surgical.merge.support import TensorMerge


@MERGE_METHODS.register(
    "della",
    help="keep probabilities from density - epsilon (smallest) to density + epsilon (largest), rescaled",
    options=[
        Option("density", float, 0.7, "mean fraction kept", low=0, high=1, low_open=True),
        Option("epsilon", float, 0.1, "half-width of the keep probabilities around density", low=0, high=0.5),
        SEED,
        Option("consensus", str, "ties", CONSENSUS.help, choices=("none", "ties")),
        Option("normalize", bool, True, "divide by the sum of the weights that contribute"),
        SCALE,
    ],  # fmt: skip
    reference="https://arxiv.org/abs/2406.11617",
)
def della(t: TensorMerge) -> torch.Tensor:
    """Rank each change's values by |v| over the whole tensor (values outside the union are
    zeros, ranked lowest), keep with a probability linear in the rank, divide by it, combine."""
    n, m = t.values.shape
    outside = t.numel - m  # zeros outside the union rank below every stored value
    order = t.values.abs().argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(m).expand(n, m)) + outside
    eps, density = t.options["epsilon"], t.options["density"]
    p = (density - eps + 2 * eps * rank.float() / max(1, t.numel - 1)).clamp(1e-6, 1.0)
    kept = t.values * random_keep(t, p) / p
    return combine(t, kept, t.options["consensus"], t.options["normalize"]) * t.options["scale"]
