"""Forgetting: how far fine-tuning moved a model away from its base on held-out reference data.

Two measures, both on batches the fine-tuning never saw (general text for a language model):

- ``loss_change``: the reference loss of the tuned model minus that of the base (PEFT's method
  comparison reports this for language models; cheap and of low variance);
- ``kl``: the mean KL divergence KL(base || tuned) of the two models' predictive distributions,
  per attended token position (language models) or per example (classification). It sees every
  change of the distribution, not only the change at the labelled token.

With a :class:`~surgical.delta.Delta` both come from ONE model in memory: each batch runs on the
base, then on the base with the delta applied in place (:func:`surgical.delta.applied`, which
costs time proportional to the delta and restores the base bit for bit). Only one batch of base
log-probabilities is held at a time, never the logits of the whole set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.runtime import progress
from surgical.delta import Delta, applied
from surgical.delta.base import check_base
from surgical.eval.metrics import (
    IGNORE_INDEX,
    Batch,
    check_batches,
    class_targets,
    eval_mode,
    forward_logits,
    lm_targets,
    model_device,
    task_of_logits,
)


def forgetting(
    model: nn.Module,
    reference: Sequence[Batch],
    *,
    delta: Delta | None = None,
    base_model: nn.Module | None = None,
    show: bool = True,
) -> dict[str, float]:
    """Measures forgetting on reference batches: the loss change and KL(base || tuned).

    Two modes, which give the same numbers:

    - ``delta`` given: ``model`` is the BASE. Per batch, the base runs, then the delta is applied
      in place, the tuned model runs and the delta is reverted. Afterwards the model's weights
      are bit-identical to before (also when an error interrupts the measurement).
    - ``base_model`` given: ``model`` is the TUNED model and ``base_model`` the base (two models
      in memory; they may sit on different devices).

    The task is read from the logits' rank: 3-D (causal LM) or 2-D (classification).

    Args:
        model: The base (with ``delta``) or the tuned model (with ``base_model``).
        reference: Held-out batches, dicts of tensors plus ``labels`` (token ids with -100 where
            no loss is taken, or class ids). The KL of a language model is taken at every
            position whose ``attention_mask`` is 1 (every position without a mask).
        delta: The fine-tuning delta of ``model`` (a base it was trained on; checked).
        base_model: The base model, when ``model`` is already the tuned one.
        show: Show a progress bar.

    Returns:
        ``loss_base`` and ``loss_tuned`` (mean token cross-entropy over the labelled tokens after
        the shift by one, or mean cross-entropy per example), ``loss_change`` (tuned minus base),
        ``kl`` (mean KL(base || tuned) in nats, from float32 softmaxes), and the counts they are
        means over: ``tokens`` and ``positions`` (language models) or ``examples``
        (classification). A delta of zeros gives exactly 0 for both ``loss_change`` and ``kl``.

    Raises:
        SurgicalError: neither or both of ``delta`` and ``base_model``; a reference set that is
            empty or has no labels; a delta that does not fit the model or its base.
    """
    if (delta is None) == (base_model is None):
        raise SurgicalError(
            "forgetting needs exactly one of delta and base_model",
            "Pass the base model with delta=..., or the tuned model with base_model=...",
        )
    check_batches("reference", reference, what="reference set")
    if delta is not None:
        if not isinstance(delta, Delta):
            raise SurgicalError(
                f"delta must be a surgical.Delta, got {type(delta).__name__}", "Load it with Delta.load(dir)"
            )
        delta.validate()
        check_base(model, delta)  # once, before any forward; the toggles below skip the fingerprint
        run_base = _plain(model)
        run_tuned = _toggled(model, delta)
        modes = [eval_mode(model)]
    else:
        run_base, run_tuned = _plain(base_model), _plain(model)
        modes = [eval_mode(model), eval_mode(base_model)]
    acc = _Accumulator()
    with contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        bar = stack.enter_context(progress(disable=not show))
        bar_task = bar.add_task("forgetting", total=len(reference), info="")
        for batch in reference:
            base_logits = run_base(batch)
            kind = task_of_logits(base_logits, "auto", "reference")
            base = acc.base_pass(kind, base_logits, batch)
            del base_logits  # only the log-probs of this batch are kept
            acc.tuned_pass(kind, run_tuned(batch), batch, base)
            bar.update(bar_task, advance=1, info=f"kl {acc.kl / max(acc.positions, 1):.3g}")
    return acc.result()


def _plain(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    device = model_device(model)
    return lambda batch: forward_logits(model, batch, device)


def _toggled(model: nn.Module, delta: Delta) -> Callable[[Batch], torch.Tensor]:
    device = model_device(model)

    def run(batch: Batch) -> torch.Tensor:
        # force: the base was checked once above; the toggle itself still checks names and shapes
        with applied(model, delta, force=True):
            return forward_logits(model, batch, device)

    return run


class _Accumulator:
    """Sums over the reference set; holds the base log-probs of one batch between its passes."""

    def __init__(self) -> None:
        self.loss_base = 0.0
        self.loss_tuned = 0.0
        self.count = 0  # labelled tokens (LM) or examples (classification)
        self.kl = 0.0
        self.positions = 0  # where the KL is taken: attended positions (LM) or examples
        self.kind = ""

    def base_pass(self, kind: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Adds the base loss of a batch; returns its base log-probs at the KL positions."""
        if self.kind and kind != self.kind:
            raise SurgicalError(
                "the reference batches give logits of different ranks", "Use batches of one task"
            )
        self.kind = kind
        loss, count = _loss_sum(kind, logits, batch["labels"])
        self.loss_base += loss
        self.count += count
        return F.log_softmax(_kl_rows(kind, logits, batch), dim=-1)

    def tuned_pass(self, kind: str, logits: torch.Tensor, batch: Batch, base_logp: torch.Tensor) -> None:
        """Adds the tuned loss and the KL(base || tuned) of a batch."""
        self.loss_tuned += _loss_sum(kind, logits, batch["labels"])[0]
        tuned_logp = F.log_softmax(_kl_rows(kind, logits, batch), dim=-1)
        base_logp = base_logp.to(tuned_logp.device)
        # sum_v p_base (log p_base - log p_tuned) per row; exactly 0 where the two are identical
        per_row = F.kl_div(tuned_logp, base_logp, log_target=True, reduction="none").sum(-1)
        self.kl += per_row.double().sum().item()
        self.positions += int(per_row.numel())

    def result(self) -> dict[str, float]:
        if self.count == 0:
            raise SurgicalError(
                "the reference set has no labelled token or example (every label is -100)",
                "Label the reference text (labels = input_ids, -100 on padding)",
            )
        base, tuned = self.loss_base / self.count, self.loss_tuned / self.count
        out: dict[str, float] = {
            "loss_base": base,
            "loss_tuned": tuned,
            "loss_change": tuned - base,
            "kl": self.kl / max(self.positions, 1),
        }
        if self.kind == "causal_lm":
            out.update(tokens=self.count, positions=self.positions)
        else:
            out["examples"] = self.count
        return out


def _loss_sum(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed cross-entropy, number of labelled tokens or examples) of one batch."""
    if kind == "causal_lm":
        logits, labels = lm_targets(logits, labels)
    else:
        logits, labels = class_targets(logits, labels)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss.item(), int((labels != IGNORE_INDEX).sum())


def _kl_rows(kind: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The float32 logit rows the KL is taken over: attended positions (LM) or examples."""
    if kind == "classification":
        return logits.float()
    mask = batch.get("attention_mask")
    if mask is None:
        return logits.float().reshape(-1, logits.shape[-1])
    return logits[mask.to(logits.device) != 0].float()
