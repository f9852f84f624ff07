"""Exact top-k over many score tensors without concatenating them (a two-pass radix select).

``torch.topk`` over one concatenation of every score would copy all scores and, on CPU, keep
value/index pairs for them: for a 135M-parameter model that is over a gigabyte on top of the
scores, more than the scoring itself. Instead each fp32 score is mapped to an order-preserving
32-bit key, and two histogram passes over the tensors (high 16 bits, then low 16 bits among the
keys that share the winning prefix) find the k-th largest key exactly. Memory: one tensor's
temporaries at a time plus the boolean masks.

Ties at the threshold go to the earliest entries (tensor order, then flat position), so the
result is deterministic and exactly k entries are chosen.
"""

from __future__ import annotations

import torch

_HALF = 1 << 16


def sortable_keys(scores: torch.Tensor) -> torch.Tensor:
    """Maps fp32 values to int32 keys with the same order (NaN above +inf), without a copy in fp32."""
    bits = scores.float().contiguous().reshape(-1).view(torch.int32)
    # negative floats: flip the magnitude bits so that more negative sorts lower
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _high(keys: torch.Tensor) -> torch.Tensor:
    return (keys >> 16) + (_HALF // 2)  # arithmetic shift: [-32768, 32767] -> [0, 65535]


def _threshold(tensors: list[torch.Tensor], k: int) -> tuple[int, int]:
    """The k-th largest key T and how many entries with key == T are needed."""
    hist = torch.zeros(_HALF, dtype=torch.int64)
    for s in tensors:
        hist += torch.bincount(_high(sortable_keys(s)), minlength=_HALF)
    high, above = _pick(hist, k)
    hist.zero_()
    for s in tensors:
        keys = sortable_keys(s)
        hist += torch.bincount(keys[_high(keys) == high] & (_HALF - 1), minlength=_HALF)
    low, above_low = _pick(hist, k - above)
    return ((high - _HALF // 2) << 16) | low, k - above - above_low


def _pick(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bucket holding the k-th largest element, and the number of elements above that bucket."""
    from_top = torch.flip(hist, [0]).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor(k)))  # first cumulative count >= k
    bucket = _HALF - 1 - i
    above = int(from_top[i - 1]) if i > 0 else 0
    return bucket, above


def topk_masks(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean masks (one per flattened tensor) marking exactly the k largest values overall."""
    total = sum(int(t.numel()) for t in tensors)
    if k >= total:
        return [torch.ones(t.numel(), dtype=torch.bool) for t in tensors]
    if k <= 0:
        return [torch.zeros(t.numel(), dtype=torch.bool) for t in tensors]
    threshold, ties = _threshold(tensors, k)
    masks = []
    for s in tensors:
        keys = sortable_keys(s)
        mask = keys > threshold
        if ties > 0:
            equal = torch.nonzero(keys == threshold).flatten()[:ties]
            mask[equal] = True
            ties -= int(equal.numel())
        masks.append(mask)
    return masks
