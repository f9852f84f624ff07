"""The concatenation-free exact top-k against a plain sort."""

from __future__ import annotations

import pytest
import torch

from surgical.select.topk import sortable_keys, topk_masks


def test_keys_preserve_float_order():
    x = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 7.5, float("inf")])
    keys = sortable_keys(x)
    assert bool((keys[1:] >= keys[:-1]).all()) and int(keys[3]) < int(keys[4])  # -0.0 just below 0.0


@pytest.mark.parametrize("trial", range(40))
def test_exactly_k_largest_with_ties_to_the_earliest(trial):
    g = torch.Generator().manual_seed(trial)
    tensors = [torch.randn(int(torch.randint(1, 60, (1,), generator=g)), generator=g) for _ in range(4)]
    if trial % 2:
        tensors = [t.round().abs() for t in tensors]  # many ties, many zeros
    flat = torch.cat(tensors)
    k = int(torch.randint(0, flat.numel() + 1, (1,), generator=g))
    got = torch.cat(topk_masks(tensors, k))
    # reference: stable descending sort, so equal values keep tensor order then position
    want = torch.zeros_like(got)
    want[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    assert torch.equal(got, want)
