"""``prepare``: make exactly a plan's parameters trainable, at the memory floor.

After ``prepare(model, plan)``:
- every parameter not in the plan has ``requires_grad=False`` (no gradient, no optimizer state);
- each planned Linear weight is frozen and gets a ``weight_sg_delta`` parameter holding the k
  trainable values (see :mod:`surgical.train.sparse`);
- the plan's dense parameters train as usual.

So ``[p for p in model.parameters() if p.requires_grad]`` is exactly what an optimizer needs,
and the HF ``Trainer`` picks the same set by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from surgical.errors import SurgicalError
from surgical.select.plan import Plan
from surgical.train.sparse import EntryState, attach_entries, detach_entries, sync_entries
from surgical.train.structured import attach_block


@dataclass
class Prepared:
    """What ``prepare`` recorded on the model (``model._sg_prepared``)."""

    plan: Plan
    entry_modules: dict[str, nn.Module]  # parameter name -> module holding it


def _module_of(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    mname, _, pname = param_name.rpartition(".")
    try:
        module = model.get_submodule(mname) if mname else model
    except AttributeError:
        module = None
    if module is None or not isinstance(getattr(module, pname, None), torch.Tensor):
        raise SurgicalError(
            f"the plan names parameter {param_name!r}, which this model does not have",
            "Use the plan with the base model it was selected on",
        )
    return module, pname


def check_plan(model: nn.Module, plan: Plan) -> None:
    """Raises a SurgicalError if the plan does not fit the model (names, shapes, indices)."""
    params = dict(model.named_parameters())
    for name, shape in plan.shapes.items():
        if name not in params:
            _module_of(model, name)  # raises with the standard message
        if tuple(params[name].shape) != tuple(shape):
            raise SurgicalError(
                f"the plan was made for another model: {name!r} has shape {tuple(shape)} in the "
                f"plan but {tuple(params[name].shape)} in this model",
                "Use the plan with the base model it was selected on",
            )
    for name in plan.sparse_names:
        idx = plan.entry_indices(name)
        if idx.numel() and int(idx.max()) >= params[name].numel():
            raise SurgicalError(f"plan indices for {name!r} are out of range", "Re-run selection")


def _check_untied(model: nn.Module, module: nn.Module, name: str) -> None:
    """Embedding rows are trained through the lookup only: refuse a weight another module uses."""
    users = [m for m in model.modules() if getattr(m, "weight", None) is module.weight]
    if len(users) > 1:
        raise SurgicalError(
            f"{name!r} is tied to another module (e.g. the LM head), so its rows cannot be trained "
            "through the embedding alone",
            "Train the tied weight densely (list it under 'always'), or untie the embeddings",
        )


def _kind(model: nn.Module, plan: Plan, name: str) -> str:
    """How a sparse plan entry trains ("entries", "rows", "cols"), or a SurgicalError."""
    module, pname = _module_of(model, name)
    kind = "rows" if name in plan.rows else "cols" if name in plan.cols else "entries"
    if isinstance(module, nn.Embedding) and pname == "weight" and kind == "rows":
        _check_untied(model, module, name)  # token rows
    elif not isinstance(module, nn.Linear) or pname != "weight":
        raise SurgicalError(
            f"entries, rows and columns train nn.Linear weights (and nn.Embedding rows), not {name!r}",
            "Train that parameter densely (list it under 'always')",
        )
    return kind


def prepare(model: nn.Module, plan: Plan) -> nn.Module:
    """Makes exactly the plan's entries and dense parameters trainable; returns the model.

    Raises:
        SurgicalError: if the model is already prepared or the plan does not fit it.
    """
    if getattr(model, "_sg_prepared", None) is not None:
        raise SurgicalError("this model is already prepared", "Call surgical.unprepare(model) first")
    check_plan(model, plan)
    kinds = {name: _kind(model, plan, name) for name in plan.sparse_names}  # validate all first
    for p in model.parameters():
        p.requires_grad_(False)
    entry_modules: dict[str, nn.Module] = {}
    for name, kind in kinds.items():
        module, _ = _module_of(model, name)
        if kind == "rows":  # dense sub-blocks: one small matmul (or index_add) for the gradient
            attach_block(module, plan.rows[name], axis=0)
        elif kind == "cols":
            attach_block(module, plan.cols[name], axis=1)
        else:
            attach_entries(module, plan.entries[name])
        entry_modules[name] = module
    params = dict(model.named_parameters())
    for name in plan.dense:
        params[name].requires_grad_(True)
    model._sg_prepared = Prepared(plan=plan, entry_modules=entry_modules)
    return model


def prepared(model: nn.Module) -> Prepared:
    """The record ``prepare`` left on the model, or a SurgicalError if there is none."""
    info = getattr(model, "_sg_prepared", None)
    if info is None:
        raise SurgicalError("this model was not prepared", "Call surgical.prepare(model, plan) first")
    return info


def sync(model: nn.Module) -> None:
    """Writes every trained delta into its weight, so the weights hold the fine-tuned values.

    Forward passes do this lazily; call it before reading weights or a state dict directly.
    """
    for module in prepared(model).entry_modules.values():
        sync_entries(module, module._sg_entries)


def unprepare(model: nn.Module) -> nn.Module:
    """Removes the delta parameters, leaving a plain model that holds the fine-tuned weights."""
    info = prepared(model)
    for module in info.entry_modules.values():
        detach_entries(module)
    del model._sg_prepared
    return model


def entry_state(module: nn.Module) -> EntryState:
    """The entry bookkeeping of a prepared Linear."""
    return module._sg_entries


def trainable_count(model: nn.Module) -> int:
    """Number of trainable values (delta entries plus dense parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
