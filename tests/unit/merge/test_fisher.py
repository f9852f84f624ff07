"""Fisher merging: per-value weights from the scores a delta carries, from selection to file."""

from __future__ import annotations

import pytest
import torch
from test_merge import SHAPE, W, dense_of, entries

import surgical as sg
from conftest import cls_batches, tiny_bert
from surgical.core.errors import SurgicalError


def scored(idx, vals, scores):
    d = entries(idx, vals)
    d.scores[W] = torch.tensor(scores, dtype=torch.float32)
    return d


def test_fisher_weights_each_value_by_its_scores():
    a = scored([0, 3], [1.0, 2.0], [3.0, 1.0])
    b = scored([3, 5], [4.0, -1.0], [1.0, 2.0])
    out = dense_of(sg.merge([a, b], "fisher")).reshape(-1)
    assert out[0] == 1.0 and out[5] == -1.0  # one delta: its value
    assert out[3] == pytest.approx((1 * 2.0 + 1 * 4.0) / 2)
    c = scored([3], [4.0], [3.0])  # a more important change pulls harder
    assert dense_of(sg.merge([a, c], "fisher")).reshape(-1)[3] == pytest.approx((1 * 2.0 + 3 * 4.0) / 4)


def test_deltas_without_scores_count_by_weight_or_are_refused():
    a = scored([3], [2.0], [3.0])
    plain = entries([3], [4.0])
    assert dense_of(sg.merge([a, plain], "fisher")).reshape(-1)[3] == pytest.approx((3 * 2.0 + 1 * 4.0) / 4)
    with pytest.raises(SurgicalError, match="without importance scores"):
        sg.merge([a, plain], "fisher", missing="error")


def test_scores_survive_save_load_scale_and_to_dense(tmp_path):
    a = scored([0, 3], [1.0, 2.0], [3.0, 1.0])
    a.save(tmp_path / "a")
    back = sg.Delta.load(tmp_path / "a")
    assert torch.equal(back.scores[W], a.scores[W])
    assert torch.equal(back.scale(0.5).scores[W], a.scores[W])
    dense = back.to_dense()
    assert dense.scores[W].shape == SHAPE and dense.scores[W].reshape(-1)[3] == 1.0
    assert back.digest() == entries([0, 3], [1.0, 2.0]).digest()  # importance is not part of the change


def test_select_keeps_scores_and_extract_attaches_them():
    model = tiny_bert()
    plan = sg.select(
        model, cls_batches(), method="fisher", density=0.02, always=["classifier"], progress=False
    )
    assert plan.scores and all(plan.scores[n].numel() == plan.entries[n].numel() for n in plan.entries)
    sg.prepare(model, plan)
    sg.fit(model, cls_batches(), lr=0.01, show=False)
    delta = sg.extract(model, scores=plan)
    for n, (idx, _) in delta.entries.items():
        assert torch.equal(delta.scores[n], plan.scores[n]) and idx.numel() == plan.scores[n].numel()
    assert not sg.extract(model).scores  # only when asked for


def test_plan_scores_round_trip(tmp_path):
    plan = sg.select(tiny_bert(), cls_batches(), method="gradient", density=0.02, progress=False)
    plan.save(tmp_path / "p")
    back = sg.Plan.load(tmp_path / "p")
    assert back.scores.keys() == plan.scores.keys()
    assert all(torch.equal(back.scores[n], plan.scores[n]) for n in plan.scores)
