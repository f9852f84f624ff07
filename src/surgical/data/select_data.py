"""``select_data``: which examples are worth training on, under a budget.

``select_data(model, examples, method=..., fraction=|count=)`` runs a registered data criterion
(:data:`surgical.data.DATA_CRITERIA`) and returns a :class:`DataSelection`: the sorted indices
of the kept examples, their scores, and provenance (method, options, seed, a SHA-256 of the
data, cost). Saved as a small manifest (``selection.json`` + ``selection.safetensors``, written
atomically, no pickle) to keep beside the delta it trains; :meth:`DataSelection.check` refuses to
apply a selection to other data.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.io import atomic_dir, check_sha256, read_tensor_dir, sha256_file
from surgical.core.registry import check_range
from surgical.core.runtime import peak_rss_bytes, reset_peak_rss
from surgical.core.version import __version__
from surgical.data import dedup, diversity, gradient, importance, loss_score, trajectory  # noqa: F401  (register)
from surgical.data.criteria import DATA_CRITERIA, DataContext, class_quotas, picks, stratifies, stratifying
from surgical.data.examples import Example, as_examples, budget_of, data_hash, is_token_labelled
from surgical.data.losses import LogitsFn

SELECTION_FORMAT = "surgical-data-selection/1"
INFO_FILE = "selection.json"
TENSOR_FILE = "selection.safetensors"


@dataclass
class DataSelection:
    """The examples chosen for training, with how they were chosen.

    Attributes:
        indices: Sorted int64 positions of the kept examples in the data they were chosen from.
        scores: Float32 score of every example (higher = more worth keeping), or None for
            criteria that choose sets (``diversity``, ``trajectory``, ``dedup``).
        method: The criterion.
        options: Its options, completed with defaults.
        data_hash: SHA-256 of the examples' input_ids and labels (:func:`surgical.data.data_hash`).
        num_examples: How many examples there were to choose from.
        meta: Provenance: seed, budget, fraction/count asked for, seconds, examples per second,
            peak memory, version, date, and what the criterion reported (``kept`` by dedup, ...).
    """

    indices: torch.Tensor
    scores: torch.Tensor | None
    method: str
    options: dict[str, Any]
    data_hash: str
    num_examples: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.numel())

    def summary(self) -> str:
        """One line: method, how many of how many, the time taken."""
        secs = self.meta.get("seconds")
        took = f" in {secs:.1f}s" if isinstance(secs, (int, float)) else ""
        return (
            f"{self.method}: {len(self):,} of {self.num_examples:,} examples "
            f"({100 * len(self) / max(1, self.num_examples):.1f}%){took}"
        )

    def check(self, examples: Any) -> list[Example]:
        """The examples as a checked list if they are the ones the selection was made for.

        Raises:
            SurgicalError: the examples differ (another data set, order, tokenization, labels).
        """
        ex = as_examples(examples)
        if len(ex) != self.num_examples or data_hash(ex) != self.data_hash:
            raise SurgicalError(
                f"the selection was made for other data ({self.num_examples} examples with hash "
                f"{self.data_hash[:12]}, got {len(ex)} with hash {data_hash(ex)[:12]})",
                "Select again on this data, or pass the same data, tokenizer and max_length",
            )
        return ex

    def subset(self, examples: Any) -> Any:
        """The selected examples of ``examples`` (checked first): a ``datasets.Dataset`` stays one
        (``.select``), anything else becomes a list of per-example dicts of tensors."""
        ex = self.check(examples)
        if hasattr(examples, "select") and hasattr(examples, "column_names"):
            return examples.select(self.indices.tolist())
        return [ex[i] for i in self.indices.tolist()]

    def save(self, directory: str | Path) -> Path:
        """Writes ``selection.json`` and ``selection.safetensors`` into ``directory`` atomically."""
        directory = Path(directory)
        tensors = {"indices": self.indices.to(torch.int64).contiguous()}
        if self.scores is not None:
            tensors["scores"] = self.scores.to(torch.float32).contiguous()
        info = {
            "format": SELECTION_FORMAT,
            "method": self.method,
            "options": self.options,
            "data_hash": self.data_hash,
            "num_examples": self.num_examples,
            "selected": len(self),
            "has_scores": self.scores is not None,
            "meta": self.meta,
        }
        with atomic_dir(directory) as tmp:
            save_file(tensors, str(tmp / TENSOR_FILE))
            info["sha256"] = sha256_file(tmp / TENSOR_FILE)
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> DataSelection:
        """Reads a selection written by :meth:`save`.

        Raises:
            SurgicalError: a missing directory or file, or a truncated or corrupted one.
        """
        directory = Path(directory)
        fix = "Pass a directory written by `surgical select-data` or DataSelection.save"
        info, tensors = read_tensor_dir(directory, INFO_FILE, TENSOR_FILE, "selection", fix)
        try:
            if not isinstance(info, dict) or info.get("format") != SELECTION_FORMAT:
                raise ValueError(f"{INFO_FILE} is not a {SELECTION_FORMAT} manifest")
            n = int(info["num_examples"])
            indices = tensors["indices"]
            if indices.dtype != torch.int64 or indices.dim() != 1 or indices.numel() != int(info["selected"]):
                raise ValueError("the indices are not the recorded number of int64 values")
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
                raise ValueError("an index lies outside the data")
            if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
                raise ValueError("the indices are not sorted and distinct")
            scores = tensors.get("scores") if info["has_scores"] else None
            if info["has_scores"] and (
                scores is None or scores.dtype != torch.float32 or scores.shape != (n,)
            ):
                raise ValueError("the scores are not one float32 per example")
            sel = cls(
                indices=indices,
                scores=scores,
                method=str(info["method"]),
                options=dict(info["options"]),
                data_hash=str(info["data_hash"]),
                num_examples=n,
                meta=dict(info.get("meta") or {}),
            )
        except (KeyError, ValueError, TypeError) as e:
            why = f"lacks {e}" if isinstance(e, KeyError) else str(e)
            raise SurgicalError(
                f"selection in {str(directory)!r} is corrupted ({why})", "Save it again"
            ) from None
        check_sha256(directory / TENSOR_FILE, info.get("sha256"))
        return sel


def resolve_budget(n: int, fraction: float | None, count: int | None) -> int:
    """The number of examples to keep: ``fraction`` of ``n`` (rounded half up, at least 1) or
    ``count``; a SurgicalError unless exactly one is given and valid."""
    if (fraction is None) == (count is None):
        raise SurgicalError(
            "select_data needs exactly one of fraction and count", "Pass fraction=0.3 or count=1000"
        )
    if fraction is not None:
        check_range(fraction, "fraction", 0, 1, low_open=True)
        return budget_of(fraction, n)
    if isinstance(count, bool) or not isinstance(count, int):
        raise SurgicalError(f"count must be an integer, got {count!r}", "Pass a whole number of examples")
    check_range(count, "count", 1)
    if count > n:
        raise SurgicalError(f"count {count} exceeds the {n} examples", f"Pass a count of at most {n}")
    return count


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` highest scores, ties to the earlier position."""
    if not bool(torch.isfinite(scores).all()):
        raise SurgicalError("the criterion produced NaN or infinite scores", "Check the model and the data")
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return order[:k]


def stratified_top_k(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the highest ``scores`` within each class, ``k`` in all, split over the
    classes in proportion to their sizes (largest remainders; ties to the smaller class id), ties
    within a class to the earlier position."""
    return torch.cat([pos[top_k(scores[pos], n)] for n, pos in class_quotas(labels, k)])


def _class_labels(examples: list, method: str) -> torch.Tensor:
    if is_token_labelled(examples):
        raise SurgicalError(
            f"stratify needs one class label per example; these examples label tokens ({method!r})",
            "Drop stratify for causal-LM data",
        )
    return torch.tensor([int(torch.as_tensor(e["labels"]).reshape(-1)[0]) for e in examples])


def select_data(
    model: nn.Module | None,
    examples: Any,
    *,
    method: str = "random",
    fraction: float | None = None,
    count: int | None = None,
    seed: int = 0,
    validation: Any = None,
    params: Mapping[str, torch.Tensor | None] | Any = None,
    reference: nn.Module | LogitsFn | None = None,
    batch_size: int = 8,
    pad_id: int = 0,
    stratify: bool = False,
    progress: bool = True,
    **options: Any,
) -> DataSelection:
    """Chooses the examples worth training on.

    Args:
        model: The model that scores the examples (left unchanged); None for ``random``,
            ``dedup`` and ``importance``, which need none.
        examples: A ``datasets.Dataset`` with ``input_ids`` and ``labels`` columns, or a list of
            per-example dicts with ``input_ids`` and ``labels`` (a class id, or one label per token
            with -100 where no loss is taken) and optionally ``attention_mask``
            (:func:`surgical.data.split_batches` turns padded batches into such a list).
        method: A data criterion (``DATA_CRITERIA.names()``): random, loss, learnability,
            trajectory, diversity, dedup, gradient, importance.
        fraction: Share of the examples to keep, in (0, 1] (rounded half up, at least one).
        count: Number of examples to keep instead.
        seed: Seed of every random choice; the same seed gives the same selection.
        validation: Examples of the target task, in the same forms (``gradient`` and
            ``importance`` need them).
        params: ``gradient`` only: the parameters the features are restricted to, a
            :class:`surgical.Plan` or its ``entries`` dict (name -> flat indices, None: whole tensor).
        reference: ``learnability`` only: a tuned reference model or ``(batch) -> logits``
            function to use instead of tuning one.
        batch_size: Examples per forward pass.
        pad_id: Token id used to pad ``input_ids`` when examples are batched.
        stratify: Classification: split the budget over the classes in proportion to their
            sizes; score-based criteria keep the best-scored examples of each class, ``trajectory``
            samples each class's quota evenly over the clusters, ``diversity`` runs k-center
            within each class. Loss and gradient scores on a base whose head is new favour one
            class, and so can trajectories; this keeps the class shares of the data. Refused
            for ``dedup`` (it removes copies, it does not choose a share) and for token-labelled
            examples.
        progress: Show progress bars.
        **options: The criterion's own options (``DATA_CRITERIA.describe()``).

    Returns:
        A :class:`DataSelection` with exactly the budget's number of indices (``dedup``: at most,
        see :mod:`surgical.data.dedup`).

    Raises:
        SurgicalError: an unknown method or option, a bad budget, empty data or data without
            ``input_ids``/``labels``, a missing model or validation set the method needs.
    """
    entry = DATA_CRITERIA.entry(method)
    opts = DATA_CRITERIA.resolve(method, options)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SurgicalError(f"batch_size must be a positive integer, got {batch_size!r}", "Pass e.g. 8")
    ex = as_examples(examples)
    budget = resolve_budget(len(ex), fraction, count)
    if stratify and not stratifies(method):
        raise SurgicalError(
            f"stratify does not apply to {method!r}, which chooses a set without regard to classes",
            f"Drop stratify, or use a criterion that keeps class shares ({', '.join(stratifying())})",
        )
    class_labels = _class_labels(ex, method) if stratify else None
    if entry.extra.get("needs_model") and model is None:
        raise SurgicalError(
            f"data criterion {method!r} needs a model", "Pass the model to score the examples with"
        )
    val = None
    if entry.extra.get("needs_validation"):
        if validation is None:
            raise SurgicalError(
                f"data criterion {method!r} needs validation examples",
                "Pass validation=... (the target task)",
            )
        val = as_examples(validation, "validation examples")
    ctx = DataContext(
        model=model, examples=ex, budget=budget, batch_size=batch_size, seed=seed, options=opts,
        validation=val, params=params, reference=reference, progress=progress, pad_id=pad_id,
        class_labels=class_labels,
    )  # fmt: skip
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    result = entry.obj(ctx)
    seconds = time.perf_counter() - start
    if picks(method):
        chosen, scores = result.to(torch.long).reshape(-1), None
        if chosen.numel() != torch.unique(chosen).numel() or chosen.numel() > budget:
            raise RuntimeError(f"data criterion {method!r} picked repeated or too many examples")
        if class_labels is not None:  # a stratifying criterion must meet every class's quota
            wanted = class_quotas(class_labels, budget)
            got = [int((class_labels[chosen] == class_labels[pos[0]]).sum()) for _, pos in wanted]
            if got != [n for n, _ in wanted]:
                raise RuntimeError(f"data criterion {method!r} did not keep the class shares")
    else:
        scores = result.detach().float().cpu().reshape(-1)
        if scores.numel() != len(ex):
            raise RuntimeError(
                f"data criterion {method!r} returned {scores.numel()} scores for {len(ex)} examples"
            )
        chosen = (
            top_k(scores, budget) if class_labels is None else stratified_top_k(scores, class_labels, budget)
        )
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss_bytes()
    meta = {
        "seed": seed,
        "budget": budget,
        "fraction": fraction,
        "count": count,
        "batch_size": batch_size,
        "stratify": stratify,
        "seconds": round(seconds, 4),
        "examples_per_second": round(len(ex) / seconds, 2) if seconds > 0 else None,
        "peak_memory_bytes": peak,
        "params": _describe_params(params),
        "reference": None if reference is None else type(reference).__name__,
        "validation_examples": None if val is None else len(val),
        "version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **ctx.info,
    }
    return DataSelection(
        indices=chosen.sort().values.cpu(),
        scores=scores,
        method=method,
        options=opts,
        data_hash=data_hash(ex),
        num_examples=len(ex),
        meta=meta,
    )


def _describe_params(params: Any) -> dict[str, Any] | None:
    """A JSON-able description of ``params`` for provenance: tensors and their entry counts."""
    if params is None:
        return None
    if hasattr(params, "num_entries") and hasattr(params, "dense"):
        return {"plan": True, "entries": int(params.num_entries), "dense": list(params.dense)}
    if isinstance(params, Mapping):
        return {str(n): (None if v is None else int(torch.as_tensor(v).numel())) for n, v in params.items()}
    return {"given": type(params).__name__}
