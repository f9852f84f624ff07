"""Counts of N-D row plans (conv channels, experts): a row holds every value of shape[1:]."""

from __future__ import annotations

import torch

import surgical as sg
from surgical.select.report import selected_count


def test_rows_of_nd_weights_count_all_their_values():
    plan = sg.Plan(rows={"experts.w": torch.tensor([0, 2])}, shapes={"experts.w": (4, 3, 5)})
    assert plan.num_entries == 2 * 3 * 5 == selected_count(plan, "experts.w")
    flat = sg.Plan(
        rows={"lin.w": torch.tensor([1])},
        cols={"lin.v": torch.tensor([0, 1])},
        shapes={"lin.w": (4, 6), "lin.v": (3, 6)},
    )
    assert flat.num_entries == 6 + 2 * 3
