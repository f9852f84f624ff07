"""Moving deltas in and out of models: ``apply``, ``revert`` and ``applied``.

``apply`` saves, for every value it changes, the value it overwrote (k values for k entries, the
selected rows or columns for a block, the whole tensor for dense and replaced tensors), in the
model's applied stack (:mod:`surgical.core.marks`). ``revert`` writes them back, so it restores
the base bit for bit, and both cost time proportional to the delta, not the model: switching
the task of a served model is cheap. A delta is recognised by its content
(:meth:`Delta.digest`), so one reloaded from disk reverts what the same delta applied.
(``extract``, which reads a prepared model's training state, lives in :mod:`surgical.train`.)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from surgical.core.blocks import BLOCK_KINDS
from surgical.core.errors import SurgicalError
from surgical.core.marks import AppliedRecord, Saved, applied_stack, is_prepared
from surgical.core.tensors import is_plain
from surgical.delta.base import check_base
from surgical.delta.delta import Delta


@torch.no_grad()
def apply(model: nn.Module, delta: Delta, *, scale: float = 1.0, force: bool = False) -> nn.Module:
    """Adds ``scale`` times a delta to a model in place and returns it; :func:`revert` undoes it.

    Entries, row and column blocks and dense tensors add ``scale * value`` (with ``scale=1``
    exactly the addition training did, so the fine-tuned model is reproduced bit for bit).
    Replaced tensors are copied for ``scale=1`` and interpolated ``base + scale * (new - base)`` otherwise.

    Args:
        model: A plain (unprepared) model of the architecture the delta was trained on; other
            deltas may already be applied.
        delta: The delta to apply.
        scale: Multiplier of the change.
        force: Apply even if the base fingerprint differs from the one recorded at training.

    Raises:
        SurgicalError: if a parameter is missing or has another shape, is quantized or
            sharded, or the base differs.
    """
    if is_prepared(model):
        raise SurgicalError(
            "cannot apply a delta to a prepared model", "Call surgical.unprepare(model) first"
        )
    delta.validate()
    params = dict(model.named_parameters())
    for name in delta.shapes:
        if name in params and not is_plain(params[name]):
            raise SurgicalError(
                f"cannot apply a delta to {name!r}: it is stored as {type(params[name]).__name__} "
                "(quantized or sharded), whose values cannot be written",
                "Apply the delta to the full-precision, unsharded base model",
            )
    check_base(model, delta, force=force)
    record = AppliedRecord(delta.digest())
    if any(r.digest == record.digest for r in applied_stack(model)):
        warnings.warn(
            "this delta is already applied to the model; applying it again adds its change a second "
            "time (revert it first, or pass scale= to apply a multiple on purpose)",
            stacklevel=2,
        )
    scale = float(scale)

    def change(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # scale 1 adds the stored values as they are: the addition training did, bit for bit
        t = t if scale == 1.0 else t.float() * scale
        return t.to(like.device, like.dtype)

    for name, (idx, vals) in delta.entries.items():
        flat = params[name].data.view(-1)
        i = idx.to(flat.device)
        old = flat.index_select(0, i)
        record.saved[name] = Saved(i, old)
        flat.index_copy_(0, i, torch.add(old, change(vals, flat)))
    for kind, axis in BLOCK_KINDS.items():
        for name, (idx, block) in delta.blocks(kind).items():
            p = params[name].data
            i = idx.to(p.device)
            old = p.index_select(axis, i)
            record.saved[name] = Saved(i, old, axis)
            p.index_copy_(axis, i, torch.add(old, change(block, p)))
    for name, t in delta.dense.items():
        p = params[name].data
        record.saved[name] = Saved(None, p.clone())
        if scale == 1.0:  # summed in float64 and rounded once: a float64 change adds back exactly
            p.copy_(p.double().add_(t.to(p.device, torch.float64)).to(p.dtype))
        else:
            p.add_(change(t, p))
    for name, t in delta.full.items():
        p = params[name].data
        record.saved[name] = Saved(None, p.clone())
        if scale == 1.0:
            p.copy_(t.to(p.device, p.dtype))
        else:
            p.copy_(p.float().lerp(t.to(p.device).float(), scale).to(p.dtype))
    applied_stack(model).append(record)
    return model


@torch.no_grad()
def revert(model: nn.Module, delta: Delta | None = None) -> nn.Module:
    """Undoes the last :func:`apply` (of ``delta``, if given) exactly, restoring the saved values.

    ``delta`` is matched by content, so the same delta loaded again from disk is recognised.

    Raises:
        SurgicalError: if nothing was applied, ``delta`` was not applied to this model, or deltas
            applied after it are still in place (revert in reverse order).
    """
    stack = applied_stack(model)
    if not stack:
        raise SurgicalError("no delta is applied to this model", "Apply one with surgical.apply first")
    if delta is not None:
        digest = delta.digest()
        if stack[-1].digest != digest:
            if any(r.digest == digest for r in stack):
                raise SurgicalError(
                    "deltas applied after this one are still in place", "Revert them first (reverse order)"
                )
            raise SurgicalError(
                "this delta was not applied to this model",
                "Pass the delta that surgical.apply received (or the same delta loaded again)",
            )
    record = stack.pop()
    params = dict(model.named_parameters())
    for name, (idx, old, axis) in record.saved.items():
        p = params[name].data
        if idx is None:
            p.copy_(old)
        elif axis is None:
            p.view(-1).index_copy_(0, idx, old)
        else:
            p.index_copy_(axis, idx, old)
    return model


@contextlib.contextmanager
def applied(
    model: nn.Module, delta: Delta, *, scale: float = 1.0, force: bool = False
) -> Iterator[nn.Module]:
    """``with applied(model, delta): ...`` runs the body with the delta applied, then reverts exactly."""
    apply(model, delta, scale=scale, force=force)
    try:
        yield model
    finally:
        revert(model, delta)
