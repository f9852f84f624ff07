"""Merge methods on sparse deltas: hand-computed examples, sparse == densified, conformance."""

from __future__ import annotations

import math

import pytest
import torch

import surgical as sg
from surgical.core.errors import SurgicalError
from surgical.merge import MERGE_METHODS, interference, merge

SHAPE = (4, 5)
W = "layer.0.weight"


def entries(idx, vals, name=W, shape=SHAPE, full=None, fp="abc") -> sg.Delta:
    d = sg.Delta(shapes={name: shape}, meta={"base": {"fingerprint": fp, "fingerprint_excludes": []}})
    d.entries[name] = (torch.tensor(idx, dtype=torch.int64), torch.tensor(vals, dtype=torch.float32))
    for n, t in (full or {}).items():
        d.full[n], d.shapes[n] = t, tuple(t.shape)
    return d


def dense_of(d: sg.Delta, name: str = W) -> torch.Tensor:
    return d.to_dense().dense[name] if name in d.names() else torch.zeros(SHAPE)


A = entries([0, 3, 7], [1.0, -2.0, 0.5])
B = entries([3, 7, 12], [1.0, 3.0, -4.0])


def test_linear_is_the_weighted_mean_and_one_input_returns_it():
    out = merge([A, B], "linear", weights=[1, 3])
    want = (dense_of(A) * 1 + dense_of(B) * 3) / 4
    assert torch.allclose(dense_of(out), want)
    same = merge([A], "linear")
    assert torch.equal(same.entries[W][0], A.entries[W][0]) and torch.equal(
        same.entries[W][1], A.entries[W][1]
    )


def test_task_arithmetic_weights_summing_to_zero_give_zero():
    out = merge([A, A], "task_arithmetic", weights=[1.0, -1.0])
    assert W not in out.names()  # nothing left: an all-zero change is not stored
    neg = merge([A], "task_arithmetic", weights=[-1.0], scale=2.0)
    assert torch.equal(dense_of(neg), -2 * dense_of(A))


def test_ties_by_hand():
    # density 0.15 of 20 values = 3 kept per delta: A keeps 3 and 0 (|2|, |1|, |0.5|) -> all three;
    # B keeps its three. At 3: A=-2, B=+1 -> sign + (sum -1? no: -2 + 1 = -1) -> sign -, keeps A only.
    out = merge([A, B], "ties", density=0.15)
    d = dense_of(out).reshape(-1)
    assert d[0] == 1.0 and d[3] == -2.0 and d[7] == pytest.approx((0.5 + 3.0) / 2) and d[12] == -4.0
    tight = merge([A, B], "ties", density=0.05)  # 1 value each: A's -2 at 3, B's -4 at 12
    assert set(tight.entries[W][0].tolist()) == {3, 12}


def test_ties_with_disjoint_supports_is_the_sum():
    c = entries([1, 2], [0.3, -0.7])
    out = merge([A, c], "ties", density=1.0)
    assert torch.allclose(dense_of(out), dense_of(A) + dense_of(c))


def test_dare_is_seeded_and_unbiased():
    big = entries(list(range(20)), [float(i + 1) for i in range(20)])
    one = merge([big], "dare", density=0.5, seed=3)
    assert torch.equal(dense_of(one), dense_of(merge([big], "dare", density=0.5, seed=3)))
    assert not torch.equal(dense_of(one), dense_of(merge([big], "dare", density=0.5, seed=4)))
    kept = dense_of(one).reshape(-1)
    assert all(v in (0.0, 2 * (i + 1)) for i, v in enumerate(kept.tolist()))  # dropped or rescaled
    mean = torch.stack([dense_of(merge([big], "dare", density=0.5, seed=s)) for s in range(400)]).mean(0)
    assert torch.allclose(mean, dense_of(big), rtol=0.15)  # E[keep / p * v] = v


def test_breadcrumbs_drops_the_largest_and_the_smallest():
    big = entries(list(range(20)), [float(i + 1) for i in range(20)])
    out = merge([big], "breadcrumbs", density=0.5, gamma=0.1)
    kept = sorted(out.entries[W][1].tolist())
    assert kept == [float(v) for v in range(9, 19)]  # the top 2 dropped, the next 10 kept


def test_model_stock_ratio_from_the_angle():
    x = entries([0, 1], [1.0, 0.0])
    y = entries([0, 1], [0.0, 1.0])  # orthogonal: c = 0 -> t = 0 -> the base
    assert W not in merge([x, y], "model_stock").names()
    same = merge([x, x], "model_stock")  # c = 1 -> t = 1 -> the mean
    assert torch.allclose(dense_of(same), dense_of(x))
    with pytest.raises(SurgicalError, match="model_stock merges at least 2"):
        merge([x], "model_stock")


def test_wise_ft_scales_changes_and_keeps_replaced_tensors():
    head = torch.randn(2, 3)
    d = entries([0, 3], [1.0, -2.0], full={"head.weight": head})
    out = merge([d], "wise_ft", alpha=0.25)
    assert torch.allclose(dense_of(out), 0.25 * dense_of(d)) and torch.equal(out.full["head.weight"], head)
    with pytest.raises(SurgicalError, match="wise_ft merges exactly 1"):
        merge([d, d], "wise_ft")


def _rows_delta(rows, seed, name=W) -> sg.Delta:
    g = torch.Generator().manual_seed(seed)
    d = sg.Delta(shapes={name: SHAPE}, meta={"base": {"fingerprint": "abc", "fingerprint_excludes": []}})
    d.rows[name] = (torch.tensor(rows), torch.randn(len(rows), SHAPE[1], generator=g))
    return d


def _random_entries(seed: int) -> sg.Delta:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(20, generator=g)[:7].sort().values
    return entries(idx.tolist(), torch.randn(7, generator=g).tolist())


def _options(name: str) -> dict:
    return {
        "wise_ft": {"alpha": 0.6},
        "ties": {"density": 0.3},
        "dare": {"density": 0.6, "seed": 5},
        "della": {"density": 0.6, "seed": 5},
        "breadcrumbs": {"density": 0.6, "gamma": 0.1},
        "slerp": {"t": 0.3},
    }.get(name, {})


@pytest.mark.parametrize("method", MERGE_METHODS.names())
@pytest.mark.parametrize("inputs", ["entries", "rows", "mixed"])
def test_sparse_merge_equals_the_densified_merge(method, inputs):
    if inputs == "entries":
        ds = [_random_entries(s) for s in range(3)]
    elif inputs == "rows":
        ds = [_rows_delta([0, 2], 1), _rows_delta([1, 2], 2), _rows_delta([3], 3)]
    else:
        ds = [_random_entries(0), _rows_delta([1, 2], 2), _random_entries(4)]
    entry = MERGE_METHODS.entry(method)
    ds = ds[: entry.extra.get("max_inputs") or len(ds)]
    weights = [1.0, 0.5, 2.0][: len(ds)]
    sparse = merge(ds, method, weights=weights, **_options(method))
    dense = merge([d.to_dense() for d in ds], method, weights=weights, **_options(method))
    assert torch.allclose(dense_of(sparse), dense_of(dense), atol=1e-6)
    assert not sparse.dense  # sparse in, sparse out
    if inputs == "rows" and method != "model_stock":
        assert W in sparse.rows or W not in sparse.names()


@pytest.mark.parametrize("method", MERGE_METHODS.names())
def test_every_method_returns_a_valid_delta_that_applies(method):
    from conftest import tiny_bert

    model = tiny_bert()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    shape = tuple(model.get_parameter(name).shape)
    fp = sg.Delta.from_models(model, model).meta["base"]
    ds = []
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        d = sg.Delta(shapes={name: shape}, meta={"base": fp})
        d.entries[name] = (torch.randperm(shape[0] * shape[1], generator=g)[:50].sort().values,
                           torch.randn(50, generator=g) * 0.01)  # fmt: skip
        ds.append(d)
    ds = ds[: MERGE_METHODS.entry(method).extra.get("max_inputs") or len(ds)]
    out = merge(ds, method, **_options(method))
    out.validate()
    before = model.get_parameter(name).detach().clone()
    with sg.applied(model, out):
        pass
    assert torch.equal(model.get_parameter(name), before)


def test_bad_input_is_refused():
    with pytest.raises(SurgicalError, match="unknown merge method 'soup'. Use one of: breadcrumbs"):
        merge([A], "soup")
    with pytest.raises(SurgicalError, match=r"unknown option\(s\) alpha for merge method 'ties'"):
        merge([A, B], "ties", alpha=0.5)
    with pytest.raises(SurgicalError, match="2 inputs but 1 weights"):
        merge([A, B], "linear", weights=[1.0])
    with pytest.raises(SurgicalError, match="another base model"):
        merge([A, entries([1], [1.0], fp="def")], "linear")
    with pytest.raises(SurgicalError, match=r"as \(2, 10\)"):
        merge([A, entries([1], [1.0], shape=(2, 10))], "linear")
    with pytest.raises(SurgicalError, match="must be in"):
        merge([A, B], "ties", density=1.5)
    head = {"h": torch.ones(2)}
    with pytest.raises(SurgicalError, match="replaces 'h' and delta 2 adds to it"):
        merge([entries([1], [1.0], full=head), entries([1], [1.0], name="h", shape=(2,))], "linear")


def test_replaced_tensors_are_averaged_by_weight():
    a = entries([0], [1.0], full={"h": torch.zeros(2)})
    b = entries([1], [1.0], full={"h": torch.ones(2)})
    out = merge([a, b], "linear", weights=[1, 3])
    assert torch.allclose(out.full["h"], torch.full((2,), 0.75))


def test_interference_reports_overlap_signs_and_cosine():
    rows = interference([A, B])
    (r,) = rows
    assert r["deltas"] == 2 and r["overlap"] == pytest.approx(2 / 4)  # shared 3 and 7 of {0, 3, 7, 12}
    assert r["sign_conflict"] == pytest.approx(1 / 2)  # at 3: -2 vs +1
    a, b = dense_of(A).reshape(-1).double(), dense_of(B).reshape(-1).double()
    assert r["cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())))
    assert r["kind"] == "sparse" and (r["shared"], r["union"]) == (2, 4)


def test_interference_summary_weighs_values_and_keeps_dense_tensors_apart():
    bias = "layer.0.bias"
    a = two_tensor([0, 3, 7], [1.0, -2.0, 0.5], [1], [4.0])
    b = two_tensor([3, 7, 12], [1.0, 3.0, -4.0], [1, 2, 5, 9, 11], [1.0, 1.0, 1.0, 1.0, 1.0])
    for d, v in ((a, [1.0, -1.0, 2.0]), (b, [1.0, 1.0, 1.0])):
        d.dense[bias], d.shapes[bias] = torch.tensor(v), (3,)
    rows = {r["name"]: r for r in interference([a, b])}
    assert rows[bias]["kind"] == "dense" and rows[bias]["overlap"] == 1.0 and rows[V]["kind"] == "sparse"
    s = sg.interference_summary(list(rows.values()))
    assert s["dense"] == {"tensors": 1, "overlap": 1.0, "mean_overlap": 1.0, "mean_sign_conflict": 1 / 3,
                          "mean_cosine": pytest.approx(rows[bias]["cosine"])}  # fmt: skip
    # Q shares 2 of 4 values, V 1 of 5: 3 of 9 over both, where the per-tensor mean is (1/2 + 1/5) / 2
    assert s["sparse"]["tensors"] == 2 and s["sparse"]["overlap"] == pytest.approx(3 / 9)
    assert s["sparse"]["mean_overlap"] == pytest.approx((1 / 2 + 1 / 5) / 2)
    assert sg.interference_summary([]) == {}


Q, V = "layer.0.attention.query.weight", "layer.1.output.dense.weight"


def two_tensor(idx_q, vals_q, idx_v, vals_v) -> sg.Delta:
    d = entries(idx_q, vals_q, name=Q)
    e = entries(idx_v, vals_v, name=V)
    d.entries[V], d.shapes[V] = e.entries[V], SHAPE
    return d


def test_rules_set_weights_and_options_per_tensor_first_match_wins():
    a = two_tensor([0, 3], [1.0, -2.0], [1, 2], [4.0, 1.0])
    b = two_tensor([3, 5], [2.0, 6.0], [2, 9], [-3.0, 0.5])
    rules = [
        {"match": "attention", "weights": [1, 3]},  # the query tensor: B weighs three times A
        {"match": ["query", "output"], "options": {"density": 0.05}},  # only V reaches this one
    ]
    out = merge([a, b], "ties", weights=[1, 1], rules=rules, density=1.0)
    want_q = merge([a, b], "ties", weights=[1, 3], density=1.0)
    want_v = merge([a, b], "ties", weights=[1, 1], density=0.05)
    assert torch.equal(dense_of(out, Q), dense_of(want_q, Q))
    assert torch.equal(dense_of(out, V), dense_of(want_v, V))
    assert not torch.equal(dense_of(out, V), dense_of(merge([a, b], "ties", density=1.0), V))
    recorded = out.meta["merge"]["rules"]
    assert [r["tensors"] for r in recorded] == [[Q], [V]]
    assert recorded[0]["weights"] == [1.0, 3.0] and recorded[1]["options"]["density"] == 0.05
    assert recorded[0]["options"]["density"] == 1.0  # the call's options, completed
    # a rule's weights also weigh replaced tensors (heads): their weighted mean
    h1, h2 = two_tensor([0], [1.0], [1], [1.0]), two_tensor([0], [1.0], [1], [1.0])
    h1.full["head"], h1.shapes["head"] = torch.ones(2), (2,)
    h2.full["head"], h2.shapes["head"] = torch.zeros(2), (2,)
    mixed = merge([h1, h2], "linear", rules=[{"match": "head", "weights": [1, 3]}])
    assert torch.equal(mixed.full["head"], torch.full((2,), 0.25))


@pytest.mark.parametrize(
    "rules, message",
    [
        ({"match": "q"}, "rules must be a list"),
        ([["q"]], r"rules\[0\] must be a mapping"),
        ([{"weights": [1, 1]}], r"rules\[0\] has no match"),
        ([{"match": "q", "weight": 1}], r"rules\[0\] has unknown keys weight"),
        ([{"match": "", "weights": [1, 1]}], r"rules\[0\].match must name tensor patterns"),
        ([{"match": "q"}], r"rules\[0\] changes nothing"),
        ([{"match": "q", "weights": [1]}], r"2 inputs but 1 rules\[0\].weights"),
        ([{"match": "q", "weights": [1, float("nan")]}], r"rules\[0\].weights: a weight must be a finite"),
        ([{"match": "q", "options": {"density": 2}}], r"rules\[0\].options.density must be in"),
        ([{"match": "q", "options": {"nope": 1}}], r"unknown option\(s\) nope"),
        ([{"match": "nothing.here", "weights": [1, 1]}], r"matches no tensor of the inputs"),
        ([{"match": "layer", "weights": [1, 1]}, {"match": "query", "weights": [2, 1]}], "Reorder the rules"),
    ],
)
def test_bad_rules_are_one_line_errors(rules, message):
    a = two_tensor([0], [1.0], [1], [1.0])
    with pytest.raises(SurgicalError, match=message) as e:
        merge([a, a], "ties", rules=rules)
    assert "\n" not in str(e.value)


def test_slerp_follows_the_arc_and_falls_back_to_the_line():
    a, b = entries([0, 1], [1.0, 0.0]), entries([0, 1], [0.0, 2.0])  # orthogonal, norms 1 and 2
    half = dense_of(merge([a, b], "slerp")).reshape(-1)
    s = math.sin(math.pi / 4) / math.sin(math.pi / 2)
    assert torch.allclose(half[:2], torch.tensor([s * 1.0, s * 2.0]))  # on the arc, not the chord (0.5, 1)
    assert torch.equal(dense_of(merge([a, b], "slerp", t=0.0)), dense_of(a))
    assert torch.allclose(dense_of(merge([a, b], "slerp", t=1.0)), dense_of(b))
    at = 0.3  # against a direct evaluation at another t
    want = math.sin(0.7 * math.pi / 2) * dense_of(a) + math.sin(0.3 * math.pi / 2) * dense_of(b)
    assert torch.allclose(dense_of(merge([a, b], "slerp", t=at)), want, atol=1e-6)
    c = entries([0, 1], [2.0, 0.0])  # parallel to a: the arc is flat, linear interpolation
    assert torch.allclose(dense_of(merge([a, c], "slerp", t=0.25)), 0.75 * dense_of(a) + 0.25 * dense_of(c))
    other = entries([5], [3.0], name="other.weight")  # a tensor only one input changes: the line
    mixed = merge([a, other], "slerp", t=0.25)
    assert torch.allclose(dense_of(mixed), 0.75 * dense_of(a))
    with pytest.raises(SurgicalError, match="slerp merges exactly 2"):
        merge([a, b, c], "slerp")


def test_sce_selects_by_variance_weights_by_energy_and_elects_signs():
    # A = [1, -2, 0.5, 0] and B = [0, 1, 3, -4] at flat positions 0, 3, 7, 12 of 20
    out = dense_of(merge([A, B], "sce")).reshape(-1)
    ca, cb = 5.25 / 31.25, 26 / 31.25  # mean squares 5.25/4 and 26/4, normalized
    want = torch.zeros(20)
    want[0] = 1.0  # A alone
    want[3] = 1.0  # -2 ca + 1 cb > 0: B's sign wins, B's value alone
    want[7] = (ca * 0.5 + cb * 3.0) / (ca + cb)
    want[12] = -4.0
    assert torch.allclose(out, want)
    # select_topk 0.1 keeps 2 of 20 positions: the largest variances, at 12 (4) and 3 (2.25)
    top = dense_of(merge([A, B], "sce", select_topk=0.1)).reshape(-1)
    assert torch.allclose(
        top, torch.zeros(20).index_put_((torch.tensor([3, 12]),), torch.tensor([1.0, -4.0]))
    )
    # the weights multiply the energies: enough weight on A turns the sign at 3 its way
    assert dense_of(merge([A, B], "sce", weights=[10, 1])).reshape(-1)[3] == -2.0
    assert torch.allclose(dense_of(merge([A, B], "sce", scale=0.5)), 0.5 * dense_of(merge([A, B], "sce")))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def test_karcher_is_the_mean_direction_at_the_mean_length():
    a, b = entries([0, 1], [1.0, 0.0]), entries([0, 1], [0.0, 3.0])  # orthogonal, lengths 1 and 3
    two = dense_of(merge([a, b], "karcher")).reshape(-1)
    assert torch.allclose(two[:2], 2.0 * torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    # the direction is the midpoint of the arc: slerp's at t 0.5 between the unit directions
    unit_b = entries([0, 1], [0.0, 1.0])
    assert torch.allclose(_unit(two), _unit(dense_of(merge([a, unit_b], "slerp")).reshape(-1)), atol=1e-6)
    # weights pull the direction: 3:1 towards a, a quarter of the right angle away from it
    skew = dense_of(merge([a, b], "karcher", weights=[3, 1], tol=1e-9, max_iter=50)).reshape(-1)
    angle = math.atan2(float(skew[1]), float(skew[0]))
    assert angle == pytest.approx(math.pi / 8, abs=1e-6) and float(skew.norm()) == pytest.approx(1.5)
    c = entries([0, 1], [2.0, 0.0])  # parallel to a: the mean of the lengths along a
    assert torch.allclose(dense_of(merge([a, c], "karcher")), 1.5 * dense_of(a))
    # three directions: the result is a fixed point (its weighted tangent mean vanishes)
    d = entries([0, 1, 2], [0.2, -0.5, 1.0])
    x = _unit(dense_of(merge([a, b, d], "karcher", tol=1e-10, max_iter=100)).reshape(-1).double())
    us = [_unit(dense_of(e).reshape(-1).double()) for e in (a, b, d)]
    tangent = sum(
        math.acos(float(u @ x)) / math.sin(math.acos(float(u @ x))) * (u - float(u @ x) * x) for u in us
    )
    assert float(tangent.norm()) < 1e-6  # the result is stored in float32
    other = entries([5], [3.0], name="other.weight")  # a tensor only one input changes: its change
    assert torch.allclose(dense_of(merge([a, other], "karcher")), dense_of(a))
    # inputs that cancel, or zero weights: no mean direction, so no change
    assert dense_of(merge([a, entries([0, 1], [-2.0, 0.0])], "karcher")).abs().sum() == 0
    assert dense_of(merge([a, b], "karcher", weights=[0, 0])).abs().sum() == 0


@pytest.mark.parametrize("method", ["karcher", "fisher"])
def test_weighted_means_refuse_negative_weights(method):
    a, b = entries([0, 1], [1.0, 0.0]), entries([0, 1], [0.0, 3.0])
    with pytest.raises(SurgicalError, match=rf"{method} takes weights >= 0, but weights\[1\] is -1.0"):
        merge([a, b], method, weights=[1, -1])
    with pytest.raises(SurgicalError, match=r"rules\[0\].weights\[0\] is \[1.0, -0.5\]"):
        merge([a, b], method, rules=[{"match": ["*"], "weights": [[1, -0.5], 1]}])
    assert dense_of(merge([a, b], "ties", weights=[1, -1])).abs().sum() > 0  # ties may subtract


def test_layer_positions_and_interpolation():
    from surgical.merge.gradients import interpolate, layer_positions

    layers = [f"bert.encoder.layer.{i}.q.weight" for i in (0, 2, 4)]
    names = ["bert.embeddings.word_embeddings.weight", *layers, "classifier.weight"]
    assert list(layer_positions(names).values()) == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert layer_positions(["model.layers.3.mlp.experts.7.w1", "model.layers.6.x"]) == {
        "model.layers.3.mlp.experts.7.w1": 0.5,  # the first dotted integer is the layer
        "model.layers.6.x": 1.0,
    }
    assert interpolate([0, 1, 0.5], 0.25) == 0.5 and interpolate([0, 1, 0.5], 0.75) == 0.75
    assert interpolate([0.3], 0.9) == 0.3 and interpolate([2, 4], 1.0) == 4.0


def _layered(values: dict[int, float], name="enc.layer.{}.w") -> sg.Delta:
    d = sg.Delta(meta={"base": {"fingerprint": "abc", "fingerprint_excludes": []}})
    for layer, v in values.items():
        n = name.format(layer)
        d.entries[n], d.shapes[n] = (torch.tensor([0, 1]), torch.tensor([v, -v])), SHAPE
    return d


def test_weights_and_options_vary_over_the_layers():
    a, b = _layered({0: 1.0, 1: 1.0, 2: 1.0}), _layered({0: 3.0, 1: 3.0, 2: 3.0})
    out = merge([a, b], "task_arithmetic", weights=[[1, 0], 1])  # a weighs 1 at layer 0, 0 at layer 2
    got = [float(dense_of(out, f"enc.layer.{i}.w").reshape(-1)[0]) for i in range(3)]
    assert got == pytest.approx([1 + 3, 0.5 + 3, 0 + 3])
    per = out.meta["merge"]["per_tensor"]
    assert per["enc.layer.1.w"] == {"position": 0.5, "weights": [0.5, 1.0]}
    # a float option as anchors (slerp's t, mergekit's favourite), the same as one merge per layer
    c = _layered({0: 1.0, 1: 2.0, 2: -1.0})
    varied = merge([a, c], "slerp", t=[0.0, 1.0])
    for i, x in enumerate((0.0, 0.5, 1.0)):
        n = f"enc.layer.{i}.w"
        assert torch.allclose(dense_of(varied, n), dense_of(merge([a, c], "slerp", t=x), n))
        assert varied.meta["merge"]["per_tensor"][n]["t"] == x
    # inside a rule too; a tensor outside the rule keeps the call's values
    ruled = merge([a, b], "task_arithmetic", rules=[{"match": "enc.layer.2.*", "weights": [[0, 2], 0]}])
    assert float(dense_of(ruled, "enc.layer.2.w").reshape(-1)[0]) == pytest.approx(2.0)
    assert float(dense_of(ruled, "enc.layer.0.w").reshape(-1)[0]) == pytest.approx(4.0)
    assert "per_tensor" not in merge([a, b], "task_arithmetic").meta["merge"]  # nothing varies


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"weights": [[], 1]}, "weights is an empty list"),
        ({"weights": [[1, float("inf")], 1]}, "weights must hold finite numbers"),
        ({"method": "slerp", "t": [0, 1.5]}, "must be in"),
        ({"method": "dare", "seed": [0, 1]}, "only float options can vary over the layers"),
        ({"method": "ties", "nope": [0, 1]}, r"unknown option\(s\) nope"),
    ],
)
def test_bad_gradients_are_one_line(kw, message):
    kw = {"method": "ties", **kw}
    a = _layered({0: 1.0, 1: 1.0})
    with pytest.raises(SurgicalError, match=message) as e:
        merge([a, a], kw.pop("method"), **kw)
    assert "\n" not in str(e.value)
