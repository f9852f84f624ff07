"""Per-example data for example, token and online selection: checking, hashing, re-batching.

Selection works on *examples*: dicts holding 1-D ``input_ids``, optionally a 1-D
``attention_mask`` (and other per-token inputs such as ``token_type_ids``), and ``labels``: one
class id (a 0-d tensor or an int) or one label per token (``-100`` where no loss is taken).
:func:`as_examples` turns what users have (a ``datasets.Dataset``, a list of dicts, a list of
padded batches) into that form; :func:`collate` and :func:`batches_of` turn examples back into
right-padded batches a model accepts; :func:`data_hash` fingerprints them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from surgical.core.errors import SurgicalError

IGNORE_INDEX = -100  # the label value Hugging Face losses skip

Example = dict[str, torch.Tensor]
"""One example: 1-D ``input_ids`` (and per-token inputs), ``labels`` 0-d or 1-D."""

_FIX_FIELDS = "Give every example 'input_ids' and 'labels' (class id, or token labels with -100 for no loss)"


def _tensor(value: Any, key: str, i: int) -> torch.Tensor:
    try:
        t = value if torch.is_tensor(value) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise SurgicalError(
            f"example {i}: {key!r} is not a number or a list of numbers ({type(value).__name__})", _FIX_FIELDS
        ) from None
    if t.numel() == 0:
        return t.long()
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        if key in ("input_ids", "labels"):
            raise SurgicalError(f"example {i}: {key!r} must hold integers, got {t.dtype}", _FIX_FIELDS)
    return t.long() if not t.is_floating_point() else t


def _example(raw: Any, i: int) -> Example:
    if not isinstance(raw, Mapping):
        raise SurgicalError(f"example {i} is a {type(raw).__name__}, not a dict", _FIX_FIELDS)
    missing = [k for k in ("input_ids", "labels") if k not in raw]
    if missing:
        raise SurgicalError(f"example {i} has no {' and no '.join(map(repr, missing))}", _FIX_FIELDS)
    ex: Example = {}
    for key, value in raw.items():
        if key in ("input_ids", "labels"):
            ex[key] = _tensor(value, key, i)
        elif isinstance(value, (list, tuple)) or torch.is_tensor(value):
            try:  # other per-token inputs (attention_mask, token_type_ids); the rest is not for the model
                ex[key] = _tensor(value, key, i)
            except SurgicalError:
                pass
    ids = ex["input_ids"]
    if ids.dim() == 2 and ids.shape[0] == 1:  # a batch of one
        ex = {k: (v[0] if v.dim() >= 1 and v.shape[:1] == (1,) else v) for k, v in ex.items()}
        ids = ex["input_ids"]
    if ids.dim() != 1 or ids.numel() == 0:
        raise SurgicalError(
            f"example {i}: input_ids must be one non-empty sequence, got shape {tuple(ids.shape)}",
            "Pass one example per dict (split padded batches with surgical.data.split_batches)",
        )
    labels = ex["labels"]
    if labels.dim() == 1 and labels.numel() == 1 and ids.numel() != 1:
        ex["labels"] = labels = labels[0]
    if labels.dim() == 1 and labels.shape != ids.shape:
        raise SurgicalError(
            f"example {i}: {labels.numel()} labels for {ids.numel()} input_ids",
            "Give one class id, or one label per token",
        )
    if labels.dim() > 1:
        raise SurgicalError(f"example {i}: labels have shape {tuple(labels.shape)}", _FIX_FIELDS)
    per_token = {"input_ids", "labels"} | {
        k
        for k, v in ex.items()
        if v.dim() == 1 and v.shape == ids.shape  # not per-token: models do not take it
    }
    return _trim({k: v for k, v in ex.items() if k in per_token})


def _trim(ex: Example) -> Example:
    """The example without trailing padding (attention_mask 0 at the end), so that an example
    hashes and batches the same whether or not it came padded."""
    mask = ex.get("attention_mask")
    if mask is None or mask.dim() != 1 or bool(mask[-1]):
        return ex
    length = int(mask.nonzero().max()) + 1 if bool(mask.any()) else 1
    token = ex["labels"].dim() == 1
    return {k: (v[:length] if v.dim() == 1 and (k != "labels" or token) else v) for k, v in ex.items()}


def as_examples(data: Any, what: str = "examples") -> list[Example]:
    """``data`` as a list of checked per-example dicts of tensors.

    Args:
        data: A ``datasets.Dataset`` with ``input_ids`` and ``labels`` columns, or a sequence of
            dicts each holding one example (``input_ids`` a list or 1-D tensor, or a batch of
            one). Other list/tensor fields of the same length (``attention_mask``,
            ``token_type_ids``) are kept; scalar fields other than ``labels`` are dropped.
        what: How to name the data in errors (``examples``, ``validation``).

    Raises:
        SurgicalError: empty data, an example without ``input_ids`` or ``labels``, labels that
            fit neither classification nor token labels, or classification mixed with token labels.
    """
    try:
        import datasets

        if isinstance(data, datasets.DatasetDict):
            raise SurgicalError(f"{what} is a DatasetDict", "Pass one split, e.g. data['train']")
        if isinstance(data, datasets.Dataset):
            missing = [c for c in ("input_ids", "labels") if c not in data.column_names]
            if missing:
                raise SurgicalError(
                    f"{what} have no column {' and no column '.join(map(repr, missing))}", _FIX_FIELDS
                )
            data = list(data)
    except ImportError:  # datasets is optional here
        pass
    if isinstance(data, (Mapping, str, bytes)) or not isinstance(data, Sequence):
        raise SurgicalError(
            f"{what} must be a datasets.Dataset or a list of per-example dicts, got {type(data).__name__}",
            _FIX_FIELDS,
        )
    if len(data) == 0:
        raise SurgicalError(f"{what} are empty", "Pass at least one example")
    out = [_example(raw, i) for i, raw in enumerate(data)]
    kinds = {ex["labels"].dim() for ex in out}
    if len(kinds) > 1:
        raise SurgicalError(
            f"{what} mix class labels and token labels", "Give every example the same kind of labels"
        )
    return out


def budget_of(fraction: float, n: int) -> int:
    """``fraction`` of ``n`` items, rounded half up, at least 1 and at most ``n``."""
    return max(1, min(n, int(fraction * n + 0.5)))


def split_batches(batches: Sequence[Mapping[str, Any]]) -> list[Example]:
    """Padded batches (dicts of ``(B, ...)`` tensors) split into per-example dicts, trailing
    padding removed (where ``attention_mask`` marks it)."""
    out: list[Example] = []
    for b, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise SurgicalError(f"batch {b} is not a dict with input_ids", _FIX_FIELDS)
        size = int(batch["input_ids"].shape[0])
        for i in range(size):
            raw = {
                k: v[i]
                for k, v in batch.items()
                if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == size
            }
            out.append(_example(raw, len(out)))
    return out


def is_token_labelled(examples: Sequence[Example]) -> bool:
    """True if the examples carry one label per token (causal LM), False for class ids."""
    return examples[0]["labels"].dim() == 1


def collate(examples: Sequence[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``examples``: ``input_ids`` padded with ``pad_id``, token labels with
    -100, ``attention_mask`` with 0 (made of ones where an example has none), other per-token
    inputs with 0; class labels stacked."""
    width = max(int(ex["input_ids"].shape[0]) for ex in examples)
    keys = [k for k in examples[0] if all(k in ex for ex in examples)]
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = examples[0][key]
        if key == "labels" and first.dim() == 0:
            out[key] = torch.stack([ex[key] for ex in examples])
            continue
        fill = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        t = torch.full((len(examples), width), fill, dtype=first.dtype)
        for i, ex in enumerate(examples):
            t[i, : ex[key].shape[0]] = ex[key]
        out[key] = t
    if "attention_mask" not in out:
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, ex in enumerate(examples):
            mask[i, : ex["input_ids"].shape[0]] = 1
        out["attention_mask"] = mask
    return out


def batches_of(
    examples: Sequence[Example],
    indices: Sequence[int] | torch.Tensor | None = None,
    batch_size: int = 8,
    pad_id: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """The examples at ``indices`` (default: all, in order) in right-padded batches of ``batch_size``.

    Use it to train on a selection: ``batches_of(examples, selection.indices, batch_size=16)``.
    """
    idx = list(range(len(examples))) if indices is None else [int(i) for i in indices]
    return [
        collate([examples[i] for i in idx[s : s + batch_size]], pad_id)
        for s in range(0, len(idx), batch_size)
    ]


def iter_batches(
    examples: Sequence[Example], batch_size: int, pad_id: int = 0
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``(positions, batch)`` over the examples in order, ``batch_size`` at a time."""
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        yield torch.arange(s, s + len(chunk)), collate(chunk, pad_id)


def attended_ids(ex: Example) -> torch.Tensor:
    """The example's input_ids at attended positions (all of them without an attention mask)."""
    mask = ex.get("attention_mask")
    ids = ex["input_ids"]
    return ids if mask is None else ids[mask.bool()]


def data_hash(examples: Sequence[Example]) -> str:
    """SHA-256 (hex) over the examples' ``input_ids`` and ``labels``, in order.

    Each example contributes its length-prefixed ``input_ids`` then ``labels`` as little-endian
    int64, so the hash does not depend on padding, batching or the container the examples came
    in, and any change of a token, a label or the order changes it.
    """
    h = hashlib.sha256()
    h.update(f"surgical-examples:{len(examples)}".encode())
    for ex in examples:
        for key in ("input_ids", "labels"):
            t = ex[key].reshape(-1).to(torch.int64).cpu().contiguous()
            h.update(len(t).to_bytes(8, "little"))
            h.update(t.numpy().astype("<i8").tobytes())
    return h.hexdigest()
