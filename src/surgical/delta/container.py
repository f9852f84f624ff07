"""The delta container: what training changed, keyed by the model's own parameter names.

The data and its invariants only; :class:`surgical.delta.Delta` adds arithmetic and the file
format on top. Algebra, base checks and conversions work on this class, so they stand below
``Delta`` and nothing in this package imports upwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgical.core.blocks import BLOCK_KINDS, check_block, check_sorted_indices
from surgical.core.errors import SurgicalError


@dataclass(eq=False)  # tensors inside: compare deltas with digest()
class DeltaData:
    """A sparse (and partly dense) change to a base model (the data of a :class:`Delta`).

    Attributes:
        entries: Parameter name -> (sorted unique int64 flat indices, float values added at them).
        rows: Parameter name -> (sorted unique int64 row indices, block of shape
            ``(r, *shape[1:])`` added to those rows).
        cols: 2-D parameter name -> (sorted unique int64 column indices, block of shape
            ``(shape[0], c)`` added to those columns).
        dense: Parameter name -> tensor added to the base tensor.
        full: Parameter name -> tensor that replaces the base tensor.
        shapes: Parameter name -> shape of the parameter in the base model.
        meta: Base identity (``base``), plan provenance (``plan``), training summary, etc.
        scores: Optional importance per stored value (the selection's scores, e.g. the diagonal
            Fisher), parameter name -> tensor shaped like that name's stored values; used by
            Fisher merging, not by apply. Kept by ``scale`` and ``to_dense``, dropped by the
            operations that change which values are stored.
    """

    entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    cols: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_entries(self) -> int:
        """Number of sparse entries."""
        return sum(int(i.numel()) for i, _ in self.entries.values())

    @property
    def num_block_values(self) -> int:
        """Number of values in row and column blocks."""
        return sum(int(b.numel()) for kind in BLOCK_KINDS for _, b in self.blocks(kind).values())

    @property
    def num_full(self) -> int:
        """Number of values in replaced tensors."""
        return sum(int(t.numel()) for t in self.full.values())

    @property
    def num_dense(self) -> int:
        """Number of values in added dense tensors."""
        return sum(int(t.numel()) for t in self.dense.values())

    @property
    def num_values(self) -> int:
        """Number of stored values of every kind (what bytes per value divide by)."""
        return self.num_entries + self.num_block_values + self.num_dense + self.num_full

    def names(self) -> list[str]:
        """Every parameter name the delta touches."""
        return [*self.entries, *self.rows, *self.cols, *self.dense, *self.full]

    def blocks(self, kind: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The ``rows`` or ``cols`` dictionary, by kind name."""
        return self.rows if kind == "rows" else self.cols

    def kind_of(self, name: str) -> str:
        """The kind (``entries``, ``rows``, ``cols``, ``dense`` or ``full``) storing ``name``."""
        for kind in ("entries", "rows", "cols", "dense", "full"):
            if name in getattr(self, kind):
                return kind
        raise KeyError(name)

    def validate(self) -> None:
        """Raises a SurgicalError unless the delta is well formed.

        Well formed: kinds are disjoint, every shape is known, sparse indices are sorted, unique
        and inside their tensor, blocks and whole tensors have the right shapes, values are
        finite. Costs time proportional to the delta.
        """
        seen: set[str] = set()
        for name in self.names():
            if name in seen:
                raise SurgicalError(
                    f"the delta holds {name!r} twice (two kinds)", "Keep one kind per parameter"
                )
            seen.add(name)
            if name not in self.shapes:
                raise SurgicalError(f"the delta has no shape for {name!r}", "Set delta.shapes[name]")
        fix = "Build the delta with surgical.extract or the Delta methods, or fix that tensor"
        try:
            for name, (idx, vals) in self.entries.items():
                if idx.numel() != vals.numel():
                    raise ValueError(f"{idx.numel()} indices but {vals.numel()} values")
                check_sorted_indices(idx, _numel(self.shapes[name]), "entry")
            for kind in BLOCK_KINDS:
                for name, (idx, block) in self.blocks(kind).items():
                    check_block(kind, idx, block, tuple(self.shapes[name]))
            for name, t in (*self.dense.items(), *self.full.items()):
                if tuple(t.shape) != tuple(self.shapes[name]):
                    raise ValueError(f"tensor is {tuple(t.shape)}, its shape is {tuple(self.shapes[name])}")
        except ValueError as e:
            problem = f"{name!r} ({self.kind_of(name)}) of the delta is malformed: {e}"
            raise SurgicalError(problem, fix) from None
        for name, (_, vals) in (*self.entries.items(), *self.rows.items(), *self.cols.items()):
            _check_finite(name, vals)
        for name, t in (*self.dense.items(), *self.full.items()):
            _check_finite(name, t)
        for name, s in self.scores.items():
            stored = self.values_of(name) if name in seen else None
            if stored is None or tuple(s.shape) != tuple(stored.shape) or not bool((s >= 0).all()):
                raise SurgicalError(
                    f"the importance scores of {name!r} do not match its stored values (or are negative)",
                    "Give one non-negative score per stored value, or drop delta.scores[name]",
                )

    def values_of(self, name: str) -> torch.Tensor:
        """The stored values of ``name`` in their layout: (k,) entries, a block, or a tensor."""
        stored = getattr(self, self.kind_of(name))[name]
        return stored[1] if isinstance(stored, tuple) else stored


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_finite(name: str, t: torch.Tensor, where: Path | None = None) -> None:
    if not bool(torch.isfinite(t).all()):
        place = f" in {str(where)!r}" if where is not None else ""
        raise SurgicalError(f"delta values of {name!r}{place} contain NaN or Inf", "Check the training run")
