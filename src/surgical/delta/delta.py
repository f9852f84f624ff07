"""The Delta: what training changed, keyed by the model's own parameter names.

Five kinds of tensor, one kind per parameter:
- ``entries``: sorted flat indices and values *added* to the base at those indices;
- ``rows`` / ``cols``: sorted row (column) indices and a dense block *added* to those rows
  (columns of a 2-D weight): what row/column training and Embedding token rows produce, stored
  with one index per row instead of one per value (see :mod:`surgical.core.blocks`);
- ``dense``: a whole tensor *added* to the base (deltas built from two checkpoints, LoRA imports);
- ``full``: a whole tensor that *replaces* the base's (densely trained heads, norms, biases; a
  freshly initialised classification head has no meaningful base value to add to).

Applying is exact: a fine-tuned entry is ``base + delta`` computed the same way training wrote
it, so a delta applied to a fresh copy of the base reproduces the fine-tuned model bit for bit.

On disk, format 2 adds the ``rows`` and ``cols`` kinds to format 1 (entries, dense, full). A
delta without them is still written as format 1, so older readers keep loading it; both formats
load.

Integrity: ``delta_config.json`` records the SHA-256 of ``delta.safetensors`` (key ``sha256``),
and loading checks it, and every stored tensor's dtype against what the config's value codec
writes (deltas saved before the checksum existed have no ``sha256`` and still load).

Arithmetic (``scale``, ``+``, ``to_dense``, ``prune``, ``compress``) lives in
:mod:`surgical.delta.algebra`; the methods here delegate to it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import surgical.delta.algebra as algebra
import surgical.delta.convert as convert
from surgical.core.blocks import BLOCK_KINDS, block_shape, check_block, check_sorted_indices
from surgical.core.codec import (
    FLOAT_DTYPES,
    VALUE_CODECS,
    decode_indices,
    decode_values,
    encode_indices,
    encode_values,
)
from surgical.core.errors import SurgicalError
from surgical.core.io import atomic_dir, check_replaceable, check_sha256, sha256_file
from surgical.core.version import __version__
from surgical.delta.container import DeltaData, _check_finite, _numel

FORMAT_VERSION = 2  # the newest format written; format 1 (no rows/cols kinds) still loads
_KINDS_OF_FORMAT = {1: ("entries", "dense", "full"), 2: ("entries", "rows", "cols", "dense", "full")}
CONFIG_FILE = "delta_config.json"
TENSOR_FILE = "delta.safetensors"
_RESERVED = {"format_version", "library_version", "dtype", "tensors", "sha256"}


@dataclass(eq=False)  # tensors inside: compare deltas with digest()
class Delta(DeltaData):
    """A sparse (and partly dense) change to a base model: the data of :class:`DeltaData`, plus
    arithmetic (:mod:`surgical.delta.algebra`), conversions and the file format."""

    def digest(self) -> str:
        """A SHA-256 (hex) of the delta's content: names, kinds, shapes, indices and values.

        Two deltas with the same digest change a model identically; :func:`surgical.revert`
        matches the applied delta by it. Metadata is not part of it.
        """
        h = hashlib.sha256()
        for name in sorted(self.names()):
            kind = self.kind_of(name)
            h.update(f"{name}|{kind}|{tuple(self.shapes[name])};".encode())
            stored = getattr(self, kind)[name]
            for t in stored if isinstance(stored, tuple) else (stored,):
                t = t.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # arithmetic (see algebra.py)
    def scale(self, factor: float) -> Delta:
        """A copy with every added change multiplied by ``factor`` (replaced tensors are kept)."""
        return algebra.scale(self, factor)

    def __add__(self, other: Delta) -> Delta:
        return algebra.add(self, other)

    def __mul__(self, factor: float) -> Delta:
        return self.scale(factor)

    __rmul__ = __mul__

    def to_dense(self) -> Delta:
        """A copy whose entries are dense added tensors (zeros elsewhere)."""
        return algebra.to_dense(self)

    def prune(self, density: float) -> Delta:
        """A copy keeping, per tensor, the ``density`` fraction of added values largest in magnitude."""
        return algebra.prune(self, density)

    def compress(self, density: float = 1.0, values: str = "sign") -> Delta:
        """ComPEFT-style compression: ``prune(density)`` then values as stored by codec ``values``."""
        return algebra.compress(self, density, values)

    @classmethod
    def from_models(cls, base, finetuned, density: float | None = None) -> Delta:
        """The delta turning ``base`` into ``finetuned`` (see :func:`surgical.delta.convert.from_models`)."""
        return convert.from_models(cls, base, finetuned, density=density)

    @classmethod
    def from_peft_lora(cls, directory: str | Path, base=None) -> Delta:
        """A dense delta from a PEFT LoRA adapter directory (see :mod:`surgical.delta.convert`)."""
        return convert.from_peft_lora(cls, directory, base=base)

    def save(self, directory: str | Path, dtype: str = "float32") -> Path:
        """Writes ``delta.safetensors`` and ``delta_config.json`` atomically.

        Args:
            directory: Target directory; an existing delta directory (or an empty one) is
                replaced only once the new one is complete. A file, or a directory holding other
                files, is refused (SurgicalError): nothing else is ever overwritten.
            dtype: Storage of the values: ``float32`` (exact), ``float16``, ``bfloat16``, or the
                lossy ``int8`` (per-tensor scale) and ``sign`` (1 bit + one scale per tensor,
                for entries, rows and columns; dense and replaced tensors then use bfloat16).
        """
        if dtype not in VALUE_CODECS:
            raise SurgicalError(f"unknown value dtype {dtype!r}", f"Use one of: {', '.join(VALUE_CODECS)}")
        check_replaceable(directory, CONFIG_FILE, "delta", "directory")  # never a file or another directory
        self.validate()
        tensors: dict[str, torch.Tensor] = {}
        kinds: dict[str, dict[str, Any]] = {}
        whole_codec = dtype if dtype in ("float32", "float16", "bfloat16") else "bfloat16"
        sparse = [("entries", self.entries), *((k, self.blocks(k)) for k in BLOCK_KINDS)]
        for kind, items in sparse:
            for name, (idx, vals) in items.items():
                # indices as 16-bit gaps for every sparse kind: rows and columns are sorted too
                gaps, overflow = encode_indices(idx)
                tensors[f"{kind}.{name}.gaps"] = gaps
                tensors[f"{kind}.{name}.overflow"] = overflow
                for part, t in encode_values(vals, dtype).items():
                    tensors[f"{kind}.{name}.{part}"] = t
                kinds[name] = {"kind": kind, "shape": list(self.shapes[name]), "count": int(idx.numel())}
        for kind, whole in (("dense", self.dense), ("full", self.full)):
            for name, t in whole.items():
                t = t.detach().to("cpu")
                tensors[f"{kind}.{name}"] = t.to(torch.float32).to(_float(whole_codec))
                kinds[name] = {"kind": kind, "shape": list(self.shapes[name])}
                if t.dtype == torch.float64 and whole_codec == "float32":
                    # a float64 change is what makes base + change exact (surgical.train.extract);
                    # the few values float32 cannot hold are stored beside it, exactly
                    flat = t.reshape(-1)
                    fix = torch.nonzero(flat.to(torch.float32).double() != flat).reshape(-1)
                    if fix.numel():
                        gaps, overflow = encode_indices(fix)
                        tensors[f"{kind}.{name}.fix_gaps"] = gaps
                        tensors[f"{kind}.{name}.fix_overflow"] = overflow
                        tensors[f"{kind}.{name}.fix"] = flat[fix].contiguous()
                        kinds[name]["fixups"] = int(fix.numel())
        for name, s in self.scores.items():  # importance, not part of the change: always float32
            tensors[f"scores.{name}"] = s.detach().to("cpu", torch.float32).contiguous()
            kinds[name]["scores"] = True
        config = {
            # the oldest format that holds every kind used, so older readers load what they can
            "format_version": FORMAT_VERSION if self.rows or self.cols else 1,
            "library_version": __version__,
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
            config["sha256"] = sha256_file(tmp / TENSOR_FILE)  # of the bytes just written
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> Delta:
        """Reads a delta directory (safetensors and JSON only; nothing is executed).

        Raises:
            SurgicalError: if the directory or a file is missing, truncated or corrupted (a
                tensor of another dtype than the config's codec stores, a SHA-256 that does not
                match the one recorded), or holds NaN/Inf values.
        """
        directory = Path(directory)
        fix = "Pass a directory written by Delta.save or `surgical demo`"
        if not directory.is_dir():
            if directory.exists():
                raise SurgicalError(f"{str(directory)!r} is a file, not a delta directory", fix)
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
        version = config.get("format_version") if isinstance(config, dict) else None
        if not isinstance(version, int) or version not in _KINDS_OF_FORMAT or "tensors" not in config:
            raise SurgicalError(
                f"{str(directory / CONFIG_FILE)!r} is not a surgical delta of format "
                f"{' or '.join(map(str, _KINDS_OF_FORMAT))}",
                fix + " (a newer format needs a newer surgical)",
            )
        delta = cls()
        codec = config.get("dtype", "float32")
        try:
            if codec not in VALUE_CODECS:
                raise ValueError(f"unknown value dtype {codec!r}")
            parts, whole = _stored_dtypes(codec)
            for name, info in config["tensors"].items():
                kind = info["kind"]
                if kind not in _KINDS_OF_FORMAT[version]:
                    raise ValueError(f"unknown kind {kind!r} of {name} in format {version}")
                shape = tuple(int(s) for s in info["shape"])
                delta.shapes[name] = shape
                if kind in ("dense", "full"):
                    t = _stored(tensors, f"{kind}.{name}", whole)
                    t = t if t.dtype == torch.float64 else t.float()
                    if tuple(t.shape) != shape:
                        raise ValueError(f"shape of {name}")
                    if info.get("fixups"):
                        fix = decode_indices(
                            _stored(tensors, f"{kind}.{name}.fix_gaps", (torch.int16,)),
                            _stored(tensors, f"{kind}.{name}.fix_overflow", (torch.int64,)),
                        )
                        if fix.numel() != int(info["fixups"]):
                            raise ValueError(f"fix-up count of {name}")
                        check_sorted_indices(fix, _numel(shape), f"{name} fix-up")
                        t = t.double()
                        t.view(-1)[fix] = _stored(tensors, f"{kind}.{name}.fix", (torch.float64,))
                    getattr(delta, kind)[name] = t
                    continue
                prefix = f"{kind}.{name}."
                gaps = _stored(tensors, prefix + "gaps", (torch.int16,))
                idx = decode_indices(gaps, _stored(tensors, prefix + "overflow", (torch.int64,)))
                count = int(info["count"])
                if idx.numel() != count:
                    raise ValueError(f"index count of {name}")
                if kind == "entries":
                    check_sorted_indices(idx, _numel(shape), f"{name} entry")
                    want: tuple[int, ...] = (count,)
                else:
                    want = block_shape(kind, shape, count)
                stored = {part: _stored(tensors, prefix + part, want_dt) for part, want_dt in parts.items()}
                vals = decode_values(stored, codec, _numel(want))
                if vals.numel() != _numel(want):
                    raise ValueError(f"value count of {name}")
                if kind == "entries":
                    delta.entries[name] = (idx, vals)
                else:
                    block = vals.reshape(want)
                    try:
                        check_block(kind, idx, block, shape)
                    except ValueError as e:
                        raise ValueError(f"{kind} of {name}: {e}") from None
                    delta.blocks(kind)[name] = (idx, block)
        except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as e:
            raise SurgicalError(
                f"{str(directory / TENSOR_FILE)!r} is corrupted or does not match its {CONFIG_FILE} ({e})",
                "Save the delta again",
            ) from None
        try:
            for name, info in config["tensors"].items():
                if info.get("scores"):
                    delta.scores[name] = _stored(tensors, f"scores.{name}", (torch.float32,))
            if delta.scores:
                delta.validate()
        except (KeyError, ValueError, SurgicalError) as e:
            raise SurgicalError(
                f"{str(directory / TENSOR_FILE)!r} is corrupted or does not match its {CONFIG_FILE} ({e})",
                "Save the delta again",
            ) from None
        for name, (_, vals) in (*delta.entries.items(), *delta.rows.items(), *delta.cols.items()):
            _check_finite(name, vals, directory)
        for name, t in (*delta.dense.items(), *delta.full.items()):
            _check_finite(name, t, directory)
        # last, so that damage the checks above can name (a shape, a NaN) is reported as such
        check_sha256(directory / TENSOR_FILE, config.get("sha256"))
        delta.meta = {k: v for k, v in config.items() if k not in _RESERVED}
        return delta


def _stored_dtypes(codec: str) -> tuple[dict[str, tuple[torch.dtype, ...]], tuple[torch.dtype, ...]]:
    """What :meth:`Delta.save` writes with value codec ``codec``: the dtypes of the value parts
    of a sparse tensor, and those of a dense or replaced tensor."""
    if codec in FLOAT_DTYPES:
        # a float64 whole change is legitimate: it is what makes base + change exact
        return {"values": (FLOAT_DTYPES[codec],)}, (FLOAT_DTYPES[codec], torch.float64)
    values = torch.int8 if codec == "int8" else torch.uint8
    return {"values": (values,), "scale": (torch.float32,)}, (torch.bfloat16, torch.float64)


def _stored(tensors: dict[str, torch.Tensor], key: str, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """``tensors[key]`` if it has one of ``dtypes``; a ValueError naming the tensor otherwise."""
    if key not in tensors:
        raise ValueError(f"tensor {key!r} is missing")
    t = tensors[key]
    if t.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"tensor {key!r} is stored as {str(t.dtype).removeprefix('torch.')}, expected {want}"
        )
    return t


def _float(codec: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[codec]
