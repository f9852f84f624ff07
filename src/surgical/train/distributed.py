"""FSDP2 for prepared models: frozen weights sharded, the trained entries added in the forward pass.

``shard(model)`` applies PyTorch's ``fully_shard`` (FSDP2) to every numbered transformer block
and then to the whole model, after checking what makes that sound:

- a process group of at least two processes (torchrun / accelerate launch); on one process
  sharding saves nothing and is refused;
- a model prepared with ``additive=True`` (or on a quantized base): FSDP2 keeps one shard of each
  weight per process and gathers it afresh for every forward and backward pass, so the in-place
  path's write into the weight would be lost; the additive path never writes the weight
  (:mod:`surgical.train.additive`);
- quantized weights only in a format FSDP2 can split and gather (torchao NF4, whose blocks and
  scales split by rows), with rows and scales that divide evenly between the processes.

FSDP2 then shards everything it manages: the frozen weights (each process holds 1/N of them
between passes), the delta parameters and their gradients (reduce-scattered) and so the
optimizer state. ``surgical.extract`` reads the sharded deltas whole, which is a collective:
every process must call it (any process may then save the delta; they hold the same one).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.names import split_layer
from surgical.core.tensors import is_quantized
from surgical.train.prepare import prepared
from surgical.train.state import stateful_modules


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The numbered transformer blocks (``layers.0``, ``h.3``, ...), outermost matches only."""
    out, chosen = [], []
    for name, module in model.named_modules():  # outer modules come first
        prefix, rest = split_layer(f"{name}.x")
        if prefix is None or rest != "x" or any(name.startswith(f"{c}.") for c in chosen):
            continue
        chosen.append(name)
        out.append(module)
    return out[::-1]  # FSDP2 shards inner modules before the ones that hold them


def shard(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """Shards a prepared model with FSDP2 ``fully_shard``: each transformer block, then the root.

    Args:
        model: A model prepared with ``surgical.prepare(model, plan, additive=True)`` (or whose
            trained weights are quantized), on the device it will train on.
        fsdp_kwargs: Passed to every ``fully_shard`` call (``mesh``, ``mp_policy``,
            ``reshard_after_forward``, ...).

    Returns:
        The model (its class swapped for FSDP's, as ``fully_shard`` does).

    Raises:
        SurgicalError: no process group of at least two processes, a model not prepared, one
            with a state that writes its weight in place, or quantized weights FSDP2 cannot shard.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        n = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        raise SurgicalError(
            f"FSDP sharding needs at least 2 processes, this run has {n}",
            "Launch with torchrun --nproc_per_node N (or accelerate launch) and call "
            "torch.distributed.init_process_group first, or train without sharding",
        )
    prepared(model)  # raises if not prepared
    in_place = [f"{n}.{st.param_name}".lstrip(".") for n, _, st in stateful_modules(model) if st.in_place]
    if in_place:
        raise SurgicalError(
            f"{in_place[0]!r} (and {len(in_place) - 1} more) trains by writing its weight, which FSDP "
            "sharding would lose",
            "Prepare with surgical.prepare(model, plan, additive=True) (entries of Linear weights and "
            "dense parameters only)",
        )
    _check_quantized(model, dist.get_world_size())
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


#: the parts of a torchao NF4 weight that FSDP2 splits by rows (values, block scales, their scales)
_NF4_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor")


def _check_quantized(model: nn.Module, world: int) -> None:
    """Raises unless every quantized weight of ``model`` can be split between ``world`` processes:
    a format that tells FSDP2 how to gather it (torchao NF4; not torchao int8 nor bitsandbytes),
    with its rows and each of its parts a multiple of ``world``."""
    for name, p in model.named_parameters():
        if not is_quantized(p):
            continue
        if not hasattr(type(p), "fsdp_pre_all_gather"):
            raise SurgicalError(
                f"{name!r} is quantized as {type(p).__name__}, which FSDP2 cannot shard",
                "Quantize with backend torchao and bits 4 (NF4, surgical.quantize_base(model, bits=4)) "
                "to shard a quantized base, or train on one process",
            )
        inner = [getattr(p, a, None) for a in _NF4_PARTS]
        parts = [p.shape[0]] + [t.numel() for t in inner if torch.is_tensor(t)]
        if any(n % world for n in parts):
            raise SurgicalError(
                f"{name!r} (NF4, {p.shape[0]} rows, {parts[-1]} scales) does not split evenly between "
                f"{world} processes",
                "Use a process count that divides both, or keep it in full precision (quantization exclude)",
            )
