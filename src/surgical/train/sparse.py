"""Entry-sparse training of a Linear weight at the memory floor.

The frozen weight ``W`` always holds the current fine-tuned values, so the forward pass is a
plain ``F.linear``. The trainable state is a 1-D parameter ``delta`` of the k selected entries;
``W.flat[idx] == orig + delta`` is restored lazily before each forward in which ``delta`` has
changed (its version counter moved), which works with any optimizer and training loop.

Optimizers that write parameters without bumping the version counter (fused AdamW, the HF
Trainer's default, does this) are covered by a global optimizer step post-hook that marks every
state dirty after any ``optimizer.step()`` (:func:`surgical.train.state.install`).

The backward pass returns the input gradient ``gy @ W`` and the gradient of ``delta`` only at the
selected entries. On CPU that is a sampled dense-dense product (:mod:`surgical.train.cpu_kernel`,
else ``torch.sparse.sampled_addmm``): no dense weight gradient is formed. On CUDA, and on CPU
above ``DENSE_GATHER_DENSITY``, the layer's dense product is gathered at the entries and freed
at once, which is faster there.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from surgical.core.marks import Saved
from surgical.train import cpu_kernel
from surgical.train.state import SparseState, delta_attr, install

#: Above this density the dense product followed by a gather is faster than a sampled matmul.
DENSE_GATHER_DENSITY = 0.25
#: The same on CUDA, where cuSPARSE's SDDMM was slower than the dense product gathered at every
#: density measured (0.5% to 4.6% of SmolLM2's weights on an H100: 1.65x LoRA's step time against
#: 1.01x, the same peak memory). The product is a per-layer transient, freed at once.
CUDA_DENSE_GATHER_DENSITY = 0.0


@dataclass
class EntryState(SparseState):
    """Bookkeeping of an entry-sparse weight.

    The tensors live on the module (see :mod:`surgical.train.state`): the parameter
    ``<name>_sg_delta`` (k trainable values) and the non-persistent buffers ``<name>_sg_indices``
    (sorted flat indices; int32 when the weight has fewer than 2**31 entries, half the memory of
    int64) and ``<name>_sg_orig`` (the base values at those indices).
    """

    kind: ClassVar[str] = "entries"
    buffers: ClassVar[dict[str, str]] = {"sg_indices": "moves", "sg_orig": "moves"}

    param_name: str  # name of the weight inside its module, e.g. "weight"
    shape: tuple[int, int]
    pattern: torch.Tensor | None = None  # CSR pattern of the indices, built on first use
    synced_version: int = -1
    dirty: bool = False  # set after any optimizer step
    accumulate: bool = False  # also add the dense weight gradient into ``grad_acc`` (regrow)
    grad_acc: torch.Tensor | None = None

    def indices(self, module: nn.Module) -> torch.Tensor:
        return getattr(module, f"{self.param_name}_sg_indices")

    def orig(self, module: nn.Module) -> torch.Tensor:
        return getattr(module, f"{self.param_name}_sg_orig")

    def delta(self, module: nn.Module) -> torch.Tensor:
        return getattr(module, delta_attr(self.param_name))

    def csr(self, module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The CSR pattern on the indices' device in ``dtype`` (cached).

        Its values are never read (the sampled matmul runs with ``beta=0``), so when the dtype
        matches they alias the delta's storage instead of costing 4 more bytes per entry.
        """
        idx = self.indices(module)
        p = self.pattern
        if p is None or p.device != idx.device or p.dtype != dtype:
            delta = self.delta(module).detach()
            values = delta if delta.dtype == dtype and delta.device == idx.device else None
            p = self.pattern = csr_pattern(idx, self.shape, dtype, values)
        return p

    def sync(self, module: nn.Module) -> None:
        """Writes ``orig + delta`` into the frozen weight if ``delta`` changed since the last sync."""
        delta = self.delta(module)
        if delta._version == self.synced_version and not self.dirty:
            return
        weight = getattr(module, self.param_name)
        with torch.no_grad():
            idx, orig = self.indices(module), self.orig(module)
            if not cpu_kernel.write_entries(weight, idx, orig, delta.detach()):
                new = torch.add(orig, delta.detach())
                # index_copy_ wants int64: a per-layer transient is cheaper than keeping int64 resident
                weight.view(-1).index_copy_(0, idx.long(), new.to(weight.dtype))
        self.synced_version = delta._version
        self.dirty = False

    def export(self, module: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor]:
        idx = self.indices(module).detach().to("cpu", torch.int64, copy=True)  # a Delta holds int64
        return "entries", idx, self.delta(module).detach().float().cpu().clone()

    def saved_base(self, module: nn.Module) -> Saved:
        return Saved(self.indices(module).detach(), self.orig(module).detach())

    def invalidate(self, module: nn.Module) -> None:
        self.pattern = None
        super().invalidate(module)


def csr_pattern(
    indices: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, values: torch.Tensor | None = None
) -> torch.Tensor:
    """A CSR tensor whose non-zeros sit at the sorted flat ``indices`` of a 2-D ``shape``.

    Row pointers and column indices are int32 when they fit (half the memory of int64);
    ``values`` (k values, only their storage is used) default to zeros.
    """
    rows_n, cols_n = shape
    rows = torch.div(indices, cols_n, rounding_mode="floor")
    cols = indices - rows * cols_n
    itype = torch.int32 if max(indices.numel(), cols_n) < 2**31 - 1 else torch.int64
    crow = torch.zeros(rows_n + 1, dtype=itype, device=indices.device)
    crow[1:] = torch.bincount(rows, minlength=rows_n).cumsum(0)
    if values is None:
        values = torch.zeros(indices.numel(), dtype=dtype, device=indices.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols.to(itype), values, size=shape, check_invariants=False)


HALF = (torch.bfloat16, torch.float16)


def grad_dtype(delta: torch.Tensor, device: torch.device) -> torch.dtype:
    """The dtype an entry gradient is computed in: the delta's, except that on CPU a half-precision
    delta (a model loaded in bf16/fp16) is computed in fp32, since neither the CPU kernel's sums
    nor ``sampled_addmm`` take half precision there."""
    if device.type != "cuda" and delta.dtype not in (torch.float32, torch.float64):
        return torch.float32
    return delta.dtype


def product_operands(
    gy: torch.Tensor, x: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gy`` and ``x`` for a dense weight-gradient product computed in ``dtype``, except on CUDA
    under half-precision autocast (``gy`` in bf16/fp16): there the product stays in ``gy``'s
    precision (``x`` cast to it, as autocast casts a Linear's input), so it runs on the tensor
    cores with fp32 accumulation inside the matmul, as autocast's own weight gradients (and
    LoRA's) do, instead of in fp32 on copies of both operands."""
    if gy.is_cuda and gy.dtype in HALF:
        return gy, x.to(gy.dtype)
    return gy.to(dtype), x.to(dtype)


def sampled_weight_grad(
    gy: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    pattern: torch.Tensor | Callable[[], torch.Tensor],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(gy^T @ x).flatten()[indices]``, without the dense product when sparse enough.

    On CPU the product at the entries is :mod:`surgical.train.cpu_kernel`'s when it could be
    built (it takes fp32 and bf16 operands as they are, summing in fp32), else
    ``torch.sparse.sampled_addmm``. On CUDA the dense product is gathered (see
    ``CUDA_DENSE_GATHER_DENSITY``), in bf16/fp16 on tensor cores under autocast
    (:func:`product_operands`).

    Args:
        gy: Output gradient, (tokens, out).
        x: Layer input, (tokens, in).
        indices: Sorted flat indices into the (out, in) weight.
        pattern: CSR tensor of shape (out, in) with non-zeros at ``indices`` and dtype ``dtype``,
            or a function returning it, called only when the sampled product needs it (so that
            the dense-product path, CUDA's default, never builds it: 4 bytes per entry).
        dtype: What the gradient is computed in where the operands must share a dtype (default
            ``gy``'s; see :func:`grad_dtype`).

    Returns:
        The k gradient values: float32 from the CPU kernel, else in the product's dtype (bf16
        under CUDA autocast); callers cast them to the delta's dtype.
    """
    dtype = dtype or gy.dtype
    out_f, in_f = gy.shape[-1], x.shape[-1]
    threshold = CUDA_DENSE_GATHER_DENSITY if gy.is_cuda else DENSE_GATHER_DENSITY
    if indices.numel() > threshold * out_f * in_f:
        gy, x = product_operands(gy, x, dtype)
        return (gy.t() @ x).view(-1).index_select(0, indices)
    if callable(pattern):
        pattern = pattern()
    if gy.device.type == "cpu" and dtype == torch.float32:
        grad = cpu_kernel.sampled_grad(gy, x, pattern)
        if grad is not None:
            return grad
    gy, x = gy.to(dtype), x.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse.sampled_addmm(pattern, gy.t(), x, beta=0.0).values()


class _EntryLinearFn(torch.autograd.Function):
    """y = x @ W^T + b where W already contains ``orig + delta`` at the selected entries."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, module):  # noqa: D102
        ctx.module = module
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight.to(x.dtype) if weight.dtype != x.dtype else weight, bias)

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        x, weight = ctx.saved_tensors
        gx = gb = gd = None
        if ctx.needs_input_grad[0]:
            gx = gy @ weight.to(gy.dtype)
        gy2 = gy.reshape(-1, gy.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)
        if ctx.needs_input_grad[3]:
            module = ctx.module
            state: EntryState = module._sg_entries
            # the operands keep their dtypes (bf16 under autocast): the CPU kernel widens them as
            # it reads, CUDA multiplies them on tensor cores, the rest computes in ``gdt``
            delta = state.delta(module)
            gdt = grad_dtype(delta, gy.device)
            x2 = x.reshape(-1, x.shape[-1])
            if state.accumulate:  # a prune-and-regrow schedule asked for one dense gradient
                dense = gy2.to(gdt).t() @ x2.to(gdt)
                state.grad_acc = dense if state.grad_acc is None else state.grad_acc.add_(dense)
            pattern = functools.partial(state.csr, module, gdt)
            gd = sampled_weight_grad(gy2, x2, state.indices(module), pattern, gdt).to(delta.dtype)
        return gx, None, gb, gd, None


def index_dtype(numel: int) -> torch.dtype:
    """The smallest integer dtype that indexes a weight of ``numel`` entries (int32 or int64)."""
    return torch.int32 if numel < 2**31 - 1 else torch.int64


def _entry_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    state: EntryState = module._sg_entries
    state.sync(module)
    delta = state.delta(module)
    if not (torch.is_grad_enabled() and delta.requires_grad):
        return F.linear(x, module.weight, module.bias)
    return _EntryLinearFn.apply(x, module.weight, module.bias, delta, module)


def attach_entries(
    module: nn.Module,
    indices: torch.Tensor,
    state_cls: type[EntryState] = EntryState,
    forward: Callable | None = None,
) -> nn.Parameter:
    """Makes the entries ``indices`` of ``module.weight`` trainable through a delta parameter.

    The weight is frozen, a zero-initialised parameter ``weight_sg_delta`` of ``len(indices)``
    values is registered on the module, and the module's forward is routed through the sparse
    autograd function (``forward``, default: the Linear one; another module kind passes its own,
    with its ``state_cls``). Returns the new parameter.
    """
    weight = module.weight
    indices = indices.to(device=weight.device, dtype=index_dtype(weight.numel()))
    weight.requires_grad_(False)
    state = state_cls(param_name="weight", shape=tuple(weight.shape))
    orig = weight.detach().view(-1).index_select(0, indices).clone()
    module.register_buffer("weight_sg_indices", indices, persistent=False)
    module.register_buffer("weight_sg_orig", orig, persistent=False)
    delta = nn.Parameter(torch.zeros(indices.numel(), dtype=weight.dtype, device=weight.device))
    module.register_parameter(delta_attr("weight"), delta)
    state.synced_version = delta._version
    install(module, state, forward or _entry_linear_forward)
    return delta
