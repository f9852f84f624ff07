"""``SurgicalTrainer``: the HF Trainer with a per-step batch filter.

Its own module, imported on first use (``sg.SurgicalTrainer``): importing ``transformers.Trainer``
pulls in datasets, accelerate and peft, which ``import surgical`` should not pay for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer


class SurgicalTrainer(Trainer):
    """``transformers.Trainer`` with a per-step batch filter: token selection (new labels) or
    online batch selection (a sub-batch) inside the HF training loop.

    ``batch_filter(model, batch, step) -> batch`` is the same callable :func:`surgical.fit` takes
    (``step``: optimizer steps taken so far); everything else is the stock Trainer, so it also
    takes :class:`SurgicalCallback` for schedules and delta saving::

        trainer = SurgicalTrainer(model=model, args=args, train_dataset=ds,
                                  batch_filter=lambda m, b, s: selector(m, b))
    """

    def __init__(
        self, *args: Any, batch_filter: Callable[[nn.Module, dict, int], dict] | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.batch_filter = batch_filter

    def training_step(self, model: nn.Module, inputs: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.batch_filter is not None:
            inputs = self.batch_filter(model, inputs, self.state.global_step)
        return super().training_step(model, inputs, *args, **kwargs)
