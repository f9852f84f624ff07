"""Export to a PEFT SHiRA adapter, so PEFT users load our deltas with ``PeftModel.from_pretrained``.

SHiRA stores, per adapted ``nn.Linear``, a list of (row, col) indices and one value per index,
and requires every layer to hold exactly ``r * (in_features + out_features)`` values for one
global ``r``. Our entries (and rows and columns of Linear weights, expanded to their entries)
are therefore padded with zero-valued entries up to that count (which changes nothing
numerically). Everything SHiRA cannot express (dense and replaced tensors, entries or rows on
non-Linear parameters such as Embedding token rows) goes to ``modules_to_save``: PEFT then
stores those modules whole, with the delta applied. The file costs SHiRA's ~12 bytes per value
(int32 row and column, fp32 value) against our ~4 for entries and ~2 for rows (bfloat16).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.io import atomic_dir
from surgical.core.marks import forget_applied
from surgical.core.registry import Registry
from surgical.delta.algebra import entries_of
from surgical.delta.base import check_base
from surgical.delta.delta import Delta
from surgical.delta.ops import applied

Exporter = Callable[..., Path]

EXPORT_FORMATS: Registry[Exporter] = Registry("export format")
"""Formats a delta can be written to for other libraries: ``name -> fn(delta, base, out, force=)``."""


def _shira_layers(model: nn.Module, delta: Delta) -> tuple[dict[str, nn.Linear], set[str]]:
    """Modules adaptable by SHiRA (entries, rows or columns of a Linear weight) and modules to save whole."""
    linear: dict[str, nn.Linear] = {}
    whole: set[str] = set()
    sparse = {*delta.entries, *delta.rows, *delta.cols}
    for name in delta.names():
        module_name, _, pname = name.rpartition(".")
        module = model.get_submodule(module_name)
        if name in sparse and pname == "weight" and isinstance(module, nn.Linear):
            linear[module_name] = module
        else:
            whole.add(module_name)
    for module_name in whole:
        linear.pop(module_name, None)
    if "" in whole:
        raise SurgicalError("the delta changes a top-level parameter", "PEFT can only save whole submodules")
    return linear, whole


@EXPORT_FORMATS.register("peft-shira", help="a PEFT SHiRA adapter, loadable with PeftModel.from_pretrained")
def export_shira(delta: Delta, base: nn.Module, out: str | Path, *, force: bool = False) -> Path:
    """Writes ``delta`` as a PEFT SHiRA adapter directory loadable on ``base``.

    Args:
        delta: The delta to export.
        base: The base model (left unchanged; a copy is wrapped by PEFT).
        out: Adapter directory, written atomically.
        force: Export even if the base fingerprint differs.

    Raises:
        SurgicalError: if peft is missing, the base does not fit, or no single SHiRA ``r`` can
            hold the densest layer's entries.
    """
    try:
        from peft import ShiraConfig, get_peft_model
    except ImportError:
        raise SurgicalError("exporting to PEFT needs the peft package", "pip install 'peft>=0.17'") from None
    check_base(base, delta, force=force)
    linear, whole = _shira_layers(base, delta)
    if not linear and not any(
        isinstance(base.get_submodule(n.rpartition(".")[0]), nn.Linear) for n in delta.names() if "." in n
    ):
        raise SurgicalError(
            "the delta changes no nn.Linear weight, and SHiRA adapts nn.Linear layers only",
            "Write a full model with `surgical apply` instead",
        )
    if not linear:  # PEFT refuses an adapter that targets no module
        raise SurgicalError(
            "no Linear weight of this delta can become SHiRA: each one's module also has another "
            "changed tensor (e.g. a densely trained bias), and PEFT saves such modules whole",
            "Export a delta trained without dense biases, or write a full model with `surgical apply`",
        )
    entries = {name: entries_of(delta, f"{name}.weight") for name in linear}
    r = 1
    for module_name, m in linear.items():
        k = entries[module_name][0].numel()
        r = max(r, -(-k // (m.in_features + m.out_features)))
    for module_name, m in linear.items():
        if r * (m.in_features + m.out_features) > m.in_features * m.out_features:
            raise SurgicalError(
                f"SHiRA needs r={r} for the densest layer, more values than {module_name!r} has",
                "Export a sparser delta (delta.prune(...)) or fewer layers",
            )
    padded = {
        name: _pad(entries[name], r * (m.in_features + m.out_features), m) for name, m in linear.items()
    }
    with applied(base, delta, force=True):  # values of the modules PEFT saves whole
        saved = {
            n: {k: v.detach().clone() for k, v in base.get_submodule(n).state_dict().items()} for n in whole
        }

    def mask_fn(layer: nn.Module, r: int, **kwargs) -> torch.Tensor:
        idx, _ = padded[by_weight[id(layer.weight)]]
        mask = torch.zeros(layer.weight.numel(), dtype=layer.weight.dtype, device=layer.weight.device)
        mask[idx.to(mask.device)] = 1
        return mask.view_as(layer.weight)

    model = copy.deepcopy(base)
    forget_applied(model)
    by_weight = {id(model.get_submodule(name).weight): name for name in linear}
    config = ShiraConfig(r=r, target_modules=sorted(linear), modules_to_save=sorted(whole) or None)
    config.mask_fn = mask_fn
    with warnings.catch_warnings():  # PEFT asks transformers a deprecated question; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, (_, vals) in padded.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.shira_weight["default"].copy_(vals.to(layer.shira_weight["default"].dtype))
        for name, state in saved.items():
            wrapper = peft_model.base_model.model.get_submodule(name)
            wrapper.modules_to_save["default"].load_state_dict(state)
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(str(tmp))
    return Path(out)


def _pad(entries: tuple[torch.Tensor, torch.Tensor], count: int, layer: nn.Linear):
    """Entries padded with zero values at the first unused positions, to ``count`` entries."""
    idx, vals = entries
    need = count - idx.numel()
    if need == 0:
        return idx, vals.float()
    used = torch.zeros(layer.weight.numel(), dtype=torch.bool)
    used[idx] = True
    extra = (~used).nonzero().reshape(-1)[:need]
    all_idx = torch.cat([idx, extra])
    order = all_idx.argsort()
    return all_idx[order], torch.cat([vals.float(), torch.zeros(need)])[order]
