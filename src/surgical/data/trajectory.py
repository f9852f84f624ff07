"""``trajectory`` (after S2L): cluster the examples by their loss trajectories over a short proxy
training, then sample evenly across the clusters.

A copy of the model is tuned for ``steps`` AdamW steps on all the examples (see
:func:`surgical.data.losses.brief_tune`); the loss of every example is recorded at
``checkpoints`` evenly spaced steps from 0 (the model itself) to ``steps``. The trajectories are
clustered by a seeded k-means into ``clusters`` groups, and the budget is spread over the
groups, smallest first: each takes an equal share of what is left (all of it if it is smaller),
chosen at random within it, so small groups (rare behaviours) are kept whole and the budget is
met exactly. With class labels (``select_data(stratify=True)``) each class's quota is spread the
same way over that class's members of each cluster: on a classifier whose head starts random the
trajectories follow the class, and sampling the clusters evenly alone skews the class mix.
"""

from __future__ import annotations

import torch
from torch import nn

from surgical.core.registry import Option
from surgical.data.criteria import DATA_CRITERIA, DataContext, class_quotas
from surgical.data.examples import batches_of
from surgical.data.loss_score import LR
from surgical.data.losses import brief_tune


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 100) -> torch.Tensor:
    """Cluster labels ``(N,)`` of the rows of ``x`` by Lloyd's k-means with k-means++ seeding.

    At most ``k`` clusters (fewer when ``x`` has fewer distinct rows); labels are 0..k'-1. An
    emptied cluster keeps its centre. Deterministic for a given generator state.
    """
    x = x.double()
    n = x.shape[0]
    k = max(1, min(k, n))
    centres = [int(torch.randint(n, (1,), generator=generator))]
    d2 = ((x - x[centres[0]]) ** 2).sum(1)
    while len(centres) < k:
        total = float(d2.sum())
        if total <= 0:  # every row coincides with a centre: no more distinct clusters
            break
        nxt = int(torch.multinomial(d2 / total, 1, generator=generator))
        centres.append(nxt)
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    c = x[centres].clone()
    labels = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        for j in range(c.shape[0]):
            members = labels == j
            if bool(members.any()):
                c[j] = x[members].mean(0)
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    _, labels = torch.unique(labels, return_inverse=True)
    return labels


def sample_evenly(labels: torch.Tensor, budget: int, generator: torch.Generator) -> torch.Tensor:
    """``min(budget, N)`` positions spread over the clusters in ``labels``, smallest cluster first,
    each taking ``ceil(left / clusters left)`` (or all of it), at random within it."""
    groups = [torch.nonzero(labels == j).flatten() for j in torch.unique(labels).tolist()]
    groups.sort(key=lambda g: (g.numel(), int(g[0])))
    left = min(budget, int(labels.numel()))
    chosen = []
    for i, group in enumerate(groups):
        share = min(group.numel(), -(-left // (len(groups) - i)))
        chosen.append(group[torch.randperm(group.numel(), generator=generator)[:share]])
        left -= share
    return torch.cat(chosen)


@DATA_CRITERIA.register(
    "trajectory",
    help="k-means on loss trajectories of a short proxy training, sampled evenly (S2L-like)",
    options=[
        Option("steps", int, 50, "AdamW steps of the proxy training", low=1),
        LR,
        Option("checkpoints", int, 5, "points of the trajectory (step 0 to steps, evenly spaced)", low=2),
        Option("clusters", int, 10, "k-means clusters", low=1),
    ],
    needs_model=True,
    picks=True,
    stratifies=True,
)
def trajectory_picks(ctx: DataContext) -> torch.Tensor:
    """Positions of ``ctx.budget`` examples sampled evenly across loss-trajectory clusters."""
    steps, points = ctx.options["steps"], ctx.options["checkpoints"]
    at = sorted({round(i * steps / (points - 1)) for i in range(points)})
    record: list[torch.Tensor] = []

    def on_step(step: int, tuned: nn.Module) -> None:
        if step in at:
            record.append(ctx.losses(tuned, what=f"losses at step {step}"))

    brief_tune(
        ctx.model,
        batches_of(ctx.examples, None, ctx.batch_size, ctx.pad_id),
        steps=steps,
        lr=ctx.options["lr"],
        seed=ctx.seed,
        on_step=on_step,
    )
    trajectories = torch.stack(record, 1)
    labels = kmeans(trajectories, ctx.options["clusters"], ctx.generator(1))
    if ctx.class_labels is None:
        chosen = sample_evenly(labels, ctx.budget, ctx.generator(2))
    else:
        g = ctx.generator(2)
        quotas = class_quotas(ctx.class_labels, ctx.budget)
        chosen = torch.cat([pos[sample_evenly(labels[pos], n, g)] for n, pos in quotas])
    ctx.info.update(describe_clusters(trajectories, labels, chosen, at))
    return chosen


def describe_clusters(trajectories: torch.Tensor, labels: torch.Tensor, chosen: torch.Tensor, at) -> dict:
    """What the clustering found, for the selection's record: the number of clusters, each one's
    size, how many of its examples were kept, its mean loss at each checkpoint step, the clusters
    whose mean loss ends above where it started (``rising_clusters``: examples the proxy training
    gets worse at while it learns the rest, which on a classifier go against what the rest of the
    data teaches), and the cluster of each kept example (``kept_clusters``, in the order of the
    sorted indices the selection returns), so that a kept set can be filtered by cluster."""
    k = int(labels.max()) + 1
    sizes = torch.bincount(labels, minlength=k)
    kept = torch.bincount(labels[chosen], minlength=k)
    sums = torch.zeros(k, trajectories.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels, trajectories.double())
    means = sums / sizes.clamp(min=1)[:, None]
    return {
        "clusters": k,
        "cluster_sizes": sizes.tolist(),
        "kept_by_cluster": kept.tolist(),
        "checkpoint_steps": list(at),
        "cluster_mean_losses": [[round(v, 4) for v in row] for row in means.tolist()],
        "rising_clusters": torch.nonzero(means[:, -1] > means[:, 0]).flatten().tolist(),
        "kept_clusters": labels[chosen.sort().values].tolist(),
    }


def rising_shares(meta: dict) -> tuple[float, float] | None:
    """``(share of the data, share of the kept set)`` in the ``rising_clusters`` of a
    ``trajectory`` selection's meta, or None when it recorded none."""
    rising = meta.get("rising_clusters")
    if not rising:
        return None
    sizes, kept = meta["cluster_sizes"], meta["kept_by_cluster"]
    data = sum(sizes[j] for j in rising) / max(1, sum(sizes))
    return data, sum(kept[j] for j in rising) / max(1, sum(kept))
