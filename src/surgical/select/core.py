"""``select``: score the targeted parameters, then allocate a budget of entries (global top-k)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from surgical.errors import SurgicalError
from surgical.select.criteria import CRITERIA, ScoreContext
from surgical.select.patterns import as_patterns, select_names
from surgical.select.plan import Plan


def default_targets(model: nn.Module) -> list[str]:
    """Weights of every ``nn.Linear`` except the output embedding (an LM head, often tied)."""
    out_emb = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out_emb = get_out()
    names = []
    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not out_emb:
            names.append(f"{mname}.weight" if mname else "weight")
    return names


def resolve_targets(
    model: nn.Module,
    targets: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    always: str | Sequence[str] | None,
) -> tuple[dict[str, nn.Parameter], list[str]]:
    """Returns the targeted parameters (for entry selection) and the always-trained names.

    Entry targets are ``nn.Linear`` weights: target patterns pick among them (so ``"attention.*"``
    means the attention projections' weights) and default to :func:`default_targets`. ``always``
    parameters are removed from the targets. Each pattern must match something.
    """
    params = dict(model.named_parameters())
    linear_weights = default_targets(model)
    out_emb = getattr(model, "get_output_embeddings", lambda: None)()
    for mname, module in model.named_modules():  # an output head only when asked for by name
        if module is out_emb and isinstance(module, nn.Linear) and f"{mname}.weight" in params:
            linear_weights.append(f"{mname}.weight")
    always_names = select_names(params, as_patterns(always), "always")
    target_pats = as_patterns(targets)
    if target_pats:
        names = select_names(linear_weights, target_pats, "target", "nn.Linear weight")
    else:
        names = default_targets(model)
    excl = set(select_names(names, as_patterns(exclude), "exclude")) if exclude else set()
    names = [n for n in names if n not in excl and n not in always_names and n in params]
    if not names:
        raise SurgicalError("no parameter is left to select from", "Widen the targets or the exclusions")
    return {n: params[n] for n in names}, always_names


def budget_count(total: int, density: float | None, count: int | None) -> int:
    """Number of entries to select from ``total`` given a density or a count (exactly one)."""
    if (density is None) == (count is None):
        raise SurgicalError("give exactly one of density and count", "Pass density=0.01 or count=100000")
    if density is not None:
        if not (0.0 < float(density) <= 1.0):
            raise SurgicalError(
                f"density must be in (0, 1], got {density}", "Pass a fraction such as 0.01 for 1%"
            )
        k = max(1, round(float(density) * total))
    else:
        k = int(count)
        if k < 1:
            raise SurgicalError(f"count must be at least 1, got {count}", "Pass a positive count")
    if k > total:
        raise SurgicalError(
            f"budget of {k:,} entries exceeds the {total:,} targeted entries",
            "Lower the budget or widen the targets",
        )
    return k


def global_topk(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The k highest-scoring entries across all tensors, as sorted flat indices per tensor."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float().cpu() for n in names])
    top = torch.topk(flat, k, sorted=False).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[top] = True
    out: dict[str, torch.Tensor] = {}
    start = 0
    for n in names:
        size = scores[n].numel()
        idx = torch.nonzero(mask[start : start + size]).flatten()  # sorted
        if idx.numel():
            out[n] = idx
        start += size
    return out


def proportional_counts(sizes: dict[str, int], k: int) -> dict[str, int]:
    """Splits ``k`` over tensors in proportion to their sizes, summing to exactly ``k``.

    Largest-remainder rounding; ties go to the earlier tensor, so the split is deterministic.
    """
    total = sum(sizes.values())
    exact = {n: k * s / total for n, s in sizes.items()}
    counts = {n: int(v) for n, v in exact.items()}
    short = k - sum(counts.values())
    by_remainder = sorted(sizes, key=lambda n: (-(exact[n] - counts[n]), list(sizes).index(n)))
    for n in by_remainder[:short]:
        counts[n] += 1
    return counts


def per_tensor_topk(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The same share of every tensor: each tensor's top entries, ``k`` in total."""
    counts = proportional_counts({n: s.numel() for n, s in scores.items()}, k)
    out = {}
    for n, s in scores.items():
        if counts[n]:
            idx = torch.topk(s.reshape(-1).float().cpu(), counts[n], sorted=False).indices
            out[n] = torch.sort(idx).values
    return out


ALLOCATIONS = {"global": global_topk, "per_tensor": per_tensor_topk}


def select(
    model: nn.Module,
    data: Iterable[Any] | None = None,
    *,
    method: str = "gradient",
    density: float | None = None,
    count: int | None = None,
    targets: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    always: str | Sequence[str] | None = None,
    allocation: str = "global",
    max_batches: int = 16,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> Plan:
    """Chooses which entries of the model to train.

    Args:
        model: Any torch model; for data-driven criteria it must return ``.loss`` for a batch.
        data: Calibration batches (dicts of tensors including labels).
        method: A registered criterion name (see ``surgical.CRITERIA.names()``).
        density: Fraction of the targeted entries to select, in (0, 1].
        count: Alternatively, the exact number of entries.
        targets: Patterns of parameters to select entries from (default: all Linear weights but
            the output embedding).
        exclude: Patterns removed from the targets.
        always: Patterns of parameters trained densely (heads, norms, biases); they are not
            part of the entry budget.
        allocation: ``global`` (top-k across all targeted tensors) or ``per_tensor`` (the same
            share of every tensor; raw gradient scores are largest next to the head, and a
            global top-k can spend most of the budget there).
        max_batches: Calibration batches to use.
        seed: Seed for random criteria.
        progress: Show a progress bar while scoring.
        **options: Criterion-specific settings.

    Returns:
        A :class:`Plan` with exactly the budgeted number of entries.
    """
    criterion = CRITERIA.get(method)
    if allocation not in ALLOCATIONS:
        raise SurgicalError(f"unknown allocation {allocation!r}", f"Use one of: {', '.join(ALLOCATIONS)}")
    params, always_names = resolve_targets(model, targets, exclude, always)
    total = sum(p.numel() for p in params.values())
    k = budget_count(total, density, count)
    if max_batches < 1:
        raise SurgicalError(f"max_batches must be at least 1, got {max_batches}", "Pass a positive number")
    ctx = ScoreContext(model, params, data, max_batches, seed, progress, dict(options))
    with torch.random.fork_rng(devices=[]):
        scores = criterion(ctx)
    entries = ALLOCATIONS[allocation](scores, k)
    all_params = dict(model.named_parameters())
    shapes = {n: tuple(all_params[n].shape) for n in [*entries, *always_names]}
    meta = {
        "method": method,
        "density": density,
        "count": count,
        "selected": k,
        "targeted": total,
        "granularity": "entry",
        "allocation": allocation,
        "targets": as_patterns(targets),
        "exclude": as_patterns(exclude),
        "always": as_patterns(always),
        "max_batches": max_batches,
        "seed": seed,
        "options": {k_: v for k_, v in options.items()},
    }
    return Plan(entries=entries, shapes=shapes, dense=always_names, meta=meta)
