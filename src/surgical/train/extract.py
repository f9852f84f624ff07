"""``extract``: the delta a prepared model has trained so far.

It lives with the training state because only the states know where their values are; the
delta layer below knows nothing of training.
"""

from __future__ import annotations

from torch import nn

from surgical.core.fingerprint import base_identity
from surgical.delta.delta import Delta
from surgical.train.prepare import base_overlay, prepared, sync
from surgical.train.state import state_of


def extract(model: nn.Module, **meta) -> Delta:
    """The delta a prepared model has trained so far (a copy; training may go on).

    Entry weights become ``entries``; weights trained as row or column blocks (Linear rows and
    columns, Embedding token rows) become ``rows`` / ``cols`` holding the block as trained. The
    plan's densely trained parameters are stored in full. ``meta`` is merged into the delta's
    metadata (e.g. a training summary).
    """
    info = prepared(model)
    sync(model)
    delta = Delta()
    for name, module in info.entry_modules.items():
        state = state_of(module)
        kind, idx, values = state.export(module)
        delta.shapes[name] = tuple(getattr(module, state.param_name).shape)
        if kind == "entries":
            delta.entries[name] = (idx, values)
        else:
            delta.blocks(kind)[name] = (idx, values)
    params = dict(model.named_parameters())
    for name in info.dense:
        delta.full[name] = params[name].detach().float().cpu().clone()
        delta.shapes[name] = tuple(params[name].shape)
    base = base_identity(model, exclude=delta.full, saved=base_overlay(model))
    delta.meta = {"base": base, "plan": info.meta, **meta}
    return delta



