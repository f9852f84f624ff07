"""Mixture-of-experts parameters, recognised from names and shapes.

Two layouts exist:

- **fused**: an experts module (its name ends in a word containing ``experts``, e.g.
  ``model.layers.0.mlp.experts``) holds every expert in 3-D parameters of shape (experts, ...),
  as transformers 5 stores Mixtral, Qwen-MoE and others (``gate_up_proj``, ``down_proj``). Expert
  ``e`` is row ``e`` (dim 0) of each of them.
- **a ModuleList of expert modules**: ``...experts.N.<module>.weight``; expert ``N`` is every
  parameter under ``...experts.N``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

_LIST_EXPERT = re.compile(r"^(.*?(?:^|\.)\w*experts\.\d+)\.")


def _is_experts_module(module_name: str) -> bool:
    return "experts" in module_name.rpartition(".")[2]


def is_fused_expert(name: str, shape: Sequence[int]) -> bool:
    """Whether parameter ``name`` of ``shape`` is a fused expert tensor: 3-D, held directly by an
    experts module."""
    return len(shape) == 3 and _is_experts_module(name.rpartition(".")[0])


def fused_experts_module(name: str) -> str:
    """The experts module that holds the fused expert tensor ``name``."""
    return name.rpartition(".")[0]


def listed_expert(name: str) -> str | None:
    """The expert module (``...experts.N``) a parameter of a ModuleList of experts belongs to, or
    None."""
    m = _LIST_EXPERT.match(name)
    return m.group(1) if m else None


def fused_expert_parameters(model: nn.Module) -> list[str]:
    """Names of every fused expert tensor of ``model`` (floating, 3-D, held by an experts module)."""
    out = []
    for mname, module in model.named_modules():
        if not _is_experts_module(mname):
            continue
        for pname, p in module._parameters.items():
            if p is not None and p.is_floating_point() and p.dim() == 3:
                out.append(f"{mname}.{pname}" if mname else pname)
    return out


def is_expert_parameter(name: str, shape: Sequence[int] | torch.Size) -> bool:
    """Whether ``name`` belongs to one expert (a fused tensor's rows, or a listed expert module)."""
    return is_fused_expert(name, tuple(shape)) or listed_expert(name) is not None
