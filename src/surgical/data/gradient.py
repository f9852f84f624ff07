"""``gradient`` (after LESS): per-example gradient features on the parameters that will be
trained, randomly projected, scored by cosine similarity to the validation gradient.

The features of an example are the gradient of its loss (mean over its target tokens) with
respect to the chosen parameter entries only: pass ``params`` to ``select_data`` as the support
of a surgical plan (a :class:`surgical.Plan`, whose entries, rows, columns and dense tensors
are all used, or its ``entries`` dict as is: name -> flat indices; a value of None means the
whole tensor). Without ``params`` every floating parameter of the model counts (LESS on the
whole model: slow and large). So the features match exactly what will be trained, at the cost
of one backward pass per example.

When the features have more than ``dim`` values they are projected to ``dim`` by a seeded random
map (Johnson-Lindenstrauss: inner products and cosines are preserved up to O(1/sqrt(dim))):
``rademacher`` or ``gaussian`` entries scaled by 1/sqrt(dim) (generated in chunks, never whole),
or ``sketch``, a count sketch (each value added with a random sign to one random output), O(size)
instead of O(size * dim). The score of an example is the cosine similarity of its features to the
mean features of the validation examples (``select_data(..., validation=...)``). Plain gradients
are used (LESS preconditions them with Adam's state, which a model about to be fine-tuned does
not have yet). The model runs in eval mode; its weights and ``requires_grad`` flags are left as
they were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.registry import Option
from surgical.core.runtime import progress
from surgical.data.criteria import DATA_CRITERIA, DataContext
from surgical.data.examples import Example, collate
from surgical.data.losses import batch_loss

_CHUNK = 1 << 16  # projection rows generated at once
_CACHE = 1 << 25  # projection entries kept in memory instead of regenerated
_GROUP = 1 << 26  # raw feature values held before projecting


def support_of(model: nn.Module, params: Any) -> list[tuple[str, nn.Parameter, torch.Tensor | None]]:
    """``(name, parameter, flat indices or None)`` for the gradient features, checked against the model.

    Args:
        params: None (every floating parameter), a mapping name -> flat indices (None: the whole
            tensor), or a plan-like object with ``entries``, ``rows``/``cols`` (expanded by its
            ``entry_indices``) and ``dense``.
    """
    named = dict(model.named_parameters())
    if params is None:
        return [(n, p, None) for n, p in named.items() if p.is_floating_point()]
    if hasattr(params, "entry_indices") and hasattr(params, "dense"):  # a surgical Plan
        sparse = [*params.entries, *getattr(params, "rows", {}), *getattr(params, "cols", {})]
        params = {**{n: params.entry_indices(n) for n in sparse}, **{n: None for n in params.dense}}
    if not isinstance(params, Mapping) or not params:
        raise SurgicalError(
            "params must map parameter names to flat indices (None: the whole tensor)",
            "Pass a surgical Plan or its entries dict",
        )
    out = []
    for name, idx in params.items():
        if name not in named:
            raise SurgicalError(
                f"params names {name!r}, which the model does not have", "Pass the plan of this model"
            )
        p = named[name]
        if idx is not None:
            idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
                raise SurgicalError(
                    f"params index out of range for {name!r} ({p.numel()} values)",
                    "Pass the plan of this model",
                )
        out.append((name, p, idx))
    return out


def _features(
    model: nn.Module, support: list, examples: Sequence[Example], pad_id: int, bar: Any, task: Any
) -> torch.Tensor:
    """Raw gradient features ``(len(examples), D)`` on the model's device."""
    tensors = [p for _, p, _ in support]
    rows = []
    for ex in examples:
        loss = batch_loss(model, collate([ex], pad_id))
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        parts = []
        for (_, p, idx), g in zip(support, grads, strict=True):
            g = torch.zeros_like(p) if g is None else g
            flat = g.detach().reshape(-1).float()
            parts.append(flat if idx is None else flat[idx.to(flat.device)])
        rows.append(torch.cat(parts))
        bar.update(task, advance=1)
    return torch.stack(rows)


class Projection:
    """A seeded random map from ``size`` values to ``dim`` (identity when ``size <= dim``)."""

    def __init__(self, size: int, dim: int, kind: str, seed: int) -> None:
        self.size, self.dim, self.kind, self.seed = size, dim, kind, seed
        self.identity = size <= dim
        self._cache: dict[int, torch.Tensor] = {}
        self._sketch: tuple[torch.Tensor, torch.Tensor] | None = None

    def _chunk(self, start: int, device: torch.device) -> torch.Tensor:
        if start in self._cache:
            return self._cache[start]
        rows = min(_CHUNK, self.size - start)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + start // _CHUNK)
        if self.kind == "gaussian":
            r = torch.randn((rows, self.dim), generator=g)
        else:
            r = torch.randint(0, 2, (rows, self.dim), generator=g).float() * 2 - 1
        r = (r / math.sqrt(self.dim)).to(device)
        if self.size * self.dim <= _CACHE:
            self._cache[start] = r
        return r

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats (G, size)`` projected to ``(G, dim)``."""
        if self.identity:
            return feats
        if self.kind == "sketch":
            if self._sketch is None:
                g = torch.Generator().manual_seed(self.seed)
                bucket = torch.randint(0, self.dim, (self.size,), generator=g)
                sign = torch.randint(0, 2, (self.size,), generator=g).float() * 2 - 1
                self._sketch = (bucket.to(feats.device), sign.to(feats.device))
            bucket, sign = self._sketch
            return feats.new_zeros(feats.shape[0], self.dim).index_add_(1, bucket, feats * sign)
        out = feats.new_zeros(feats.shape[0], self.dim)
        for start in range(0, self.size, _CHUNK):
            out += feats[:, start : start + _CHUNK] @ self._chunk(start, feats.device)
        return out


def gradient_features(
    model: nn.Module,
    examples: Sequence[Example],
    support: list,
    projection: Projection,
    *,
    pad_id: int = 0,
    show: bool = False,
    what: str = "gradients",
) -> torch.Tensor:
    """Projected gradient features ``(N, dim)`` (float32, CPU) of each example's loss on ``support``.

    The model runs in eval mode with gradients on exactly the supported tensors; its mode and
    ``requires_grad`` flags are restored afterwards.
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    chosen = {id(p) for _, p, _ in support}
    was_training = model.training
    group = max(1, min(64, _GROUP // max(1, projection.size)))
    out = []
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        with progress(disable=not show) as bar:
            task = bar.add_task(what, total=len(examples), info="")
            for s in range(0, len(examples), group):
                raw = _features(model, support, examples[s : s + group], pad_id, bar, task)
                out.append(projection(raw).cpu())
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return torch.cat(out)


@DATA_CRITERIA.register(
    "gradient",
    help="cosine of per-example gradients on the plan's support to the validation gradient (LESS-like)",
    options=[
        Option("dim", int, 512, "dimension of the random projection (when the features are larger)", low=1),
        Option("projection", str, "rademacher", "the random map: rademacher, gaussian or sketch",
               choices=("rademacher", "gaussian", "sketch")),
    ],
    needs_model=True,
    needs_validation=True,
)  # fmt: skip
def gradient_scores(ctx: DataContext) -> torch.Tensor:
    """Cosine similarity of each example's projected gradient to the mean validation gradient."""
    support = support_of(ctx.model, ctx.params)
    size = sum(p.numel() if idx is None else int(idx.numel()) for _, p, idx in support)
    if size == 0:
        raise SurgicalError("params select no parameter entries", "Pass a plan with a non-empty selection")
    proj = Projection(size, ctx.options["dim"], ctx.options["projection"], ctx.seed)
    ctx.info.update(features=size, projected=not proj.identity)
    kw = dict(pad_id=ctx.pad_id, show=ctx.progress)
    target = gradient_features(ctx.model, ctx.validation, support, proj, what="validation gradients", **kw)
    target = target.double().mean(0)
    if float(target.norm()) == 0.0:
        raise SurgicalError(
            "the validation gradient is zero on the chosen parameters",
            "Check params and the validation labels",
        )
    feats = gradient_features(ctx.model, ctx.examples, support, proj, **kw).double()
    return torch.nn.functional.cosine_similarity(feats, target[None, :], dim=1).float()
