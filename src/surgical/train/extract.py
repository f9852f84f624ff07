"""``extract``: the delta a prepared model has trained so far.

It lives with the training state because only the states know where their values are; the
delta layer below knows nothing of training.
"""

from __future__ import annotations

import torch
from torch import nn

from surgical.core.fingerprint import base_identity
from surgical.core.tensors import full_tensor, logical_shape
from surgical.delta.delta import Delta
from surgical.select.plan import Plan
from surgical.train.prepare import base_overlay, prepared, sync
from surgical.train.state import state_of


def extract(model: nn.Module, scores: Plan | None = None, **meta) -> Delta:
    """The delta a prepared model has trained so far (a copy; training may go on).

    Entry weights become ``entries``; weights trained as row or column blocks (Linear rows and
    columns, Embedding token rows) become ``rows`` / ``cols`` holding the block as trained.
    Densely trained parameters become ``dense`` changes (trained minus base: task vectors that
    scale and merge), except parameters without a base value (``prepare``'s ``new``, e.g. a
    fresh head), which are stored whole as ``full``. A change is kept in float32 where base +
    change gives the trained values back bit for bit, else in float64 (or, if even that fails,
    the tensor is stored whole), so applying the delta stays exact. ``meta`` is merged into the
    delta's metadata (e.g. a training summary).

    ``scores``: the plan the model was prepared with; its selection scores (e.g. the diagonal
    Fisher of ``method="fisher"``) are attached to the delta's entries, for Fisher merging, for
    every tensor whose entries training kept where they were (a schedule that moved them drops
    that tensor's scores).

    On a model sharded with FSDP2 (:func:`surgical.train.shard`) or DeepSpeed ZeRO-3 the sharded
    values are read whole, so every process must call ``extract`` (each gets the same delta).
    """
    info = prepared(model)
    sync(model)
    delta = Delta()
    for name, module in info.entry_modules.items():
        state = state_of(module, name.rpartition(".")[2])
        kind, idx, values = state.export(module)
        delta.shapes[name] = logical_shape(getattr(module, state.param_name))
        if kind == "entries":
            delta.entries[name] = (idx, values)
        else:
            delta.blocks(kind)[name] = (idx, values)
    params = dict(model.named_parameters())
    for name in info.dense:
        p = full_tensor(params[name]).detach()
        delta.shapes[name] = tuple(p.shape)
        change = _exact_change(p, info.dense_base.get(name))
        if change is None:
            delta.full[name] = p.float().cpu().clone()
        else:
            delta.dense[name] = change
    if scores is not None:
        for name, (idx, _) in delta.entries.items():
            planned = scores.entries.get(name)
            if name in scores.scores and planned is not None and torch.equal(planned.to(torch.int64), idx):
                delta.scores[name] = scores.scores[name].float().clone()
    base = base_identity(model, exclude=delta.full, saved=base_overlay(model))
    delta.meta = {"base": base, "plan": info.meta, **meta}
    return delta


def _exact_change(trained: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor | None:
    """``trained - base`` such that ``apply`` (base + change summed in float64, rounded once to
    the parameter's dtype) gives ``trained`` back bit for bit, or None if no change can.

    Float32 where the float32 change adds back exactly (nearly every value); the exact float64
    difference where it does not (a value that changed sign or moved far from a small base).
    The result is float64 only if some value needs it; a delta file then stores it as float32
    plus those few values exactly (see :meth:`surgical.Delta.save`).
    """
    if base is None:
        return None
    now = trained.to("cpu")
    exact = now.double() - base.double()  # the difference of two float32 values is exact here
    rounded = exact.to(torch.float32)
    ok = base.double().add(rounded.double()).to(now.dtype) == now
    if bool(ok.all()):
        return rounded
    change = torch.where(ok, rounded.double(), exact)
    if not torch.equal(base.double().add(change).to(now.dtype), now):
        return None
    return change
