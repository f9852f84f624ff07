"""Compact storage of sorted entry indices.

Sorted unique flat indices are stored as gaps (``index[i] - index[i-1]``, with a virtual
``index[-1] = -1`` so every gap is at least 1) in 16 bits. A gap that does not fit is stored as 0
in the 16-bit stream and its true value goes to an int64 overflow list, in order. At densities
above 1/65535 nearly every gap fits, so an index costs two bytes.
"""

from __future__ import annotations

import torch

_U16_MAX = 65535


def encode_indices(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodes sorted unique int64 indices as (16-bit gaps stored as int16, int64 overflow)."""
    indices = indices.to(torch.int64).cpu()
    if (
        indices.numel()
        and not bool((indices[1:] > indices[:-1]).all())
        or (indices.numel() and int(indices[0]) < 0)
    ):
        raise ValueError("indices must be sorted, unique and non-negative")
    gaps = torch.diff(indices, prepend=torch.tensor([-1], dtype=torch.int64))
    big = gaps > _U16_MAX
    overflow = gaps[big].clone()
    gaps = torch.where(big, torch.zeros_like(gaps), gaps)
    return gaps.to(torch.int32).to(torch.int16), overflow  # int16 holds the uint16 bit pattern


def decode_indices(gaps: torch.Tensor, overflow: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_indices`."""
    g = gaps.to(torch.int64) & 0xFFFF
    zero = g == 0
    if int(zero.sum()) != overflow.numel():
        raise ValueError("index stream and overflow list disagree")
    g[zero] = overflow.to(torch.int64)
    return torch.cumsum(g, 0) - 1


# --- values -----------------------------------------------------------------------------------
# Float dtypes are stored as they are. Two lossy codecs cut the value bytes further:
# - ``int8``: per-tensor symmetric quantization, q = round(v / s) with s = max|v| / 127;
# - ``sign``: ComPEFT-style, one bit per value plus one scale per tensor, s = mean|v| (the scale
#   that minimises the L2 error for fixed signs). Zero values are stored as +s.
# Both are idempotent: encoding already decoded values gives the same values back.

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VALUE_CODECS = (*FLOAT_DTYPES, "int8", "sign")
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)


def encode_values(values: torch.Tensor, codec: str) -> dict[str, torch.Tensor]:
    """Encodes values with ``codec``; returns named tensors (``values`` and maybe ``scale``)."""
    v = values.detach().to("cpu", torch.float32).reshape(-1)
    if codec in FLOAT_DTYPES:
        return {"values": v.to(FLOAT_DTYPES[codec]).contiguous()}
    if codec == "int8":
        scale = v.abs().max() / 127 if v.numel() else torch.tensor(0.0)
        q = torch.round(v / scale) if float(scale) > 0 else torch.zeros_like(v)
        return {"values": q.clamp(-127, 127).to(torch.int8), "scale": scale.reshape(1).float()}
    if codec == "sign":
        # float64 sum: the mean of n equal magnitudes is that magnitude exactly (idempotence)
        scale = v.abs().double().mean().float() if v.numel() else torch.tensor(0.0)
        bits = (v >= 0).to(torch.int32)
        pad = (-bits.numel()) % 8
        bits = torch.cat([bits, torch.zeros(pad, dtype=torch.int32)]).reshape(-1, 8)
        packed = (bits * _BITS).sum(1).to(torch.uint8)
        return {"values": packed, "scale": scale.reshape(1).float()}
    raise ValueError(f"unknown value codec {codec!r}")


def decode_values(stored: dict[str, torch.Tensor], codec: str, count: int) -> torch.Tensor:
    """Inverse of :func:`encode_values`: float32 values (``count`` of them)."""
    v = stored["values"]
    if codec in FLOAT_DTYPES:
        return v.float()
    if codec == "int8":
        return v.to(torch.float32) * stored["scale"].float()
    if codec == "sign":
        bits = (v.to(torch.int32).unsqueeze(1) & _BITS).ne(0).reshape(-1)[:count]
        if bits.numel() != count:
            raise ValueError("sign stream is shorter than the entry count")
        return torch.where(bits, 1.0, -1.0) * stored["scale"].float()
    raise ValueError(f"unknown value codec {codec!r}")
