"""The registry of selection criteria and the context they are given.

A criterion is a function ``(ctx: ScoreContext) -> dict[name, scores]`` returning one score
tensor per targeted parameter, the same shape as the parameter, where a higher score means
"more worth training". Criteria know nothing of budgets: allocation happens afterwards.

Each criterion is registered with its options declared (``ctx.options`` arrives checked and
completed with defaults). A criterion that scores whole tensors (``rgn``, ``fim_layer``) returns
0-d tensors instead and registers ``granularity="tensor"`` or ``"layer"``; per-entry criteria
default to ``"entry"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgical.core.registry import Registry


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
        options: The criterion's declared options, checked and completed with defaults.
        used: Calibration batches actually used (set by the criterion, for provenance).
    """

    model: nn.Module
    params: dict[str, nn.Parameter]
    data: Iterable[Any] | None
    max_batches: int
    seed: int
    progress: bool
    options: dict[str, Any]
    used: int = 0

    @property
    def expected_batches(self) -> int:
        """How many batches scoring will read: ``max_batches``, or fewer when the data (of known
        length) holds fewer; the length of its progress bar."""
        try:
            return min(self.max_batches, len(self.data))  # type: ignore[arg-type]
        except TypeError:  # a generator or other iterable without a length
            return self.max_batches


Criterion = Callable[[ScoreContext], dict[str, torch.Tensor]]

CRITERIA: Registry[Criterion] = Registry("selection criterion")


def default_granularity(method: str) -> str:
    """The granularity a criterion's scores are meant for (``"entry"`` unless it registered another)."""
    return CRITERIA.entry(method).extra.get("granularity", "entry")
