"""Per-example and per-token losses, embeddings, and the brief tuning several criteria need.

Conventions as :mod:`surgical.eval.metrics`: 2-D logits ``(B, C)`` are classification, 3-D
logits ``(B, T, V)`` a causal LM whose logits at position t predict the label at t + 1 (as
Hugging Face trains them). Logits are read in float32; labels of -100 carry no loss.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.loss import batch_to, eval_mode, output_logits
from surgical.data.examples import IGNORE_INDEX

LogitsFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""A reference given as a function: a batch (with labels) -> its logits."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def logits_of(model: nn.Module | LogitsFn, batch: Mapping[str, Any]) -> torch.Tensor:
    """The logits of ``model`` (a module, run without the labels, on its device) or of a callable
    reference (given the whole batch) for ``batch``."""
    if not isinstance(model, nn.Module):
        out = model(dict(batch))
    else:
        inputs = batch_to({k: v for k, v in batch.items() if k != "labels"}, model_device(model))
        out = model(**inputs)
    logits = output_logits(out)
    if logits is None or logits.dim() not in (2, 3):
        raise SurgicalError(
            f"the model returned no (B, C) or (B, T, V) logits ({type(out).__name__})",
            "Use a Hugging Face ...ForSequenceClassification or ...ForCausalLM model",
        )
    return logits


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy per label position, ``(B, T)``: position t holds the loss of
    ``labels[:, t]`` predicted from the logits at t - 1; 0 where the label is -100 and at t = 0."""
    labels = labels.to(logits.device)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise SurgicalError(
            f"token labels of shape {tuple(labels.shape)} do not fit logits of shape {tuple(logits.shape)}",
            "Give causal-LM batches labels shaped like input_ids",
        )
    shifted = labels[:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).reshape(shifted.shape)
    return torch.cat([ce.new_zeros(labels.shape[0], 1), ce], dim=1)


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Where causal-LM token labels count in the loss: not -100, and not the first position
    (nothing predicts it)."""
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    return mask


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of each example, ``(B,)``: cross-entropy for classification, mean token loss for a
    causal LM (0 for an example without a target)."""
    labels = labels.to(logits.device)
    if logits.dim() == 2:
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise SurgicalError(
                f"classification labels must be one class id per example, got shape {tuple(labels.shape)}",
                "Give each example one class id",
            )
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    per_token = token_losses(logits, labels)
    mask = target_mask(labels)
    return (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)


def batch_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The mean loss over the batch's examples (differentiable)."""
    logits = logits_of(model, batch)
    return example_losses(logits, batch["labels"]).mean()


def mean_pooled(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's last hidden states averaged over attended positions, ``(B, H)`` float32."""
    inputs = batch_to({k: v for k, v in batch.items() if k != "labels"}, model_device(model))
    out = model(**inputs, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    if hidden is None and isinstance(out, Mapping):
        hidden = out.get("hidden_states")
    if not hidden:
        raise SurgicalError(
            "the model returned no hidden states (output_hidden_states=True)",
            "Use a Hugging Face model, or another criterion than diversity",
        )
    last = hidden[-1].float()
    mask = inputs.get("attention_mask")
    mask = torch.ones(last.shape[:2], device=last.device) if mask is None else mask.to(last.dtype)
    return (last * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


frozen_eval = eval_mode  # one definition, in surgical.core.loss


def brief_tune(
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    *,
    steps: int,
    lr: float,
    seed: int,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """A tuned copy of ``model``: ``steps`` AdamW steps over every floating parameter.

    The model itself is never changed (a deep copy is tuned). Batches are visited in a seeded
    order, reshuffled each pass; the copy runs in eval mode (no dropout), gradients are clipped to
    norm 1, so the result depends only on the model, the batches and the seed.

    Args:
        on_step: Called as ``on_step(step, tuned)`` before the first step (``step`` 0) and after
            each step, e.g. to record losses along the way.
    """
    if not batches:
        raise SurgicalError("brief tuning got no batches", "Pass at least one example")
    tuned = copy.deepcopy(model)
    tuned.eval()
    params = [p for p in tuned.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    if on_step is not None:
        on_step(0, tuned)
    for step in range(1, steps + 1):
        if not order:
            order = torch.randperm(len(batches), generator=g).tolist()
        batch = batches[order.pop(0)]
        opt.zero_grad(set_to_none=True)
        loss = batch_loss(tuned, batch)
        if not torch.isfinite(loss):
            raise SurgicalError(
                f"the loss became NaN/inf at step {step} of the brief tuning", "Lower the option lr"
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if on_step is not None:
            on_step(step, tuned)
    opt.zero_grad(set_to_none=True)
    for p in params:
        p.requires_grad_(False)
    return tuned
