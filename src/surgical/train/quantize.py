"""A quantized frozen base: the Linear weights stored in 8 or 4 bits, the delta trained beside them.

``quantize_base(model)`` replaces the weights of the model's Linear layers in place by torchao
int8 weight-only tensors (per output row scales; 1 byte per weight instead of 4 in fp32 or 2 in
bf16); with ``bits=4`` by torchao ``NF4Tensor`` weights (NF4 in blocks of 64, their scales
quantized to int8 in blocks of up to 256: QLoRA's format, about 0.52 bytes per weight), the one
format here that FSDP2 can shard (:func:`surgical.train.shard`); or with ``backend="bnb"`` swaps
those layers for bitsandbytes ``Linear4bit`` (NF4 in blocks of 64, double-quantized scales).
``prepare`` then trains the selected entries of those weights additively
(:mod:`surgical.train.additive`): the forward pass is the quantized layer plus the sparse delta,
which stays in float32. The delta comes out of ``extract`` like any other and applies to the
full-precision base: before quantizing, the values the base fingerprint samples are recorded
(:func:`surgical.core.marks.record_quantized`), so the delta names the full-precision base.

Left in full precision: task heads and LM heads (``lm_head``, ``classifier``, ``score``,
``qa_outputs``), Linear weights shared with another module (a tied LM head), ``exclude``, every
non-Linear parameter (embeddings, norms), and with bitsandbytes a Linear whose input size is not
a multiple of 64 (its CPU kernel, 0.50.2, dequantizes NF4 blocks that span two rows wrongly;
transformer widths are multiples of 64). Dense training of a quantized weight is refused
by ``prepare``; keep such weights out with ``exclude``.

All run on CPU and CUDA. torchao's int4 weight formats are not offered: on CPU torchao stores
them unpacked in int8 bytes (no saving) and its packed formats need CUDA kernels; its NF4 tensor
and bitsandbytes pack two NF4 values per byte on both. A torchao NF4 weight is kept in full
precision when its size is not a multiple of 64 values.
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
BACKENDS = {"torchao": (8, 4), "bnb": (4,)}
#: values per NF4 block (one fp32 scale each); bitsandbytes quantizes only weights whose rows are
#: whole blocks here (in_features a multiple of it), the others stay in full precision
NF4_BLOCK = 64
#: (backend, bits) -> the format its weights are stored in
FORMATS = {("torchao", 8): "int8", ("torchao", 4): "NF4", ("bnb", 4): "NF4"}
#: the most NF4 blocks that share one (int8-quantized) scale with torchao, as in QLoRA
NF4_SCALER_BLOCK = 256
#: backend -> the pip requirement that installs it
PACKAGES = {"torchao": "torchao", "bnb": "bitsandbytes"}
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
        mb, fmt = 1 / 2**20, FORMATS[self.backend, self.bits]
        return (
            f"quantized {len(self.quantized)} Linear weights to {fmt} ({self.backend}): "
            f"{self.bytes_before * mb:.1f} MiB -> {self.bytes_after * mb:.1f} MiB; "
            f"{len(self.kept)} kept in full precision"
        )


def _import(backend: str):
    """The backend's module (``torchao.quantization``, ``bitsandbytes``), or a SurgicalError."""
    try:
        if backend == "torchao":
            import torchao.quantization as module
        else:
            import bitsandbytes as module
    except ImportError:
        raise SurgicalError(
            f"quantization backend {backend!r} is not installed",
            f"pip install 'surgical[quant]' ({PACKAGES[backend]}), or train without quantization",
        ) from None
    return module


def check_backend(backend: str, bits: int | None = None) -> int:
    """Raises a SurgicalError unless ``backend`` is known, installed and offers ``bits``; returns
    the bit width (``None``: the backend's own, 8 for torchao and 4 for bitsandbytes)."""
    if backend not in BACKENDS:
        raise SurgicalError(f"unknown quantization backend {backend!r}", f"Use one of: {', '.join(BACKENDS)}")
    if bits is None:
        bits = BACKENDS[backend][0]
    if bits not in BACKENDS[backend]:
        widths = ", ".join(str(b) for b in BACKENDS[backend])
        raise SurgicalError(
            f"backend {backend!r} quantizes to {widths} bits here, not {bits}", f"Use bits: {widths}"
        )
    _import(backend)
    return bits


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes held by ``t``: its own for a plain tensor, its inner tensors' for a subclass."""
    state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit: packed bytes and block scales
    if state is not None:
        parts = [state.absmax, state.code, state.offset]
        if state.nested:  # double quantization: the scales in 8 bits, with scales of their own
            parts += [state.state2.absmax, state.state2.code]
        return t.numel() * t.element_size() + sum(
            x.numel() * x.element_size() for x in parts if torch.is_tensor(x)
        )
    if is_plain(t):
        return t.numel() * t.element_size()
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return t.numel() * t.element_size()
    names, _ = flatten()
    return sum(_storage_bytes(getattr(t, n)) for n in names if torch.is_tensor(getattr(t, n, None)))


def quantize_base(
    model: nn.Module,
    bits: int | None = None,
    backend: str = "torchao",
    exclude: str | Sequence[str] | None = None,
) -> QuantizeReport:
    """Quantizes the Linear weights of ``model`` in place (see the module docstring).

    Call it on the base before :func:`surgical.prepare`; select on the full-precision model (or
    load a saved plan) first, since a quantized weight has no gradient to score.

    Args:
        model: A plain model (not prepared).
        bits: 8 (int8 weight-only, per-row scales) or 4 (NF4, shardable by FSDP2) with torchao,
            4 with bitsandbytes (NF4); None: the backend's first (8 with torchao).
        backend: ``"torchao"`` or ``"bnb"`` (bitsandbytes).
        exclude: Patterns of weights (or of their modules) to keep in full precision, beside the
            heads and shared weights that are always kept (see :func:`surgical.core.patterns.matches`).

    Raises:
        SurgicalError: an unknown backend or bit width, the backend not installed, or a
            prepared model.
    """
    bits = check_backend(backend, bits)
    if is_prepared(model):
        raise SurgicalError(
            "cannot quantize a prepared model", "Quantize the base first, then call surgical.prepare"
        )
    lib = _import(backend)
    patterns = [*HEADS, *as_patterns(exclude)]
    chosen: dict[str, nn.Linear] = {}
    kept = []
    for mname, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not is_plain(module.weight):
            continue
        wname = f"{mname}.weight" if mname else "weight"
        keep = any(matches(wname, p) for p in patterns)
        # bitsandbytes' CPU kernel dequantizes NF4 blocks that span rows wrongly (0.50.2, measured)
        keep = keep or (backend == "bnb" and module.in_features % NF4_BLOCK != 0)
        keep = keep or (bits == 4 and module.weight.numel() % NF4_BLOCK != 0)  # whole blocks only
        if keep or not module.weight.is_floating_point() or len(weight_users(model, module.weight)) > 1:
            kept.append(wname)
        else:
            chosen[wname] = module
    samples, before = {}, 0
    for wname, module in chosen.items():
        w = module.weight.detach()
        samples[wname] = w.reshape(-1).index_select(0, sample_positions(w.numel()).to(w.device)).float().cpu()
        before += _storage_bytes(w)
    if backend == "torchao" and bits == 4:
        for module in chosen.values():
            _to_torchao_nf4(module)
    elif backend == "torchao":
        targets = {id(m) for m in chosen.values()}
        lib.quantize_(model, lib.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: id(m) in targets)
    else:
        chosen = {w: _to_nf4(lib, model, w[: -len(".weight")], m) for w, m in chosen.items()}
    record_quantized(model, samples)
    after = sum(_storage_bytes(m.weight) for m in chosen.values())
    return QuantizeReport(backend, bits, sorted(chosen), sorted(kept), before, after)


def nf4_scaler_block(numel: int) -> int:
    """How many NF4 blocks of a weight of ``numel`` values share one scale: the largest divisor of
    its block count up to :data:`NF4_SCALER_BLOCK` (torchao needs whole groups) that leaves a
    number of scales divisible by 8, so that FSDP2 can split them between 2, 4 or 8 processes
    (576 x 576: 5,184 blocks, 216 per scale), else the largest divisor."""
    blocks = numel // NF4_BLOCK
    divisors = [d for d in range(min(NF4_SCALER_BLOCK, blocks), 0, -1) if blocks % d == 0]
    return next((d for d in divisors if (blocks // d) % 8 == 0), divisors[0])


def _to_torchao_nf4(linear: nn.Linear) -> None:
    """Replaces the weight of ``linear`` by a torchao ``NF4Tensor`` (blocks of 64 values)."""
    from torchao.quantization import to_nf4

    w = linear.weight.detach().contiguous()
    nf4 = to_nf4(w, NF4_BLOCK, nf4_scaler_block(w.numel()))
    linear.weight = nn.Parameter(nf4, requires_grad=False)


def _to_nf4(bnb, model: nn.Module, name: str, linear: nn.Linear) -> nn.Module:
    """Swaps the Linear ``name`` of ``model`` for a bitsandbytes ``Linear4bit`` holding its weight in
    NF4 (quantized when moved to its device), computing in the weight's dtype; the bias is kept."""
    w = linear.weight.detach()
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=w.dtype, quant_type="nf4", device="meta",
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(w.to("cpu"), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
    layer = layer.to(w.device)  # bitsandbytes quantizes on the move
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return layer
