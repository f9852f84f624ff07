"""Moving deltas in and out of models: ``extract``, ``apply``, ``revert`` and ``applied``.

``apply`` saves, for every value it changes, the value it overwrote (k values for k entries, the
selected rows or columns for a block, the whole tensor for dense and replaced tensors), on
``model._sg_applied``. ``revert`` writes them
back, so it restores the base bit for bit, and both cost time proportional to the delta, not the
model: switching the task of a served model is cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from surgical.delta.algebra import base_checks
from surgical.delta.blocks import BLOCK_KINDS
from surgical.delta.delta import Delta
from surgical.delta.fingerprint import model_fingerprint
from surgical.errors import SurgicalError
from surgical.train.prepare import prepared, sync


class Saved(NamedTuple):
    """Values one ``apply`` overwrote in one tensor.

    ``idx`` None: ``old`` is the whole tensor. ``axis`` None: ``idx`` are sorted flat indices and
    ``old`` the values there. ``axis`` 0 or 1: ``idx`` are sorted rows or columns and ``old`` the
    block ``tensor.index_select(axis, idx)``.
    """

    idx: torch.Tensor | None
    old: torch.Tensor
    axis: int | None = None


@dataclass
class AppliedRecord:
    """What one ``apply`` overwrote: parameter name -> :class:`Saved`."""

    delta_id: int
    saved: dict[str, Saved] = field(default_factory=dict)


def extract(model: nn.Module, **meta) -> Delta:
    """The delta a prepared model has trained so far (a copy; training may go on).

    Entry weights become ``entries``; weights trained as row or column blocks (Linear rows and
    columns, Embedding token rows, any :class:`~surgical.train.structured.BlockState`) become
    ``rows`` / ``cols`` holding the block as trained. The plan's densely trained parameters are
    stored in full. ``meta`` is merged into the delta's metadata (e.g. a training summary).
    """
    from surgical.train.structured import BlockState

    info = prepared(model)
    sync(model)
    delta = Delta()
    for name, module in info.entry_modules.items():
        state = module._sg_entries
        delta.shapes[name] = tuple(getattr(module, state.param_name).shape)
        if isinstance(state, BlockState):
            kind = "rows" if state.axis == 0 else "cols"
            sel = state.sel(module).detach().to("cpu", torch.int64, copy=True)
            delta.blocks(kind)[name] = (sel, state.block(module).detach().float().cpu().clone())
            continue
        idx = state.indices(module).detach().to("cpu", torch.int64, copy=True)  # a Delta holds int64
        delta.entries[name] = (idx, state.delta(module).detach().float().cpu().clone())
    params = dict(model.named_parameters())
    for name in info.dense:
        delta.full[name] = params[name].detach().float().cpu().clone()
        delta.shapes[name] = tuple(params[name].shape)
    delta.meta = {"base": base_identity(model, exclude=delta.full), "plan": info.meta, **meta}
    return delta


def base_identity(model: nn.Module, exclude=()) -> dict:
    """The ``base`` metadata of a delta made on ``model`` (name, architecture, fingerprint)."""
    config = getattr(model, "config", None)
    excludes = sorted(exclude)
    return {
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "model_type": getattr(config, "model_type", None),
        "architecture": type(model).__name__,
        "num_labels": getattr(config, "num_labels", None),
        "fingerprint": model_fingerprint(model, excludes),
        "fingerprint_excludes": excludes,
    }


def check_base(model: nn.Module, delta: Delta) -> None:
    """Raises a SurgicalError unless ``model`` has the delta's parameters, shapes and base identity."""
    params = dict(model.named_parameters())
    for name, shape in delta.shapes.items():
        if name not in params:
            raise SurgicalError(
                f"the delta changes {name!r}, which this model does not have",
                "Apply the delta to the base model it was trained from",
            )
        if tuple(params[name].shape) != tuple(shape):
            raise SurgicalError(
                f"the delta was trained on another model: {name!r} is {tuple(shape)} in the delta "
                f"but {tuple(params[name].shape)} here",
                "Apply the delta to the base model it was trained from",
            )
    for expected, excludes in base_checks(delta):
        got = model_fingerprint(model, excludes)
        if got != expected:
            base_name = delta.meta.get("base", {}).get("name_or_path") or "?"
            here = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "?")
            raise SurgicalError(
                f"this model ({here}, fingerprint {got}) is not the base the delta was trained on "
                f"({base_name}, fingerprint {expected})",
                "Load the right base model, or pass force=True / --force to apply anyway",
            )


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
        SurgicalError: if a parameter is missing or has another shape, or the base differs.
    """
    if getattr(model, "_sg_prepared", None) is not None:
        raise SurgicalError(
            "cannot apply a delta to a prepared model", "Call surgical.unprepare(model) first"
        )
    delta.validate()
    if force:
        check_base(model, Delta(shapes=delta.shapes))
    else:
        check_base(model, delta)
    params = dict(model.named_parameters())
    record = AppliedRecord(id(delta))
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
        p.add_(change(t, p))
    for name, t in delta.full.items():
        p = params[name].data
        record.saved[name] = Saved(None, p.clone())
        if scale == 1.0:
            p.copy_(t.to(p.device, p.dtype))
        else:
            p.copy_(p.float().lerp(t.to(p.device).float(), scale).to(p.dtype))
    stack = getattr(model, "_sg_applied", None)
    if stack is None:
        stack = []
        object.__setattr__(model, "_sg_applied", stack)  # a plain attribute, never in state_dict
    stack.append(record)
    return model


@torch.no_grad()
def revert(model: nn.Module, delta: Delta | None = None) -> nn.Module:
    """Undoes the last :func:`apply` (of ``delta``, if given) exactly, restoring the saved values.

    Raises:
        SurgicalError: if nothing was applied, ``delta`` was not applied to this model, or deltas
            applied after it are still in place (revert in reverse order).
    """
    stack = getattr(model, "_sg_applied", None) or []
    if not stack:
        raise SurgicalError("no delta is applied to this model", "Apply one with surgical.apply first")
    if delta is not None and stack[-1].delta_id != id(delta):
        if any(r.delta_id == id(delta) for r in stack):
            raise SurgicalError(
                "deltas applied after this one are still in place", "Revert them first (reverse order)"
            )
        raise SurgicalError(
            "this delta was not applied to this model",
            "Pass the same Delta object that surgical.apply received",
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
