"""Task metrics on named evaluation sets: accuracy and loss, or token loss, perplexity and
answer accuracy.

Every metric is a sum over the whole set divided once at the end (token-weighted for language
models), so the numbers do not depend on how the set is cut into batches. Logits are read in
float32 whatever the model's dtype. The model's own ``loss`` is not used: the labels are taken
out of each batch and the loss is computed here, the same way for every model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.loss import batch_to, eval_mode, output_logits
from surgical.core.runtime import progress

IGNORE_INDEX = -100  # the label value Hugging Face losses skip
TASKS = ("auto", "classification", "causal_lm")

Batch = Mapping[str, Any]
"""A dict of tensors the model accepts (``input_ids``, ``attention_mask``, ...) plus ``labels``."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def check_batches(name: str, batches: Sequence[Batch], what: str = "set") -> None:
    """Raises a SurgicalError unless ``batches`` is a non-empty sequence of dicts with labels.

    Args:
        name: The set's name, for the message.
        batches: The set's batches.
        what: What the batches are called in the message (``set``, ``reference set``).
    """
    if isinstance(batches, Mapping) or not isinstance(batches, Sequence):
        raise SurgicalError(
            f"{what} {name!r} must be a list of batches, got {type(batches).__name__}",
            "Pass a list of dicts of tensors",
        )
    if len(batches) == 0:
        raise SurgicalError(f"{what} {name!r} is empty", "Pass at least one batch")
    for batch in batches:
        if not isinstance(batch, Mapping):
            raise SurgicalError(
                f"{what} {name!r} holds a {type(batch).__name__}, not a dict batch",
                "Yield dicts such as a tokenizer's output plus 'labels'",
            )
        if "labels" not in batch:
            raise SurgicalError(
                f"{what} {name!r} has no labels",
                "Add 'labels' to its batches (class ids, or token ids with -100 where no loss is taken)",
            )


def forward_logits(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """The model's logits for ``batch`` (its labels left out, so the model computes no loss)."""
    inputs = batch_to({k: v for k, v in batch.items() if k != "labels"}, device)
    out = model(**inputs)
    logits = output_logits(out)
    if logits is None:
        raise SurgicalError(
            f"the model returned no logits ({type(out).__name__})",
            "Evaluate a model whose output has .logits (a Hugging Face ...ForSequenceClassification or "
            "...ForCausalLM)",
        )
    return logits


def task_of_logits(logits: torch.Tensor, task: str, name: str) -> str:
    """``task`` with ``auto`` resolved from the logits' rank (2-D: classification, 3-D: causal_lm)."""
    if task == "auto":
        if logits.dim() == 2:
            return "classification"
        if logits.dim() == 3:
            return "causal_lm"
        raise SurgicalError(
            f"cannot tell the task of set {name!r} from logits of shape {tuple(logits.shape)}",
            "Pass task='classification' or task='causal_lm'",
        )
    want = 2 if task == "classification" else 3
    if logits.dim() != want:
        raise SurgicalError(
            f"task {task!r} needs {want}-D logits, the model gave {tuple(logits.shape)} on set {name!r}",
            "Pass the task the model was built for (or task='auto')",
        )
    return task


def lm_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM logits and labels aligned as Hugging Face trains them: the logits at position t
    predict the label at t + 1. Returns float32 ``(B, T-1, V)`` logits and ``(B, T-1)`` labels."""
    labels = labels.to(logits.device)
    if labels.shape != logits.shape[:2]:
        raise SurgicalError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)}",
            "Give causal-LM batches labels shaped like input_ids",
        )
    return logits[:, :-1].float(), labels[:, 1:]


def class_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification logits in float32 and integer labels, checked against each other."""
    labels = labels.to(logits.device)
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.is_floating_point():
        raise SurgicalError(
            f"classification labels must be one class id per example, got shape {tuple(labels.shape)} "
            f"({labels.dtype}) for {logits.shape[0]} examples",
            "Give each batch 'labels' of shape (batch,) holding class ids",
        )
    return logits.float(), labels


class _Sums:
    """Running sums of one set, turned into its metrics at the end."""

    def __init__(self) -> None:
        self.loss = 0.0  # summed cross-entropy (float64 on the Python side)
        self.count = 0  # examples (classification) or target tokens (causal LM)
        self.correct = 0  # correct examples (classification) or fully correct answers (LM)
        self.answers = 0  # examples with at least one target token (LM)
        self.marked = False  # some attended position carries no label: the labels mark an answer

    def add_classification(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = class_targets(logits, labels)
        keep = labels != IGNORE_INDEX
        logits, labels = logits[keep], labels[keep]
        self.loss += F.cross_entropy(logits, labels, reduction="sum").item()
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.count += int(labels.numel())

    def add_causal_lm(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None) -> None:
        full_labels = labels.to(logits.device)
        logits, labels = lm_targets(logits, full_labels)
        target = labels != IGNORE_INDEX
        self.loss += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        self.count += int(target.sum())
        right = (logits.argmax(-1) == labels) | ~target  # positions without a label never fail an answer
        has_answer = target.any(-1)
        self.correct += int((right.all(-1) & has_answer).sum())
        self.answers += int(has_answer.sum())
        attended = (
            torch.ones_like(full_labels, dtype=torch.bool) if mask is None else mask.to(logits.device) != 0
        )
        # the first position is never a target (nothing predicts it), so it does not mark an answer
        self.marked |= bool((attended[:, 1:] & (full_labels[:, 1:] == IGNORE_INDEX)).any())

    def classification(self, name: str) -> dict[str, float]:
        if self.count == 0:
            raise SurgicalError(f"set {name!r} has no labelled example", "Give its examples class ids")
        return {"accuracy": self.correct / self.count, "loss": self.loss / self.count, "examples": self.count}

    def causal_lm(self, name: str) -> dict[str, float]:
        if self.count == 0:
            raise SurgicalError(
                f"set {name!r} has no labelled token (every label is -100 after the shift by one)",
                "Label the tokens the loss is taken on (e.g. the response)",
            )
        loss = self.loss / self.count
        out: dict[str, float] = {"loss": loss, "perplexity": _exp(loss), "tokens": self.count}
        if self.marked:
            out["answer_accuracy"] = self.correct / self.answers
        return out


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def evaluate(
    model: nn.Module,
    sets: Mapping[str, Sequence[Batch]],
    *,
    task: str = "auto",
    show: bool = True,
) -> dict[str, dict[str, float]]:
    """Measures a model on named evaluation sets (an in-distribution test set, shifted ones, ...).

    Per set, for ``classification``:

    - ``accuracy``: share of examples whose argmax class is the label;
    - ``loss``: mean cross-entropy per example;
    - ``examples``: number of examples (labels of -100 are left out).

    For ``causal_lm`` (logits at position t predict the label at t + 1, as Hugging Face trains):

    - ``loss``: mean token cross-entropy over the labels that are not -100, over the whole set;
    - ``perplexity``: ``exp(loss)``;
    - ``tokens``: number of labelled tokens;
    - ``answer_accuracy`` (only when the labels mark an answer, i.e. some attended position after
      the first has label -100, as instruction data with the loss on the response has): share of
      examples whose every labelled token is the model's argmax prediction.

    The model runs in eval mode without gradients and is left in the train/eval mode it had; its
    weights are not touched. Batches are moved to the model's device.

    Args:
        model: A Hugging Face style model: ``model(**inputs).logits``.
        sets: Set name -> batches, each a dict of tensors the model accepts plus ``labels``.
        task: ``classification``, ``causal_lm``, or ``auto`` (2-D logits: classification, 3-D:
            causal_lm), resolved per set from its first batch.
        show: Show a progress bar per set.

    Returns:
        Set name -> metric name -> value, in the order of ``sets``.

    Raises:
        SurgicalError: an unknown task, no sets, a set that is empty or has no labels (checked
            for every set before the model runs), logits that do not fit the task or labels.
    """
    if task not in TASKS:
        raise SurgicalError(f"task must be one of {', '.join(TASKS)}, got {task!r}", "Fix the task")
    if not isinstance(sets, Mapping) or not sets:
        raise SurgicalError(
            "evaluate needs a mapping of set names to batches", "Pass e.g. {'id': test_batches}"
        )
    for name, batches in sets.items():
        check_batches(str(name), batches)
    results: dict[str, dict[str, float]] = {}
    device = model_device(model)
    with eval_mode(model), progress(disable=not show) as bar:
        for name, batches in sets.items():
            bar_task = bar.add_task(f"evaluating {name}", total=len(batches), info="")
            sums, kind = _Sums(), task
            for batch in batches:
                logits = forward_logits(model, batch, device)
                kind = task_of_logits(logits, kind, str(name))  # auto is resolved on the first batch
                if kind == "classification":
                    sums.add_classification(logits, batch["labels"])
                else:
                    sums.add_causal_lm(logits, batch["labels"], batch.get("attention_mask"))
                del logits
                bar.update(bar_task, advance=1)
            results[name] = (
                sums.classification(str(name)) if kind == "classification" else sums.causal_lm(str(name))
            )
            bar.update(bar_task, info=_brief(results[name]))
    return results


def _brief(metrics: Mapping[str, float]) -> str:
    key = "accuracy" if "accuracy" in metrics else "loss"
    return f"{key} {metrics[key]:.4g}"
