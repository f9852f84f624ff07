"""Granularity: turning per-entry (or per-tensor) scores into scored *units* of selection.

A unit is what is selected or not as a whole: an entry, a row (dim 0, of any weight of 2+
dimensions) or a column (dim 1) of a 2-D weight, an output channel (``channel``: dim 0 of a
Linear or convolution weight, dim 1 of a transposed one such as GPT-2's ``Conv1D``), an
attention head (``head_dim`` rows of a query/key/value weight or columns of an output
projection), one expert of a mixture of experts (``expert``: row e of every fused expert tensor
of one experts module, or every parameter of expert module ``experts.N``), a whole tensor, or a
whole transformer block (``layer``). A unit's score is
the sum of its entries' scores (``aggregate="sum"``, the default: the unit's total importance)
or their mean (``aggregate="mean"``: importance per trained parameter). For per-tensor criteria
(0-d scores) a tensor's score is that value and a layer's score is the sum (or mean) over its
tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from surgical.core.errors import SurgicalError
from surgical.core.names import head_kind, split_layer
from surgical.select.experts import fused_experts_module, is_fused_expert, listed_expert

GRANULARITIES = ("entry", "row", "column", "head", "tensor", "layer", "channel", "expert")
OUTSIDE_LAYERS = "(outside layers)"


@dataclass
class Units:
    """The units of one tensor (or, for ``layer``, of one block).

    Attributes:
        name: Parameter name (for ``layer`` units: the block prefix).
        kind: Where selected units go in a Plan: ``entries``, ``rows``, ``cols`` or ``dense``.
        scores: One fp64 score per unit.
        size: Parameters per unit.
        block: Rows (or columns) per unit: 1, or ``head_dim`` for heads.
        group: The layer the units belong to (for ``per_layer`` allocation).
        members: Parameter names a ``dense`` unit stands for, or the fused expert tensors whose
            rows a ``rows`` unit of ``expert`` granularity selects together.
    """

    name: str
    kind: str
    scores: torch.Tensor
    size: int
    block: int = 1
    group: str = OUTSIDE_LAYERS
    members: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Parameters in all units together."""
        return self.size * int(self.scores.numel())


def _reduce(s: torch.Tensor, dims: tuple[int, ...], aggregate: str) -> torch.Tensor:
    return s.sum(dims) if aggregate == "sum" else s.mean(dims)


def _need_entry_scores(name: str, s: torch.Tensor, granularity: str) -> None:
    if s.dim() == 0:
        raise SurgicalError(
            f"the criterion scores whole tensors, so granularity {granularity!r} is impossible ({name})",
            "Use granularity='tensor' or 'layer'",
        )


def build_units(
    scores: dict[str, torch.Tensor],
    granularity: str,
    aggregate: str = "sum",
    head_dim: int | None = None,
    transposed: set[str] | frozenset[str] = frozenset(),
) -> list[Units]:
    """Scored units for every scored parameter, in parameter order (which breaks score ties).

    ``transposed`` names 2-D weights stored as (in, out) (transformers' ``Conv1D``), whose output
    channels are columns.
    """
    if granularity not in GRANULARITIES:
        raise SurgicalError(f"unknown granularity {granularity!r}", f"Use one of: {', '.join(GRANULARITIES)}")
    if aggregate not in ("sum", "mean"):
        raise SurgicalError(f"unknown aggregate {aggregate!r}", "Use 'sum' or 'mean'")
    if granularity == "expert":
        return _expert_units(scores, aggregate)
    out: list[Units] = []
    layers: dict[str, list[str]] = {}
    for name, s in scores.items():
        group = split_layer(name)[0] or OUTSIDE_LAYERS
        if granularity == "entry":  # fp32 and no copy: entry scores are as large as the weights
            _need_entry_scores(name, s, granularity)
            out.append(Units(name, "entries", s.detach().float().cpu().reshape(-1), 1, group=group))
            continue
        s = s.detach().to(torch.float64).cpu()  # sums over units are exact enough in fp64
        numel = int(torch.Size(s.shape).numel()) if s.dim() else None
        if granularity in ("row", "channel") and not (granularity == "channel" and name in transposed):
            _need_entry_scores(name, s, granularity)
            if s.dim() < 2:
                raise SurgicalError(
                    f"{granularity} granularity needs weights of 2+ dimensions, {name!r} is {s.dim()}-D",
                    "Exclude it",
                )
            per_row = s.reshape(s.shape[0], -1)
            out.append(Units(name, "rows", _reduce(per_row, (1,), aggregate), per_row.shape[1], group=group))
        elif granularity in ("column", "channel", "head"):
            _need_entry_scores(name, s, granularity)
            if s.dim() != 2:
                raise SurgicalError(
                    f"{granularity} granularity needs 2-D weights, {name!r} is not", "Exclude it"
                )
            rows, cols = s.shape
            if granularity in ("column", "channel"):
                out.append(Units(name, "cols", _reduce(s, (0,), aggregate), rows, group=group))
            else:
                out.append(_head_units(name, s, head_dim, aggregate, group))
        elif granularity == "tensor":
            value = s if s.dim() == 0 else _reduce(s.reshape(-1), (0,), aggregate)
            out.append(Units(name, "dense", value.reshape(1), numel or 0, group=group, members=[name]))
        else:  # layer: collected below
            layers.setdefault(group, []).append(name)
    for group, names in layers.items():
        if group == OUTSIDE_LAYERS:  # no block to join: each such tensor is a unit of its own
            for n in names:
                out.extend(build_units({n: scores[n]}, "tensor", aggregate))
            continue
        parts = [scores[n].detach().to(torch.float64).cpu() for n in names]
        if any(p.dim() == 0 for p in parts):
            value = torch.stack([p.reshape(()) if p.dim() == 0 else p.sum() for p in parts])
            value = value.sum() if aggregate == "sum" else value.mean()
            size = 0
        else:
            value = sum(p.sum() for p in parts)
            size = sum(p.numel() for p in parts)
            value = value if aggregate == "sum" else value / size
        out.append(Units(group, "dense", value.reshape(1), size, group=group, members=names))
    return out


def _expert_units(scores: dict[str, torch.Tensor], aggregate: str) -> list[Units]:
    """One unit per expert: row e of every fused expert tensor of one experts module (a ``rows``
    unit whose ``members`` are those tensors), or every parameter of a listed expert module
    ``...experts.N`` (a ``dense`` unit)."""
    fused: dict[str, list[str]] = {}
    listed: dict[str, list[str]] = {}
    for name, s in scores.items():
        if s.dim() and is_fused_expert(name, tuple(s.shape)):
            fused.setdefault(fused_experts_module(name), []).append(name)
        elif listed_expert(name) is not None:
            listed.setdefault(listed_expert(name), []).append(name)
        else:
            _need_entry_scores(name, s, "expert")  # a fused tensor scored as a whole has no rows
            raise SurgicalError(
                f"{name!r} belongs to no expert (expert granularity selects whole experts of a "
                "mixture of experts)",
                "Target expert parameters only, or use another granularity",
            )
    out: list[Units] = []
    for module, names in fused.items():
        parts = [scores[n].detach().to(torch.float64).cpu() for n in names]
        experts = {p.shape[0] for p in parts}
        if len(experts) != 1:
            raise SurgicalError(
                f"the fused expert tensors of {module!r} disagree on the number of experts "
                f"({sorted(experts)})",
                "Target the tensors of one layout only",
            )
        value = sum(p.reshape(p.shape[0], -1).sum(1) for p in parts)
        size = sum(p[0].numel() for p in parts)
        value = value if aggregate == "sum" else value / size
        group = split_layer(names[0])[0] or OUTSIDE_LAYERS
        out.append(Units(module, "rows", value, size, group=group, members=names))
    for module, names in listed.items():
        parts = [scores[n].detach().to(torch.float64).cpu() for n in names]
        if any(p.dim() == 0 for p in parts):
            values = torch.stack([p.reshape(()) if p.dim() == 0 else p.sum() for p in parts])
            value, size = (values.sum() if aggregate == "sum" else values.mean()), 0
        else:
            size = sum(p.numel() for p in parts)
            value = sum(p.sum() for p in parts)
            value = value if aggregate == "sum" else value / size
        group = split_layer(names[0])[0] or OUTSIDE_LAYERS
        out.append(Units(module, "dense", value.reshape(1), size, group=group, members=names))
    return out


def _head_units(name: str, s: torch.Tensor, hd: int | None, aggregate: str, group: str) -> Units:
    kind = head_kind(name)
    if kind is None or hd is None:
        raise SurgicalError(f"{name!r} is not an attention projection", "Target attention weights only")
    rows, cols = s.shape
    along = rows if kind == "rows" else cols
    if along % hd:
        raise SurgicalError(f"{name!r} has {along} {kind}, not a multiple of head_dim {hd}", "Use 'row'")
    if kind == "rows":
        unit_scores = _reduce(s.reshape(rows // hd, hd, cols), (1, 2), aggregate)
        return Units(name, "rows", unit_scores, hd * cols, block=hd, group=group)
    unit_scores = _reduce(s.reshape(rows, cols // hd, hd), (0, 2), aggregate)
    return Units(name, "cols", unit_scores, rows * hd, block=hd, group=group)


def dense_sizes(units: list[Units], shapes: dict[str, tuple[int, ...]]) -> None:
    """Fills in the sizes of units built from 0-d scores (which carry no shape)."""
    for u in units:
        if u.kind == "dense" and u.size == 0:
            u.size = sum(int(torch.Size(shapes[m]).numel()) for m in u.members)
