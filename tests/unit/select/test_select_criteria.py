"""Every registered criterion against a naive reference implementation (same scores).

The references hold every gradient at once, train a deep copy, or reconstruct low-rank matrices
term by term: the obvious way. ``REFERENCES`` must name every registered criterion; the
conformance test fails for a criterion that has none.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import surgical as sg
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from surgical.select.api import default_targets
from surgical.select.criteria import ScoreContext


def _grads(model, targets, data, loss_of=None):
    """Per batch, every target's gradient (all held at once: the naive way)."""
    params = dict(model.named_parameters())
    out = []
    for b in data:
        model.zero_grad()
        loss = loss_of(model, b) if loss_of else model(**b).loss
        loss.backward()
        out.append({n: params[n].grad.detach().clone() for n in targets})
    return out, params


def ref_random(model, targets, data, seed, opts):
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: torch.rand(params[n].shape, generator=gen) for n in targets}


def ref_magnitude(model, targets, data, seed, opts):
    params = dict(model.named_parameters())
    return {n: params[n].detach().abs() for n in targets}


def ref_gradient(model, targets, data, seed, opts):
    grads, _ = _grads(model, targets, data)
    return {n: sum(g[n].abs() for g in grads) for n in targets}


def _sampled_loss(seed):
    gen = torch.Generator().manual_seed(seed)

    def loss_of(model, b):
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        flat = logits.reshape(-1, logits.shape[-1])
        y = torch.multinomial(torch.softmax(flat.detach(), -1), 1, generator=gen).squeeze(1)
        if logits.dim() == 3:
            keep = b["attention_mask"].reshape(-1).bool()
            flat, y = flat[keep], y[keep]
        return F.cross_entropy(flat, y)

    return loss_of


def ref_fisher(model, targets, data, seed, opts):
    loss_of = _sampled_loss(seed) if opts.get("labels") == "sampled" else None
    grads, _ = _grads(model, targets, data, loss_of)
    return {n: sum(g[n] ** 2 for g in grads) for n in targets}


def ref_salience(model, targets, data, seed, opts):
    grads, params = _grads(model, targets, data)
    return {n: sum((params[n].detach() * g[n]).abs() for g in grads) for n in targets}


def ref_fim_layer(model, targets, data, seed, opts):
    grads, _ = _grads(model, targets, data)
    return {n: sum((g[n] ** 2).sum() for g in grads) for n in targets}


def ref_rgn(model, targets, data, seed, opts):
    grads, params = _grads(model, targets, data)
    return {n: sum(g[n].norm() / params[n].detach().norm() for g in grads) for n in targets}


def ref_principal(model, targets, data, seed, opts):
    params = dict(model.named_parameters())
    out = {}
    for n in targets:
        w = params[n].detach().double()
        u, s, vh = torch.linalg.svd(w)
        approx = sum(s[i] * torch.outer(u[:, i], vh[i]) for i in range(min(opts.get("rank", 8), s.numel())))
        out[n] = approx.abs().float()
    return out


def ref_lottery(model, targets, data, seed, opts):
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in targets)
    before = {n: params[n].detach().clone() for n in targets}
    opt = torch.optim.AdamW([params[n] for n in targets], lr=opts.get("lr", 1e-4), weight_decay=0.0)
    for b in data:
        twin(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: (params[n].detach() - before[n]).abs() for n in targets}


REFERENCES = {
    "random": ref_random,
    "magnitude": ref_magnitude,
    "gradient": ref_gradient,
    "fisher": ref_fisher,
    "salience": ref_salience,
    "fim_layer": ref_fim_layer,
    "rgn": ref_rgn,
    "principal": ref_principal,
    "lottery": ref_lottery,
}

OPTION_CASES = {"fisher": [{}, {"labels": "sampled"}], "principal": [{"rank": 3}], "lottery": [{"lr": 1e-3}]}


def criterion_scores(name, model, data, seed=0, **opts):
    targets = default_targets(model)
    params = dict(model.named_parameters())
    opts = sg.CRITERIA.resolve(name, opts)
    ctx = ScoreContext(model, {n: params[n] for n in targets}, data, len(data), seed, False, opts)
    return sg.CRITERIA.get(name)(ctx), targets


@pytest.mark.parametrize("name", sg.CRITERIA.names())
@pytest.mark.parametrize("make, batches", [(tiny_bert, cls_batches), (tiny_llama, lm_batches)])
def test_criterion_matches_naive_reference(name, make, batches):
    assert name in REFERENCES, f"criterion {name!r} has no naive reference in this test"
    for opts in OPTION_CASES.get(name, [{}]):
        model, data = make(), batches(3)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        got, targets = criterion_scores(name, model, data, seed=5, **opts)
        assert sorted(got) == sorted(targets)
        for n, p in model.named_parameters():  # scoring leaves the model bit-identical
            assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n], n
        want = REFERENCES[name](make(), targets, data, 5, opts)
        for n in targets:
            assert got[n].shape == want[n].shape, n
            # fp32 vs the references' summation order (and an fp32 vs fp64 SVD for principal)
            atol = (1e-4 if name == "principal" else 1e-5) * float(want[n].abs().max())
            torch.testing.assert_close(got[n].float(), want[n].float(), rtol=1e-4, atol=atol)


def test_tensor_level_criteria_pick_the_reference_ranking(bert, batches):
    grads, params = _grads(tiny_bert(), default_targets(bert), batches)
    rgn = {n: sum(g[n].norm() for g in grads) / params[n].norm() for n in grads[0]}
    best = max(rgn, key=lambda n: rgn[n])
    plan = sg.select(bert, batches, method="rgn", count=params[best].numel(), progress=False)
    assert plan.dense == [best] and plan.meta["granularity"] == "tensor"
    fim = {}
    for n in grads[0]:
        layer = n.split(".layer.")[1].split(".")[0] if ".layer." in n else n
        fim[layer] = fim.get(layer, 0.0) + float(sum((g[n] ** 2).sum() for g in grads))
    best_layer = max((k for k in fim if k.isdigit()), key=lambda k: fim[k])
    layer_size = sum(p.numel() for n, p in params.items() if f"layer.{best_layer}." in n and n in grads[0])
    plan = sg.select(
        bert, batches, method="fim_layer", count=layer_size, exclude=["classifier", "pooler"], progress=False
    )
    assert plan.meta["granularity"] == "layer" and plan.meta["selected"] == layer_size
    assert plan.dense and all(f"layer.{best_layer}." in n for n in plan.dense)


def test_sampled_fisher_differs_from_empirical_and_is_seeded(bert, batches):
    emp, _ = criterion_scores("fisher", tiny_bert(), batches)
    s1, _ = criterion_scores("fisher", tiny_bert(), batches, seed=1, labels="sampled")
    s2, _ = criterion_scores("fisher", tiny_bert(), batches, seed=1, labels="sampled")
    n = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(s1[n], s2[n]) and not torch.allclose(s1[n], emp[n], rtol=1e-2, atol=0)


def test_lottery_rewinds_the_model_exactly_even_with_sgd(llama):
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    plan = sg.select(
        llama, lm_batches(2), method="lottery", density=0.05, optimizer="sgd", lr=0.1, progress=False
    )
    assert plan.num_entries == round(0.05 * plan.meta["targeted"]) and plan.meta["calibration_batches"] == 2
    assert all(torch.equal(p, before[n]) for n, p in llama.named_parameters())


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("principal", {"rank": 0}, "option 'rank' of selection criterion 'principal' must be >= 1, got 0"),
        (
            "fisher",
            {"labels": "guess"},
            "option 'labels' of selection criterion 'fisher' must be one of data, sampled",
        ),
        (
            "lottery",
            {"optimizer": "lion"},
            "option 'optimizer' of selection criterion 'lottery' must be one of adamw, sgd",
        ),
        (
            "gradient",
            {"rank": 3},
            "unknown option(s) rank for selection criterion 'gradient'. Its options are: none",
        ),
        ("magnitude", {"lr": 1}, "unknown option(s) lr for selection criterion 'magnitude'"),
        ("rgn", {}, "criterion 'rgn' scores whole tensors, so granularity 'entry' is impossible"),
    ],
)
def test_bad_criterion_options_are_one_line_errors(bert, batches, method, options, message):
    gran = {"rgn": "entry"}.get(method)
    with pytest.raises(sg.SurgicalError) as e:
        sg.select(bert, batches, method=method, density=0.1, granularity=gran, progress=False, **options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_zero_calibration_batches_is_an_error_for_every_data_criterion(bert):
    for name in ("gradient", "fisher", "salience", "lottery", "fim_layer", "rgn"):
        with pytest.raises(sg.SurgicalError, match="yielded no batches"):
            sg.select(bert, [], method=name, density=0.5, granularity="tensor", progress=False)


def test_principal_approximates_each_expert_and_each_conv_as_a_matrix():
    from surgical.select.principal import low_rank, principal_of

    g = torch.Generator().manual_seed(0)
    experts = torch.randn(3, 6, 5, generator=g)
    scores = principal_of(experts, 2)
    for e in range(3):
        assert torch.allclose(scores[e], low_rank(experts[e], 2).abs(), atol=1e-5)
        assert torch.linalg.matrix_rank(low_rank(experts[e], 2)) == 2
    conv = torch.randn(4, 2, 3, 3, generator=g)
    assert torch.allclose(principal_of(conv, 1), low_rank(conv.reshape(4, -1), 1).abs().reshape(conv.shape))
    bias = torch.randn(5, generator=g)
    assert torch.equal(principal_of(bias, 2), bias.abs())
