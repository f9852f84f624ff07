"""Budget allocation: choosing units under a budget counted in parameters.

- ``global``: the best units anywhere.
- ``per_tensor``: every tensor gets a quota proportional to its size (largest-remainder
  rounding), spent on its own best units.
- ``per_layer``: every transformer block (and the group of parameters outside blocks) gets a
  quota proportional to its targeted size, spent on its own best units.

Entries (unit size 1) meet the budget exactly. Larger units are taken greedily in score order,
skipping any unit that no longer fits, so the plan never exceeds the budget; quotas are followed
by one global pass that spends what the quotas left over. The result: no unselected unit would
fit into the unspent budget, i.e. the plan is as close to the budget as whole units allow
(rows and columns within one row or column; heads within one head; tensors and layers never
exceed it). Ties in score are broken by parameter order, then by position, so plans are
deterministic. Entry top-k never concatenates the scores (see :mod:`surgical.select.topk`).
"""

from __future__ import annotations

import torch

from surgical.core.errors import SurgicalError
from surgical.select.topk import topk_masks
from surgical.select.units import Units

ALLOCATIONS = ("global", "per_tensor", "per_layer")


def proportional_counts(sizes: dict[str, int], k: int) -> dict[str, int]:
    """Splits ``k`` over keys in proportion to their sizes, summing to exactly ``k``.

    Largest-remainder rounding; ties go to the earlier key, so the split is deterministic.
    """
    total = sum(sizes.values())
    exact = {n: k * s / total for n, s in sizes.items()}
    counts = {n: int(v) for n, v in exact.items()}
    short = k - sum(counts.values())
    order = list(sizes)
    by_remainder = sorted(sizes, key=lambda n: (-(exact[n] - counts[n]), order.index(n)))
    for n in by_remainder[:short]:
        counts[n] += 1
    return counts


def _entry_topk(units: list[Units], k: int, taken: dict[str, torch.Tensor]) -> None:
    """Marks the k best entries of ``units`` (all of unit size 1) as taken, exactly k of them."""
    if k <= 0 or not units:
        return
    for u, mask in zip(units, topk_masks([u.scores for u in units], k), strict=True):
        taken[u.name] |= mask


def _greedy(units: list[Units], budget: int, taken: dict[str, torch.Tensor]) -> int:
    """Takes untaken units in score order while they fit; returns the parameters spent."""
    if budget <= 0 or not units:
        return 0
    scores = torch.cat([u.scores for u in units])
    sizes = torch.cat([torch.full((u.scores.numel(),), u.size, dtype=torch.int64) for u in units])
    owner = torch.cat([torch.full((u.scores.numel(),), i, dtype=torch.int64) for i, u in enumerate(units)])
    local = torch.cat([torch.arange(u.scores.numel()) for u in units])
    already = torch.cat([taken[u.name] for u in units])
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[~already[order]]
    smallest = int(sizes[order].min()) if order.numel() else 0
    spent = 0
    for i in order.tolist():
        if budget - spent < smallest:
            break
        s = int(sizes[i])
        if spent + s <= budget:
            spent += s
            taken[units[int(owner[i])].name][int(local[i])] = True
    return spent


def _spent(units: list[Units], taken: dict[str, torch.Tensor]) -> int:
    return sum(int(taken[u.name].sum()) * u.size for u in units)


def allocate(units: list[Units], k: int, allocation: str) -> dict[str, torch.Tensor]:
    """Chooses units worth at most ``k`` parameters; returns unit name -> boolean mask of units.

    Raises:
        SurgicalError: unknown allocation, an allocation the granularity cannot split, or a
            budget smaller than every unit.
    """
    if allocation not in ALLOCATIONS:
        raise SurgicalError(f"unknown allocation {allocation!r}", f"Use one of: {', '.join(ALLOCATIONS)}")
    taken = {u.name: torch.zeros(u.scores.numel(), dtype=torch.bool) for u in units}
    entries = all(u.size == 1 for u in units)
    if allocation == "global":
        groups = {"all": units}
    elif allocation == "per_tensor":
        if any(u.members for u in units):
            raise SurgicalError(
                "per_tensor allocation cannot split a budget of whole tensors or layers",
                "Use allocation='global' or 'per_layer'",
            )
        groups = {u.name: [u] for u in units}
    else:
        groups = {}
        for u in units:
            groups.setdefault(u.group, []).append(u)
        if any(u.members and u.name == u.group for u in units) and len(groups) > 1:
            raise SurgicalError(
                "per_layer allocation cannot split a budget of whole layers", "Use allocation='global'"
            )
    quotas = proportional_counts({g: sum(u.total for u in us) for g, us in groups.items()}, k)
    for g, us in groups.items():
        if entries:
            _entry_topk(us, quotas[g], taken)
        else:
            _greedy(us, quotas[g], taken)
    if not entries:
        _greedy(units, k - _spent(units, taken), taken)  # spend what the quotas left over
        if not any(bool(t.any()) for t in taken.values()):
            smallest = min(u.size for u in units)
            raise SurgicalError(
                f"budget of {k:,} parameters is smaller than the smallest unit ({smallest:,} parameters)",
                "Raise the budget or use a finer granularity",
            )
    return taken
