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
mean features of the validation examples (``select_data(..., validation=...)``).

``precondition="adam"`` scores each training example by its Adam update direction instead of its
raw gradient, as LESS does: ``g / (sqrt(v_hat) + eps)`` elementwise, where ``v_hat`` is Adam's
bias-corrected second moment after a short warmup training (``warmup_steps`` Adam steps at
``warmup_lr`` on batches of the training examples, visited in a seeded order reshuffled each
pass, eval mode, no weight decay, no clipping) *of the supported entries only*: the other entries
never move, exactly as in the training that follows. The gradients themselves are still taken at
the model as given (the starting point of that training); the validation gradients stay raw
(LESS's asymmetry: the target is the direction the validation loss wants, the candidates are the
steps Adam would take). The preconditioning is applied before the projection. LESS also mixes the
first moment and the example's own squared gradient into the step (and takes gradients at the
warmup checkpoints); here only ``v`` of the warmup weighs the gradient. An entry that got no
gradient in the warmup (``v = 0``) is weighted ``1 / eps``; the selection reports how many there
were (``unwarmed``). The warmup changes the supported values in place and restores them exactly
afterwards (no copy of the model).

The model runs in eval mode; its weights and ``requires_grad`` flags are left as they were.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.registry import Option
from surgical.core.runtime import progress
from surgical.data.criteria import DATA_CRITERIA, DataContext
from surgical.data.examples import Example, batches_of, collate
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


def _support_grad(model: nn.Module, support: list, batch: Mapping[str, Any]) -> torch.Tensor:
    """The gradient of the batch's mean loss on the support, one flat float32 vector ``(D,)``."""
    loss = batch_loss(model, batch)
    grads = torch.autograd.grad(loss, [p for _, p, _ in support], allow_unused=True)
    parts = []
    for (_, p, idx), g in zip(support, grads, strict=True):
        g = torch.zeros_like(p) if g is None else g
        flat = g.detach().reshape(-1).float()
        parts.append(flat if idx is None else flat[idx.to(flat.device)])
    return torch.cat(parts)


def _features(
    model: nn.Module, support: list, examples: Sequence[Example], pad_id: int, bar: Any, task: Any
) -> torch.Tensor:
    """Raw gradient features ``(len(examples), D)`` on the model's device."""
    rows = []
    for ex in examples:
        rows.append(_support_grad(model, support, collate([ex], pad_id)))
        bar.update(task, advance=1)
    return torch.stack(rows)


@contextmanager
def _gradients_on(model: nn.Module, support: list) -> Iterator[None]:
    """Eval mode with gradients on exactly the supported tensors; mode and flags restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    chosen = {id(p) for _, p, _ in support}
    was_training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


class Projection:
    """A seeded random map from ``size`` values to ``dim`` (identity when ``size <= dim``)."""

    def __init__(self, size: int, dim: int, kind: str, seed: int) -> None:
        self.size, self.dim, self.kind, self.seed = size, dim, kind, seed
        self.identity = size <= dim
        self._cache: dict[int, torch.Tensor] = {}
        self._sketch: tuple[torch.Tensor, torch.Tensor] | None = None
        # the dense random map is kept in memory when small, else regenerated chunk by chunk per call
        self.kept = self.identity or kind == "sketch" or size * dim <= _CACHE

    def _chunk(self, start: int, device: torch.device) -> torch.Tensor:
        if start in self._cache:
            return self._cache[start]
        rows = min(_CHUNK, self.size - start)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + start // _CHUNK)
        scale = 1 / math.sqrt(self.dim)
        if self.kind == "gaussian":
            r = torch.randn((rows, self.dim), generator=g).mul_(scale)
        else:  # eight signs per random byte: far fewer draws than one per sign
            packed = torch.randint(0, 256, (rows, -(-self.dim // 8)), generator=g, dtype=torch.uint8)
            bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
            r = bits.reshape(rows, -1)[:, : self.dim].to(torch.float32).mul_(2 * scale).sub_(scale)
        r = r.to(device)
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
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected gradient features ``(N, dim)`` (float32, CPU) of each example's loss on ``support``,
    multiplied elementwise by ``weight`` (a preconditioner over the support) before projecting.

    The model runs in eval mode with gradients on exactly the supported tensors; its mode and
    ``requires_grad`` flags are restored afterwards.
    """
    # a projection too big to keep is regenerated for every group: make the groups large then
    group = max(1, min(64 if projection.kept else 1024, _GROUP // max(1, projection.size)))
    out = []
    with _gradients_on(model, support), progress(disable=not show) as bar:
        task = bar.add_task(what, total=len(examples), info="")
        for s in range(0, len(examples), group):
            raw = _features(model, support, examples[s : s + group], pad_id, bar, task)
            if weight is not None:
                raw = raw * weight.to(raw.device)
            out.append(projection(raw).cpu())
    return torch.cat(out)


def adam_preconditioner(
    model: nn.Module,
    support: list,
    batches: Sequence[Mapping[str, Any]],
    *,
    steps: int,
    lr: float,
    seed: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    show: bool = False,
) -> tuple[torch.Tensor, int]:
    """Adam's elementwise preconditioner ``1 / (sqrt(v_hat) + eps)`` on the support, ``(D,)`` float32.

    Runs ``steps`` Adam steps (no weight decay, no clipping, eval mode) on the supported entries
    only, over ``batches`` in a seeded order reshuffled each pass, with ``v_hat = v / (1 -
    beta2**steps)`` as ``torch.optim.Adam`` divides by it. The supported values are restored
    exactly afterwards, and so are the model's mode and ``requires_grad`` flags.

    Returns:
        The preconditioner and how many supported entries got no gradient (``v = 0``).
    """
    if not batches:
        raise SurgicalError("the Adam warmup got no batches", "Pass at least one example")
    b1, b2 = betas
    saved = [(p, idx, p.detach().clone() if idx is None else p.detach().reshape(-1)[idx.to(p.device)].clone())
             for _, p, idx in support]  # fmt: skip
    m = v = None
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    try:
        with _gradients_on(model, support), progress(disable=not show) as bar:
            task = bar.add_task("Adam warmup", total=steps, info="")
            for step in range(1, steps + 1):
                if not order:
                    order = torch.randperm(len(batches), generator=g).tolist()
                grad = _support_grad(model, support, batches[order.pop(0)])
                if not bool(torch.isfinite(grad).all()):
                    raise SurgicalError(
                        f"the gradient became NaN/inf at step {step} of the Adam warmup",
                        "Lower the option warmup_lr",
                    )
                m = grad * (1 - b1) if m is None else m.mul_(b1).add_(grad, alpha=1 - b1)
                v = grad * grad * (1 - b2) if v is None else v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (v / (1 - b2**step)).sqrt_().add_(eps)
                _add_to_support(support, m / (1 - b1**step) / denom, -lr)
                bar.update(task, advance=1)
    finally:
        with torch.no_grad():
            for p, idx, value in saved:
                if idx is None:
                    p.copy_(value)
                else:
                    _set_entries(p, idx, value, add=False)
    assert v is not None
    return 1.0 / (v / (1 - b2**steps)).sqrt_().add_(eps), int((v == 0).sum())


@torch.no_grad()
def _add_to_support(support: list, values: torch.Tensor, alpha: float) -> None:
    """Adds ``alpha * values`` (one flat vector over the support) to the supported entries."""
    at = 0
    for _, p, idx in support:
        k = p.numel() if idx is None else int(idx.numel())
        part = values[at : at + k].to(device=p.device, dtype=p.dtype) * alpha
        at += k
        if idx is None:
            p.add_(part.view_as(p))
        else:
            _set_entries(p, idx, part, add=True)


@torch.no_grad()
def _set_entries(p: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, *, add: bool) -> None:
    """``p.flatten()[idx] = values`` (``+= values`` with ``add``), in place."""
    flat = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()
    if add:
        flat.index_add_(0, idx.to(p.device), values)
    else:
        flat.index_copy_(0, idx.to(p.device), values)
    if not p.is_contiguous():
        p.copy_(flat.view_as(p))


@DATA_CRITERIA.register(
    "gradient",
    help="cosine of per-example gradients on the plan's support to the validation gradient (LESS-like)",
    options=[
        Option("dim", int, 512, "dimension of the random projection (when the features are larger)", low=1),
        Option("projection", str, "rademacher", "the random map: rademacher, gaussian or sketch",
               choices=("rademacher", "gaussian", "sketch")),
        Option("precondition", str, "none",
               "'adam': weigh the training gradients by 1/(sqrt(v)+eps) of a short Adam warmup (LESS)",
               choices=("none", "adam")),
        Option("warmup_steps", int, 20, "precondition=adam: Adam steps of the warmup on the support", low=1),
        Option("warmup_lr", float, 1e-4, "precondition=adam: learning rate of the warmup",
               low=0, low_open=True),
        Option("eps", float, 1e-8, "precondition=adam: Adam's eps", low=0, low_open=True),
    ],
    needs_model=True,
    needs_validation=True,
)  # fmt: skip
def gradient_scores(ctx: DataContext) -> torch.Tensor:
    """Cosine similarity of each example's projected gradient (Adam-preconditioned with
    ``precondition="adam"``) to the mean raw validation gradient."""
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
    weight = None
    if ctx.options["precondition"] == "adam":
        weight, unwarmed = adam_preconditioner(
            ctx.model,
            support,
            batches_of(ctx.examples, None, ctx.batch_size, ctx.pad_id),
            steps=ctx.options["warmup_steps"],
            lr=ctx.options["warmup_lr"],
            seed=ctx.seed,
            eps=ctx.options["eps"],
            show=ctx.progress,
        )
        ctx.info["unwarmed"] = unwarmed
    feats = gradient_features(ctx.model, ctx.examples, support, proj, weight=weight, **kw).double()
    return torch.nn.functional.cosine_similarity(feats, target[None, :], dim=1).float()
