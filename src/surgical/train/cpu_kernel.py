"""The CPU kernel for gradients at selected entries (``sampled_grad.cpp``), built on first use.

``torch.sparse.sampled_addmm`` on CPU copies both operands into transposed layouts and then
computes one horizontally reduced dot product per entry. The kernel here transposes the tokens
in cache-sized chunks and shares each gradient row between four entries, which makes the
gradients of SmolLM2's entry-sparse layers about 3x faster on one core and 4.5x on two, where
its threads split the tokens (see ``benchmarks/train_speed.py``).

It is compiled once per machine with the C++ compiler found (``$CXX``, ``c++``, ``g++`` or
``clang++``) and ``-march=native`` into ``~/.cache/surgical/kernels`` (``$SURGICAL_CACHE``
moves it), and loaded with :mod:`ctypes`: no torch headers, about a second to build. When no
compiler works the caller falls back to ``sampled_addmm`` after one warning.
``SURGICAL_CPU_KERNEL=0`` turns the kernel off.

The same library writes ``orig + delta`` into an entry-sparse weight in one pass
(:func:`write_entries`, used by the weight sync).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("sampled_grad.cpp")
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what sampled_grad's operands may be
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_TRIED = False


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled or loaded."""


def enabled() -> bool:
    """False when ``SURGICAL_CPU_KERNEL=0`` asks for ``sampled_addmm`` instead."""
    return os.environ.get("SURGICAL_CPU_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("SURGICAL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "surgical") / "kernels"


def compiler() -> str | None:
    """The C++ compiler to use: ``$CXX`` if set, else the first of c++, g++, clang++ on PATH."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: a kernel built on one CPU may not run on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compile(cxx: str, out: Path, flags: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, "-O3", "-fPIC", "-shared", "-std=c++17", *flags, str(SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise KernelBuildError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
        os.replace(tmp, out)  # atomic: a concurrent build (another rank) writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(extra_flags: tuple[str, ...] = (), directory: Path | None = None) -> Path:
    """Compiles the kernel (or finds it already compiled) and returns the shared library's path.

    Tries ``-march=native -fopenmp`` first, then without OpenMP, then without ``-march``.

    Raises:
        KernelBuildError: no compiler, or every attempt failed.
    """
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
    directory = directory or cache_dir()
    source = SOURCE.read_bytes()
    attempts = [["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], []]
    last = "failed"
    for flags in attempts:
        flags = [*flags, *extra_flags]
        parts = [source, cxx.encode(), " ".join(flags).encode(), _cpu_identity().encode()]
        key = hashlib.sha256(b"\0".join(parts))
        out = directory / f"sampled_grad-{key.hexdigest()[:16]}.so"
        if out.exists():
            return out
        try:
            _compile(cxx, out, flags)
            return out
        except (KernelBuildError, OSError, subprocess.TimeoutExpired) as e:
            last = str(e)
    raise KernelBuildError(f"{cxx}: {last}")


def load(path: Path) -> ctypes.CDLL:
    """Loads a built kernel and declares its functions' signatures."""
    lib = ctypes.CDLL(str(path))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.sg_sampled_grad.argtypes = [ptr, ctypes.c_int, ptr, ctypes.c_int, i64, i64, i64, ptr, ptr, ptr,
                                    ctypes.c_int]  # fmt: skip
    lib.sg_sampled_grad.restype = None
    lib.sg_sampled_grad_avx512.restype = ctypes.c_int
    lib.sg_write_entries_f32.argtypes = [ptr, ptr, ptr, ptr, i64, ctypes.c_int]
    lib.sg_write_entries_f32.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on the first call; None when disabled or unavailable."""
    global _LIB, _TRIED
    if _LIB is not None or _TRIED or not enabled():
        return _LIB
    with _LOCK:
        if not _TRIED:
            try:
                _LIB = load(build())
            except (KernelBuildError, OSError, AttributeError) as e:  # AttributeError: a symbol missing
                warnings.warn(
                    f"surgical: the CPU entry-gradient kernel is unavailable ({e}); using "
                    "torch.sparse.sampled_addmm, about 2x slower. SURGICAL_CPU_KERNEL=0 skips the build.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _TRIED = True
    return _LIB


def sampled_grad(gy: torch.Tensor, x: torch.Tensor, pattern: torch.Tensor, lib: ctypes.CDLL | None = None):
    """``(gy^T @ x)`` at the non-zeros of the CSR ``pattern``, or None when the kernel can't do it.

    Each operand may be float32 or bfloat16 (bf16 autocast): a bfloat16 operand is widened to
    float32 as the kernel transposes it, so the result is bit for bit the one its float32 copy
    gives, without making the copy. The sums are float32; so is the result.

    Args:
        gy: Output gradient (tokens, out), float32 or bfloat16 on CPU.
        x: Layer input (tokens, in), float32 or bfloat16 on CPU.
        pattern: CSR tensor (out, in) with int32 row pointers and column indices.
        lib: A loaded kernel (default: :func:`library`).
    """
    if gy.device.type != "cpu" or gy.dtype not in KERNEL_DTYPES or x.dtype not in KERNEL_DTYPES:
        return None
    crow, col = pattern.crow_indices(), pattern.col_indices()
    if crow.dtype != torch.int32 or col.dtype != torch.int32:
        return None
    lib = lib or library()
    if lib is None:
        return None
    n_out, n_in = pattern.shape
    if gy.dim() != 2 or x.dim() != 2 or (gy.shape[0], gy.shape[1], x.shape[1]) != (x.shape[0], n_out, n_in):
        shapes = f"{tuple(gy.shape)} and {tuple(x.shape)}"
        raise ValueError(f"sampled_grad: shapes {shapes} do not fit the pattern's {(n_out, n_in)}")
    gy, x = gy.contiguous(), x.contiguous()
    out = torch.empty(col.numel(), dtype=torch.float32)
    half = [int(t.dtype == torch.bfloat16) for t in (gy, x)]
    lib.sg_sampled_grad(
        gy.data_ptr(), half[0], x.data_ptr(), half[1], gy.shape[0], n_out, n_in,
        crow.data_ptr(), col.data_ptr(), out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def write_entries(
    weight: torch.Tensor, indices: torch.Tensor, orig: torch.Tensor, delta: torch.Tensor
) -> bool:
    """``weight.flatten()[indices] = orig + delta`` in one pass; False when the kernel can't do it.

    Takes float32 CPU tensors (``weight`` contiguous) and int32 indices; anything else is left to
    the caller's torch fallback.
    """
    if indices.dtype != torch.int32:
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (weight, orig, delta)):
        return False
    if not weight.is_contiguous() or not (indices.numel() == orig.numel() == delta.numel()):
        return False
    lib = library()
    if lib is None:
        return False
    indices, orig, delta = indices.contiguous(), orig.contiguous(), delta.contiguous()
    lib.sg_write_entries_f32(
        weight.data_ptr(), indices.data_ptr(), orig.data_ptr(), delta.data_ptr(), indices.numel(),
        torch.get_num_threads(),
    )  # fmt: skip
    return True
