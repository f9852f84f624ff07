"""``task_arithmetic``: scale x sum of weighted changes (negative weights subtract a task)."""

from __future__ import annotations

import torch

from surgical.merge.registry import MERGE_METHODS, SCALE
from surgical.merge.support import TensorMerge


@MERGE_METHODS.register(
    "task_arithmetic",
    help="scale * sum_i w_i * delta_i; a negative weight removes a task",
    options=[SCALE],
    reference="https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(t: TensorMerge) -> torch.Tensor:
    """scale * sum_i w_i v_i."""
    return (t.values * t.weights[:, None]).sum(0) * t.options["scale"]
