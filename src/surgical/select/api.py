"""``select``: score the targeted parameters, group the scores into units, allocate a budget."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.names import head_dim, head_kind
from surgical.core.patterns import as_patterns, select_names
from surgical.select.allocate import ALLOCATIONS, allocate
from surgical.select.criteria import CRITERIA, ScoreContext, default_granularity
from surgical.select.plan import Plan
from surgical.select.units import GRANULARITIES, build_units, dense_sizes


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
    granularity: str = "entry",
) -> tuple[dict[str, nn.Parameter], list[str]]:
    """Returns the targeted parameters (for entry selection) and the always-trained names.

    Entry targets are ``nn.Linear`` weights: target patterns pick among them (so ``"attention.*"``
    means the attention projections' weights) and default to :func:`default_targets`. At
    ``granularity="row"`` a pattern may also name an ``nn.Embedding`` weight, whose rows are
    token rows (a tied embedding by the name ``named_parameters()`` reports, e.g.
    ``model.embed_tokens.weight``). ``always`` parameters are removed from the targets. Each
    pattern must match something.
    """
    params = dict(model.named_parameters())
    linear_weights = default_targets(model)
    out_emb = getattr(model, "get_output_embeddings", lambda: None)()
    for mname, module in model.named_modules():  # an output head only when asked for by name
        weight = f"{mname}.weight" if mname else "weight"
        if weight not in params:
            continue
        if module is out_emb and isinstance(module, nn.Linear):
            linear_weights.append(weight)
        elif granularity == "row" and isinstance(module, nn.Embedding):  # token rows
            linear_weights.append(weight)
    always_names = select_names(params, as_patterns(always), "always")
    target_pats = as_patterns(targets)
    if target_pats:
        noun = "nn.Linear or nn.Embedding weight" if granularity == "row" else "nn.Linear weight"
        names = select_names(linear_weights, target_pats, "target", noun)
    else:
        names = default_targets(model)
    excl = set(select_names(names, as_patterns(exclude), "exclude")) if exclude else set()
    names = [n for n in names if n not in excl and n not in always_names and n in params]
    if not names:
        raise SurgicalError("no parameter is left to select from", "Widen the targets or the exclusions")
    return {n: params[n] for n in names}, always_names


BYTES_PER_PARAM = 16
"""Optimizer-state bytes per trained parameter with AdamW in fp32: value, gradient, two moments."""


def budget_count(
    total: int, density: float | None, count: int | None, optimizer_bytes: int | None = None
) -> int:
    """Parameters to select from ``total`` given a density, a count or optimizer bytes (exactly one).

    ``optimizer_bytes`` buys ``optimizer_bytes // 16`` parameters (see :data:`BYTES_PER_PARAM`).
    """
    given = [x for x in (density, count, optimizer_bytes) if x is not None]
    if len(given) != 1:
        raise SurgicalError(
            "give exactly one of density, count and optimizer_bytes", "Pass density=0.01 or count=100000"
        )
    if density is not None:
        if not (0.0 < float(density) <= 1.0):
            raise SurgicalError(
                f"density must be in (0, 1], got {density}", "Pass a fraction such as 0.01 for 1%"
            )
        k = max(1, round(float(density) * total))
    elif count is not None:
        k = int(count)
        if k < 1:
            raise SurgicalError(f"count must be at least 1, got {count}", "Pass a positive count")
    else:
        k = int(optimizer_bytes) // BYTES_PER_PARAM
        if k < 1:
            raise SurgicalError(
                f"optimizer_bytes={optimizer_bytes} buys no parameter (AdamW fp32 needs 16 bytes each)",
                "Pass at least 16 bytes",
            )
    if k > total:
        raise SurgicalError(
            f"budget of {k:,} entries exceeds the {total:,} targeted entries",
            "Lower the budget or widen the targets",
        )
    return k


def global_topk(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The k highest-scoring entries across all tensors, as sorted flat indices per tensor."""
    units = build_units(scores, "entry")
    taken = allocate(units, k, "global")
    return {u.name: torch.nonzero(taken[u.name]).flatten() for u in units if taken[u.name].any()}


def select(
    model: nn.Module,
    data: Iterable[Any] | None = None,
    *,
    method: str = "gradient",
    density: float | None = None,
    count: int | None = None,
    optimizer_bytes: int | None = None,
    granularity: str | None = None,
    allocation: str = "global",
    aggregate: str = "sum",
    targets: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    always: str | Sequence[str] | None = None,
    max_batches: int = 16,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> Plan:
    """Chooses which parts of the model to train.

    Args:
        model: Any torch model; for data-driven criteria it must return ``.loss`` for a batch.
        data: Calibration batches (dicts of tensors including labels).
        method: A registered criterion name (see ``surgical.CRITERIA.names()``).
        density: Fraction of the targeted parameters to select, in (0, 1].
        count: Alternatively, the number of parameters.
        optimizer_bytes: Alternatively, AdamW fp32 optimizer-state bytes (16 per parameter).
        granularity: ``entry``, ``row``, ``column``, ``head`` (attention projections only),
            ``tensor`` or ``layer`` (a transformer block); default: the criterion's own
            (``entry`` for all but ``rgn``: tensor, ``fim_layer``: layer).
        allocation: ``global`` (best units anywhere), ``per_tensor`` (the same share of every
            tensor; raw gradient scores are largest next to the head, and a global top-k can
            spend most of the budget there) or ``per_layer`` (the same share of every block).
        aggregate: A unit's score: ``sum`` (default) or ``mean`` of its entries' scores.
        targets: Patterns of parameters to select from (default: all Linear weights but the
            output embedding). With ``granularity="row"`` they may name an ``nn.Embedding``
            weight: its rows are token rows, scored like any row (a tied embedding trains as
            one block for both the lookup and the LM head).
        exclude: Patterns removed from the targets.
        always: Patterns of parameters trained densely (heads, norms, biases); they are not
            part of the budget.
        max_batches: Calibration batches to use.
        seed: Seed for random criteria and label sampling.
        progress: Show a progress bar while scoring.
        **options: The criterion's declared options (``surgical list criteria`` prints them);
            an unknown option or a value of the wrong type is an error.

    Returns:
        A :class:`Plan`: entries go to ``entries``, rows and query/key/value heads to ``rows``,
        columns and output-projection heads to ``cols``, tensors and layers to ``dense``. The
        budget is met exactly for entries and never exceeded otherwise (see
        :mod:`surgical.select.allocate`).
    """
    criterion = CRITERIA.get(method)
    options = CRITERIA.resolve(method, options)  # unknown options and bad values fail before any work
    granularity = granularity or default_granularity(method)
    if granularity not in GRANULARITIES:
        raise SurgicalError(f"unknown granularity {granularity!r}", f"Use one of: {', '.join(GRANULARITIES)}")
    if allocation not in ALLOCATIONS:
        raise SurgicalError(f"unknown allocation {allocation!r}", f"Use one of: {', '.join(ALLOCATIONS)}")
    if default_granularity(method) in ("tensor", "layer") and granularity not in ("tensor", "layer"):
        raise SurgicalError(
            f"criterion {method!r} scores whole tensors, so granularity {granularity!r} is impossible",
            "Use granularity='tensor' or 'layer'",
        )
    params, always_names = resolve_targets(model, targets, exclude, always, granularity)
    hd = None
    if granularity == "head":
        hd = head_dim(model)
        params = {n: p for n, p in params.items() if head_kind(n)}
        if not params:
            raise SurgicalError(
                "head granularity found no attention projection among the targets", "Use granularity='row'"
            )
    total = sum(p.numel() for p in params.values())
    k = budget_count(total, density, count, optimizer_bytes)
    if max_batches < 1:
        raise SurgicalError(f"max_batches must be at least 1, got {max_batches}", "Pass a positive number")
    ctx = ScoreContext(model, params, data, max_batches, seed, progress, options)
    with torch.random.fork_rng(devices=[]):
        raw = criterion(ctx)
    scores = {n: raw[n] for n in params}  # parameter order, not gradient-arrival order: breaks ties
    del raw
    all_params = dict(model.named_parameters())
    units = build_units(scores, granularity, aggregate, hd)
    dense_sizes(units, {n: tuple(p.shape) for n, p in params.items()})
    del scores  # entry units hold the scores now; keep one copy at a time
    taken = allocate(units, k, allocation)
    plan = Plan(dense=list(always_names))
    for u in units:
        chosen = torch.nonzero(taken[u.name]).flatten()
        if not chosen.numel():
            continue
        if u.kind == "entries":
            plan.entries[u.name] = chosen
        elif u.kind in ("rows", "cols"):
            idx = (chosen[:, None] * u.block + torch.arange(u.block)[None, :]).reshape(-1)
            getattr(plan, u.kind)[u.name] = idx
        else:
            plan.dense.extend(u.members)
    selected = sum(int(taken[u.name].sum()) * u.size for u in units)
    plan.shapes = {n: tuple(all_params[n].shape) for n in [*plan.sparse_names, *plan.dense]}
    plan.meta = {
        "method": method,
        "density": density,
        "count": count,
        "optimizer_bytes": optimizer_bytes,
        "budget": k,
        "selected": selected,
        "targeted": total,
        "targeted_shapes": {n: list(p.shape) for n, p in params.items()},  # for per-layer reports
        "granularity": granularity,
        "allocation": allocation,
        "aggregate": aggregate,
        "targets": as_patterns(targets),
        "exclude": as_patterns(exclude),
        "always": as_patterns(always),
        "max_batches": max_batches,
        "calibration_batches": ctx.used,
        "seed": seed,
        "options": dict(options),
    }
    return plan
