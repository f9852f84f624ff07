"""The registry of selection criteria and the context they are given.

A criterion is a function ``(ctx: ScoreContext) -> dict[name, scores]`` returning one score
tensor per targeted parameter, the same shape as the parameter, where a higher score means
"more worth training". Criteria know nothing of budgets: allocation happens afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgical.registry import Registry


@dataclass
class ScoreContext:
    """Everything a criterion may use.

    Attributes:
        model: The model being scored (its weights must be left unchanged).
        params: Targeted parameter name -> parameter.
        data: Calibration batches (dicts the model accepts, with labels so it returns a loss);
            ``None`` for criteria that need no data.
        max_batches: How many batches to use from ``data``.
        seed: Seed for any randomness.
        progress: Whether to show a progress bar.
        options: Criterion-specific settings.
    """

    model: nn.Module
    params: dict[str, nn.Parameter]
    data: Iterable[Any] | None
    max_batches: int
    seed: int
    progress: bool
    options: dict[str, Any]


Criterion = Callable[[ScoreContext], dict[str, torch.Tensor]]

CRITERIA: Registry[Criterion] = Registry("selection criterion")
