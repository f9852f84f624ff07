"""Row and column blocks of a delta: the helpers that storage, algebra, apply and export share.

A ``rows`` change of a parameter of shape ``(n, *rest)`` is a pair (sorted unique int64 row
indices, length r; block of shape ``(r, *rest)``) whose block is *added* to those rows. A
``cols`` change of a 2-D weight ``(out, in)`` is (sorted unique column indices, length c; block
``(out, c)``) added to those columns. A row of a Linear weight is an output feature, a column an
input feature, a row of an Embedding a token.

Compared with the same values stored as entries, a block needs no index per value: a row of a
576-wide weight costs one index for 576 values. Flattened in row-major order, a block's values
line up with its flat indices (:func:`flat_indices`) in sorted order, so expanding a block to
entries is a reshape plus one index computation.
"""

from __future__ import annotations

import torch

#: kind -> the axis of the parameter its indices select
BLOCK_KINDS: dict[str, int] = {"rows": 0, "cols": 1}


def block_shape(kind: str, shape: tuple[int, ...], count: int) -> tuple[int, ...]:
    """The shape of a ``kind`` block selecting ``count`` rows or columns of a ``shape`` tensor."""
    if kind == "rows":
        return (count, *shape[1:])
    return (shape[0], count)


def check_block(kind: str, idx: torch.Tensor, block: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raises ValueError (one line) unless ``(idx, block)`` is a well-formed ``kind`` block of ``shape``.

    Checks: the kind fits the tensor (``cols`` need a 2-D weight), indices are 1-D, sorted,
    unique and inside the selected axis, and the block has the matching shape.
    """
    if kind == "cols" and len(shape) != 2:
        raise ValueError(f"columns need a 2-D weight, the tensor is {tuple(shape)}")
    if kind == "rows" and len(shape) < 1:
        raise ValueError("rows need a tensor of at least one dimension")
    axis = BLOCK_KINDS[kind]
    check_sorted_indices(idx, shape[axis], kind[:-1])
    want = block_shape(kind, shape, int(idx.numel()))
    if tuple(block.shape) != want:
        n = int(idx.numel())
        raise ValueError(f"block is {tuple(block.shape)}, {n} {kind} of {tuple(shape)} need {want}")


def check_sorted_indices(idx: torch.Tensor, bound: int, what: str) -> None:
    """Raises ValueError unless ``idx`` is 1-D, strictly increasing and within ``[0, bound)``."""
    if idx.dim() != 1 or idx.is_floating_point():
        raise ValueError(f"{what} indices must be a 1-D integer tensor")
    if idx.numel() == 0:
        return
    if not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{what} indices are not sorted and unique")
    if int(idx[0]) < 0:
        raise ValueError(f"{what} index {int(idx[0])} is negative")
    if int(idx[-1]) >= bound:
        raise ValueError(f"{what} index {int(idx[-1])} is beyond its shape (which has {bound})")


def flat_indices(kind: str, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Sorted flat indices of a block's values in the tensor, in the block's row-major order."""
    idx = idx.to(torch.int64)
    if kind == "rows":
        width = 1
        for s in shape[1:]:
            width *= s
        return (idx[:, None] * width + torch.arange(width, device=idx.device)[None, :]).reshape(-1)
    out_f, in_f = shape
    return (torch.arange(out_f, device=idx.device)[:, None] * in_f + idx[None, :]).reshape(-1)


def to_entries(
    kind: str, idx: torch.Tensor, block: torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block as sorted flat entries ``(indices, float32 values)`` (what format 1 stored)."""
    return flat_indices(kind, idx, shape), block.float().reshape(-1)


def merge_blocks(
    kind: str, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of two blocks of the same kind on one tensor; rows (columns) both hold add."""
    axis = BLOCK_KINDS[kind]
    idx = torch.cat([a[0], b[0]])
    uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    blocks = torch.cat([a[1].float(), b[1].float()], dim=axis)
    shape = list(blocks.shape)
    shape[axis] = uniq.numel()
    return uniq, torch.zeros(shape, dtype=torch.float32).index_add_(axis, inverse, blocks)


def add_block_(dense: torch.Tensor, kind: str, idx: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Adds a block into the full-size tensor ``dense`` in place and returns it."""
    return dense.index_add_(BLOCK_KINDS[kind], idx.to(dense.device), block.to(dense.device, dense.dtype))
