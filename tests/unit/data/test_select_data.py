"""select_data: exact budgets, determinism, every criterion against a naive reference on tiny data,
the manifest round trip, and one-line errors for bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from surgical.core.errors import SurgicalError
from surgical.data import DATA_CRITERIA, DataSelection, data_hash, select_data, split_batches
from surgical.data.dedup import jaccard, ngrams
from surgical.data.examples import as_examples, batches_of, collate
from surgical.data.losses import brief_tune
from surgical.data.trajectory import kmeans, sample_evenly

CLS = split_batches(cls_batches(n=3, batch=8))  # 24 examples, 12 tokens each
LM = split_batches(lm_batches(n=3, batch=4))  # 12 examples


def _quick(method: str) -> dict:
    return {
        "learnability": {"steps": 2, "lr": 1e-3},
        "trajectory": {"steps": 4, "lr": 1e-3, "clusters": 3},
    }.get(method, {})


def _select(model, examples, method, **kw):
    extra = {"validation": CLS[:4]} if DATA_CRITERIA.entry(method).extra.get("needs_validation") else {}
    return select_data(model, examples, method=method, progress=False, **extra, **_quick(method), **kw)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", DATA_CRITERIA.names())
def test_budget_is_exact_for_fraction_and_count(method):
    model = tiny_bert()
    for kw, want in [
        ({"fraction": 0.25}, 6),
        ({"fraction": 0.3}, 7),
        ({"count": 5}, 5),
        ({"fraction": 1.0}, 24),
    ]:
        sel = _select(model, CLS, method, **kw)
        assert len(sel) == want, (method, kw)
        assert torch.equal(sel.indices, torch.unique(sel.indices))  # sorted and distinct
        assert sel.indices.dtype == torch.int64 and sel.num_examples == 24


@pytest.mark.parametrize("method", DATA_CRITERIA.names())
def test_same_seed_same_selection_and_the_model_is_untouched(method):
    model = tiny_bert()
    state = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    a = _select(model, CLS, method, fraction=0.5, seed=3)
    b = _select(model, CLS, method, fraction=0.5, seed=3)
    assert torch.equal(a.indices, b.indices)
    assert (a.scores is None) == (b.scores is None)
    if a.scores is not None:
        assert torch.equal(a.scores, b.scores)
    assert _same_state(model, state)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not model.training


def test_random_is_a_seeded_uniform_sample():
    a = select_data(None, CLS, method="random", count=6, seed=0, progress=False)
    b = select_data(None, CLS, method="random", count=6, seed=1, progress=False)
    assert not torch.equal(a.indices, b.indices)
    g = torch.Generator().manual_seed(0)
    naive = torch.argsort(torch.rand(24, generator=g), descending=True, stable=True)[:6].sort().values
    assert torch.equal(a.indices, naive)
    counts = torch.zeros(24)
    for seed in range(300):
        counts[select_data(None, CLS, method="random", count=6, seed=seed, progress=False).indices] += 1
    assert counts.min() > 40 and counts.max() < 110  # expected 75 each


def _naive_losses(model, examples):
    """The model's own loss on each example alone (Hugging Face's loss, batch of one)."""
    out = []
    with torch.no_grad():
        for ex in examples:
            batch = {k: v[None] for k, v in ex.items()}
            out.append(float(model(**batch).loss))
    return torch.tensor(out)


@pytest.mark.parametrize("make, data", [(tiny_bert, CLS), (tiny_llama, LM)])
def test_loss_keeps_the_highest_or_lowest_loss(make, data):
    model = make()
    naive = _naive_losses(model, data)
    high = _select(model, data, "loss", count=4, batch_size=5)
    low = _select(model, data, "loss", count=4, keep="low")
    assert torch.allclose(high.scores, naive, atol=1e-5)
    assert set(high.indices.tolist()) == set(torch.topk(naive, 4).indices.tolist())
    assert set(low.indices.tolist()) == set(torch.topk(-naive, 4).indices.tolist())


def test_loss_ignores_padding_and_prompt_tokens():
    model = tiny_llama()
    ids = torch.arange(1, 11)
    labels = ids.clone()
    labels[:4] = -100  # a prompt
    short = {"input_ids": ids, "attention_mask": torch.ones(10, dtype=torch.long), "labels": labels}
    other = {"input_ids": torch.arange(20, 36), "labels": torch.arange(20, 36)}
    sel = _select(model, [short, other], "loss", count=1, batch_size=2)  # short is padded to 16
    naive = _naive_losses(model, [short, other])
    assert torch.allclose(sel.scores, naive, atol=1e-5)


def test_learnability_with_a_given_reference_is_the_loss_difference():
    model, ref = tiny_bert(0), tiny_bert(1)
    sel = _select(model, CLS, "learnability", count=5, reference=ref)
    naive = _naive_losses(model, CLS) - _naive_losses(ref, CLS)
    assert torch.allclose(sel.scores, naive, atol=1e-5)
    assert set(sel.indices.tolist()) == set(torch.topk(naive, 5).indices.tolist())

    def ref_logits(batch):
        return ref(**{k: v for k, v in batch.items() if k != "labels"}).logits

    by_fn = _select(model, CLS, "learnability", count=5, reference=ref_logits)
    assert torch.allclose(by_fn.scores, sel.scores, atol=1e-6) and by_fn.meta["reference"] == "function"


def test_learnability_tunes_a_copy_and_scores_against_it():
    model = tiny_bert()
    state = _state(model)
    sel = select_data(
        model,
        CLS,
        method="learnability",
        fraction=0.5,
        reference_fraction=0.5,
        steps=8,
        lr=1e-2,
        progress=False,
    )
    assert _same_state(model, state)
    assert sel.meta["reference_examples"] == 12
    assert sel.scores.mean() > 0  # the tuned reference fits the data better than the model


def test_brief_tune_restores_nothing_because_it_never_touches_the_model():
    model = tiny_llama()
    model.train()
    for p in list(model.parameters())[:3]:
        p.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    state = _state(model)
    batches = batches_of(LM, None, 4)
    seen = []
    tuned = brief_tune(model, batches, steps=5, lr=1e-2, seed=0, on_step=lambda s, m: seen.append(s))
    assert seen == [0, 1, 2, 3, 4, 5]
    assert _same_state(model, state) and [p.requires_grad for p in model.parameters()] == flags
    assert model.training
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, model.get_parameter(n))]
    assert len(changed) == len(list(model.parameters()))  # every parameter was tuned, frozen ones too
    # a naive AdamW loop over the same batch order gives the same weights
    naive = copy.deepcopy(model).eval()
    params = list(naive.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    order = []
    for _ in range(5):
        if not order:
            order = torch.randperm(len(batches), generator=g).tolist()
        b = batches[order.pop(0)]
        opt.zero_grad()
        naive(**b).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    for (n, p), q in zip(tuned.named_parameters(), naive.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_kmeans_finds_separated_blobs_and_sampling_is_even():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [3, 10, 20]
    x = torch.cat([c + 0.1 * torch.randn(s, 2, generator=g) for c, s in zip(centres, sizes, strict=True)])
    labels = kmeans(x, 3, torch.Generator().manual_seed(1))
    truth = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    for j in range(3):  # every blob is one cluster
        assert labels[truth == j].unique().numel() == 1
    assert labels.unique().numel() == 3
    picked = sample_evenly(labels, 12, torch.Generator().manual_seed(0))
    per = torch.bincount(truth[picked], minlength=3).tolist()
    assert per == [3, 5, 4] or sorted(per) == [3, 4, 5]  # the small blob whole, the rest shared
    assert per[0] == 3
    for budget in range(1, 34):  # exact for every budget, never repeating
        p = sample_evenly(labels, budget, torch.Generator().manual_seed(budget))
        assert p.numel() == budget == p.unique().numel()


def test_kmeans_with_fewer_distinct_points_than_clusters():
    x = torch.tensor([[1.0], [1.0], [2.0], [2.0]])
    labels = kmeans(x, 4, torch.Generator().manual_seed(0))
    assert labels.unique().numel() == 2 and labels[0] == labels[1] and labels[2] == labels[3]


def test_trajectory_covers_the_clusters():
    model = tiny_llama()
    sel = select_data(model, LM, method="trajectory", count=6, steps=4, lr=1e-2, checkpoints=3, clusters=3,
                      progress=False)  # fmt: skip
    assert len(sel) == 6 and sel.scores is None and 1 <= sel.meta["clusters"] <= 3
    k, sizes, kept = sel.meta["clusters"], sel.meta["cluster_sizes"], sel.meta["kept_by_cluster"]
    assert len(sizes) == len(kept) == k and sum(sizes) == len(LM) and sum(kept) == 6
    assert all(0 <= a <= n for a, n in zip(kept, sizes, strict=True))
    assert sel.meta["checkpoint_steps"] == [0, 2, 4]  # three checkpoints over four steps
    losses = sel.meta["cluster_mean_losses"]
    assert len(losses) == k and all(len(row) == 3 and all(v > 0 for v in row) for row in losses)
    clusters = sel.meta["kept_clusters"]  # one per kept index, adding up to kept_by_cluster
    assert len(clusters) == 6 and [clusters.count(j) for j in range(k)] == kept


def test_describe_clusters_counts_members_kept_and_mean_trajectories():
    from surgical.data.trajectory import describe_clusters

    traj = torch.tensor([[1.0, 0.5], [3.0, 1.5], [10.0, 12.0], [2.0, 1.0]])
    info = describe_clusters(traj, torch.tensor([0, 0, 1, 0]), torch.tensor([2, 1]), [0, 4])
    assert info == {
        "clusters": 2,
        "cluster_sizes": [3, 1],
        "kept_by_cluster": [1, 1],
        "checkpoint_steps": [0, 4],
        "cluster_mean_losses": [[2.0, 1.0], [10.0, 12.0]],
        "rising_clusters": [1],  # its loss ends above where it started
        "kept_clusters": [0, 1],  # examples 1 and 2, in the order of the sorted indices
    }


def test_rising_shares_weighs_the_rising_clusters_in_the_data_and_in_the_kept_set():
    from surgical.data.trajectory import rising_shares

    meta = {"rising_clusters": [1], "cluster_sizes": [3, 1], "kept_by_cluster": [1, 1]}
    assert rising_shares(meta) == (0.25, 0.5)
    assert rising_shares({**meta, "rising_clusters": []}) is None and rising_shares({}) is None


def _with_duplicates():
    distinct = split_batches(cls_batches(n=1, batch=6, seed=5))
    return [copy.deepcopy(distinct[i % 6]) for i in (0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 1, 3)]


def test_diversity_never_picks_two_identical_examples_while_distinct_remain():
    data = _with_duplicates()
    model = tiny_bert()
    for seed in range(4):
        sel = _select(model, data, "diversity", count=6, seed=seed)
        picked = [tuple(data[i]["input_ids"].tolist()) for i in sel.indices]
        assert len(set(picked)) == 6
    sel = _select(model, data, "diversity", count=8)
    picked = [tuple(data[i]["input_ids"].tolist()) for i in sel.indices]
    assert len(set(picked)) == 6 and sel.meta["distinct"] == 6


def test_diversity_is_greedy_k_center_on_mean_pooled_embeddings():
    model = tiny_bert()
    sel = _select(model, CLS, "diversity", count=5, seed=2)
    with torch.no_grad():
        emb = torch.stack(
            [model(**{k: v[None] for k, v in ex.items() if k != "labels"}, output_hidden_states=True)
             .hidden_states[-1][0].mean(0) for ex in CLS]
        )  # fmt: skip
    x = F.normalize(emb.double(), dim=1)
    first = int(torch.randint(24, (1,), generator=torch.Generator().manual_seed(2 * 1_000_003)))
    picked = [first]
    while len(picked) < 5:  # the naive O(N k) greedy
        d = [min(1 - float(x[i] @ x[j]) for j in picked) if i not in picked else -1 for i in range(24)]
        picked.append(max(range(24), key=lambda i: (d[i], -i)))
    assert sel.indices.tolist() == sorted(picked)


def _naive_dedup(data, threshold, n):
    kept = []
    for i, ex in enumerate(data):
        s = ngrams(ex["input_ids"].tolist(), n)
        if not any(jaccard(s, ngrams(data[j]["input_ids"].tolist(), n)) >= threshold for j in kept):
            kept.append(i)
    return kept


def test_dedup_matches_the_naive_greedy_rule():
    g = torch.Generator().manual_seed(0)
    base = [torch.randint(1, 50, (20,), generator=g) for _ in range(8)]
    data = []
    for i, ids in enumerate(base):
        data.append({"input_ids": ids, "labels": torch.tensor(i % 2)})
        near = ids.clone()
        near[i % 20] = 99  # one token changed: Jaccard of 3-grams ~ 0.7-0.9
        data.append({"input_ids": near, "labels": torch.tensor(0)})
        data.append({"input_ids": ids.clone(), "labels": torch.tensor(1)})  # an exact copy
    data.append({"input_ids": torch.tensor([5, 6]), "labels": torch.tensor(0)})  # shorter than an n-gram
    data.append({"input_ids": torch.tensor([5, 6]), "labels": torch.tensor(0)})
    for threshold in (0.5, 0.7, 0.8, 0.95, 1.0):
        naive = _naive_dedup(data, threshold, 3)
        sel = select_data(None, data, method="dedup", fraction=1.0, threshold=threshold, progress=False)
        assert sel.indices.tolist() == naive, threshold
        assert sel.meta["kept"] == len(naive)
    sel = select_data(
        None, data, method="dedup", count=4, progress=False
    )  # the budget: a random 4 of the kept
    assert len(sel) == 4 and set(sel.indices.tolist()) <= set(_naive_dedup(data, 0.8, 3))


def test_minhash_agreement_estimates_the_jaccard_similarity():
    from surgical.data.dedup import _signatures

    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        a = torch.randint(0, 1000, (60,), generator=g).tolist()
        b = (
            a[: int(torch.randint(10, 60, (1,), generator=g))]
            + torch.randint(0, 1000, (30,), generator=g).tolist()
        )
        sa, sb = ngrams(a, 2), ngrams(b, 2)
        x, y = _signatures([sa, sb])
        agree = sum(u == v for u, v in zip(x, y, strict=True)) / len(x)
        assert abs(agree - jaccard(sa, sb)) < 0.15


def _naive_gradient_scores(model, data, validation, support, weight=None):
    """Cosine of each example's gradient on ``support`` (times ``weight``) to the mean validation
    gradient, by backward."""

    def feats(ex):
        model.zero_grad()
        batch = {k: v[None] for k, v in ex.items()}
        model(**batch).loss.backward()
        named = dict(model.named_parameters())
        out = [
            named[n].grad.reshape(-1)[idx] if idx is not None else named[n].grad.reshape(-1)
            for n, idx in support.items()
        ]
        return torch.cat(out).double()

    target = torch.stack([feats(ex) for ex in validation]).mean(0)
    w = 1.0 if weight is None else weight
    scores = torch.stack([F.cosine_similarity(feats(ex) * w, target, dim=0) for ex in data])
    model.zero_grad(set_to_none=True)
    return scores.float()


def _support(model):
    named = dict(model.named_parameters())
    return {
        "model.layers.0.mlp.down_proj.weight": torch.arange(
            0, named["model.layers.0.mlp.down_proj.weight"].numel(), 7
        ),
        "model.layers.1.self_attn.q_proj.weight": torch.tensor([0, 5, 9, 100, 1023]),
        "model.norm.weight": None,
    }


def test_gradient_matches_naive_backward_on_the_support():
    model = tiny_llama()
    support = _support(model)
    sel = select_data(model, LM, method="gradient", count=4, validation=LM[:3], params=support, dim=4096,
                      progress=False)  # fmt: skip
    assert not sel.meta["projected"] and sel.meta["features"] == 293 + 5 + 32
    naive = _naive_gradient_scores(copy.deepcopy(model), LM, LM[:3], support)
    assert torch.allclose(sel.scores, naive, atol=1e-4)
    assert set(sel.indices.tolist()) == set(torch.topk(naive, 4).indices.tolist())
    assert sel.meta["params"]["model.norm.weight"] is None


@pytest.mark.parametrize("projection", ["rademacher", "gaussian", "sketch"])
def test_projected_gradient_scores_track_the_exact_ones(projection):
    model = tiny_llama()
    support = {"model.layers.0.mlp.down_proj.weight": None, "model.layers.1.mlp.up_proj.weight": None}  # 4096
    exact = select_data(model, LM, method="gradient", count=4, validation=LM[:3], params=support, dim=4096,
                        progress=False).scores  # fmt: skip
    proj = select_data(model, LM, method="gradient", count=4, validation=LM[:3], params=support, dim=1024,
                       projection=projection, progress=False)  # fmt: skip
    assert proj.meta["projected"]
    assert (proj.scores - exact).abs().max() < 0.15
    assert torch.corrcoef(torch.stack([proj.scores, exact]))[0, 1] > 0.9


def test_gradient_takes_a_plan_like_object():
    model = tiny_llama()

    class FakePlan:  # duck-typed: the fields of surgical.Plan that matter
        entries = {"model.layers.0.mlp.down_proj.weight": torch.tensor([1, 2, 3])}
        rows = {"model.layers.1.mlp.up_proj.weight": torch.tensor([0, 2])}
        cols: dict = {}
        dense = ["model.norm.weight"]
        num_entries = 3 + 64

        def entry_indices(self, name):
            if name in self.entries:
                return self.entries[name]
            r = self.rows[name]
            return (r[:, None] * 32 + torch.arange(32)[None, :]).reshape(-1)

    sel = select_data(
        model, LM, method="gradient", count=3, validation=LM[:2], params=FakePlan(), progress=False
    )
    up = "model.layers.1.mlp.up_proj.weight"
    support = {
        "model.layers.0.mlp.down_proj.weight": torch.tensor([1, 2, 3]),
        up: FakePlan().entry_indices(up),
        "model.norm.weight": None,
    }
    naive = _naive_gradient_scores(copy.deepcopy(model), LM, LM[:2], support)
    assert sel.meta["features"] == 3 + 64 + 32
    assert torch.allclose(sel.scores, naive, atol=1e-4)


def _bert_support(model):
    named = dict(model.named_parameters())
    q = "bert.encoder.layer.0.attention.self.query.weight"
    return {
        q: torch.arange(0, named[q].numel(), 5),
        "bert.encoder.layer.1.output.dense.weight": torch.tensor([0, 3, 64, 1000, 2047]),
        "bert.encoder.layer.1.output.LayerNorm.bias": None,
        "classifier.weight": None,
    }


def _naive_adam_weight(model, data, support, steps, lr, eps=1e-8):
    """1 / (sqrt(v_hat) + eps) by hand: torch.optim.Adam on a copy, full-batch warmup, gradients
    outside the support zeroed (so those entries never move), v read from the optimizer's state."""
    warm = copy.deepcopy(model).eval()
    named = dict(warm.named_parameters())
    for p in warm.parameters():
        p.requires_grad_(False)
    masks = {}
    for n, idx in support.items():
        named[n].requires_grad_(True)
        mask = torch.zeros(named[n].numel())
        mask[slice(None) if idx is None else idx] = 1
        masks[n] = mask.view_as(named[n])
    opt = torch.optim.Adam([named[n] for n in support], lr=lr, eps=eps)
    batch = collate(data)
    for _ in range(steps):
        opt.zero_grad()
        warm(**batch).loss.backward()
        for n in support:
            named[n].grad.mul_(masks[n])
        opt.step()
    before = dict(model.named_parameters())
    for n in support:  # the entries outside the support did not move
        assert torch.equal(named[n].detach() * (1 - masks[n]), before[n].detach() * (1 - masks[n]))
    v = torch.cat([
        opt.state[named[n]]["exp_avg_sq"].reshape(-1)[slice(None) if idx is None else idx]
        for n, idx in support.items()
    ]).double()  # fmt: skip
    return 1.0 / ((v / (1 - 0.999**steps)).sqrt() + eps)


def test_adam_preconditioned_gradient_matches_torch_adam_by_hand():
    model = tiny_bert()
    support = _bert_support(model)
    state = _state(model)
    kw = dict(count=6, validation=CLS[:5], params=support, dim=4096, batch_size=len(CLS), progress=False)
    sel = select_data(
        model, CLS, method="gradient", precondition="adam", warmup_steps=3, warmup_lr=1e-2, **kw
    )
    assert _same_state(model, state)  # the warmup's changes were undone exactly
    assert not sel.meta["projected"] and sel.meta["unwarmed"] == 0
    assert sel.options["precondition"] == "adam" and sel.options["warmup_steps"] == 3
    weight = _naive_adam_weight(model, CLS, support, steps=3, lr=1e-2)
    naive = _naive_gradient_scores(copy.deepcopy(model), CLS, CLS[:5], support, weight=weight)
    assert torch.allclose(sel.scores, naive, atol=1e-4)
    assert set(sel.indices.tolist()) == set(torch.topk(naive, 6).indices.tolist())
    plain = select_data(model, CLS, method="gradient", **kw).scores
    assert (plain - sel.scores).abs().max() > 0.05  # the preconditioning changes the scores


def test_adam_preconditioning_is_deterministic_and_leaves_the_model_as_it_was():
    model = tiny_bert().train()
    state = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    kw = dict(fraction=0.5, validation=CLS[:4], params=_bert_support(model), precondition="adam",
              warmup_steps=5, warmup_lr=1e-2, dim=64, progress=False)  # fmt: skip
    a = select_data(model, CLS, method="gradient", seed=4, **kw)
    b = select_data(model, CLS, method="gradient", seed=4, **kw)
    c = select_data(model, CLS, method="gradient", seed=5, **kw)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    assert not torch.equal(a.scores, c.scores)  # another seed: another warmup order and projection
    assert _same_state(model, state) and model.training
    assert [p.requires_grad for p in model.parameters()] == flags


def test_adam_preconditioning_reports_entries_without_warmup_gradient():
    model = tiny_bert()
    emb = "bert.embeddings.word_embeddings.weight"  # row 0: the padding token, in no example
    support = {emb: torch.arange(0, 32), "classifier.weight": None}
    sel = select_data(model, CLS, method="gradient", count=3, validation=CLS[:4], params=support,
                      precondition="adam", warmup_steps=2, progress=False)  # fmt: skip
    assert sel.meta["unwarmed"] == 32 and torch.isfinite(sel.scores).all()


def test_examples_from_a_dataset_and_from_dicts_hash_alike(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        {"input_ids": ex["input_ids"].tolist(), "labels": ex["labels"].tolist(), "text": "x"} for ex in LM
    ]
    ds = datasets.Dataset.from_list(rows)
    assert data_hash(as_examples(ds)) == data_hash(as_examples(LM)) == data_hash(LM)
    padded = collate([LM[0], {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2])}])
    again = split_batches([padded])
    assert data_hash(again) == data_hash(
        [LM[0], {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2])}]
    )
    sel = select_data(None, ds, method="random", fraction=0.5, progress=False)
    sub = sel.subset(ds)
    assert isinstance(sub, datasets.Dataset) and len(sub) == 6
    assert sub["input_ids"] == [rows[i]["input_ids"] for i in sel.indices]


def test_manifest_round_trip_and_hash_check(tmp_path):
    model = tiny_bert()
    sel = _select(model, CLS, "loss", fraction=0.25)
    sel.save(tmp_path / "sel")
    back = DataSelection.load(tmp_path / "sel")
    assert torch.equal(back.indices, sel.indices) and torch.equal(back.scores, sel.scores)
    assert back.method == "loss" and back.options == {"keep": "high"} and back.data_hash == sel.data_hash
    assert back.meta["budget"] == 6 and back.num_examples == 24
    assert len(back.check(CLS)) == 24
    assert [ex["input_ids"].tolist() for ex in back.subset(CLS)] == [
        CLS[i]["input_ids"].tolist() for i in sel.indices
    ]
    picks = _select(model, CLS, "diversity", count=3)
    picks.save(tmp_path / "picks")
    assert DataSelection.load(tmp_path / "picks").scores is None
    other = copy.deepcopy(CLS)
    other[5]["labels"] = 1 - other[5]["labels"]
    for bad in (other, CLS[:-1], list(reversed(CLS))):
        with pytest.raises(SurgicalError, match="the selection was made for other data"):
            back.check(bad)


def test_damaged_manifests_are_refused(tmp_path):
    sel = select_data(None, CLS, method="random", count=3, progress=False)
    sel.save(tmp_path / "s")
    with pytest.raises(SurgicalError, match="does not exist"):
        DataSelection.load(tmp_path / "nope")
    (tmp_path / "s" / "selection.safetensors").write_bytes(b"garbage")
    with pytest.raises(SurgicalError, match="truncated or corrupted"):
        DataSelection.load(tmp_path / "s")
    sel.save(tmp_path / "t")
    (tmp_path / "t" / "selection.json").write_text('{"format": "other"}')
    with pytest.raises(SurgicalError, match="corrupted"):
        DataSelection.load(tmp_path / "t")


BAD = [
    ({"fraction": 0.0}, r"fraction must be in \(0, 1\]"),
    ({"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
    ({"fraction": -0.1}, r"fraction must be in \(0, 1\]"),
    ({}, "exactly one of fraction and count"),
    ({"fraction": 0.5, "count": 3}, "exactly one of fraction and count"),
    ({"count": 0}, "count must be >= 1"),
    ({"count": 25}, "count 25 exceeds the 24 examples"),
    ({"count": 2.5}, "count must be an integer"),
    ({"count": 3, "method": "nope"}, "unknown data criterion 'nope'. Use one of: dedup, diversity"),
    ({"count": 3, "method": "loss", "keep": "middle"}, "must be one of high, low"),
    ({"count": 3, "method": "loss", "nope": 1}, r"unknown option\(s\) nope for data criterion 'loss'"),
    ({"count": 3, "method": "gradient"}, "needs validation examples"),
    ({"count": 3, "method": "loss", "model": None}, "needs a model"),
    ({"count": 3, "batch_size": 0}, "batch_size must be a positive integer"),
]


@pytest.mark.parametrize("kw, message", BAD)
def test_bad_arguments_are_one_line_errors(kw, message):
    kw = dict(kw)
    model = kw.pop("model", tiny_bert())
    with pytest.raises(SurgicalError, match=message) as e:
        select_data(model, CLS, progress=False, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "examples are empty"),
        ([{"input_ids": [1, 2]}], "example 0 has no 'labels'"),
        ([{"labels": 1}], "example 0 has no 'input_ids'"),
        ([{"input_ids": [1, 2], "labels": 0}, {"text": "x"}], "example 1 has no 'input_ids' and no 'labels'"),
        ([{"input_ids": [], "labels": 0}], "input_ids must be one non-empty sequence"),
        ([{"input_ids": [[1, 2], [3, 4]], "labels": [0, 1]}], "split padded batches"),
        ([{"input_ids": [1, 2, 3], "labels": [1, 2]}], "2 labels for 3 input_ids"),
        ([{"input_ids": ["a"], "labels": 0}], "'input_ids' is not a number"),
        ([{"input_ids": [1.5, 2.0], "labels": 0}], "'input_ids' must hold integers"),
        ([{"input_ids": [1, 2], "labels": 0}, {"input_ids": [1, 2], "labels": [1, 2]}], "mix class labels"),
        ("not examples", "must be a datasets.Dataset or a list"),
        ({"input_ids": [1]}, "must be a datasets.Dataset or a list"),
    ],
)
def test_bad_examples_are_one_line_errors(data, message):
    with pytest.raises(SurgicalError, match=message) as e:
        select_data(None, data, count=1, progress=False)
    assert "\n" not in str(e.value)


def test_a_dataset_without_the_fields_or_rows_is_refused():
    datasets = pytest.importorskip("datasets")
    with pytest.raises(SurgicalError, match="have no column 'input_ids'"):
        select_data(None, datasets.Dataset.from_dict({"text": ["a"], "labels": [0]}), count=1, progress=False)
    with pytest.raises(SurgicalError, match="examples are empty"):
        select_data(
            None, datasets.Dataset.from_dict({"input_ids": [], "labels": []}), count=1, progress=False
        )
    with pytest.raises(SurgicalError, match="is a DatasetDict"):
        one = datasets.Dataset.from_dict({"input_ids": [[1]], "labels": [0]})
        select_data(None, datasets.DatasetDict(train=one), count=1, progress=False)


def test_gradient_params_must_fit_the_model():
    model = tiny_llama()
    for params, message in [
        ({"nope.weight": None}, "which the model does not have"),
        ({"model.norm.weight": torch.tensor([40])}, "index out of range"),
        ({}, "params must map parameter names"),
        ({"model.norm.weight": torch.tensor([], dtype=torch.long)}, "select no parameter entries"),
    ]:
        with pytest.raises(SurgicalError, match=message):
            select_data(
                model, LM, method="gradient", count=2, validation=LM[:2], params=params, progress=False
            )


def _registries():
    from surgical.data import TOKEN_CRITERIA

    return {"data": DATA_CRITERIA, "token": TOKEN_CRITERIA}


@pytest.mark.parametrize("label", ["data", "token"])
def test_registry_conformance(label):
    reg = _registries()[label]
    for e in reg.entries():
        assert e.help
        for o in e.options:
            assert o.type in (int, float, str, bool) and o.help
            assert o.check(o.default, "x") == o.default
        assert reg.resolve(e.name, {}) == {o.name: o.default for o in e.options}
        with pytest.raises(SurgicalError, match=r"unknown option\(s\) no_such_option for .*Its options are"):
            reg.resolve(e.name, {"no_such_option": 1})
    with pytest.raises(SurgicalError, match="Use one of: " + ", ".join(reg.names())):
        reg.get("no-such-name")


def _labels(data) -> list[int]:
    return [int(torch.as_tensor(e["labels"]).reshape(-1)[0]) for e in data]


@pytest.mark.parametrize("method", ["loss", "gradient", "random", "importance"])
def test_stratify_keeps_the_class_shares_and_the_best_of_each_class(method):
    model = tiny_bert()
    labels = _labels(CLS)
    shares = {c: labels.count(c) / len(labels) for c in set(labels)}
    for kw, k in (({"fraction": 0.5}, 12), ({"count": 7}, 7), ({"fraction": 1.0}, 24)):
        sel = _select(model, CLS, method, stratify=True, **kw)
        assert len(sel) == k and torch.equal(sel.indices, torch.unique(sel.indices))  # budget exact
        kept = [labels[i] for i in sel.indices.tolist()]
        for c, share in shares.items():  # within one example of the class's share
            assert abs(kept.count(c) - share * k) <= 1, (method, kw, c)
        for c in shares:  # the kept ones of a class are its best-scored
            mine = [i for i in range(len(labels)) if labels[i] == c]
            kept_c = [i for i in sel.indices.tolist() if labels[i] == c]
            worst_kept = min(sel.scores[kept_c].tolist(), default=float("inf"))
            dropped = [sel.scores[i].item() for i in mine if i not in kept_c]
            assert all(d <= worst_kept for d in dropped)
        assert sel.meta["stratify"] is True


def test_stratified_top_k_splits_by_largest_remainder():
    from surgical.data.select_data import stratified_top_k

    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    scores = torch.arange(10, dtype=torch.float)
    picked = stratified_top_k(scores, labels, 5)  # quotas 2.5, 1.5, 1.0 -> 3 (tie: class 0), 1, 1
    assert sorted(picked.tolist()) == [2, 3, 4, 7, 9]


@pytest.mark.parametrize("method", ["trajectory", "diversity"])
def test_set_choosing_criteria_keep_exact_class_quotas_when_stratified(method):
    from surgical.data.criteria import class_quotas

    model = tiny_bert()
    labels = torch.tensor(_labels(CLS))
    for budget in ({"fraction": 0.5}, {"count": 7}, {"fraction": 1.0}):
        sel = _select(model, CLS, method, stratify=True, **budget)
        k = len(sel)
        assert k == (7 if "count" in budget else round(budget["fraction"] * len(CLS)))
        assert torch.equal(sel.indices, torch.unique(sel.indices))
        for n, pos in class_quotas(labels, k):  # exactly each class's quota
            assert int(torch.isin(sel.indices, pos).sum()) == n
        again = _select(model, CLS, method, stratify=True, **budget)
        assert torch.equal(sel.indices, again.indices)  # seeded


def test_stratified_diversity_never_repeats_an_input_within_a_class_while_others_remain():
    model = tiny_bert()
    data = [dict(e) for e in CLS[:8]] * 2  # every input twice, same label
    labels = torch.tensor(_labels(data))
    sel = _select(model, data, "diversity", count=8, stratify=True)
    picked = [tuple(data[i]["input_ids"].tolist()) for i in sel.indices.tolist()]
    assert len(set(picked)) == 8  # 8 distinct inputs, quotas met by distinct ones first
    assert sorted(labels[sel.indices].tolist()) == sorted(_labels(CLS[:8]))


def test_stratify_refuses_dedup_and_token_labels():
    with pytest.raises(SurgicalError, match="stratify does not apply to 'dedup'.*Drop stratify.*trajectory"):
        _select(None, CLS, "dedup", fraction=0.5, stratify=True)
    with pytest.raises(SurgicalError, match="one class label per example"):
        _select(tiny_llama(), LM, "loss", fraction=0.5, stratify=True)


def test_rademacher_projection_is_signs_of_one_scale_seeded_and_chunked():
    from surgical.data.gradient import _CHUNK, Projection

    p = Projection(_CHUNK + 100, 12, "rademacher", seed=3)  # a dim that is not a whole byte of signs
    first, second = p._chunk(0, torch.device("cpu")), p._chunk(_CHUNK, torch.device("cpu"))
    assert first.shape == (_CHUNK, 12) and second.shape == (100, 12)
    assert set((first * 12**0.5).round().unique().tolist()) == {-1.0, 1.0}
    assert abs(float((first > 0).float().mean()) - 0.5) < 0.01
    assert torch.equal(
        first, Projection(_CHUNK + 100, 12, "rademacher", seed=3)._chunk(0, torch.device("cpu"))
    )
    assert not torch.equal(
        first, Projection(_CHUNK + 100, 12, "rademacher", seed=4)._chunk(0, torch.device("cpu"))
    )
    assert not torch.equal(first[:100], second)  # each chunk draws its own signs
    x = torch.randn(5, _CHUNK + 100)
    torch.testing.assert_close(p(x), x[:, :_CHUNK] @ first + x[:, _CHUNK:] @ second)
    assert p.kept and not Projection(1 << 20, 64, "rademacher", seed=0).kept  # regenerated per call
