"""Compact storage of sorted entry indices.

Sorted unique flat indices are stored as gaps (``index[i] - index[i-1]``, with a virtual
``index[-1] = -1`` so every gap is at least 1) in 16 bits. A gap that does not fit is stored as 0
in the 16-bit stream and its true value goes to an int64 overflow list, in order. At densities
above 1/65535 nearly every gap fits, so an index costs two bytes.
"""

from __future__ import annotations

import torch

_U16_MAX = 65535


def encode_indices(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodes sorted unique int64 indices as (16-bit gaps stored as int16, int64 overflow)."""
    indices = indices.to(torch.int64).cpu()
    if (
        indices.numel()
        and not bool((indices[1:] > indices[:-1]).all())
        or (indices.numel() and int(indices[0]) < 0)
    ):
        raise ValueError("indices must be sorted, unique and non-negative")
    gaps = torch.diff(indices, prepend=torch.tensor([-1], dtype=torch.int64))
    big = gaps > _U16_MAX
    overflow = gaps[big].clone()
    gaps = torch.where(big, torch.zeros_like(gaps), gaps)
    return gaps.to(torch.int32).to(torch.int16), overflow  # int16 holds the uint16 bit pattern


def decode_indices(gaps: torch.Tensor, overflow: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_indices`."""
    g = gaps.to(torch.int64) & 0xFFFF
    zero = g == 0
    if int(zero.sum()) != overflow.numel():
        raise ValueError("index stream and overflow list disagree")
    g[zero] = overflow.to(torch.int64)
    return torch.cumsum(g, 0) - 1
