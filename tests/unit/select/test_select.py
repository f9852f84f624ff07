"""Selection: exact budgets, targets/exclusions/always, criteria against naive references."""

from __future__ import annotations

import pytest
import torch

import surgical as sg
from conftest import cls_batches, lm_batches, tiny_bert
from surgical.select.api import default_targets, global_topk


def test_default_targets_are_linear_weights_without_output_embedding(llama):
    names = default_targets(llama)
    assert "lm_head.weight" not in names
    assert all(n.endswith("proj.weight") for n in names)
    assert len(names) == 2 * 7  # q,k,v,o,gate,up,down per layer


@pytest.mark.parametrize("density", [0.001, 0.01, 0.37, 1.0])
def test_budget_is_exact_for_density(bert, batches, density):
    plan = sg.select(bert, batches, method="gradient", density=density, always=["classifier"], progress=False)
    total = plan.meta["targeted"]
    assert plan.num_entries == max(1, round(density * total))
    assert all(torch.equal(i, torch.unique(i)) for i in plan.entries.values())  # sorted, unique


def test_budget_is_exact_for_count_and_random_is_seeded(bert):
    a = sg.select(bert, method="random", count=1234, seed=3)
    b = sg.select(bert, method="random", count=1234, seed=3)
    c = sg.select(bert, method="random", count=1234, seed=4)
    assert a.num_entries == 1234
    assert all(torch.equal(a.entries[n], b.entries[n]) for n in a.entries)
    assert any(not torch.equal(a.entries[n], c.entries.get(n, torch.empty(0))) for n in a.entries)


def test_gradient_scores_match_naive_reference(bert, batches):
    """Top-k of summed |grad| computed the obvious way (all grads held at once)."""
    k = 500
    plan = sg.select(bert, batches, method="gradient", count=k, always=["classifier"], progress=False)
    targets = default_targets(bert)
    targets.remove("classifier.weight")
    ref = tiny_bert()
    params = dict(ref.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in targets}
    for b in batches:
        ref.zero_grad()
        ref(**b).loss.backward()
        for n in targets:
            sums[n] += params[n].grad.abs()
    flat = torch.cat([sums[n].reshape(-1) for n in targets])
    want = set(torch.topk(flat, k).indices.tolist())
    got, off = set(), 0
    for n in targets:
        got |= {off + i for i in plan.entries.get(n, torch.empty(0, dtype=torch.long)).tolist()}
        off += params[n].numel()
    assert got == want


def test_scoring_leaves_model_untouched(bert, batches):
    before = {n: p.detach().clone() for n, p in bert.named_parameters()}
    flags = {n: p.requires_grad for n, p in bert.named_parameters()}
    sg.select(bert, batches, method="gradient", density=0.1, progress=False)
    for n, p in bert.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n]


def test_targets_exclude_always(bert):
    plan = sg.select(
        bert,
        method="random",
        density=0.5,
        targets=["attention.*"],
        exclude=["layer.1.*"],
        always=["classifier"],
    )
    assert plan.entries and all("attention" in n and "layer.1." not in n for n in plan.entries)
    assert plan.dense == ["classifier.weight", "classifier.bias"]
    assert plan.num_dense == 32 * 2 + 2


def test_causal_lm_gradient_selection(llama):
    plan = sg.select(llama, lm_batches(), method="gradient", density=0.02, progress=False)
    assert plan.num_entries == round(0.02 * plan.meta["targeted"])


def test_global_topk_spans_tensors():
    scores = {"a": torch.tensor([[5.0, 1.0], [0.0, 9.0]]), "b": torch.tensor([7.0, 2.0, 8.0])}
    got = global_topk(scores, 3)
    assert got["a"].tolist() == [3] and got["b"].tolist() == [0, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(method="nope", density=0.1),
            "unknown selection criterion 'nope'. Use one of: fim_layer, fisher, gradient, lottery, magnitude",
        ),
        (dict(method="random", density=0.0), "density must be in (0, 1]"),
        (dict(method="random", density=1.5), "density must be in (0, 1]"),
        (dict(method="random", density=0.1, targets=["nothing_like_this"]), "matches no nn.Linear weight"),
        (dict(method="random", count=10**9), "exceeds the"),
        (dict(method="gradient", density=0.1), "needs calibration data"),
        (dict(method="random", density=0.1, targets=["embeddings"]), "matches no nn.Linear weight"),
    ],
)
def test_bad_input_is_one_clear_error(bert, kwargs, message):
    with pytest.raises(sg.SurgicalError) as e:
        sg.select(bert, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_empty_data_and_missing_loss(bert):
    with pytest.raises(sg.SurgicalError, match="yielded no batches"):
        sg.select(bert, [], method="gradient", density=0.1, progress=False)
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in cls_batches(1)]
    with pytest.raises(sg.SurgicalError, match="returned no loss"):
        sg.select(bert, no_labels, method="gradient", density=0.1, progress=False)


def test_plan_save_load_roundtrip(bert, tmp_path):
    plan = sg.select(bert, method="random", density=0.05, always=["classifier"])
    plan.save(tmp_path / "p")
    back = sg.Plan.load(tmp_path / "p")
    assert back.entries.keys() == plan.entries.keys()
    assert all(torch.equal(back.entries[n], plan.entries[n]) for n in plan.entries)
    assert back.dense == plan.dense and back.shapes == plan.shapes and back.meta == plan.meta


def test_per_tensor_allocation_gives_each_tensor_its_share(bert, batches):
    k = 1001
    plan = sg.select(
        bert,
        batches,
        method="gradient",
        count=k,
        allocation="per_tensor",
        always=["classifier"],
        progress=False,
    )
    assert plan.num_entries == k
    params = dict(bert.named_parameters())
    total = plan.meta["targeted"]
    for name, idx in plan.entries.items():
        assert abs(idx.numel() - k * params[name].numel() / total) < 1.0
    # within a tensor, the highest-scoring entries win
    ref = tiny_bert()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    w = dict(ref.named_parameters())[name]
    g = torch.zeros(w.numel())
    for b in batches:
        ref.zero_grad()
        ref(**b).loss.backward()
        g += w.grad.abs().reshape(-1)
    chosen = plan.entries[name]
    others = torch.ones_like(g, dtype=torch.bool)
    others[chosen] = False
    assert g[chosen].min() >= g[others].max() * (1 - 1e-5)


def test_proportional_counts_sum_exactly():
    from surgical.select.allocate import proportional_counts

    counts = proportional_counts({"a": 3, "b": 3, "c": 3}, 4)
    assert sum(counts.values()) == 4 and counts == {"a": 2, "b": 1, "c": 1}


def test_plan_with_rows_and_cols_roundtrip(tmp_path):
    plan = sg.Plan(
        rows={"a.weight": torch.tensor([0, 3])},
        cols={"b.weight": torch.tensor([2])},
        shapes={"a.weight": (4, 5), "b.weight": (3, 6)},
    )
    assert plan.num_entries == 2 * 5 + 3
    assert plan.entry_indices("a.weight").tolist() == [0, 1, 2, 3, 4, 15, 16, 17, 18, 19]
    assert plan.entry_indices("b.weight").tolist() == [2, 8, 14]
    plan.save(tmp_path / "p")
    back = sg.Plan.load(tmp_path / "p")
    assert torch.equal(back.rows["a.weight"], plan.rows["a.weight"])
    assert torch.equal(back.cols["b.weight"], plan.cols["b.weight"])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"density": True}, "density must be a number in (0, 1], got True"),
        ({"density": "0.1"}, "density must be a number in (0, 1], got '0.1'"),
        ({"count": 10.5}, "count must be a whole number, got 10.5"),
        ({"optimizer_bytes": "1e6"}, "optimizer_bytes must be a whole number"),
    ],
)
def test_a_budget_of_the_wrong_type_is_refused(bert, kwargs, needle):
    with pytest.raises(sg.SurgicalError) as e:
        sg.select(bert, None, method="random", progress=False, **kwargs)
    assert needle in str(e.value)
    assert sg.select(bert, None, method="random", count=10.0, progress=False).num_entries == 10  # 10.0 is 10


def test_select_names_a_model_that_is_not_one():
    with pytest.raises(sg.SurgicalError, match=r"select takes a torch model \(nn.Module\), got str 'bert'"):
        sg.select("bert", None, method="random", density=0.1)


def test_the_scoring_bar_counts_the_batches_there_are():
    from surgical.select.criteria import ScoreContext

    def ctx(data):
        return ScoreContext(None, {}, data, 16, 0, False, {})

    assert ctx([{}] * 6).expected_batches == 6 and ctx([{}] * 40).expected_batches == 16
    assert ctx(iter([{}] * 6)).expected_batches == 16  # no length: the most it may read
