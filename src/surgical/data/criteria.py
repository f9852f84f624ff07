"""The registry of example-selection criteria and the context they are given.

A criterion is a function ``(ctx: DataContext) -> torch.Tensor``. By default it returns one
score per example (higher = keep) and :func:`surgical.data.select_data` keeps the ``ctx.budget``
best (ties to the earlier example). A criterion that chooses a *set* rather than scoring examples
one by one (``diversity``, ``trajectory``, ``dedup``) registers ``picks=True`` and returns the
chosen positions itself (at most ``ctx.budget``; exactly that many unless it documents
otherwise). A set-choosing criterion that registers ``stratifies=True`` also keeps class shares
when ``ctx.class_labels`` is given (``select_data(stratify=True)``): :func:`class_quotas` says how
many of each class.

Registered with ``help``, declared ``options`` (``ctx.options`` arrives checked and completed
with defaults) and, where it applies, ``needs_model=True`` / ``needs_validation=True``, checked
before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgical.core.registry import Registry
from surgical.core.runtime import progress
from surgical.data.examples import Example, iter_batches
from surgical.data.losses import LogitsFn, example_losses, frozen_eval, logits_of


@dataclass
class DataContext:
    """Everything a data criterion may use.

    Attributes:
        model: The model scoring the examples (left unchanged), or None for criteria that need none.
        examples: The examples, each a dict of 1-D tensors (see :mod:`surgical.data.examples`).
        budget: How many examples to keep.
        batch_size: Examples per forward pass.
        seed: Seed for any randomness.
        options: The criterion's declared options, checked and completed with defaults.
        validation: Validation examples (the ``gradient`` criterion's target), or None.
        params: Parameter name -> flat indices (None: the whole tensor) that gradient features
            are restricted to, or None (every parameter).
        reference: A reference model or ``(batch) -> logits`` function (``learnability`` uses it
            instead of tuning one), or None.
        progress: Whether to show progress bars.
        pad_id: Token id that pads ``input_ids`` when examples are batched.
        info: Facts a criterion reports for the selection's provenance (e.g. ``kept`` by dedup).
        class_labels: ``(N,)`` class ids when the selection keeps class shares (``stratify``),
            else None; only criteria registered with ``stratifies=True`` see it set.
    """

    model: nn.Module | None
    examples: Sequence[Example]
    budget: int
    batch_size: int = 8
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    validation: Sequence[Example] | None = None
    params: Mapping[str, torch.Tensor | None] | None = None
    reference: nn.Module | LogitsFn | None = None
    progress: bool = False
    pad_id: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    class_labels: torch.Tensor | None = None

    def batches(
        self, examples: Sequence[Example] | None = None, what: str = "scoring"
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """``(positions, batch)`` over ``examples`` (default: the context's), with a progress bar."""
        examples = self.examples if examples is None else examples
        total = (len(examples) + self.batch_size - 1) // self.batch_size
        with progress(disable=not self.progress) as bar:
            task = bar.add_task(what, total=total, info="")
            for pos, batch in iter_batches(examples, self.batch_size, self.pad_id):
                yield pos, batch
                bar.update(task, advance=1)

    def losses(
        self, model: nn.Module | LogitsFn, examples: Sequence[Example] | None = None, what: str = "losses"
    ) -> torch.Tensor:
        """The loss of every example under ``model`` (a module or a logits function), ``(N,)``
        float32 on the CPU, computed without gradients in eval mode."""
        out = []
        guard = frozen_eval(model) if isinstance(model, nn.Module) else torch.no_grad()
        with guard:
            for _, batch in self.batches(examples, what):
                out.append(example_losses(logits_of(model, batch), batch["labels"]).float().cpu())
        return torch.cat(out)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from ``seed`` (and ``salt``, for independent streams)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)


DataCriterion = Callable[[DataContext], torch.Tensor]

DATA_CRITERIA: Registry[DataCriterion] = Registry("data criterion")


def picks(method: str) -> bool:
    """Whether the criterion chooses the examples itself (True) or scores them (False)."""
    return bool(DATA_CRITERIA.entry(method).extra.get("picks", False))


def stratifies(method: str) -> bool:
    """Whether ``stratify`` applies: a scoring criterion, or a set-choosing one that keeps class
    shares itself (registered ``stratifies=True``)."""
    return not picks(method) or bool(DATA_CRITERIA.entry(method).extra.get("stratifies", False))


def stratifying() -> list[str]:
    """The registered criteria ``stratify`` applies to (for error messages)."""
    return [name for name in DATA_CRITERIA.names() if stratifies(name)]


def class_quotas(labels: torch.Tensor, k: int) -> list[tuple[int, torch.Tensor]]:
    """``(quota, positions)`` per class of ``labels`` (in class order): ``k`` in all, split over the
    classes in proportion to their sizes by largest remainders (ties to the smaller class id)."""
    classes, sizes = torch.unique(labels, return_counts=True)
    quotas = sizes.double() * k / len(labels)
    take = quotas.floor().long()
    short = k - int(take.sum())
    if short:
        rest = torch.sort(quotas - take, descending=True, stable=True).indices[:short]
        take[rest] += 1
    return [
        (n, (labels == c).nonzero().reshape(-1)) for c, n in zip(classes.tolist(), take.tolist(), strict=True)
    ]


@DATA_CRITERIA.register("random", help="a seeded uniform sample (the baseline)")
def random_scores(ctx: DataContext) -> torch.Tensor:
    """Seeded uniform random scores: the top ``budget`` is a uniform sample without replacement."""
    return torch.rand(len(ctx.examples), generator=ctx.generator())
