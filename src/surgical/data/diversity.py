"""``diversity``: greedy k-center on the model's mean-pooled embeddings, cosine distance.

Every example is embedded as the mean of the model's last hidden states over its attended
tokens (``output_hidden_states=True``). The first pick is a seeded random example; each next pick
is the example farthest (1 - cosine similarity) from everything picked so far, ties to the
earlier example, so the picks cover the embedding space (the 2-approximation of k-center).

Examples with identical ``input_ids`` (over attended tokens) are embedded once and compete as
one, so two identical examples are never both picked while a distinct one remains, whatever
tiny differences padding makes in their embeddings; when the budget exceeds the number of
distinct examples, the remaining copies are taken in a seeded random order.
"""

from __future__ import annotations

import torch

from surgical.data.criteria import DATA_CRITERIA, DataContext
from surgical.data.examples import attended_ids
from surgical.data.losses import frozen_eval, mean_pooled


def unique_examples(ctx: DataContext) -> tuple[list[int], list[int]]:
    """(first position of each distinct input, positions of the other copies)."""
    seen: dict[bytes, int] = {}
    firsts, copies = [], []
    for i, ex in enumerate(ctx.examples):
        key = attended_ids(ex).to(torch.int64).numpy().tobytes()
        if key in seen:
            copies.append(i)
        else:
            seen[key] = i
            firsts.append(i)
    return firsts, copies


def k_center(emb: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Greedy k-center on unit-normalised rows of ``emb`` with cosine distance, starting at ``first``;
    returns the ``min(k, N)`` picked rows in pick order."""
    x = torch.nn.functional.normalize(emb.double(), dim=1)
    n = x.shape[0]
    k = min(k, n)
    picked = [first]
    dist = (1 - x @ x[first]).clamp(min=0)
    dist[first] = -1.0  # never again
    for _ in range(k - 1):
        nxt = int(torch.argmax(dist))  # the first maximum: ties to the earlier example
        picked.append(nxt)
        dist = torch.minimum(dist, (1 - x @ x[nxt]).clamp(min=0))
        dist[picked] = -1.0
    return torch.tensor(picked, dtype=torch.long)


@DATA_CRITERIA.register(
    "diversity",
    help="greedy k-center on mean-pooled last hidden states, cosine distance",
    needs_model=True,
    picks=True,
)
def diversity_picks(ctx: DataContext) -> torch.Tensor:
    """Positions of ``ctx.budget`` examples covering the embedding space."""
    firsts, copies = unique_examples(ctx)
    chunks = []
    with frozen_eval(ctx.model):
        for _, batch in ctx.batches([ctx.examples[i] for i in firsts], "embedding"):
            chunks.append(mean_pooled(ctx.model, batch).cpu())
    emb = torch.cat(chunks)
    g = ctx.generator()
    first = int(torch.randint(len(firsts), (1,), generator=g))
    order = k_center(emb, ctx.budget, first)
    chosen = torch.tensor(firsts, dtype=torch.long)[order]
    ctx.info["distinct"] = len(firsts)
    extra = ctx.budget - len(chosen)
    if extra > 0:
        rest = torch.tensor(copies, dtype=torch.long)[torch.randperm(len(copies), generator=g)[:extra]]
        chosen = torch.cat([chosen, rest])
    return chosen
