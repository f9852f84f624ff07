"""The WiSE-FT sweep's choice: best validation score, ties to the larger alpha, and with a
forgetting budget only among the alphas whose KL on the reference is within it."""

from __future__ import annotations

import pytest

from surgical.core.errors import SurgicalError
from surgical.recipes.searches import choose_alpha


def _points(rows):
    return [{"alpha": a, "score": s, "results": {"reference": {"kl": k}}} for a, s, k in rows]


POINTS = _points([(0.0, 0.60, 0.0), (0.5, 0.75, 0.002), (0.75, 0.80, 0.0045), (1.0, 0.80, 0.008)])


def test_without_a_budget_the_best_score_wins_and_ties_go_to_the_larger_alpha():
    assert choose_alpha(POINTS)["alpha"] == 1.0


def test_a_budget_rules_out_the_points_above_it():
    assert choose_alpha(POINTS, max_kl=0.005)["alpha"] == 0.75
    assert choose_alpha(POINTS, max_kl=0.0045)["alpha"] == 0.75  # at the budget is within it
    assert choose_alpha(POINTS, max_kl=0.003)["alpha"] == 0.5
    assert choose_alpha(POINTS, max_kl=0.0)["alpha"] == 0.0


def test_a_budget_no_point_meets_names_the_lowest_kl():
    with pytest.raises(SurgicalError, match=r"within max_kl 0.001 \(the lowest, 0.002, is at alpha 0.5\)"):
        choose_alpha(POINTS[1:], max_kl=0.001)
