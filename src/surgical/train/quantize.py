"""A quantized frozen base: the Linear weights stored in int8, the delta trained beside them.

``quantize_base(model)`` replaces the weights of the model's Linear layers by torchao int8
weight-only tensors (per output row scales) in place: 1 byte per weight instead of 4 (fp32) or
2 (bf16). ``prepare`` then trains the selected entries of those weights additively
(:mod:`surgical.train.additive`): the forward pass is the quantized layer plus the sparse delta,
which stays in float32. The delta comes out of ``extract`` like any other and applies to the
full-precision base: before quantizing, the values the base fingerprint samples are recorded
(:func:`surgical.core.marks.record_quantized`), so the delta names the full-precision base.

Left in full precision: task heads and LM heads (``lm_head``, ``classifier``, ``score``,
``qa_outputs``), Linear weights shared with another module (a tied LM head), ``exclude``, and
every non-Linear parameter (embeddings, norms). Dense training of a quantized weight is refused
by ``prepare``; keep such weights out with ``exclude``.

torchao runs on CPU and CUDA. Its 4-bit weight formats are not offered: on CPU torchao stores
4-bit weights unpacked in int8 bytes (no saving) and its packed formats need CUDA kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.fingerprint import sample_positions
from surgical.core.marks import is_prepared, record_quantized
from surgical.core.patterns import as_patterns, matches
from surgical.core.tensors import is_plain
from surgical.train.tied import weight_users

#: backend -> the bit widths it offers here
BACKENDS = {"torchao": (8,)}
#: Linear modules kept in full precision by default: LM and task heads (the last projection is
#: sensitive, is often tied to the embedding, and a task head trains densely)
HEADS = ("lm_head", "classifier", "score", "qa_outputs")


@dataclass
class QuantizeReport:
    """What :func:`quantize_base` did."""

    backend: str
    bits: int
    quantized: list[str]  # weight names now quantized
    kept: list[str]  # Linear weights left in full precision
    bytes_before: int  # of the quantized weights, in their original dtype
    bytes_after: int  # of the same weights quantized (values, scales, zero points)

    def summary(self) -> str:
        mb = 1 / 2**20
        return (
            f"quantized {len(self.quantized)} Linear weights to int{self.bits} ({self.backend}): "
            f"{self.bytes_before * mb:.1f} MiB -> {self.bytes_after * mb:.1f} MiB; "
            f"{len(self.kept)} kept in full precision"
        )


def _torchao():
    try:
        import torchao.quantization as tq
    except ImportError:
        raise SurgicalError(
            "quantization backend 'torchao' is not installed",
            "pip install 'surgical[quant]' (torchao), or train without quantization",
        ) from None
    return tq


def check_backend(backend: str, bits: int = 8) -> None:
    """Raises a SurgicalError unless ``backend`` is known, installed and offers ``bits``."""
    if backend not in BACKENDS:
        raise SurgicalError(f"unknown quantization backend {backend!r}", f"Use one of: {', '.join(BACKENDS)}")
    if bits not in BACKENDS[backend]:
        widths = ", ".join(str(b) for b in BACKENDS[backend])
        raise SurgicalError(f"backend {backend!r} quantizes to {widths} bits here, not {bits}", "Use bits: 8")
    _torchao()


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes held by ``t``: its own for a plain tensor, its inner tensors' for a subclass."""
    if is_plain(t):
        return t.numel() * t.element_size()
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return t.numel() * t.element_size()
    names, _ = flatten()
    return sum(_storage_bytes(getattr(t, n)) for n in names if torch.is_tensor(getattr(t, n, None)))


def quantize_base(
    model: nn.Module,
    bits: int = 8,
    backend: str = "torchao",
    exclude: str | Sequence[str] | None = None,
) -> QuantizeReport:
    """Quantizes the Linear weights of ``model`` in place (see the module docstring).

    Call it on the base before :func:`surgical.prepare`; select on the full-precision model (or
    load a saved plan) first, since a quantized weight has no gradient to score.

    Args:
        model: A plain model (not prepared).
        bits: 8 (int8 weight-only, per-row scales).
        backend: ``"torchao"``.
        exclude: Patterns of weights (or of their modules) to keep in full precision, beside the
            heads and shared weights that are always kept (see :func:`surgical.core.patterns.matches`).

    Raises:
        SurgicalError: an unknown backend or bit width, the backend not installed, or a
            prepared model.
    """
    check_backend(backend, bits)
    if is_prepared(model):
        raise SurgicalError(
            "cannot quantize a prepared model", "Quantize the base first, then call surgical.prepare"
        )
    tq = _torchao()
    patterns = [*HEADS, *as_patterns(exclude)]
    chosen: dict[str, nn.Linear] = {}
    kept = []
    for mname, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not is_plain(module.weight):
            continue
        wname = f"{mname}.weight" if mname else "weight"
        keep = any(matches(wname, p) for p in patterns)
        if keep or not module.weight.is_floating_point() or len(weight_users(model, module.weight)) > 1:
            kept.append(wname)
        else:
            chosen[wname] = module
    samples, before = {}, 0
    for wname, module in chosen.items():
        w = module.weight.detach()
        samples[wname] = w.reshape(-1).index_select(0, sample_positions(w.numel()).to(w.device)).float().cpu()
        before += _storage_bytes(w)
    targets = {id(m) for m in chosen.values()}
    tq.quantize_(model, tq.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: id(m) in targets)
    record_quantized(model, samples)
    after = sum(_storage_bytes(m.weight) for m in chosen.values())
    return QuantizeReport(backend, bits, sorted(chosen), sorted(kept), before, after)
