"""The model-loss helper every scorer, data criterion and the training loop use."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from surgical.core.errors import SurgicalError


def batch_to(batch: Any, device: torch.device) -> dict[str, Any]:
    """The tensors of a dict batch moved to ``device``; a SurgicalError for anything but a dict."""
    if isinstance(batch, dict):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    raise SurgicalError(
        f"batches must be dicts of tensors the model accepts, got {type(batch).__name__}",
        "Yield dicts such as a tokenizer's output plus 'labels'",
    )


def model_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The loss the model itself reports for ``batch`` (``output.loss``); a SurgicalError if none."""
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None:
        raise SurgicalError(
            "the model returned no loss for a batch",
            "Include 'labels' in each batch so the model computes its loss",
        )
    return loss


LossFn = Callable[[nn.Module, dict[str, Any]], torch.Tensor]
"""A function computing the scalar loss of a batch (default: :func:`model_loss`)."""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Runs the body in eval mode without gradients, then restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def output_logits(out: Any) -> torch.Tensor | None:
    """The logits of a model's output: ``.logits``, a ``"logits"`` key, or the tensor itself;
    None if it has none."""
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None and torch.is_tensor(out):
        logits = out
    return logits
