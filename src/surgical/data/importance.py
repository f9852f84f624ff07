"""``importance``: DSIR-like importance resampling towards the target's n-gram distribution.

For picking, from a large mixed pool, the examples that look like a small sample of the target
(the ``validation`` examples): domain data out of a web crawl, one task's examples out of a
mixture. No model is used, so it runs at tokenizer speed on any pool.

Each example is a bag of hashed token n-grams (every n from 1 to ``ngram``, over its attended
``input_ids``, each n-gram hashed into one of ``buckets`` buckets). Two bag-of-n-grams models are
fitted: one on the target examples, one on the pool itself, each bucket's probability smoothed
with ``smoothing`` pseudo-counts. An example's log importance weight is the sum over its n-grams
of ``log p_target(bucket) - log p_pool(bucket)``: how much likelier the target's model finds it
than the pool's (with ``normalize``, divided by its number of n-grams and multiplied by the
pool's mean number, so that long examples are not favoured for length alone while the weights
keep the scale that sampling draws by). With ``sample`` (the default, as in DSIR) the kept set is a draw
without replacement with probabilities proportional to the weights (Gumbel top-k: the score is
the log weight plus Gumbel noise, seeded); without it the largest weights are kept. The
selection's ``scores`` are the ranking keys (with the noise when sampling); ``meta`` records the
log weights' quantiles, the share of the target's n-grams whose bucket occurs in the pool at all
(``target_coverage``: low means the pool holds little that looks like the target; with many
more pool n-grams than buckets, collisions push it towards 1) and, as DSIR's paper measures a
selection, the KL divergence from the target's n-gram distribution to the pool's and to the
kept set's (``kl_to_target``, nats, both smoothed alike: the drop is how much more the kept set
looks like the target; not recorded when ``stratify`` changes which examples are kept).

The hash is fixed (a universal hash of the token ids modulo a Mersenne prime, not Python's
salted ``hash``), so the same data, options and seed give the same selection in every process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from surgical.core.errors import SurgicalError
from surgical.core.registry import Option
from surgical.core.runtime import progress
from surgical.data.criteria import DATA_CRITERIA, DataContext
from surgical.data.examples import Example, attended_ids

_PRIME = (1 << 31) - 1
# fixed multipliers of the n-gram hash (non-zero, below the prime: a product of two values < 2^31 fits int64)
_MULTIPLIERS = (1_103_515_245, 2_654_435_761 % _PRIME, 1_597_334_677, 1_540_483_477, 2_246_822_519 % _PRIME)


def ngram_buckets(ids: torch.Tensor, ngram: int, buckets: int) -> torch.Tensor:
    """The bucket of every n-gram of ``ids`` for n = 1 .. ``ngram`` (a sequence shorter than n has
    no n-grams of that size), ``(count,)`` int64."""
    ids = ids.reshape(-1).long() % _PRIME
    out = []
    h = torch.zeros_like(ids)
    for n in range(1, ngram + 1):
        if ids.numel() < n:
            break
        # h_n[i] hashes ids[i : i + n]: fold the next token into h_{n-1}[i], then tag with n
        h = (h[: ids.numel() - n + 1] * _MULTIPLIERS[n - 1] + ids[n - 1 :] + n) % _PRIME
        out.append(h % buckets)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _bags(examples: Sequence[Example], ngram: int, buckets: int, what: str, show: bool) -> list[torch.Tensor]:
    out = []
    with progress(disable=not show) as bar:
        task = bar.add_task(what, total=len(examples), info="")
        for i, ex in enumerate(examples):
            out.append(ngram_buckets(attended_ids(ex), ngram, buckets))
            if i % 1024 == 1023 or i == len(examples) - 1:
                bar.update(task, completed=i + 1)
    return out


def _log_probs(bags: list[torch.Tensor], buckets: int, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed log probability of every bucket under the bag-of-n-grams model of ``bags``, and
    the raw counts."""
    counts = torch.zeros(buckets, dtype=torch.float64)
    for bag in bags:
        counts += torch.bincount(bag, minlength=buckets).double()
    probs = (counts + smoothing) / (counts.sum() + smoothing * buckets)
    return probs.log(), counts


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=values.dtype))
    return {k: round(float(v), 4) for k, v in zip(("min", "p10", "median", "p90", "max"), q, strict=True)}


@DATA_CRITERIA.register(
    "importance",
    help="DSIR-like: hashed n-gram importance weights towards the validation examples, resampled",
    options=[
        Option("buckets", int, 10_000, "hash buckets of the n-gram features", low=16),
        Option("ngram", int, 2, "the longest n-gram (every n from 1 up to it is counted)", low=1,
               high=len(_MULTIPLIERS)),
        Option("smoothing", float, 1.0, "pseudo-counts added to every bucket", low=0, low_open=True),
        Option("sample", bool, True, "draw in proportion to the weights (Gumbel top-k); false: the largest"),
        Option("normalize", bool, False, "log weight per n-gram (times the mean count): no length bias"),
    ],
    needs_validation=True,
)  # fmt: skip
def importance_scores(ctx: DataContext) -> torch.Tensor:
    """Log importance weights (plus seeded Gumbel noise when sampling): the top ``budget`` is the
    selection."""
    o = ctx.options
    n, buckets = o["ngram"], o["buckets"]
    target = _bags(ctx.validation, n, buckets, "hashing target n-grams", ctx.progress)
    pool = _bags(ctx.examples, n, buckets, "hashing pool n-grams", ctx.progress)
    target_log, target_counts = _log_probs(target, buckets, o["smoothing"])
    pool_log, pool_counts = _log_probs(pool, buckets, o["smoothing"])
    if not target_counts.sum():
        raise SurgicalError(
            "the validation examples hold no tokens to build the target's n-gram model from",
            "Pass validation examples with attended input_ids",
        )
    ratio = target_log - pool_log
    sizes = torch.tensor([bag.numel() for bag in pool])
    owner = torch.repeat_interleave(torch.arange(len(pool)), sizes)
    weights = torch.zeros(len(pool), dtype=torch.float64).index_add_(0, owner, ratio[torch.cat(pool)])
    if o["normalize"]:  # per n-gram, times the mean count: the sampling's temperature stays the same
        weights = weights / sizes.clamp(min=1) * sizes.double().mean()
    covered = float(target_counts[pool_counts > 0].sum() / target_counts.sum())
    ctx.info.update(log_weights=_quantiles(weights), target_coverage=round(covered, 4))
    scores = weights.float()
    if o["sample"]:
        u = torch.rand(len(pool), generator=ctx.generator(), dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        scores = (weights - torch.log(-torch.log(u))).float()
    if ctx.class_labels is None:  # the kept set is the top budget (stratified, it differs by class)
        kept = torch.sort(scores.double(), descending=True, stable=True).indices[: ctx.budget]
        kept_log, _ = _log_probs([pool[i] for i in kept.tolist()], buckets, o["smoothing"])
        ctx.info["kl_to_target"] = {
            "pool": round(_kl(target_log, pool_log), 4),
            "kept": round(_kl(target_log, kept_log), 4),
        }
    return scores


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """KL(p || q) in nats between two smoothed bucket distributions given as log probabilities."""
    return float((p_log.exp() * (p_log - q_log)).sum())
