"""Base identity: a fingerprint of the model a delta was made on.

The fingerprint hashes the names, shapes and a fixed strided sample of values of every parameter
of the base, except the ones the delta replaces (a freshly initialised classification head is
random on every load). Since it does not depend on which entries the delta holds, deltas made on
the same base carry the same fingerprint and stay checkable after composition. Values are hashed
rounded to bfloat16, so the same base loaded in float32, float16 or bfloat16 is recognised.

A model with deltas applied through :func:`surgical.apply` is fingerprinted as its base: the
values saved by each application (:mod:`surgical.core.marks`) stand in for the changed ones. A
prepared model passes the base values its training state saved (``saved``), since only the
training layer knows where they are.

A quantized base (:func:`surgical.train.quantize_base`) is fingerprinted by the full-precision
values recorded before quantizing, so a delta trained on it checks against the full-precision
base it applies to; a sharded (FSDP2, DeepSpeed ZeRO-3) parameter is read whole, which makes
fingerprinting a sharded model a collective that every process must join.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from surgical.core.marks import Saved, applied_stack, quantized_samples
from surgical.core.tensors import full_tensor, is_quantized, logical_shape


@dataclass
class BaseOverlay:
    """What a prepared model changed in place, for fingerprinting it as its base.

    Attributes:
        values: Parameter name -> the base values its training state saved.
        skip: Parameters that are not part of the base (the trainable values themselves).
    """

    values: Mapping[str, Saved] = field(default_factory=dict)
    skip: Iterable[str] = ()


SAMPLE = 64


def sample_positions(numel: int) -> torch.Tensor:
    """The flat positions sampled from a tensor of ``numel`` elements (at most ``SAMPLE``)."""
    if numel <= SAMPLE:
        return torch.arange(numel)
    # integer arithmetic: a float32 linspace rounds past numel - 1 for tensors of ~2**24+ elements
    return torch.arange(SAMPLE, dtype=torch.int64) * (numel - 1) // (SAMPLE - 1)


def base_samples(
    model: nn.Module, exclude: Iterable[str] = (), saved: BaseOverlay | None = None
) -> dict[str, tuple[tuple, torch.Tensor]]:
    """Name -> (shape, sampled base values) for every parameter not in ``exclude``.

    Accounts for what this library changed in place: ``saved`` (what a prepared model's training
    state keeps) and the deltas applied with :func:`surgical.apply`.
    """
    excluded = set(exclude) | (set(saved.skip) if saved else set())
    stack = list(applied_stack(model))
    recorded = quantized_samples(model)
    out = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        if name in excluded:
            continue
        shape = logical_shape(p)
        pos = sample_positions(math.prod(shape)).to(p.device)
        if name in recorded:  # quantized: the full-precision values sampled before quantizing
            vals = recorded[name].float().clone().to(p.device)
        else:
            flat = _readable(p).detach().reshape(-1)
            vals = flat.index_select(0, pos).float().clone()
        overrides = [saved.values[name]] if saved and name in saved.values else []
        # the bottom-most application saved the true base
        overrides += [r.saved[name] for r in reversed(stack) if name in r.saved]
        for idx, old, axis in overrides:
            if axis is not None:  # a row or column block: locate the sampled positions in it
                idx, old = _block_positions(shape, pos, idx, old, axis)
            _override(vals, pos, idx, old)
        out[name] = (shape, vals.cpu())
    return out


def _readable(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``t``'s values: a sharded tensor read whole, a quantized one
    dequantized (values close to, not equal to, the full-precision base's)."""
    t = full_tensor(t)
    if is_quantized(t) and hasattr(t, "dequantize"):
        return t.dequantize()
    return t


def _override(vals: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor | None, orig: torch.Tensor) -> None:
    """Replaces sampled values by saved originals (``idx`` None: ``orig`` is the whole tensor)."""
    if idx is None:
        vals.copy_(orig.reshape(-1).index_select(0, pos.to(orig.device)).float().to(vals.device))
        return
    idx = idx.to(pos.device)
    if idx.numel() == 0:
        return
    at = torch.searchsorted(idx, pos).clamp(max=idx.numel() - 1)
    hit = idx[at] == pos
    if bool(hit.any()):
        vals[hit] = orig.to(vals.device).float()[at[hit]]


def _block_positions(
    shape: tuple[int, ...], pos: torch.Tensor, sel: torch.Tensor, block: torch.Tensor, axis: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Saved block values at the sampled flat positions ``pos`` it covers, as (flat idx, values).

    Costs O(len(pos) log r), never the size of the block: sampled positions are mapped to their
    row (column) and looked up in the sorted selection.
    """
    sel = sel.to(pos.device)
    if sel.numel() == 0:
        return sel, block.reshape(-1)
    width = block[0].numel() if axis == 0 else shape[1]  # values per row of the tensor
    row, col = pos // width, pos % width
    unit = row if axis == 0 else col
    at = torch.searchsorted(sel, unit).clamp(max=sel.numel() - 1)
    hit = sel[at] == unit
    b = block.to(pos.device).reshape(block.shape[0], -1)
    vals = b[at[hit], col[hit]] if axis == 0 else b[row[hit], at[hit]]
    return pos[hit], vals


def fingerprint_of(samples: dict[str, tuple[tuple, torch.Tensor]]) -> str:
    """16 hex digits of a hash over names, shapes and sampled values (rounded to bfloat16)."""
    h = hashlib.sha256()
    for name in sorted(samples):
        shape, values = samples[name]
        h.update(f"{name}{tuple(shape)}".encode())
        h.update(values.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module, exclude: Iterable[str] = (), saved: BaseOverlay | None = None) -> str:
    """Fingerprint of ``model`` as a base, ignoring the parameters in ``exclude``."""
    return fingerprint_of(base_samples(model, exclude, saved))


def base_identity(model: nn.Module, exclude: Iterable[str] = (), saved: BaseOverlay | None = None) -> dict:
    """The ``base`` metadata of a delta made on ``model`` (name, architecture, fingerprint)."""
    config = getattr(model, "config", None)
    excludes = sorted(exclude)
    return {
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "model_type": getattr(config, "model_type", None),
        "architecture": type(model).__name__,
        "num_labels": getattr(config, "num_labels", None),
        "fingerprint": model_fingerprint(model, excludes, saved),
        "fingerprint_excludes": excludes,
    }
