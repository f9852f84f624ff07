"""The registry of selection criteria and the context they are given.

A criterion is a function ``(ctx: ScoreContext) -> dict[name, scores]`` returning one score
tensor per targeted parameter, the same shape as the parameter, where a higher score means
"more worth training". Criteria know nothing of budgets: allocation happens afterwards.

A criterion that scores whole tensors (``rgn``, ``fim_layer``) returns 0-d tensors instead and
sets ``default_granularity`` on the function (``"tensor"`` or ``"layer"``); per-entry criteria
default to ``"entry"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgical.errors import SurgicalError
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

    def take_options(self, method: str, **defaults: Any) -> dict[str, Any]:
        """The criterion's options with defaults filled in; an unknown option is a SurgicalError."""
        unknown = sorted(set(self.options) - set(defaults))
        if unknown:
            known = ", ".join(sorted(defaults)) or "none"
            raise SurgicalError(
                f"unknown option(s) {', '.join(unknown)} for criterion {method!r}",
                f"Its options are: {known}",
            )
        return {**defaults, **self.options}


Criterion = Callable[[ScoreContext], dict[str, torch.Tensor]]

CRITERIA: Registry[Criterion] = Registry("selection criterion")


def default_granularity(criterion: Criterion) -> str:
    """The granularity a criterion's scores are meant for (``"entry"`` unless it says otherwise)."""
    return getattr(criterion, "default_granularity", "entry")
