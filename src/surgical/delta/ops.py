"""Moving deltas in and out of models: ``extract`` and ``apply``."""

from __future__ import annotations

import torch
from torch import nn

from surgical.delta.delta import FINGERPRINT_SAMPLE, Delta, base_fingerprint, fingerprint_of
from surgical.errors import SurgicalError
from surgical.train.prepare import prepared, sync


def extract(model: nn.Module, **meta) -> Delta:
    """The delta a prepared model has trained so far (a copy; training may go on).

    Entry tensors hold the trained deltas; the plan's densely trained parameters are stored in
    full. ``meta`` is merged into the delta's metadata (e.g. a training summary).
    """
    info = prepared(model)
    sync(model)
    delta = Delta()
    samples = {}
    for name, module in info.entry_modules.items():
        state = module._sg_entries
        idx = state.indices(module).detach().cpu().clone()
        delta.entries[name] = (idx, state.delta(module).detach().float().cpu().clone())
        delta.shapes[name] = tuple(module.weight.shape)
        samples[name] = (delta.shapes[name], state.orig(module)[:FINGERPRINT_SAMPLE])
    params = dict(model.named_parameters())
    for name in info.plan.dense:
        delta.full[name] = params[name].detach().float().cpu().clone()
        delta.shapes[name] = tuple(params[name].shape)
    config = getattr(model, "config", None)
    delta.meta = {
        "base": {
            "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
            "model_type": getattr(config, "model_type", None),
            "architecture": type(model).__name__,
            "num_labels": getattr(config, "num_labels", None),
            "fingerprint": fingerprint_of(samples),
        },
        "plan": info.plan.meta,
        **meta,
    }
    return delta


@torch.no_grad()
def apply(model: nn.Module, delta: Delta, *, force: bool = False) -> nn.Module:
    """Adds a delta to a base model in place and returns it.

    Args:
        model: A plain (unprepared) model of the architecture the delta was trained on.
        delta: The delta to apply.
        force: Apply even if the base fingerprint differs from the one recorded at training.

    Raises:
        SurgicalError: if a parameter is missing or has another shape, or the base differs.
    """
    if getattr(model, "_sg_prepared", None) is not None:
        raise SurgicalError(
            "cannot apply a delta to a prepared model", "Call surgical.unprepare(model) first"
        )
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
    expected = delta.meta.get("base", {}).get("fingerprint")
    if expected and not force:
        got = base_fingerprint(model, delta)
        if got != expected:
            base_name = delta.meta.get("base", {}).get("name_or_path") or "?"
            here = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "?")
            raise SurgicalError(
                f"this model ({here}, fingerprint {got}) is not the base the delta was trained on "
                f"({base_name}, fingerprint {expected})",
                "Load the right base model, or pass force=True / --force to apply anyway",
            )
    for name, (idx, vals) in delta.entries.items():
        flat = params[name].data.view(-1)
        i = idx.to(flat.device)
        flat.index_copy_(0, i, torch.add(flat.index_select(0, i), vals.to(flat.device, flat.dtype)))
    for name, t in delta.full.items():
        params[name].data.copy_(t.to(params[name].device, params[name].dtype))
    return model
