"""The Plan: what a selection chose to train, savable and reusable on the same base model.

On disk: ``plan.safetensors`` (entry indices as 16-bit gaps plus an int64 overflow list, row and
column indices as int64) and ``plan.json`` (shapes, counts, dense names, provenance, and the
SHA-256 of ``plan.safetensors`` under ``sha256``). Loading checks the checksum when it is
recorded (plans saved before have none), every tensor's dtype, and the JSON's structure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from surgical.core.codec import decode_indices, encode_indices
from surgical.core.errors import SurgicalError
from surgical.core.io import atomic_dir, check_replaceable, check_sha256, read_tensor_dir, sha256_file

PLAN_FORMAT = 1
INFO_FILE = "plan.json"
TENSOR_FILE = "plan.safetensors"


@dataclass
class Plan:
    """A selection of parameters to train.

    A parameter appears in at most one of ``entries``, ``rows``, ``cols`` and ``dense``.

    Attributes:
        entries: Parameter name -> sorted flat int64 indices of the entries to train.
        shapes: Parameter name -> shape, for every parameter the plan names.
        dense: Names of parameters trained in full (selected whole tensors, and the heads,
            norms and biases the user asked to train always).
        rows: Parameter name -> sorted int64 indices of whole rows (dim 0) of a 2-D weight.
        cols: Parameter name -> sorted int64 indices of whole columns (dim 1) of a 2-D weight.
        meta: Provenance: criterion, budget, patterns, seed, calibration size, totals.
        scores: Parameter name -> the criterion's score at each selected entry (aligned with
            ``entries[name]``), for Fisher merging (``sg.extract(model, scores=plan)``).
    """

    entries: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    cols: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_entries(self) -> int:
        """Number of selected values outside ``dense`` (entries plus those of rows/columns)."""
        n = sum(int(i.numel()) for i in self.entries.values())
        n += sum(int(r.numel()) * _numel(self.shapes[k][1:]) for k, r in self.rows.items())
        n += sum(int(c.numel()) * self.shapes[k][0] for k, c in self.cols.items())
        return n

    def entry_indices(self, name: str) -> torch.Tensor:
        """Sorted flat indices of everything selected in a sparse parameter (rows/cols expanded)."""
        if name in self.entries:
            return self.entries[name]
        out_f, in_f = self.shapes[name]
        if name in self.rows:
            r = self.rows[name]
            return (r[:, None] * in_f + torch.arange(in_f)[None, :]).reshape(-1)
        c = self.cols[name]
        return (torch.arange(out_f)[:, None] * in_f + c[None, :]).reshape(-1)

    @property
    def sparse_names(self) -> list[str]:
        """Parameters with entries, rows or columns selected."""
        return [*self.entries, *self.rows, *self.cols]

    @property
    def num_dense(self) -> int:
        """Number of parameters trained densely."""
        return sum(_numel(self.shapes[n]) for n in self.dense)

    @property
    def num_trainable(self) -> int:
        """Entries plus densely trained parameters."""
        return self.num_entries + self.num_dense

    def summary(self) -> str:
        """One line: criterion, granularity, selected values and their share of the targets."""
        total = self.meta.get("targeted", 0) or 1
        selected = self.meta.get("selected", self.num_entries)
        always = [n for n in self.dense if n not in self.meta.get("targeted_shapes", {})]
        whole = len(self.dense) - len(always) if "targeted_shapes" in self.meta else 0
        return (
            f"{self.meta.get('method', '?')} ({self.meta.get('granularity', 'entry')}): {selected:,} "
            f"values ({100 * selected / total:.2f}% of {total:,} targeted) in "
            f"{len(self.sparse_names) + whole} tensors, {self.num_dense:,} dense in {len(self.dense)} tensors"
        )

    def save(self, directory: str | Path) -> Path:
        """Writes ``plan.safetensors`` and ``plan.json`` into ``directory`` atomically (an existing
        plan directory, or an empty one, is replaced; a file or another directory is refused)."""
        directory = check_replaceable(directory, INFO_FILE, "plan", "directory")
        tensors: dict[str, torch.Tensor] = {}
        for name, idx in self.entries.items():
            gaps, overflow = encode_indices(idx)
            tensors[f"{name}.gaps"] = gaps
            tensors[f"{name}.overflow"] = overflow
        for kind in ("rows", "cols"):
            for name, idx in getattr(self, kind).items():
                tensors[f"{name}.{kind}"] = idx.to(torch.int64).contiguous()
        for name, s in self.scores.items():
            tensors[f"{name}.scores"] = s.detach().to("cpu", torch.float32).contiguous()
        info = {
            "format": PLAN_FORMAT,
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "entries": {n: int(i.numel()) for n, i in self.entries.items()},
            "rows": sorted(self.rows),
            "cols": sorted(self.cols),
            "scores": sorted(self.scores),
            "dense": self.dense,
            "meta": self.meta,
        }
        with atomic_dir(directory) as tmp:
            save_file(tensors, str(tmp / TENSOR_FILE))
            info["sha256"] = sha256_file(tmp / TENSOR_FILE)  # of the bytes just written
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Plan:
        """Reads a plan written by :meth:`save`.

        Raises:
            SurgicalError: if the directory or a file is missing, truncated or corrupted (a
                tensor of another dtype than a plan stores, a SHA-256 that does not match the one
                recorded, a ``plan.json`` of another structure).
        """
        directory = Path(directory)
        fix = "Pass a directory written by `surgical select` or Plan.save"
        info, tensors = read_tensor_dir(directory, INFO_FILE, TENSOR_FILE, "plan", fix)
        try:
            if not isinstance(info, dict):
                raise ValueError(f"{INFO_FILE} holds a {type(info).__name__}, not an object")
            entries = {}
            for name, count in dict(info["entries"]).items():
                idx = decode_indices(
                    _stored(tensors, f"{name}.gaps", torch.int16),
                    _stored(tensors, f"{name}.overflow", torch.int64),
                )
                if idx.numel() != count:
                    raise ValueError(f"the entry list of {name!r} holds {idx.numel()} indices, not {count}")
                entries[name] = idx
            plan = cls(
                entries=entries,
                shapes={str(n): tuple(int(x) for x in s) for n, s in dict(info["shapes"]).items()},
                dense=[str(n) for n in info["dense"]],
                meta=dict(info.get("meta") or {}),
                rows={n: _stored(tensors, f"{n}.rows", torch.int64) for n in info.get("rows", [])},
                cols={n: _stored(tensors, f"{n}.cols", torch.int64) for n in info.get("cols", [])},
                scores={n: _stored(tensors, f"{n}.scores", torch.float32) for n in info.get("scores", [])},
            )
            for name, s in plan.scores.items():
                if name not in plan.entries or s.numel() != plan.entries[name].numel():
                    raise ValueError(f"the scores of {name!r} do not match its entries")
            for name in (*plan.entries, *plan.rows, *plan.cols, *plan.dense):
                if name not in plan.shapes:
                    raise ValueError(f"{name!r} has no shape")
        except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as e:
            why = f"lacks {e}" if isinstance(e, KeyError) else str(e)
            raise SurgicalError(
                f"plan in {str(directory)!r} is corrupted ({why})", "Save the plan again"
            ) from None
        # last, so that damage the checks above can name is reported as such
        check_sha256(directory / TENSOR_FILE, info.get("sha256"))
        return plan


def _stored(tensors: dict[str, torch.Tensor], key: str, dtype: torch.dtype) -> torch.Tensor:
    """``tensors[key]`` if it has ``dtype``; a ValueError naming the tensor otherwise."""
    if key not in tensors:
        raise ValueError(f"tensor {key!r} is missing from {TENSOR_FILE}")
    t = tensors[key]
    if t.dtype != dtype:
        have, want = (str(d).removeprefix("torch.") for d in (t.dtype, dtype))
        raise ValueError(f"tensor {key!r} is stored as {have}, expected {want}")
    return t


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
