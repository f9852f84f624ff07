"""What kind of tensor a parameter is: plain, sharded (an FSDP2 DTensor, a DeepSpeed ZeRO-3
partition) or quantized.

Training in place and applying a delta write into a weight's values; that only works for a
plain tensor. A ``DTensor`` (FSDP2's ``fully_shard``) holds one shard per process and is
re-gathered for each forward and backward pass; so is a parameter partitioned by DeepSpeed
ZeRO-3 (its ``data`` is empty between passes); a quantized weight (a torchao tensor subclass,
bitsandbytes' ``Params4bit``) holds integers and scales, not the values. The library tells them
apart here, in one place, and reads a sharded tensor whole with :func:`full_tensor`.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

_PLAIN = (torch.Tensor, nn.Parameter)


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it when no
    DTensor can exist yet)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def drop_gathered(model: nn.Module) -> None:
    """Frees the whole (gathered) parameters FSDP2 may still hold for ``model``'s sharded modules,
    so that the next forward gathers the shards afresh.

    FSDP2 keeps the root module's parameters gathered after a forward (the backward needs them
    at once), also after a forward without gradients, and while they are gathered the module's
    parameters *are* the whole tensors: a value written to them then (a base value swapped in)
    is lost when FSDP reshards, and a value written to the shards is not seen by the next forward.
    Call this before writing to a sharded model's parameters and after a forward that should not
    leave them gathered. Nothing to do for a model FSDP2 has not sharded.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    if fsdp is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


def is_plain(t: torch.Tensor) -> bool:
    """Whether ``t`` is an ordinary tensor or parameter, whose values can be written in place."""
    return type(t) in _PLAIN


def is_quantized(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor subclass other than a DTensor: a quantized weight (torchao,
    bitsandbytes), whose stored data are not its values."""
    return isinstance(t, torch.Tensor) and not is_plain(t) and not is_dtensor(t)


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The values a torchao quantized weight stands for, in its dtype (int8 or NF4)."""
    original = getattr(weight, "get_original_weight", None)  # NF4Tensor (its dequantize is static)
    return original() if original is not None else weight.dequantize()


def is_zero3(t: object) -> bool:
    """Whether ``t`` is a parameter partitioned by DeepSpeed ZeRO-3 (it carries ``ds_id``)."""
    return isinstance(t, torch.Tensor) and hasattr(t, "ds_id") and hasattr(t, "ds_shape")


def logical_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole tensor (a ZeRO-3 partition's ``data`` is empty between passes; a
    bitsandbytes 4-bit weight stores packed bytes and keeps its shape in its ``quant_state``)."""
    if is_zero3(t):
        return tuple(t.ds_shape)
    packed = getattr(getattr(t, "quant_state", None), "shape", None)  # bitsandbytes 4-bit: packed bytes
    return tuple(packed) if packed is not None else tuple(t.shape)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a sharded tensor its whole value on every process (detached).

    For a DTensor or a ZeRO-3 parameter this is a collective (every process must call it, in the
    same order) that costs one transient copy of the whole tensor. Pass the parameter itself: a
    ``detach()``-ed ZeRO-3 parameter has lost what marks it.
    """
    if is_dtensor(t):
        return t.detach().full_tensor()
    if is_zero3(t):
        import deepspeed  # present wherever a ZeRO-3 parameter exists

        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return t.detach().clone()
    return t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` (the same value on every process) laid out as ``like``: for a DTensor, each
    process keeps its own part of its own copy (nothing is sent between processes); otherwise
    ``whole`` on ``like``'s device and dtype."""
    whole = whole.to(like.device, like.dtype)
    if not is_dtensor(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)
