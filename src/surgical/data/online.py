"""Online batch selection: from each (larger) batch, train on the examples worth it now.

``OnlineSelector(fraction, utility=...)`` is called as ``selector(model, batch)`` on every batch
of a training loop, before the forward pass that trains, and returns the sub-batch of exactly
``round(fraction * B)`` examples (at least one), in their order in the batch. Feed it batches
``1 / fraction`` times the size you want to train on.

Utilities (computed without gradients, in eval mode; the model's mode is restored):

- ``loss``: the example's current loss (mean over its target tokens for a causal LM);
- ``reducible`` (after RHO-LOSS): the loss minus the loss under ``reference``, so examples that
  are learnable, not merely noisy, come first. With surgical the reference is the base model:
  the trained model with the delta toggled off, not a second copy (pass a ``(batch) -> logits``
  function that does that, or a frozen model).

With ``diversity`` > 0 the picks are greedy: the first has the highest utility (scaled to [0, 1]
within the batch); each next maximises ``utility + diversity * (cosine distance to the nearest
pick)`` on mean-pooled last hidden states, so near-copies of a pick lose their place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.loss import batch_to
from surgical.core.registry import check_range
from surgical.data.examples import budget_of
from surgical.data.losses import LogitsFn, example_losses, frozen_eval, logits_of, model_device

UTILITIES = ("loss", "reducible")


class OnlineSelector:
    """Keeps the top ``fraction`` of each batch by a utility, optionally spread by diversity.

    Args:
        fraction: Share of each batch kept, in (0, 1].
        utility: ``loss`` or ``reducible`` (loss minus the reference's loss).
        reference: ``reducible`` only: a model or ``(batch) -> logits`` function.
        diversity: Weight of the diversity term (0: plain top-k by utility).

    Raises:
        SurgicalError: a fraction outside (0, 1], an unknown utility, ``reducible`` without a
            reference, a negative diversity.
    """

    def __init__(
        self,
        fraction: float,
        utility: str = "loss",
        reference: nn.Module | LogitsFn | None = None,
        diversity: float = 0.0,
    ) -> None:
        check_range(fraction, "fraction", 0, 1, low_open=True)
        if utility not in UTILITIES:
            raise SurgicalError(f"unknown utility {utility!r}", f"Use one of: {', '.join(UTILITIES)}")
        if utility == "reducible" and reference is None:
            raise SurgicalError(
                "utility 'reducible' needs a reference",
                "Pass reference= a model or (batch) -> logits function (the base: the delta toggled off)",
            )
        check_range(diversity, "diversity", 0)
        self.fraction, self.utility, self.reference, self.diversity = fraction, utility, reference, diversity
        self.seen = 0  # examples scored
        self.kept = 0  # examples returned

    def config(self) -> dict[str, Any]:
        """The settings that change training (for run identities and checkpoints)."""
        return {"fraction": self.fraction, "utility": self.utility, "diversity": self.diversity}

    def _utility_and_embeddings(
        self, model: nn.Module, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        with frozen_eval(model):
            if self.diversity > 0:
                inputs = batch_to({k: v for k, v in batch.items() if k != "labels"}, model_device(model))
                out = model(**inputs, output_hidden_states=True)
                hidden = out.hidden_states[-1].float()
                mask = inputs.get("attention_mask")
                mask = (
                    torch.ones(hidden.shape[:2], device=hidden.device)
                    if mask is None
                    else mask.to(hidden.dtype)
                )
                emb = ((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)).cpu()
                logits = out.logits
            else:
                emb, logits = None, logits_of(model, batch)
            u = example_losses(logits, batch["labels"]).float().cpu()
        if self.utility == "reducible":
            guard = frozen_eval(self.reference) if isinstance(self.reference, nn.Module) else torch.no_grad()
            with guard:
                u = u - example_losses(logits_of(self.reference, batch), batch["labels"]).float().cpu()
        return u, emb

    def select(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """Sorted positions of the examples of ``batch`` to train on."""
        if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
            raise SurgicalError(
                "online selection needs dict batches with input_ids and labels", "Pass the training batches"
            )
        size = int(batch["input_ids"].shape[0])
        k = budget_of(self.fraction, size)
        u, emb = self._utility_and_embeddings(model, batch)
        if not bool(torch.isfinite(u).all()):
            raise SurgicalError("the utility is NaN or infinite for a batch", "Check the model and the batch")
        if emb is None:
            chosen = torch.sort(u.double(), descending=True, stable=True).indices[:k]
        else:
            chosen = greedy_diverse(u, emb, k, self.diversity)
        self.seen += size
        self.kept += k
        return chosen.sort().values

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The sub-batch of ``batch`` to train on (every tensor with the batch dimension indexed)."""
        idx = self.select(model, batch)
        size = int(batch["input_ids"].shape[0])
        return {
            k: v[idx.to(v.device)] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == size else v
            for k, v in batch.items()
        }


def greedy_diverse(utility: torch.Tensor, emb: torch.Tensor, k: int, weight: float) -> torch.Tensor:
    """``k`` positions, greedily maximising scaled utility plus ``weight`` times the cosine distance
    to the nearest position already picked (the first: the highest utility; ties to the earlier)."""
    u = utility.double()
    span = float(u.max() - u.min())
    u = (u - u.min()) / span if span > 0 else torch.zeros_like(u)
    x = torch.nn.functional.normalize(emb.double(), dim=1)
    first = int(torch.argmax(u))
    picked = [first]
    dist = (1 - x @ x[first]).clamp(min=0)
    for _ in range(k - 1):
        score = u + weight * dist
        score[picked] = float("-inf")
        nxt = int(torch.argmax(score))
        picked.append(nxt)
        dist = torch.minimum(dist, (1 - x @ x[nxt]).clamp(min=0))
    return torch.tensor(picked, dtype=torch.long)
