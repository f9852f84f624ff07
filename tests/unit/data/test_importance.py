"""The ``importance`` data criterion (DSIR-like hashed n-gram importance resampling)."""

from __future__ import annotations

import math

import pytest
import torch

from surgical.core.errors import SurgicalError
from surgical.data import select_data
from surgical.data.importance import _MULTIPLIERS, _PRIME, ngram_buckets


def _naive_buckets(ids: list[int], n_max: int, buckets: int) -> list[int]:
    """Every n-gram hashed one at a time: h = 0, then h = h * M[k] + token + (k + 1) for k < n."""
    out = []
    for n in range(1, n_max + 1):
        for i in range(len(ids) - n + 1):
            h = 0
            for k in range(n):
                h = (h * _MULTIPLIERS[k] + ids[i + k] + k + 1) % _PRIME
            out.append(h % buckets)
    return out


def test_ngram_buckets_hash_every_ngram_up_to_n_like_the_one_at_a_time_rule():
    ids = [5, 17, 5, 17, 99, 3]
    for n, buckets in ((1, 50), (2, 10_000), (3, 97)):
        got = ngram_buckets(torch.tensor(ids), n, buckets).tolist()
        assert got == _naive_buckets(ids, n, buckets)
        assert len(got) == sum(len(ids) - k + 1 for k in range(1, n + 1))
    # a sequence shorter than n has no n-grams of that size; equal n-grams share a bucket
    assert ngram_buckets(torch.tensor([7]), 3, 100).tolist() == _naive_buckets([7], 1, 100)
    b = ngram_buckets(torch.tensor(ids), 2, 10_000).tolist()
    assert b[6] == b[8]  # the bigram (5, 17) twice


def _domain(lo: int, n: int, seed: int, label_of=lambda i: i % 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(6, 14, (n,), generator=g).tolist()
    return [
        {"input_ids": torch.randint(lo, lo + 40, (k,), generator=g), "labels": torch.tensor(label_of(i))}
        for i, k in enumerate(sizes)
    ]


POOL = _domain(10, 20, 0) + _domain(60, 20, 1)  # two token ranges: domain A then domain B
TARGET = _domain(10, 20, 2)  # a sample of domain A


def _naive_log_weights(pool, target, n, buckets, smoothing, normalize=False):
    def counts(data):
        c = [0.0] * buckets
        for ex in data:
            for b in _naive_buckets(ex["input_ids"].tolist(), n, buckets):
                c[b] += 1
        total = sum(c) + smoothing * buckets
        return [math.log((x + smoothing) / total) for x in c]

    t, p = counts(target), counts(pool)
    out, sizes = [], [len(_naive_buckets(ex["input_ids"].tolist(), n, buckets)) for ex in pool]
    for ex in pool:
        bag = _naive_buckets(ex["input_ids"].tolist(), n, buckets)
        w = sum(t[b] - p[b] for b in bag)
        out.append(w / len(bag) if normalize else w)
    if normalize:
        out = [w * sum(sizes) / len(sizes) for w in out]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("normalize", [False, True])
def test_scores_without_sampling_are_the_log_importance_weights(normalize):
    sel = select_data(
        None, POOL, method="importance", count=20, validation=TARGET, sample=False, buckets=1000, ngram=2,
        smoothing=0.5, normalize=normalize, progress=False,
    )  # fmt: skip
    want = _naive_log_weights(POOL, TARGET, 2, 1000, 0.5, normalize)
    assert torch.allclose(sel.scores.double(), want, rtol=1e-5, atol=1e-4)
    assert sel.indices.tolist() == list(range(20))  # every domain-A example, none of B
    pool_buckets = {b for ex in POOL for b in _naive_buckets(ex["input_ids"].tolist(), 2, 1000)}
    target = [b for ex in TARGET for b in _naive_buckets(ex["input_ids"].tolist(), 2, 1000)]
    covered = sum(b in pool_buckets for b in target) / len(target)  # target n-grams the pool has
    assert sel.meta["target_coverage"] == round(covered, 4) and 0.5 < covered < 1
    q = sel.meta["log_weights"]
    assert q["min"] <= q["p10"] <= q["median"] <= q["p90"] <= q["max"]


def test_sampling_draws_in_proportion_to_the_weights():
    pool = POOL[:3]
    kw = dict(method="importance", validation=TARGET + POOL[20:22], buckets=64, progress=False)
    logw = select_data(None, pool, count=1, sample=False, **kw).scores.double()
    want = torch.softmax(logw, 0)  # P(first pick = i) = w_i / sum w under Gumbel top-k
    picks = torch.zeros(3)
    for seed in range(600):
        picks[select_data(None, pool, count=1, seed=seed, **kw).indices[0]] += 1
    assert torch.allclose(picks / 600, want.float(), atol=0.06), (picks / 600, want)


def test_sampling_keeps_mostly_the_target_domain_and_is_seeded():
    kept = []
    for seed in (0, 1):
        sel = select_data(None, POOL, method="importance", fraction=0.5, validation=TARGET, seed=seed,
                          progress=False)  # fmt: skip
        again = select_data(None, POOL, method="importance", fraction=0.5, validation=TARGET, seed=seed,
                            progress=False)  # fmt: skip
        assert torch.equal(sel.indices, again.indices) and torch.equal(sel.scores, again.scores)
        assert int((sel.indices < 20).sum()) >= 18  # at most 2 of 20 from domain B (none, here)
        kept.append(sel.indices)
    random = select_data(None, POOL, method="random", fraction=0.5, progress=False)
    assert int((random.indices < 20).sum()) < 18


def test_coverage_reports_target_ngrams_the_pool_lacks_and_stratify_keeps_class_shares():
    target = _domain(200, 6, 3)  # tokens the pool never has
    sel = select_data(None, POOL, method="importance", count=4, validation=target, buckets=100_000,
                      progress=False)  # fmt: skip
    assert sel.meta["target_coverage"] < 0.05
    sel = select_data(None, POOL, method="importance", count=4, validation=TARGET, sample=False,
                      progress=False)  # fmt: skip
    kl = sel.meta["kl_to_target"]
    assert kl["kept"] < kl["pool"]  # four domain-A examples are closer to the target than the mix

    def smoothed_log(data):  # the bucket distribution of ``data``, smoothed as the criterion does
        c = torch.zeros(10_000, dtype=torch.float64)
        for ex in data:
            for b in _naive_buckets(ex["input_ids"].tolist(), 2, 10_000):
                c[b] += 1
        return ((c + 1) / (c.sum() + 10_000)).log()

    t, kept = smoothed_log(TARGET), smoothed_log([POOL[i] for i in sel.indices.tolist()])
    assert kl["kept"] == pytest.approx(float((t.exp() * (t - kept)).sum()), abs=1e-4)
    assert kl["pool"] == pytest.approx(float((t.exp() * (t - smoothed_log(POOL))).sum()), abs=1e-4)
    stratified = select_data(None, POOL, method="importance", count=4, validation=TARGET, stratify=True,
                             progress=False)  # fmt: skip
    assert "kl_to_target" not in stratified.meta  # stratify changes the kept set after scoring
    both = _domain(10, 20, 0, label_of=lambda i: int(i < 4)) + _domain(60, 20, 1, label_of=lambda i: 0)
    sel = select_data(None, both, method="importance", count=10, validation=TARGET, stratify=True,
                      sample=False, progress=False)  # fmt: skip
    labels = [int(both[i]["labels"]) for i in sel.indices.tolist()]
    assert labels.count(1) == 1  # 4 of 40 are class 1: one of ten, however alike the others look


def test_bad_input_is_one_line():
    empty_target = [{"input_ids": torch.tensor([3, 4]), "attention_mask": torch.tensor([0, 0]), "labels": 0}]
    for kw, message in [
        ({}, "needs validation examples"),
        ({"validation": empty_target}, "validation examples hold no tokens"),
        ({"validation": TARGET, "ngram": 9}, r"'ngram' of data criterion 'importance' must be in \[1, 5\]"),
        ({"validation": TARGET, "smoothing": 0}, "'smoothing' .* must be > 0"),
        ({"validation": TARGET, "buckets": 8}, "'buckets' .* must be >= 16"),
    ]:
        with pytest.raises(SurgicalError, match=message) as e:
            select_data(None, POOL, method="importance", count=3, progress=False, **kw)
        assert "\n" not in str(e.value)
