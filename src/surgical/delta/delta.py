"""The Delta: what training changed, keyed by the model's own parameter names.

Three kinds of tensor, one kind per parameter:
- ``entries``: sorted flat indices and values *added* to the base at those indices;
- ``dense``: a whole tensor *added* to the base (deltas built from two checkpoints, LoRA imports);
- ``full``: a whole tensor that *replaces* the base's (densely trained heads, norms, biases; a
  freshly initialised classification head has no meaningful base value to add to).

Applying is exact: a fine-tuned entry is ``base + delta`` computed the same way training wrote
it, so a delta applied to a fresh copy of the base reproduces the fine-tuned model bit for bit.
Arithmetic (``scale``, ``+``, ``to_dense``, ``prune``, ``compress``) lives in
:mod:`surgical.delta.algebra`; the methods here delegate to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from surgical.delta.codec import VALUE_CODECS, decode_indices, decode_values, encode_indices, encode_values
from surgical.errors import SurgicalError
from surgical.utils import atomic_dir

FORMAT_VERSION = 1
CONFIG_FILE = "delta_config.json"
TENSOR_FILE = "delta.safetensors"
_RESERVED = {"format_version", "library_version", "dtype", "tensors"}


@dataclass(eq=False)  # identity: revert() matches the object that was applied
class Delta:
    """A sparse (and partly dense) change to a base model.

    Attributes:
        entries: Parameter name -> (sorted unique int64 flat indices, float values added at them).
        dense: Parameter name -> tensor added to the base tensor.
        full: Parameter name -> tensor that replaces the base tensor.
        shapes: Parameter name -> shape of the parameter in the base model.
        meta: Base identity (``base``), plan provenance (``plan``), training summary, etc.
    """

    entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_entries(self) -> int:
        """Number of sparse entries."""
        return sum(int(i.numel()) for i, _ in self.entries.values())

    @property
    def num_full(self) -> int:
        """Number of values in replaced tensors."""
        return sum(int(t.numel()) for t in self.full.values())

    @property
    def num_dense(self) -> int:
        """Number of values in added dense tensors."""
        return sum(int(t.numel()) for t in self.dense.values())

    def names(self) -> list[str]:
        """Every parameter name the delta touches."""
        return [*self.entries, *self.dense, *self.full]

    def validate(self) -> None:
        """Raises a SurgicalError unless kinds are disjoint, shapes known and values finite."""
        seen: set[str] = set()
        for name in self.names():
            if name in seen:
                raise SurgicalError(
                    f"the delta holds {name!r} twice (two kinds)", "Keep one kind per parameter"
                )
            seen.add(name)
            if name not in self.shapes:
                raise SurgicalError(f"the delta has no shape for {name!r}", "Set delta.shapes[name]")
        for name, (idx, vals) in self.entries.items():
            if idx.numel() != vals.numel():
                raise SurgicalError(f"{name!r} has {idx.numel()} indices but {vals.numel()} values", "Fix it")
            _check_finite(name, vals)
        for name, t in (*self.dense.items(), *self.full.items()):
            _check_finite(name, t)

    # arithmetic (see algebra.py)
    def scale(self, factor: float) -> Delta:
        """A copy with every added change multiplied by ``factor`` (replaced tensors are kept)."""
        from surgical.delta.algebra import scale

        return scale(self, factor)

    def __add__(self, other: Delta) -> Delta:
        from surgical.delta.algebra import add

        return add(self, other)

    def __mul__(self, factor: float) -> Delta:
        return self.scale(factor)

    __rmul__ = __mul__

    def to_dense(self) -> Delta:
        """A copy whose entries are dense added tensors (zeros elsewhere)."""
        from surgical.delta.algebra import to_dense

        return to_dense(self)

    def prune(self, density: float) -> Delta:
        """A copy keeping, per tensor, the ``density`` fraction of added values largest in magnitude."""
        from surgical.delta.algebra import prune

        return prune(self, density)

    def compress(self, density: float = 1.0, values: str = "sign") -> Delta:
        """ComPEFT-style compression: ``prune(density)`` then values as stored by codec ``values``."""
        from surgical.delta.algebra import compress

        return compress(self, density, values)

    @classmethod
    def from_models(cls, base, finetuned, density: float | None = None) -> Delta:
        """The delta turning ``base`` into ``finetuned`` (see :func:`surgical.delta.convert.from_models`)."""
        from surgical.delta.convert import from_models

        return from_models(base, finetuned, density=density)

    @classmethod
    def from_peft_lora(cls, directory: str | Path, base=None) -> Delta:
        """A dense delta from a PEFT LoRA adapter directory (see :mod:`surgical.delta.convert`)."""
        from surgical.delta.convert import from_peft_lora

        return from_peft_lora(directory, base=base)

    def save(self, directory: str | Path, dtype: str = "float32") -> Path:
        """Writes ``delta.safetensors`` and ``delta_config.json`` atomically.

        Args:
            directory: Target directory; an existing one is replaced only once the new one is
                complete.
            dtype: Storage of the values: ``float32`` (exact), ``float16``, ``bfloat16``, or the
                lossy ``int8`` (per-tensor scale) and ``sign`` (1 bit + one scale per tensor,
                for entries; dense and replaced tensors then use bfloat16).
        """
        if dtype not in VALUE_CODECS:
            raise SurgicalError(f"unknown value dtype {dtype!r}", f"Use one of: {', '.join(VALUE_CODECS)}")
        self.validate()
        tensors: dict[str, torch.Tensor] = {}
        kinds: dict[str, dict[str, Any]] = {}
        whole_codec = dtype if dtype in ("float32", "float16", "bfloat16") else "bfloat16"
        for name, (idx, vals) in self.entries.items():
            gaps, overflow = encode_indices(idx)
            tensors[f"entries.{name}.gaps"] = gaps
            tensors[f"entries.{name}.overflow"] = overflow
            for part, t in encode_values(vals, dtype).items():
                tensors[f"entries.{name}.{part}"] = t
            kinds[name] = {"kind": "entries", "shape": list(self.shapes[name]), "count": int(idx.numel())}
        for kind, items in (("dense", self.dense), ("full", self.full)):
            for name, t in items.items():
                tensors[f"{kind}.{name}"] = t.detach().to("cpu", torch.float32).to(_float(whole_codec))
                kinds[name] = {"kind": kind, "shape": list(self.shapes[name])}
        config = {
            "format_version": FORMAT_VERSION,
            "library_version": _version(),
            "dtype": dtype,
            "tensors": kinds,
            **self.meta,
        }
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise SurgicalError(
                    f"{key!r} overflows {dtype} (values beyond its range)",
                    "Save with dtype='float32' or 'bfloat16'",
                )
        with atomic_dir(directory) as tmp:
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                str(tmp / TENSOR_FILE),
                metadata={"format": "surgical-delta"},
            )
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
        if (
            not isinstance(config, dict)
            or config.get("format_version") != FORMAT_VERSION
            or "tensors" not in config
        ):
            raise SurgicalError(
                f"{str(directory / CONFIG_FILE)!r} is not a surgical delta of format {FORMAT_VERSION}", fix
            )
        delta = cls()
        codec = config.get("dtype", "float32")
        try:
            if codec not in VALUE_CODECS:
                raise ValueError(f"unknown value dtype {codec!r}")
            for name, info in config["tensors"].items():
                shape = tuple(int(s) for s in info["shape"])
                numel = _numel(shape)
                delta.shapes[name] = shape
                if info["kind"] == "entries":
                    prefix = f"entries.{name}."
                    idx = decode_indices(tensors[prefix + "gaps"], tensors[prefix + "overflow"])
                    stored = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                    vals = decode_values(stored, codec, int(info["count"]))
                    if idx.numel() != info["count"] or vals.numel() != idx.numel():
                        raise ValueError(f"entry count of {name}")
                    if idx.numel() and int(idx[-1]) >= numel:
                        raise ValueError(f"indices of {name} beyond its shape")
                    delta.entries[name] = (idx, vals)
                elif info["kind"] in ("dense", "full"):
                    t = tensors[f"{info['kind']}.{name}"].float()
                    if tuple(t.shape) != shape:
                        raise ValueError(f"shape of {name}")
                    getattr(delta, info["kind"])[name] = t
                else:
                    raise ValueError(f"unknown kind {info['kind']!r} of {name}")
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise SurgicalError(
                f"{str(directory)!r} is corrupted: its files disagree ({e})", "Save the delta again"
            ) from None
        for name, (_, vals) in delta.entries.items():
            _check_finite(name, vals, directory)
        for name, t in (*delta.dense.items(), *delta.full.items()):
            _check_finite(name, t, directory)
        delta.meta = {k: v for k, v in config.items() if k not in _RESERVED}
        return delta


def _float(codec: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[codec]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_finite(name: str, t: torch.Tensor, where: Path | None = None) -> None:
    if not bool(torch.isfinite(t).all()):
        place = f" in {str(where)!r}" if where is not None else ""
        raise SurgicalError(f"delta values of {name!r}{place} contain NaN or Inf", "Check the training run")


def _version() -> str:
    from surgical import __version__

    return __version__
