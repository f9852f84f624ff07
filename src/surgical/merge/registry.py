"""The registry of merge methods and the helpers several of them share.

A merge method is a plain per-tensor function ``fn(t: TensorMerge) -> torch.Tensor``: given one
tensor's changes over their union support (``t.values``, shape ``(n, m)``), the per-delta
weights and the method's checked options, it returns the ``m`` merged values. It knows nothing
of files, kinds or which deltas touch which tensors (:func:`surgical.merge.merge` does that).

Registered with ``help``, ``options`` and ``reference`` (a paper or page), and ``min_inputs`` /
``max_inputs`` where the method needs them, ``nonnegative_weights`` where it averages by weight
and a negative weight has no meaning (:func:`surgical.merge.merge` refuses one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from surgical.core.registry import Option, Registry
from surgical.merge.support import TensorMerge, hashed_uniform

MergeFn = Callable[[TensorMerge], torch.Tensor]

MERGE_METHODS: Registry[MergeFn] = Registry("merge method")

# options with mergekit's names where one exists
DENSITY = Option("density", float, 1.0, "fraction of each tensor kept (of its whole size)", low=0, high=1,
                 low_open=True)  # fmt: skip
SCALE = Option("scale", float, 1.0, "multiplier of the merged change (mergekit's lambda)")
NORMALIZE = Option("normalize", bool, True, "divide by the sum of the weights that contribute")
SEED = Option("seed", int, 0, "seed of the random drops (a draw depends on the value's position)")
CONSENSUS = Option("consensus", str, "none", "'ties': keep only values that agree with the elected sign",
                   choices=("none", "ties"))  # fmt: skip


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the ``k`` largest |values| (ties broken by position); all non-zeros if fewer."""
    n, m = values.shape
    if k >= m:
        return values != 0
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    idx = torch.topk(values.abs(), k, dim=1, sorted=False).indices
    return torch.zeros_like(values, dtype=torch.bool).scatter_(1, idx, True) & (values != 0)


def combine(t: TensorMerge, values: torch.Tensor, consensus: str, normalize: bool) -> torch.Tensor:
    """The weighted combination of ``values`` (n, m): a plain weighted sum, or TIES' disjoint
    mean: only values agreeing with the sign elected by weighted sum (``consensus="ties"``) or
    by count (``"ties_count"``)."""
    w = t.weights[:, None]
    weighted = values * w
    if consensus in ("ties", "ties_count"):
        votes = weighted if consensus == "ties" else torch.sign(weighted)
        sign = torch.sign(votes.sum(0))
        keep = (torch.sign(weighted) == sign) & (values != 0)
    else:
        keep = values != 0
    total = (weighted * keep).sum(0)
    if not normalize:
        return total
    denom = (w * keep).sum(0)
    return torch.where(denom != 0, total / torch.where(denom != 0, denom, 1), torch.zeros_like(total))


def random_keep(t: TensorMerge, probability: torch.Tensor) -> torch.Tensor:
    """Per delta, a keep mask drawn with ``probability`` (n, m) from position-seeded uniforms."""
    pos = t.flat_positions()
    draws = torch.stack([hashed_uniform(t.options["seed"], t.name, pos, i) for i in range(t.values.shape[0])])
    return draws < probability
