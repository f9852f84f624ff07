"""The Delta: what training changed, keyed by the model's own parameter names.

Two kinds of tensor:
- ``entries``: sorted flat indices and values *added* to the base at those indices;
- ``full``: a whole tensor that *replaces* the base's (densely trained heads, norms, biases; a
  freshly initialised classification head has no meaningful base value to add to).

Applying is exact: a fine-tuned entry is ``base + delta`` computed the same way training wrote
it, so a delta applied to a fresh copy of the base reproduces the fine-tuned model bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from surgical.delta.codec import decode_indices, encode_indices
from surgical.errors import SurgicalError
from surgical.utils import atomic_dir

FORMAT_VERSION = 1
CONFIG_FILE = "delta_config.json"
TENSOR_FILE = "delta.safetensors"
FINGERPRINT_SAMPLE = 64
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Delta:
    """A sparse (and partly dense) change to a base model.

    Attributes:
        entries: Parameter name -> (sorted int64 flat indices, values added at them).
        full: Parameter name -> tensor that replaces the base tensor.
        shapes: Parameter name -> shape of the parameter in the base model.
        meta: Base identity (``base``), plan provenance (``plan``), training summary, etc.
    """

    entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_entries(self) -> int:
        """Number of sparse entries."""
        return sum(int(i.numel()) for i, _ in self.entries.values())

    @property
    def num_full(self) -> int:
        """Number of values in replaced tensors."""
        return sum(int(t.numel()) for t in self.full.values())

    def save(self, directory: str | Path, dtype: str = "float32") -> Path:
        """Writes ``delta.safetensors`` and ``delta_config.json`` atomically.

        Args:
            directory: Target directory; an existing one is replaced only once the new one is
                complete.
            dtype: Storage dtype of the values: ``float32`` (exact), ``float16`` or ``bfloat16``.
        """
        if dtype not in _DTYPES:
            raise SurgicalError(f"unknown value dtype {dtype!r}", f"Use one of: {', '.join(_DTYPES)}")
        tdtype = _DTYPES[dtype]
        tensors: dict[str, torch.Tensor] = {}
        kinds: dict[str, dict[str, Any]] = {}
        for name, (idx, vals) in self.entries.items():
            _check_finite(name, vals)
            gaps, overflow = encode_indices(idx)
            tensors[f"entries.{name}.gaps"] = gaps
            tensors[f"entries.{name}.overflow"] = overflow
            tensors[f"entries.{name}.values"] = vals.detach().to("cpu", tdtype).contiguous()
            kinds[name] = {"kind": "entries", "shape": list(self.shapes[name]), "count": int(idx.numel())}
        for name, t in self.full.items():
            _check_finite(name, t)
            tensors[f"full.{name}"] = t.detach().to("cpu", tdtype).contiguous()
            kinds[name] = {"kind": "full", "shape": list(self.shapes[name])}
        config = {
            "format_version": FORMAT_VERSION,
            "library_version": _version(),
            "dtype": dtype,
            "tensors": kinds,
            **self.meta,
        }
        with atomic_dir(directory) as tmp:
            save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": "surgical-delta"})
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> Delta:
        """Reads a delta directory (safetensors and JSON only; nothing is executed).

        Raises:
            SurgicalError: if the directory or a file is missing, truncated or corrupted, or
                holds NaN/Inf values.
        """
        directory = Path(directory)
        fix = "Pass a directory written by Delta.save or `surgical demo`"
        if not directory.is_dir():
            raise SurgicalError(f"delta directory {str(directory)!r} does not exist", fix)
        for fname in (CONFIG_FILE, TENSOR_FILE):
            if not (directory / fname).is_file():
                raise SurgicalError(f"{str(directory / fname)!r} is missing", fix)
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SurgicalError(
                f"{str(directory / CONFIG_FILE)!r} is truncated or corrupted ({e.__class__.__name__})",
                "Save the delta again",
            ) from None
        try:
            tensors = load_file(str(directory / TENSOR_FILE))
        except (SafetensorError, OSError, ValueError) as e:
            raise SurgicalError(
                f"{str(directory / TENSOR_FILE)!r} is truncated or corrupted ({e})", "Save the delta again"
            ) from None
        if config.get("format_version") != FORMAT_VERSION or "tensors" not in config:
            raise SurgicalError(
                f"{str(directory / CONFIG_FILE)!r} is not a surgical delta of format {FORMAT_VERSION}",
                fix,
            )
        delta = cls()
        try:
            for name, info in config["tensors"].items():
                delta.shapes[name] = tuple(info["shape"])
                if info["kind"] == "entries":
                    idx = decode_indices(tensors[f"entries.{name}.gaps"], tensors[f"entries.{name}.overflow"])
                    vals = tensors[f"entries.{name}.values"].float()
                    if idx.numel() != info["count"] or vals.numel() != idx.numel():
                        raise ValueError(f"entry count of {name}")
                    delta.entries[name] = (idx, vals)
                else:
                    delta.full[name] = tensors[f"full.{name}"].float()
        except (KeyError, ValueError) as e:
            raise SurgicalError(
                f"{str(directory)!r} is corrupted: its files disagree ({e})", "Save the delta again"
            ) from None
        for name, (_, vals) in delta.entries.items():
            _check_finite(name, vals)
        for name, t in delta.full.items():
            _check_finite(name, t)
        reserved = {"format_version", "library_version", "dtype", "tensors"}
        delta.meta = {k: v for k, v in config.items() if k not in reserved}
        return delta


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise SurgicalError(f"delta values of {name!r} contain NaN or Inf", "Check the training run")


def _version() -> str:
    from surgical import __version__

    return __version__


def fingerprint_of(samples: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> str:
    """Hash of parameter names, shapes and base values at the first entries of each tensor."""
    h = hashlib.sha256()
    for name in sorted(samples):
        shape, values = samples[name]
        h.update(f"{name}{tuple(shape)}".encode())
        h.update(values[:FINGERPRINT_SAMPLE].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def base_fingerprint(model: nn.Module, delta: Delta) -> str:
    """Fingerprint of ``model`` seen as the base of ``delta`` (see :func:`fingerprint_of`).

    Covers only the tensors the delta adds to; replaced (``full``) tensors are excluded since
    their base values do not matter (a fresh classification head is random).
    """
    params = dict(model.named_parameters())
    samples = {}
    for name, (idx, _) in delta.entries.items():
        p = params.get(name)
        if p is None or tuple(p.shape) != tuple(delta.shapes[name]):
            return f"mismatch:{name}"
        head = idx[:FINGERPRINT_SAMPLE].to(p.device)
        samples[name] = (tuple(p.shape), p.detach().reshape(-1).index_select(0, head))
    return fingerprint_of(samples)
