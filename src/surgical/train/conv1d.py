"""Entries of a transformers ``Conv1D`` weight (GPT-2) through the sampled entry gradient.

``Conv1D`` is a Linear whose weight is stored transposed, (in, out): ``y = x @ W + b``. Its
entries train like those of an ``nn.Linear`` (:mod:`surgical.train.sparse`): ``W`` holds
``base + delta`` at the selected entries, the forward is the module's own ``addmm``, and the
backward returns the input gradient and the delta's gradient at the entries only, ``(x^T gy)``
at (i, o), which is ``(gy^T x)`` at (o, i) of the (out, in) view. On CPU that comes from the
sampled-product kernel over a CSR pattern of the entries in the (out, in) order; the delta
keeps the order of the weight's own flat indices (what the plan and the delta file hold), so the
kernel's result is put back in that order through a cached permutation (int32, 4 bytes per entry
on top of the pattern's 4). On CUDA, and on CPU above ``DENSE_GATHER_DENSITY``, the layer's
dense product is gathered and freed, as for Linear weights.

Rows and columns of a ``Conv1D`` weight train through the generic path
(:mod:`surgical.train.generic`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from surgical.train import cpu_kernel
from surgical.train.sparse import (
    CUDA_DENSE_GATHER_DENSITY,
    DENSE_GATHER_DENSITY,
    EntryState,
    attach_entries,
    csr_pattern,
    grad_dtype,
    index_dtype,
    product_operands,
)


@dataclass
class Conv1DEntryState(EntryState):
    """Entries of an (in, out) ``Conv1D`` weight; ``shape`` is the weight's, (in, out)."""

    kind: ClassVar[str] = "entries"
    inverse: torch.Tensor | None = None  # position of each entry in the (out, in) order, cached

    def transposed(self, module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The CSR pattern of the entries in the (out, in) view and the permutation back (cached)."""
        idx = self.indices(module)
        p = self.pattern
        if p is None or self.inverse is None or p.device != idx.device or p.dtype != dtype:
            n_in, n_out = self.shape
            flat = idx.long()
            rows_in = torch.div(flat, n_out, rounding_mode="floor")
            t = (flat - rows_in * n_out) * n_in + rows_in  # flat index in the (out, in) view
            order = torch.argsort(t)
            delta = self.delta(module).detach()
            values = delta if delta.dtype == dtype and delta.device == idx.device else None
            self.pattern = csr_pattern(t[order], (n_out, n_in), dtype, values)  # values never read
            self.inverse = torch.argsort(order).to(index_dtype(idx.numel()))
        return self.pattern, self.inverse

    def entry_grad(
        self, module: nn.Module, gy: torch.Tensor, x: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """The delta's gradient from the output gradient (tokens, out) and the input (tokens, in),
        computed as Linear entries' are (``dtype``: :func:`surgical.train.sparse.grad_dtype`)."""
        idx = self.indices(module)
        n_in, n_out = self.shape
        threshold = CUDA_DENSE_GATHER_DENSITY if gy.is_cuda else DENSE_GATHER_DENSITY
        if idx.numel() > threshold * n_in * n_out:
            gy, x = product_operands(gy, x, dtype)
            return (x.t() @ gy).view(-1).index_select(0, idx)
        pattern, inverse = self.transposed(module, dtype)
        grad = None
        if gy.device.type == "cpu" and dtype == torch.float32:
            grad = cpu_kernel.sampled_grad(gy, x, pattern)
        if grad is None:
            gy, x = gy.to(dtype), x.to(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                grad = torch.sparse.sampled_addmm(pattern, gy.t(), x, beta=0.0).values()
        return grad.index_select(0, inverse)

    def invalidate(self, module: nn.Module) -> None:
        self.inverse = None
        super().invalidate(module)


class _EntryConv1DFn(torch.autograd.Function):
    """y = x @ W + b where W (in, out) already contains ``orig + delta`` at the selected entries."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, module):  # noqa: D102
        ctx.module = module
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        w = weight.to(x.dtype) if weight.dtype != x.dtype else weight
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, x2, w) if bias is not None else x2 @ w
        return y.view(*x.shape[:-1], w.shape[1])

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        x, weight = ctx.saved_tensors
        gx = gb = gd = None
        gy2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = (gy2 @ weight.to(gy.dtype).t()).view(x.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)
        if ctx.needs_input_grad[3]:
            module = ctx.module
            state: Conv1DEntryState = module._sg_entries
            delta = state.delta(module)
            gdt = grad_dtype(delta, gy.device)  # operands as for Linear entries: kept as they come
            x2 = x.reshape(-1, x.shape[-1])
            if state.accumulate:  # a prune-and-regrow schedule asked for one dense gradient
                dense = x2.to(gdt).t() @ gy2.to(gdt)
                state.grad_acc = dense if state.grad_acc is None else state.grad_acc.add_(dense)
            gd = state.entry_grad(module, gy2, x2, gdt).to(delta.dtype)
        return gx, None, gb, gd, None


def _entry_conv1d_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    state: Conv1DEntryState = module._sg_entries
    state.sync(module)
    delta = state.delta(module)
    if not (torch.is_grad_enabled() and delta.requires_grad):
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(module.bias, x2, module.weight) if module.bias is not None else x2 @ module.weight
        return y.view(*x.shape[:-1], module.weight.shape[1])
    return _EntryConv1DFn.apply(x, module.weight, module.bias, delta, module)


def attach_conv1d_entries(module: nn.Module, indices: torch.Tensor) -> nn.Parameter:
    """Makes the entries ``indices`` (flat, of the (in, out) weight) of a ``Conv1D`` trainable."""
    return attach_entries(module, indices, Conv1DEntryState, _entry_conv1d_forward)
