"""``dedup``: drop exact and near-duplicate examples, keeping the first of each.

Examples are compared on their ``input_ids`` over attended tokens. In order, an example is
dropped when it equals an earlier kept one exactly, or when the Jaccard similarity of its token
``ngram`` sets with an earlier *kept* example reaches ``threshold`` (so the first example of a
group of near-copies stays, and each example is judged against what is kept). A sequence shorter
than ``ngram`` tokens is one n-gram, itself.

Near-duplicate candidates come from MinHash signatures (128 seeded hash functions of the n-gram
ids) split into bands; every candidate pair is then checked with the exact Jaccard similarity,
so nothing is dropped that is below the threshold. The band width is chosen so that a pair at
the threshold is found with probability above 0.999.

The budget is an upper bound for this criterion: when fewer examples survive than the budget
asks for, all of them are returned (``fraction=1`` keeps every surviving example); when more
survive, a seeded random sample of them of exactly the budget. ``DataSelection.meta["kept"]``
records how many survived.
"""

from __future__ import annotations

import hashlib

import torch

from surgical.core.registry import Option
from surgical.data.criteria import DATA_CRITERIA, DataContext
from surgical.data.examples import attended_ids

NUM_HASHES = 128
_PRIME = (1 << 31) - 1  # a Mersenne prime: the universal hash family (a * x + b) mod p, x < p


def ngrams(ids: list[int], n: int) -> set[tuple[int, ...]]:
    """The set of ``n``-grams of ``ids`` (the whole sequence if it is shorter)."""
    if len(ids) <= n:
        return {tuple(ids)}
    return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (1 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _gram_id(gram: tuple[int, ...]) -> int:
    digest = hashlib.blake2b(repr(gram).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _PRIME  # a, id < 2^31: a * id + b stays inside int64


def _bands(threshold: float) -> int:
    """Rows per band: the widest (fewest false candidates) that still finds a pair at the
    threshold with probability > 0.999."""
    best = 1
    for rows in range(1, 17):
        if NUM_HASHES % rows == 0:
            bands = NUM_HASHES // rows
            if 1 - (1 - threshold**rows) ** bands > 0.999:
                best = rows
    return best


def _signatures(sets: list[set[tuple[int, ...]]]) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(20240607)  # fixed: the result must not depend on the user's seed
    a = torch.randint(1, _PRIME, (NUM_HASHES, 1), generator=g, dtype=torch.int64)
    b = torch.randint(0, _PRIME, (NUM_HASHES, 1), generator=g, dtype=torch.int64)
    sigs = []
    for s in sets:
        ids = torch.tensor([_gram_id(x) for x in s], dtype=torch.int64)[None, :]
        sigs.append(tuple(((a * ids + b) % _PRIME).min(1).values.tolist()))
    return sigs


def near_duplicate_survivors(id_lists: list[list[int]], threshold: float, n: int) -> list[int]:
    """Positions kept by the greedy rule of this module (exact duplicates included, as Jaccard 1)."""
    exact: dict[tuple[int, ...], int] = {}
    order = []
    for i, ids in enumerate(id_lists):
        key = tuple(ids)
        if key not in exact:
            exact[key] = i
            order.append(i)
    sets = {i: ngrams(id_lists[i], n) for i in order}
    rows = _bands(threshold)
    sigs = dict(zip(order, _signatures([sets[i] for i in order]), strict=True))
    buckets: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    kept: list[int] = []
    for i in order:
        keys = [(band, sigs[i][band * rows : (band + 1) * rows]) for band in range(NUM_HASHES // rows)]
        candidates = sorted({j for key in keys for j in buckets.get(key, ())})
        if any(jaccard(sets[i], sets[j]) >= threshold for j in candidates):
            continue
        kept.append(i)
        for key in keys:  # only kept examples are compared against
            buckets.setdefault(key, []).append(i)
    return kept


@DATA_CRITERIA.register(
    "dedup",
    help="drop exact and near-duplicates (Jaccard of token n-grams), keeping the first",
    options=[
        Option("threshold", float, 0.8, "Jaccard similarity at which an example is a near-duplicate",
               low=0, high=1, low_open=True),
        Option("ngram", int, 3, "tokens per n-gram", low=1),
    ],
    picks=True,
)  # fmt: skip
def dedup_picks(ctx: DataContext) -> torch.Tensor:
    """The surviving positions, or a seeded random ``budget`` of them."""
    id_lists = [attended_ids(ex).tolist() for ex in ctx.examples]
    kept = torch.tensor(
        near_duplicate_survivors(id_lists, ctx.options["threshold"], ctx.options["ngram"]), dtype=torch.long
    )
    ctx.info["kept"] = int(kept.numel())
    if kept.numel() <= ctx.budget:
        return kept
    return kept[torch.randperm(kept.numel(), generator=ctx.generator())[: ctx.budget]]
