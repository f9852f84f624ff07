"""``diversity``: greedy k-center on the model's mean-pooled embeddings, cosine distance.

Every example is embedded as the mean of the model's last hidden states over its attended
tokens (``output_hidden_states=True``). The first pick is a seeded random example; each next pick
is the example farthest (1 - cosine similarity) from everything picked so far, ties to the
earlier example, so the picks cover the embedding space (the 2-approximation of k-center).

Examples with identical ``input_ids`` (over attended tokens) are embedded once and compete as
one, so two identical examples are never both picked while a distinct one remains, whatever
tiny differences padding makes in their embeddings; when the budget exceeds the number of
distinct examples, the remaining copies are taken in a seeded random order. With class labels
(``select_data(stratify=True)``) the same is done within each class for its quota.
"""

from __future__ import annotations

import torch

from surgical.data.criteria import DATA_CRITERIA, DataContext, class_quotas
from surgical.data.examples import attended_ids
from surgical.data.losses import frozen_eval, mean_pooled


def split_copies(keys: list[bytes], positions: list[int]) -> tuple[list[int], list[int]]:
    """(the first position of each distinct input among ``positions``, the other copies' positions)."""
    seen: set[bytes] = set()
    firsts, copies = [], []
    for i in positions:
        (copies if keys[i] in seen else firsts).append(i)
        seen.add(keys[i])
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
    stratifies=True,
)
def diversity_picks(ctx: DataContext) -> torch.Tensor:
    """Positions of ``ctx.budget`` examples covering the embedding space (within each class, with
    ``ctx.class_labels``)."""
    keys = [attended_ids(ex).to(torch.int64).numpy().tobytes() for ex in ctx.examples]
    firsts, _ = split_copies(keys, list(range(len(keys))))
    row = {keys[i]: r for r, i in enumerate(firsts)}  # each distinct input is embedded once
    chunks = []
    with frozen_eval(ctx.model):
        for _, batch in ctx.batches([ctx.examples[i] for i in firsts], "embedding"):
            chunks.append(mean_pooled(ctx.model, batch).cpu())
    emb = torch.cat(chunks)
    ctx.info["distinct"] = len(firsts)
    g = ctx.generator()
    if ctx.class_labels is None:
        groups = [(ctx.budget, list(range(len(keys))))]
    else:  # the same within each class (copies labelled differently count once per class)
        groups = [(n, pos.tolist()) for n, pos in class_quotas(ctx.class_labels, ctx.budget)]
    out = []
    for n, positions in groups:
        mine, copies = split_copies(keys, positions)
        out.append(_cover(emb[[row[keys[i]] for i in mine]], mine, copies, n, g))
    return torch.cat(out)


def _cover(
    emb: torch.Tensor, firsts: list[int], copies: list[int], k: int, g: torch.Generator
) -> torch.Tensor:
    """``k`` positions: k-center over the distinct examples ``firsts`` (embedded as ``emb``) from a
    seeded random start, then copies in a seeded random order if ``k`` exceeds them."""
    firsts_t, copies_t = torch.tensor(firsts, dtype=torch.long), torch.tensor(copies, dtype=torch.long)
    if k == 0:
        return firsts_t[:0]
    first = int(torch.randint(len(firsts), (1,), generator=g))
    chosen = firsts_t[k_center(emb, k, first)]
    extra = k - len(chosen)
    if extra > 0:
        chosen = torch.cat([chosen, copies_t[torch.randperm(len(copies), generator=g)[:extra]]])
    return chosen
