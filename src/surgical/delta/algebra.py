"""Arithmetic on deltas: scaling, composition, densifying, pruning and compression.

Added changes (``entries``, ``rows``, ``cols`` and ``dense``) form a vector space: scaling
multiplies them and composition adds them, value by value (overlapping entries, rows or columns
add). Replaced tensors (``full``) have no base to scale from, so ``scale`` keeps them, and
composing two deltas that replace the same tensor with different values is an error: there is no
sum of two replacements.

When two deltas change one tensor in different kinds, the sum takes the most compact kind that
holds both exactly: two blocks of the same kind stay a block (union of the rows or columns);
entries with a block, or rows with columns, become entries; anything with a dense tensor becomes
dense.
"""

from __future__ import annotations

import copy
import math
import numbers

import torch

from surgical.core.blocks import BLOCK_KINDS, add_block_, merge_blocks, to_entries
from surgical.core.codec import VALUE_CODECS, decode_values, encode_values
from surgical.core.errors import SurgicalError
from surgical.delta.base import base_checks
from surgical.delta.container import DeltaData


def _copy_meta(delta: DeltaData) -> dict:
    return copy.deepcopy(delta.meta)


def scale(delta: DeltaData, factor: float) -> DeltaData:
    """``factor`` times the added changes of ``delta``; replaced tensors are kept as they are."""
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor):
        raise SurgicalError(f"a delta's scale must be a finite number, got {factor!r}", "Pass e.g. 0.5")
    factor = float(factor)
    out = type(delta)(shapes=dict(delta.shapes), meta=_copy_meta(delta))
    out.entries = {n: (i.clone(), v * factor) for n, (i, v) in delta.entries.items()}
    out.rows = {n: (i.clone(), b * factor) for n, (i, b) in delta.rows.items()}
    out.cols = {n: (i.clone(), b * factor) for n, (i, b) in delta.cols.items()}
    out.dense = {n: t * factor for n, t in delta.dense.items()}
    out.full = {n: t.clone() for n, t in delta.full.items()}
    out.scores = {n: t.clone() for n, t in delta.scores.items()}  # importance does not scale
    out.meta.setdefault("ops", []).append(f"scale({factor:g})")
    return out


def merge_entries(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of two sorted entry sets; values at shared indices are summed."""
    idx = torch.cat([a[0], b[0]])
    vals = torch.cat([a[1].float(), b[1].float()])
    uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    summed = torch.zeros(uniq.numel(), dtype=torch.float32).index_add_(0, inverse, vals)
    return uniq, summed


def entries_of(delta: DeltaData, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The change of ``name`` as sorted flat entries (a block is expanded; entries as they are)."""
    if name in delta.entries:
        return delta.entries[name]
    kind = delta.kind_of(name)
    idx, block = delta.blocks(kind)[name]
    return to_entries(kind, idx, block, tuple(delta.shapes[name]))


def _dense_of(delta: DeltaData, name: str) -> torch.Tensor:
    if name in delta.dense:
        return delta.dense[name].float()
    out = torch.zeros(delta.shapes[name], dtype=torch.float32)
    kind = delta.kind_of(name)
    if kind in BLOCK_KINDS:
        idx, block = delta.blocks(kind)[name]
        return add_block_(out, kind, idx, block.float())
    idx, vals = delta.entries[name]
    out.view(-1).index_put_((idx,), vals.float(), accumulate=True)
    return out


def _with_values(delta: DeltaData, name: str, values: torch.Tensor) -> DeltaData:
    """A delta holding only ``name``, laid out as in ``delta`` but with ``values`` as its values."""
    out = DeltaData(shapes={name: delta.shapes[name]})
    kind = delta.kind_of(name)
    stored = getattr(delta, kind)[name]
    getattr(out, kind)[name] = (stored[0], values) if isinstance(stored, tuple) else values
    return out


def _copy_change(src: DeltaData, out: DeltaData, name: str) -> None:
    """Copies the change of ``name`` in ``src`` into ``out``, in the same kind."""
    kind = src.kind_of(name)
    if kind in ("dense", "full"):
        getattr(out, kind)[name] = getattr(src, kind)[name].clone()
    else:
        idx, vals = getattr(src, kind)[name]
        getattr(out, kind)[name] = (idx.clone(), vals.clone())


def _add_changes(a: DeltaData, b: DeltaData, out: DeltaData, name: str) -> None:
    """Puts the sum of two added changes of ``name`` into ``out`` (see the module docstring)."""
    ka, kb = a.kind_of(name), b.kind_of(name)
    if ka == kb and ka in BLOCK_KINDS:
        out.blocks(ka)[name] = merge_blocks(ka, a.blocks(ka)[name], b.blocks(kb)[name])
    elif "dense" in (ka, kb):
        out.dense[name] = _dense_of(a, name) + _dense_of(b, name)
    else:
        out.entries[name] = merge_entries(entries_of(a, name), entries_of(b, name))


def add(a: DeltaData, b: DeltaData) -> DeltaData:
    """The composition ``a + b``: applying it equals applying ``a`` then ``b`` (up to rounding).

    Raises:
        SurgicalError: if a parameter has different shapes, or is replaced by one delta and
            changed otherwise by the other, or the deltas were made on different bases.
    """
    for name in set(a.shapes) & set(b.shapes):
        if tuple(a.shapes[name]) != tuple(b.shapes[name]):
            raise SurgicalError(
                f"cannot compose: {name!r} is {tuple(a.shapes[name])} in one delta and "
                f"{tuple(b.shapes[name])} in the other",
                "Compose deltas of the same base model",
            )
    out = type(a)(shapes={**a.shapes, **b.shapes}, meta=_compose_meta(a, b))
    names_a, names_b = set(a.names()), set(b.names())
    for name in dict.fromkeys([*a.names(), *b.names()]):
        in_a, in_b = name in names_a, name in names_b
        if in_a and in_b:
            if name in a.full or name in b.full:
                if name in a.full and name in b.full and torch.equal(a.full[name], b.full[name]):
                    out.full[name] = a.full[name].clone()
                    continue
                raise SurgicalError(
                    f"cannot compose: both deltas change {name!r} and at least one replaces it",
                    "Drop the replaced tensor from one delta (del delta.full[name]) before composing",
                )
            _add_changes(a, b, out, name)
        else:
            _copy_change(a if in_a else b, out, name)
    return out


def compose(deltas: list[DeltaData], weights: list[float] | None = None) -> DeltaData:
    """``sum(w * d)`` over the deltas (weights default to 1); overlapping entries add."""
    if not deltas:
        raise SurgicalError("nothing to compose", "Pass at least one delta")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise SurgicalError(f"{len(deltas)} deltas but {len(weights)} weights", "Pass one weight per delta")
    out = deltas[0] if weights[0] == 1.0 else scale(deltas[0], weights[0])
    for d, w in zip(deltas[1:], weights[1:], strict=True):
        out = add(out, d if w == 1.0 else scale(d, w))
    return out


def _compose_meta(a: DeltaData, b: DeltaData) -> dict:
    """Keeps base identity when both agree; records every distinct fingerprint check otherwise."""
    checks = []
    for d in (a, b):
        for check in base_checks(d):
            if check not in checks:
                checks.append(check)
    fps = {fp for fp, excludes in checks}
    base_a, base_b = a.meta.get("base", {}), b.meta.get("base", {})
    names = {base_a.get("name_or_path"), base_b.get("name_or_path")} - {None, ""}
    if len(fps) > 1 and len({tuple(e) for _, e in checks}) == 1:
        raise SurgicalError(
            f"cannot compose deltas made on different base models (fingerprints {' vs '.join(sorted(fps))})",
            "Compose deltas of the same base model",
        )
    base = {**base_b, **base_a}
    base.pop("fingerprint", None)
    base.pop("fingerprint_excludes", None)
    if len(checks) == 1:
        base["fingerprint"], base["fingerprint_excludes"] = checks[0][0], list(checks[0][1])
    elif checks:
        base["checks"] = [[fp, list(ex)] for fp, ex in checks]
    if len(names) > 1:
        base["name_or_path"] = " + ".join(sorted(names))
    return {"base": base, "composed_of": [_summary(a), _summary(b)]}


def _summary(d: DeltaData) -> dict:
    keep = ("plan", "training", "source", "ops", "composed_of")
    return {k: d.meta[k] for k in keep if k in d.meta}


def to_dense(delta: DeltaData) -> DeltaData:
    """A copy with every added change (entries, rows, columns) turned into a dense added tensor."""
    out = type(delta)(shapes=dict(delta.shapes), meta=_copy_meta(delta))
    out.dense = {n: _dense_of(delta, n) for n in delta.names() if n not in delta.full}
    out.full = {n: t.clone() for n, t in delta.full.items()}
    out.scores = {
        n: _dense_of(_with_values(delta, n, s), n) for n, s in delta.scores.items() if n not in delta.full
    }
    return out


def topk_entries(
    t_idx: torch.Tensor | None, vals: torch.Tensor, density: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``density`` share of ``vals`` largest in |value| (at least one), as sorted entries."""
    flat = vals.reshape(-1).float()
    k = max(1, round(density * flat.numel())) if flat.numel() else 0
    top = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    idx = top if t_idx is None else t_idx[top]
    return idx.to(torch.int64), flat[top]


def prune(delta: DeltaData, density: float) -> DeltaData:
    """Keeps per tensor the ``density`` fraction of added values largest in magnitude.

    Entries stay entries; dense added tensors become entries, and so do rows and columns for
    ``density < 1`` (the largest values of a block are scattered over its rows, so what is left
    is no block any more). Replaced tensors are kept.
    """
    if not 0.0 < density <= 1.0:
        raise SurgicalError(f"density must be in (0, 1], got {density}", "Pass e.g. density=0.5")
    out = type(delta)(shapes=dict(delta.shapes), meta=_copy_meta(delta))
    for name, (idx, vals) in delta.entries.items():
        out.entries[name] = topk_entries(idx, vals, density) if density < 1 else (idx.clone(), vals.clone())
    for kind in BLOCK_KINDS:
        for name, (idx, block) in delta.blocks(kind).items():
            if density < 1:
                out.entries[name] = topk_entries(*entries_of(delta, name), density)
            else:
                out.blocks(kind)[name] = (idx.clone(), block.clone())
    for name, t in delta.dense.items():
        out.entries[name] = topk_entries(None, t, density)
    out.full = {n: t.clone() for n, t in delta.full.items()}
    out.meta.setdefault("ops", []).append(f"prune({density:g})")
    return out


def compress(delta: DeltaData, density: float = 1.0, values: str = "sign") -> DeltaData:
    """ComPEFT-style: ``prune(density)``, then sparse values as the codec ``values`` stores them.

    The result holds exactly what ``save(dtype=values)`` writes, so it can be evaluated before
    saving. ``values``: ``sign`` (1 bit + one scale per tensor), ``int8``, or a float dtype.
    """
    if values not in VALUE_CODECS:
        raise SurgicalError(f"unknown value codec {values!r}", f"Use one of: {', '.join(VALUE_CODECS)}")
    out = prune(delta, density) if density < 1.0 else scale(delta, 1.0)
    for kind in ("entries", *BLOCK_KINDS):  # what save() encodes with the codec, tensor by tensor
        items = getattr(out, kind)
        for name, (idx, vals) in list(items.items()):
            stored = decode_values(encode_values(vals, values), values, vals.numel())
            items[name] = (idx, stored.reshape(vals.shape))
    out.meta["ops"] = [*delta.meta.get("ops", []), f"compress(density={density:g}, values={values})"]
    return out
