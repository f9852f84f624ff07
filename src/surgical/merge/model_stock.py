"""``model_stock``: move toward the mean of the changes by a ratio set by the angle between them."""

from __future__ import annotations

import torch

from surgical.merge.registry import MERGE_METHODS
from surgical.merge.support import TensorMerge


@MERGE_METHODS.register(
    "model_stock",
    help="t * mean change, t = N c / (1 + (N - 1) c) from the mean pairwise cosine c (per tensor)",
    reference="https://arxiv.org/abs/2403.19522",
    min_inputs=2,
)
def model_stock(t: TensorMerge) -> torch.Tensor:
    """Weights are ignored: the ratio comes from the geometry of the fine-tuned changes."""
    v = t.values.double()
    n = v.shape[0]
    norms = v.norm(dim=1)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            d = float(norms[i] * norms[j])
            cos.append(float(v[i] @ v[j]) / d if d > 0 else 0.0)
    c = sum(cos) / len(cos)
    ratio = n * c / (1 + (n - 1) * c) if (1 + (n - 1) * c) != 0 else 0.0
    return (v.mean(0) * ratio).float()
