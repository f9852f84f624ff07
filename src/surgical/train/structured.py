"""Rows and columns of a Linear weight (and token rows of an Embedding) trained as a dense block.

Same in-place scheme as entry training (:mod:`surgical.train.sparse`): the frozen weight ``W``
holds ``base + delta`` on the selected rows (or columns), so the forward is a plain ``F.linear``.
The trainable parameter ``weight_sg_delta`` is the (r, in) block of selected rows or the (out, c)
block of selected columns, and its gradient is one small dense matmul:
``gy[:, rows]^T @ x`` for rows, ``gy^T @ x[:, cols]`` for columns. No index lists per entry, no
sparse kernels: the cheapest structured path there is.

:func:`surgical.extract` stores the block as it is (a ``rows`` or ``cols`` delta: one index per
row or column), and the base fingerprint reads the saved base block the way it reads an
applied block, so no flat index list is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from surgical.core.marks import Saved
from surgical.train.sparse import product_operands
from surgical.train.state import SparseState, install


@dataclass
class BlockState(SparseState):
    """Bookkeeping of a row- or column-block weight.

    Module attributes: parameter ``weight_sg_delta`` (the block), non-persistent buffers
    ``weight_sg_sel`` (sorted row or column indices) and ``weight_sg_base`` (base block).
    ``tied`` lists the other modules that use the same weight and read this block (the LM head
    of a tied embedding, see :mod:`surgical.train.tied`); they are detached together.
    """

    kind: ClassVar[str] = "rows"  # the class default; an instance of columns says "cols"
    buffers: ClassVar[dict[str, str]] = {"sg_sel": "fixed", "sg_base": "base", "sg_lookup": "derived"}

    param_name: str
    shape: tuple[int, int]
    axis: int  # 0: rows, 1: columns
    synced_version: int = -1
    dirty: bool = False
    tied: list[nn.Module] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kind = "rows" if self.axis == 0 else "cols"

    def block(self, module: nn.Module) -> nn.Parameter:
        return getattr(module, f"{self.param_name}_sg_delta")

    def sel(self, module: nn.Module) -> torch.Tensor:
        return getattr(module, f"{self.param_name}_sg_sel")

    def sync(self, module: nn.Module) -> None:
        """Writes ``base + block`` into the frozen weight if the block changed."""
        block = self.block(module)
        if block._version == self.synced_version and not self.dirty:
            return
        weight = getattr(module, self.param_name)
        base = getattr(module, f"{self.param_name}_sg_base")
        with torch.no_grad():
            weight.index_copy_(self.axis, self.sel(module), torch.add(base, block.detach()).to(weight.dtype))
        self.synced_version = block._version
        self.dirty = False

    def export(self, module: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor]:
        sel = self.sel(module).detach().to("cpu", torch.int64, copy=True)
        return self.kind, sel, self.block(module).detach().float().cpu().clone()

    def saved_base(self, module: nn.Module) -> Saved:
        base = getattr(module, f"{self.param_name}_sg_base")
        return Saved(self.sel(module).detach(), base.detach(), self.axis)


class _BlockLinearFn(torch.autograd.Function):
    """y = x @ W^T + b where W already holds ``base + block`` on the selected rows/columns."""

    @staticmethod
    def forward(ctx, x, weight, bias, block, sel, axis):  # noqa: D102
        ctx.save_for_backward(x, weight, sel)
        ctx.axis = axis
        ctx.has_bias = bias is not None
        return F.linear(x, weight.to(x.dtype) if weight.dtype != x.dtype else weight, bias)

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        x, weight, sel = ctx.saved_tensors
        gx = gb = gblock = None
        if ctx.needs_input_grad[0]:
            gx = gy @ weight.to(gy.dtype)
        gy2 = gy.reshape(-1, gy.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)
        if ctx.needs_input_grad[3]:
            # fp32, or bf16 tensor-core products under CUDA autocast (as for entries)
            gy2, x2 = product_operands(gy2, x.reshape(-1, x.shape[-1]), torch.float32)
            if ctx.axis == 0:
                gblock = gy2.index_select(1, sel).t() @ x2  # (r, in)
            else:
                gblock = gy2.t() @ x2.index_select(1, sel)  # (out, c)
            gblock = gblock.to(torch.float32)
        return gx, None, gb, gblock, None, None


def block_linear(module: nn.Linear, x: torch.Tensor, state: BlockState, holder: nn.Module) -> torch.Tensor:
    """``module(x)`` with the gradient of the block that ``holder`` carries for ``module.weight``.

    ``holder`` is ``module`` itself, or the embedding whose weight ``module`` (an LM head) shares.
    """
    state.sync(holder)
    block = state.block(holder)
    if not (torch.is_grad_enabled() and block.requires_grad):
        return F.linear(x, module.weight, module.bias)
    return _BlockLinearFn.apply(x, module.weight, module.bias, block, state.sel(holder), state.axis)


def _block_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return block_linear(module, x, module._sg_entries, module)


class _BlockEmbeddingFn(torch.autograd.Function):
    """Embedding lookup whose gradient goes only to the selected token rows."""

    @staticmethod
    def forward(ctx, ids, weight, block, lookup, module):  # noqa: D102
        ctx.save_for_backward(ids, lookup)
        ctx.rows = block.shape[0]
        ctx.padding_idx = module.padding_idx
        return F.embedding(
            ids, weight, module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq,
            module.sparse,
        )  # fmt: skip

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        ids, lookup = ctx.saved_tensors
        pos = lookup[ids.reshape(-1)]
        hit = pos >= 0  # tokens whose row is trained
        if ctx.padding_idx is not None:  # as F.embedding: padding positions give no gradient
            hit &= ids.reshape(-1) != ctx.padding_idx
        gy2 = gy.reshape(-1, gy.shape[-1])
        gblock = torch.zeros(ctx.rows, gy.shape[-1], dtype=torch.float32, device=gy.device)
        gblock.index_add_(0, pos[hit], gy2[hit].to(torch.float32))
        return None, None, gblock, None, None


def _block_embedding_forward(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    state: BlockState = module._sg_entries
    state.sync(module)
    block = state.block(module)
    if not (torch.is_grad_enabled() and block.requires_grad):
        return F.embedding(ids, module.weight, module.padding_idx, module.max_norm, module.norm_type)
    return _BlockEmbeddingFn.apply(ids, module.weight, block, module.weight_sg_lookup, module)


def attach_block(module: nn.Module, sel: torch.Tensor, axis: int) -> nn.Parameter:
    """Makes rows (``axis=0``) or columns (``axis=1``) ``sel`` of ``module.weight`` trainable.

    ``module`` is an ``nn.Linear``, or an ``nn.Embedding`` with ``axis=0`` (token rows).
    """
    weight = module.weight
    sel = sel.to(device=weight.device, dtype=torch.int64)
    weight.requires_grad_(False)
    state = BlockState(param_name="weight", shape=tuple(weight.shape), axis=axis)
    base = weight.detach().index_select(axis, sel).clone()
    module.register_buffer("weight_sg_sel", sel, persistent=False)
    module.register_buffer("weight_sg_base", base, persistent=False)
    block = nn.Parameter(torch.zeros_like(base))
    module.register_parameter("weight_sg_delta", block)
    state.synced_version = block._version
    if isinstance(module, nn.Embedding):
        lookup = torch.full((weight.shape[0],), -1, dtype=torch.int64, device=weight.device)
        lookup[sel] = torch.arange(sel.numel(), device=weight.device)
        module.register_buffer("weight_sg_lookup", lookup, persistent=False)
        install(module, state, _block_embedding_forward)
    else:
        install(module, state, _block_linear_forward)
    return block
