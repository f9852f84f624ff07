"""Granularities, allocations and budgets: exact where units allow, never over, deterministic."""

from __future__ import annotations

import pytest
import torch

import surgical as sg
from conftest import lm_batches, tiny_llama
from surgical.core.names import split_layer
from surgical.select.allocate import proportional_counts

VALID = [
    ("entry", "global"),
    ("entry", "per_tensor"),
    ("entry", "per_layer"),
    ("row", "global"),
    ("row", "per_tensor"),
    ("row", "per_layer"),
    ("column", "global"),
    ("column", "per_tensor"),
    ("column", "per_layer"),
    ("head", "global"),
    ("head", "per_tensor"),
    ("head", "per_layer"),
    ("tensor", "global"),
    ("tensor", "per_layer"),
    ("layer", "global"),
]


def unit_sizes(plan, params, granularity, hd=8):
    """Sizes of the units the plan did NOT select, for the 'nothing else fits' check."""
    sizes = []
    for n in plan.meta["_targets"]:
        out_f, in_f = params[n].shape
        if granularity == "row":
            sizes += [in_f] * (out_f - len(plan.rows.get(n, [])))
        elif granularity == "column":
            sizes += [out_f] * (in_f - len(plan.cols.get(n, [])))
        elif granularity == "tensor" and n not in plan.dense:
            sizes.append(out_f * in_f)
    return sizes


@pytest.mark.parametrize("granularity, allocation", VALID)
@pytest.mark.parametrize("density", [0.07, 0.3, 0.55])
def test_budget_is_met_as_closely_as_units_allow(granularity, allocation, density):
    model = tiny_llama()
    params = dict(model.named_parameters())
    if granularity == "layer" and density < 0.5:  # a block is half of the targets here
        with pytest.raises(sg.SurgicalError, match="smaller than the smallest unit"):
            sg.select(model, method="random", density=density, granularity="layer")
        return
    plan = sg.select(
        model,
        lm_batches(2),
        method="gradient",
        density=density,
        granularity=granularity,
        allocation=allocation,
        always=["norm"],
        progress=False,
    )
    k, got = plan.meta["budget"], plan.meta["selected"]
    always = [n for n in params if "norm" in n]
    trained_dense = [n for n in plan.dense if n not in always]
    assert got == plan.num_entries + sum(params[n].numel() for n in trained_dense)
    assert got <= k
    if granularity == "entry":
        assert got == k == round(density * plan.meta["targeted"])
    elif granularity in ("row", "column"):
        plan.meta["_targets"] = sg.select.__globals__["default_targets"](model)
        assert k - got < min(unit_sizes(plan, params, granularity))  # no unselected row/col fits
    elif granularity == "head":
        assert k - got < 8 * 32  # one head of q/k/v/o is head_dim(8) x 32 parameters
    assert all(n in always or "norm" not in n for n in plan.dense)  # `always` stays dense, outside
    assert all(n not in plan.sparse_names for n in always)


def test_row_selection_matches_a_naive_greedy_over_row_sums():
    model = tiny_llama()
    data = lm_batches(2)
    plan = sg.select(model, data, method="gradient", count=2000, granularity="row", progress=False)
    ref = tiny_llama()
    params = dict(ref.named_parameters())
    targets = [n for n in params if n.endswith("proj.weight")]
    sums = {n: torch.zeros_like(params[n]) for n in targets}
    for b in data:
        ref.zero_grad()
        ref(**b).loss.backward()
        for n in targets:
            sums[n] += params[n].grad.abs()
    rows = [
        (float(sums[n][r].sum()), i, r, n) for i, n in enumerate(targets) for r in range(sums[n].shape[0])
    ]
    rows.sort(key=lambda t: (-t[0], t[1], t[2]))
    spent, want = 0, {}
    for _, _, r, n in rows:
        size = params[n].shape[1]
        if spent + size <= 2000:
            spent += size
            want.setdefault(n, []).append(r)
    assert {n: sorted(v) for n, v in want.items()} == {n: r.tolist() for n, r in plan.rows.items()}
    assert plan.meta["selected"] == spent


def test_heads_are_whole_blocks_of_query_key_value_rows_and_output_columns():
    model = tiny_llama()
    plan = sg.select(model, lm_batches(2), method="gradient", density=0.5, granularity="head", progress=False)
    hd = 8  # hidden 32 / 4 heads
    assert plan.rows and plan.cols and not plan.entries
    for name, idx in {**plan.rows, **plan.cols}.items():
        assert name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
        blocks = idx.reshape(-1, hd)
        assert torch.equal(blocks - blocks[:, :1], torch.arange(hd).expand_as(blocks))
        assert bool((blocks[:, 0] % hd == 0).all())
    assert all(n.endswith("o_proj.weight") for n in plan.cols)
    assert plan.meta["targeted"] == 2 * (32 * 32 + 16 * 32 + 16 * 32 + 32 * 32)  # GQA: k/v have 2 heads


def test_best_head_wins_under_a_one_head_budget():
    model = tiny_llama()
    data = lm_batches(2)
    plan = sg.select(model, data, method="magnitude", count=8 * 32, granularity="head", targets=["q_proj"])
    w = dict(tiny_llama().named_parameters())
    best = max(
        (float(w[n].detach().abs().reshape(4, 8, 32)[h].sum()), n, h)
        for n in w
        if n.endswith("q_proj.weight")
        for h in range(4)
    )
    assert list(plan.rows) == [best[1]] and plan.rows[best[1]].tolist() == list(
        range(best[2] * 8, best[2] * 8 + 8)
    )


def test_per_layer_allocation_gives_each_block_its_share():
    model = tiny_llama()
    plan = sg.select(
        model, lm_batches(2), method="gradient", count=3001, allocation="per_layer", progress=False
    )
    per_layer: dict[str, int] = {}
    for n, idx in plan.entries.items():
        layer = split_layer(n)[0]
        per_layer[layer] = per_layer.get(layer, 0) + idx.numel()
    sizes = {"model.layers.0": plan.meta["targeted"] // 2, "model.layers.1": plan.meta["targeted"] // 2}
    assert per_layer == proportional_counts(sizes, 3001)


def test_optimizer_bytes_budget_buys_16_bytes_per_parameter(bert):
    plan = sg.select(bert, method="random", optimizer_bytes=16 * 1000 + 15)
    assert plan.num_entries == 1000 and plan.meta["budget"] == 1000
    with pytest.raises(sg.SurgicalError, match="buys no parameter"):
        sg.select(bert, method="random", optimizer_bytes=15)
    with pytest.raises(sg.SurgicalError, match="exactly one of density, count and optimizer_bytes"):
        sg.select(bert, method="random", density=0.1, optimizer_bytes=1600)


@pytest.mark.parametrize("granularity", ["entry", "row", "column", "head", "tensor", "layer"])
def test_plans_are_deterministic_under_a_seed(granularity):
    def run(seed):
        return sg.select(tiny_llama(), method="random", density=0.6, granularity=granularity, seed=seed)

    a, b, c = run(1), run(1), run(2)
    same = (
        all(torch.equal(a.entries[n], b.entries[n]) for n in a.entries)
        and all(torch.equal(a.rows[n], b.rows[n]) for n in a.rows)
        and all(torch.equal(a.cols[n], b.cols[n]) for n in a.cols)
    )
    assert same and a.dense == b.dense and a.entries.keys() == b.entries.keys()
    assert a.meta["selected"] == b.meta["selected"]
    if granularity in ("entry", "row"):
        assert any(
            not torch.equal(a.entry_indices(n), c.entry_indices(n))
            for n in a.sparse_names
            if n in c.sparse_names
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(granularity="tensor", allocation="per_tensor"), "per_tensor allocation cannot split"),
        (
            dict(granularity="layer", allocation="per_layer"),
            "per_layer allocation cannot split a budget of whole",
        ),
        (dict(granularity="blob"), "unknown granularity 'blob'. Use one of: entry, row, column, head"),
        (dict(allocation="fair"), "unknown allocation 'fair'. Use one of: global, per_tensor, per_layer"),
        (dict(granularity="head", targets=["mlp"]), "head granularity found no attention projection"),
        (dict(aggregate="max", granularity="row"), "unknown aggregate 'max'"),
    ],
)
def test_bad_structure_is_one_line_error(kwargs, message):
    with pytest.raises(sg.SurgicalError) as e:
        sg.select(tiny_llama(), method="random", density=0.3, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_budget_smaller_than_any_unit_is_an_error():
    with pytest.raises(sg.SurgicalError, match="smaller than the smallest unit"):
        sg.select(tiny_llama(), method="random", count=10, granularity="layer")


def test_structured_plans_save_load_and_prepare(tmp_path):
    model = tiny_llama()
    plan = sg.select(model, method="magnitude", density=0.2, granularity="row", always=["norm"])
    plan.save(tmp_path / "p")
    back = sg.Plan.load(tmp_path / "p")
    assert back.rows.keys() == plan.rows.keys() and back.meta == plan.meta
    assert all(torch.equal(back.rows[n], plan.rows[n]) for n in plan.rows)
    sg.prepare(model, back)
    assert sg.trainable_count(model) == plan.num_trainable
    layer_plan = sg.select(tiny_llama(), method="magnitude", density=0.5, granularity="layer")
    assert layer_plan.dense and all(n.startswith("model.layers.") for n in layer_plan.dense)
    assert layer_plan.num_dense == layer_plan.meta["selected"]


def test_unit_scores_are_sums_or_means_of_their_entries():
    from surgical.select.allocate import allocate
    from surgical.select.units import build_units

    a = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    scores = {"a": a, "b": torch.tensor([[1.5, 1.5]])}
    by_sum = build_units(scores, "row", "sum")
    assert [u.scores.tolist() for u in by_sum] == [[4.0, 0.0], [3.0]] and [u.size for u in by_sum] == [4, 2]
    taken = allocate(by_sum, 4, "global")
    assert taken["a"].tolist() == [True, False] and taken["b"].tolist() == [False]
    by_mean = build_units(scores, "row", "mean")
    taken = allocate(by_mean, 4, "global")  # b's row (mean 1.5) first; then a's best row no longer fits
    assert taken["a"].tolist() == [False, False] and taken["b"].tolist() == [True]
    cols = build_units(scores, "column", "sum")
    assert cols[0].scores.tolist() == [1.0] * 4 and cols[0].size == 2


def test_heatmap_scale_is_logarithmic_only_when_shares_span_decades():
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    from surgical.core.plotting import colour_norm

    spread = np.array([[57.0, np.nan], [0.01, 0.0], [2.0, 5.0]])
    norm, grid = colour_norm(spread)
    assert isinstance(norm, LogNorm) and (norm.vmin, norm.vmax) == (0.01, 57.0)
    assert grid[1, 1] < norm.vmin and np.isnan(grid[0, 1])  # unselected: below the scale
    assert norm(0.1) - norm(0.01) == pytest.approx(norm(1.0) - norm(0.1))  # a decade each
    narrow = np.array([[1.0, 2.0], [0.0, np.nan]])
    norm, grid = colour_norm(narrow)
    assert isinstance(norm, Normalize) and not isinstance(norm, LogNorm)
    assert (norm.vmin, norm.vmax) == (0, 2.0) and grid is narrow
