"""``select``: score the targeted parameters, group the scores into units, allocate a budget."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.names import head_dim, head_kind
from surgical.core.patterns import as_patterns, select_names
from surgical.core.tensors import is_quantized, logical_shape
from surgical.select.allocate import ALLOCATIONS, allocate
from surgical.select.criteria import CRITERIA, ScoreContext, default_granularity
from surgical.select.experts import fused_expert_parameters, is_expert_parameter
from surgical.select.plan import Plan
from surgical.select.units import GRANULARITIES, build_units, dense_sizes

#: Modules whose ``weight`` is a default target (besides transformers' ``Conv1D``).
TARGET_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2): a Linear with an (in, out) weight.

    Recognised by class name and module, so that selection never imports transformers."""
    return any(
        c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__
    )


def default_targets(model: nn.Module) -> list[str]:
    """The weights of every ``nn.Linear``, transformers ``Conv1D`` and ``nn.Conv1d/2d/3d`` except
    the output embedding (an LM head, often tied), and every fused expert tensor (a 3-D parameter
    of a module whose name contains ``experts``); never embeddings or norms."""
    out_emb = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out_emb = get_out()
    names = []
    for mname, module in model.named_modules():
        if module is out_emb or not isinstance(module._parameters.get("weight"), torch.Tensor):
            continue
        if isinstance(module, TARGET_MODULES) or is_transposed_linear(module):
            names.append(f"{mname}.weight" if mname else "weight")
    return names + [n for n in fused_expert_parameters(model) if n not in names]


def transposed_weights(model: nn.Module, names: Iterable[str]) -> set[str]:
    """Those of ``names`` that are (in, out) weights (transformers' ``Conv1D``)."""
    out = set()
    for name in names:
        mname, _, pname = name.rpartition(".")
        if pname == "weight" and is_transposed_linear(model.get_submodule(mname) if mname else model):
            out.add(name)
    return out


def resolve_targets(
    model: nn.Module,
    targets: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    always: str | Sequence[str] | None,
    granularity: str = "entry",
) -> tuple[dict[str, nn.Parameter], list[str]]:
    """Returns the targeted parameters (for entry selection) and the always-trained names.

    Targets default to :func:`default_targets`. Target patterns pick among those, the output
    head, and any other floating parameter of 2+ dimensions that is not an embedding's (a
    router, a custom module's weight: they train through the generic path). At
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
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    known = set(linear_weights)
    linear_weights += [  # not the trainable values a prepared model carries (``<param>_sg_delta``)
        n for n, p in params.items()
        if n not in known and p.dim() >= 2 and p.is_floating_point() and id(p) not in embeddings
        and not n.endswith("_sg_delta")
    ]  # fmt: skip
    always_names = select_names(params, as_patterns(always), "always")
    target_pats = as_patterns(targets)
    if target_pats:
        noun = "nn.Linear or nn.Embedding weight" if granularity == "row" else "nn.Linear weight"
        names = select_names(linear_weights, target_pats, "target", f"{noun} (nor other weight of 2+ dims)")
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
    for name, value in (("density", density), ("count", count), ("optimizer_bytes", optimizer_bytes)):
        whole = name != "density"
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and value != int(value)):
            want = "a whole number" if whole else "a number in (0, 1]"
            raise SurgicalError(
                f"{name} must be {want}, got {value!r}", f"Pass e.g. {name}={100 if whole else 0.01}"
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
        granularity: ``entry``, ``row`` (dim 0), ``column`` (dim 1 of a 2-D weight), ``channel``
            (output channels: rows of Linear and convolution weights, columns of a transposed
            ``Conv1D``), ``head`` (attention projections only), ``expert`` (whole experts of a
            mixture of experts; other targets are left out), ``tensor`` or ``layer`` (a
            transformer block); default: the criterion's own (``entry`` for all but ``rgn``:
            tensor, ``fim_layer``: layer).
        allocation: ``global`` (best units anywhere), ``per_tensor`` (the same share of every
            tensor; raw gradient scores are largest next to the head, and a global top-k can
            spend most of the budget there) or ``per_layer`` (the same share of every block).
        aggregate: A unit's score: ``sum`` (default) or ``mean`` of its entries' scores.
        targets: Patterns of parameters to select from (default: the weights of Linear,
            ``Conv1D`` and convolution modules but the output embedding, and fused expert
            tensors). With ``granularity="row"`` they may name an ``nn.Embedding``
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
    if not isinstance(model, nn.Module):
        raise SurgicalError(
            f"select takes a torch model (nn.Module), got {type(model).__name__} {model!r:.60}",
            "Load it first, e.g. AutoModelForSequenceClassification.from_pretrained(path)",
        )
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
    quantized = [n for n, p in params.items() if is_quantized(p)]
    packed = [n for n in quantized if logical_shape(params[n]) != tuple(params[n].shape)]
    if packed or (quantized and method != "random"):  # integers and scales: nothing to score
        name = (packed or quantized)[0]
        kind = type(params[name]).__name__
        raise SurgicalError(
            f"criterion {method!r} cannot score {name!r}: it is quantized ({kind})",
            "Select on the full-precision model before surgical.quantize_base"
            + ("" if packed else " (or use method='random')"),
        )
    hd = None
    if granularity == "head":
        hd = head_dim(model)
        params = {n: p for n, p in params.items() if head_kind(n)}
        if not params:
            raise SurgicalError(
                "head granularity found no attention projection among the targets", "Use granularity='row'"
            )
    if granularity == "expert":  # whole experts: other targets have no expert to belong to
        params = {n: p for n, p in params.items() if is_expert_parameter(n, p.shape)}
        if not params:
            raise SurgicalError(
                "expert granularity found no expert parameter among the targets (fused 3-D tensors of "
                "an experts module, or the modules of a ModuleList named experts)",
                "Target the experts, or use another granularity",
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
    units = build_units(scores, granularity, aggregate, hd, transposed_weights(model, params))
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
            plan.scores[u.name] = u.scores[chosen].float().clone()  # for Fisher merging
        elif u.kind in ("rows", "cols"):
            idx = (chosen[:, None] * u.block + torch.arange(u.block)[None, :]).reshape(-1)
            for name in u.members or [u.name]:  # an expert: the same rows of its fused tensors
                getattr(plan, u.kind)[name] = idx.clone()
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
