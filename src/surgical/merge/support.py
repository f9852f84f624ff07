"""The union support of one tensor across several deltas: what every merge method works on.

For one parameter, each delta's change is laid out over the *union* of the deltas' supports, as
a matrix ``values`` of shape ``(n_deltas, m)`` with zeros where a delta does not touch a value:

- all changes are row blocks (or all column blocks): the union of the rows (columns), ``m`` =
  rows x row width; the result is a block again;
- any change is dense: the whole tensor, ``m`` = numel (it was dense already);
- otherwise (entries, or entries mixed with blocks): the union of the flat indices.

Nothing the size of a base weight is allocated for sparse kinds: a merge costs time and memory
proportional to the changed values. Since values outside the union are zero in every delta,
an elementwise method gives on the union exactly what it gives on the densified deltas, and
methods that rank values over the whole tensor (TIES' top-k, DELLA's ranks) count the zeros
outside the union as the smallest values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from surgical.core.blocks import BLOCK_KINDS, flat_indices
from surgical.delta.algebra import entries_of
from surgical.delta.container import DeltaData


@dataclass
class TensorMerge:
    """One tensor's changes over their union support, and what a method needs to merge them.

    Attributes:
        name: Parameter name.
        shape: The parameter's shape.
        kind: ``entries``, ``rows``, ``cols`` or ``dense``: how the result is stored.
        index: Entries: sorted flat indices (m); rows/cols: sorted row/column indices; dense: None.
        values: ``(n, m)`` float32 changes, zero where a delta does not touch the value.
        weights: ``(n,)`` float32 per-delta weights.
        options: The method's options, checked and completed.
        present: ``(n,)`` bool: which deltas change this tensor at all.
        importance: ``(n, m)`` importance scores laid out like ``values`` (methods that declare
            ``needs_scores``), zero where a delta stores no score.
        scored: ``(n,)`` bool: which deltas carry scores for this tensor.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    index: torch.Tensor | None
    values: torch.Tensor
    weights: torch.Tensor
    options: dict[str, Any] = field(default_factory=dict)
    present: torch.Tensor | None = None
    importance: torch.Tensor | None = None
    scored: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        """Values in the whole tensor (the union holds ``values.shape[1]`` of them)."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    def flat_positions(self) -> torch.Tensor:
        """The flat position in the whole tensor of each union value (for per-position draws)."""
        if self.kind == "dense":
            return torch.arange(self.numel, dtype=torch.int64)
        if self.kind == "entries":
            return self.index
        return flat_indices(self.kind, self.index, self.shape)


def stack(deltas: list[DeltaData], name: str, weights: torch.Tensor, options: dict[str, Any]) -> TensorMerge:
    """The changes of ``name`` in ``deltas`` (added kinds only) over their union support."""
    shape = next(tuple(d.shapes[name]) for d in deltas if name in d.shapes)
    kinds = [d.kind_of(name) if name in d.names() else None for d in deltas]
    present = torch.tensor([k is not None for k in kinds])
    used = {k for k in kinds if k is not None}
    n = len(deltas)
    if "dense" in used:
        numel = int(torch.Size(shape).numel())
        values = torch.zeros(n, numel, dtype=torch.float32)
        for i, d in enumerate(deltas):
            if kinds[i] == "dense":
                values[i] = d.dense[name].float().reshape(-1)
            elif kinds[i] is not None:
                idx, vals = entries_of(d, name)
                values[i, idx] = vals.float()
        return TensorMerge(name, shape, "dense", None, values, weights, options, present)
    if len(used) == 1 and next(iter(used)) in BLOCK_KINDS:
        kind = next(iter(used))
        axis = BLOCK_KINDS[kind]
        union = torch.unique(
            torch.cat([d.blocks(kind)[name][0] for d, k in zip(deltas, kinds, strict=True) if k])
        )
        blocks = []
        for d, k in zip(deltas, kinds, strict=True):
            block_shape = list(shape)
            block_shape[axis] = union.numel()
            full = torch.zeros(block_shape, dtype=torch.float32)
            if k:
                idx, block = d.blocks(kind)[name]
                full.index_copy_(axis, torch.searchsorted(union, idx), block.float())
            blocks.append(full.reshape(-1))
        return TensorMerge(name, shape, kind, union, torch.stack(blocks), weights, options, present)
    parts = [entries_of(d, name) if k else None for d, k in zip(deltas, kinds, strict=True)]
    union = torch.unique(torch.cat([p[0] for p in parts if p is not None]))
    values = torch.zeros(n, union.numel(), dtype=torch.float32)
    for i, p in enumerate(parts):
        if p is not None:
            values[i, torch.searchsorted(union, p[0])] = p[1].float()
    return TensorMerge(name, shape, "entries", union, values, weights, options, present)


def unstack(t: TensorMerge, merged: torch.Tensor, out: DeltaData) -> None:
    """Stores the merged values of ``t`` (shape ``(m,)``) in ``out`` in ``t.kind``.

    Entries keep only non-zero values; blocks and dense tensors keep their layout.
    """
    out.shapes[t.name] = t.shape
    if t.kind == "dense":
        out.dense[t.name] = merged.reshape(t.shape).clone()
    elif t.kind == "entries":
        keep = merged != 0
        if bool(keep.any()):
            out.entries[t.name] = (t.index[keep].clone(), merged[keep].clone())
        else:
            del out.shapes[t.name]
    else:
        axis = BLOCK_KINDS[t.kind]
        block_shape = list(t.shape)
        block_shape[axis] = t.index.numel()
        out.blocks(t.kind)[t.name] = (t.index.clone(), merged.reshape(block_shape).clone())


def hashed_uniform(seed: int, name: str, positions: torch.Tensor, which: int) -> torch.Tensor:
    """Uniform [0, 1) numbers, one per (seed, tensor name, flat position, delta number).

    A draw depends on where the value sits, not on which other values are stored, so a sparse
    merge draws exactly what the same merge of the densified deltas draws (a splitmix64 hash).
    """
    salt = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & 0x7FFFFFFFFFFFFFFF
    x = positions.to(torch.int64) ^ ((seed * 0x9E3779B1 + which * 0x85EBCA77 + salt) & 0x7FFFFFFFFFFFFFFF)
    for mul, shift in ((0x1CE4E5B9, 30), (0x133111EB, 27)):  # multipliers kept in int64 range
        x = x ^ (x >> shift)
        x = x * mul
    x = x ^ (x >> 31)
    return (x & ((1 << 53) - 1)).to(torch.float64).div_(float(1 << 53)).to(torch.float32)
