"""Entries of a Linear weight that cannot be written in place: a quantized or sharded base.

The in-place path (:mod:`surgical.train.sparse`) keeps ``base + delta`` in the frozen weight.
That needs a plain tensor: a quantized weight (torchao, bitsandbytes) stores integers and scales,
and FSDP2's ``fully_shard`` keeps one shard per process and gathers the weight afresh for every
forward and backward pass, so a write into the gathered weight is lost. Here the weight is never
written. The forward pass is the module's own (quantized kernel, or the FSDP-gathered weight)
plus the delta's contribution::

    y = module(x) + x @ D^T        D: the sparse (out, in) matrix with the delta at the entries

and the backward pass adds ``gy @ D`` to the input gradient and gives the delta the sampled
product ``(gy^T x)`` at its entries (the kernel of the in-place path, see
:func:`surgical.train.sparse.sampled_weight_grad`). The delta is a 1-D parameter like the in-place
path's, so optimizers, DDP, FSDP2 (which shards and gathers it like any parameter), checkpoints,
``extract`` and the delta file are the same; only the cost differs: two sparse products of k
entries per forward and backward, and no base values kept (4 bytes per entry fewer).

Training a quantized base computes gradients on the quantized weights (QLoRA's trade-off); the
delta's values are what they are, and applied to the full-precision base they give
``base + delta`` at the entries, as a delta trained in place would.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.tensors import dequantized, full_tensor, is_plain, is_quantized
from surgical.train.sparse import grad_dtype, index_dtype, sampled_weight_grad
from surgical.train.state import SparseState, delta_attr, install


@dataclass
class AdditiveEntryState(SparseState):
    """Entries added to a Linear's output instead of written into its weight.

    Module attributes: parameter ``weight_sg_delta`` (k values) and the non-persistent buffer
    ``weight_sg_indices`` (sorted flat indices). ``active`` False leaves the delta out of the
    forward pass (the base model, for :func:`surgical.train.base_values`).
    """

    kind: ClassVar[str] = "entries"
    in_place: ClassVar[bool] = False
    buffers: ClassVar[dict[str, str]] = {"sg_indices": "moves"}

    param_name: str
    shape: tuple[int, int]
    dirty: bool = False  # nothing to write, kept for the protocol
    active: bool = True
    accumulate: bool = False  # also add the dense weight gradient into ``grad_acc`` (regrow)
    grad_acc: torch.Tensor | None = None
    _rows_cols: tuple[torch.Tensor, torch.Tensor] | None = None  # CSR row pointers, columns

    def indices(self, module: nn.Module) -> torch.Tensor:
        return getattr(module, f"{self.param_name}_sg_indices")

    def delta(self, module: nn.Module) -> torch.Tensor:
        return getattr(module, delta_attr(self.param_name))

    def matrix(self, module: nn.Module, values: torch.Tensor) -> torch.Tensor:
        """The sparse CSR (out, in) matrix with ``values`` at the entries.

        The pattern (row pointers, column indices) is cached; the values are the tensor passed,
        never copied: under FSDP2 that is the delta gathered for this pass.
        """
        idx = self.indices(module)
        rc = self._rows_cols
        if rc is None or rc[0].device != idx.device:
            rows_n, cols_n = self.shape
            rows = torch.div(idx.long(), cols_n, rounding_mode="floor")
            itype = index_dtype(max(idx.numel(), cols_n))
            crow = torch.zeros(rows_n + 1, dtype=itype, device=idx.device)
            crow[1:] = torch.bincount(rows, minlength=rows_n).cumsum(0)
            rc = self._rows_cols = (crow, (idx.long() - rows * cols_n).to(itype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
            return torch.sparse_csr_tensor(rc[0], rc[1], values, size=self.shape, check_invariants=False)

    def sync(self, module: nn.Module) -> None:
        """Nothing to write: the weight always holds the base."""
        self.dirty = False

    def export(self, module: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor]:
        idx = self.indices(module).detach().to("cpu", torch.int64, copy=True)
        return "entries", idx, full_tensor(self.delta(module)).detach().float().cpu().clone()

    def invalidate(self, module: nn.Module) -> None:
        self._rows_cols = None
        self.dirty = False

    def write_into_weight(self, module: nn.Module) -> None:
        """Adds the delta into a plain weight for good (what ``unprepare`` leaves): the same
        ``base + delta`` in the weight's dtype as the in-place path writes."""
        weight = getattr(module, self.param_name)
        if not is_plain(weight):
            raise SurgicalError(
                f"cannot write the trained entries into {type(module).__name__}.{self.param_name}: "
                f"it is stored as {type(weight).__name__} (quantized or sharded), not as a plain tensor",
                "Extract the delta (surgical.extract) and apply it to the full-precision base instead",
            )
        with torch.no_grad():
            flat = weight.view(-1)
            idx = self.indices(module).long()
            new = torch.add(
                flat.index_select(0, idx).to(self.delta(module).dtype), self.delta(module).detach()
            )
            flat.index_copy_(0, idx, new.to(weight.dtype))


def _delta_term(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``x @ D^T`` for a sparse (out, in) ``D``, shaped like the Linear's output, in ``D``'s dtype
    (autocast off: the sparse products have no half-precision kernels on CPU)."""
    x2 = x.reshape(-1, x.shape[-1]).to(d.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return torch.sparse.mm(d, x2.t()).t().reshape(*x.shape[:-1], d.shape[0])


class _AdditiveFn(torch.autograd.Function):
    """``x @ D^T`` with D's values the delta; backward: ``gy @ D`` and ``(gy^T x)`` at the entries."""

    @staticmethod
    def forward(ctx, x, delta, module, state):  # noqa: D102
        ctx.module, ctx.state = module, state
        ctx.save_for_backward(x, delta)
        dt = grad_dtype(delta, x.device)
        return _delta_term(x, state.matrix(module, delta.detach().to(dt)))

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        x, delta = ctx.saved_tensors
        module, state = ctx.module, ctx.state
        dt = grad_dtype(delta, gy.device)
        d = state.matrix(module, delta.detach().to(dt))
        gy2 = gy.reshape(-1, gy.shape[-1]).to(dt)
        gx = gd = None
        if ctx.needs_input_grad[0]:
            with torch.autocast(gy.device.type, enabled=False):
                gx = torch.sparse.mm(d.t(), gy2.t()).t().reshape(x.shape).to(x.dtype)  # gy @ D
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            if state.accumulate:  # a prune-and-regrow schedule asked for one dense gradient
                dense = gy2.t() @ x2.to(dt)
                state.grad_acc = dense if state.grad_acc is None else state.grad_acc.add_(dense)
            # the operands as they come (bf16 under autocast), as for in-place entries
            gy_in = gy.reshape(-1, gy.shape[-1])
            gd = sampled_weight_grad(gy_in, x2, state.indices(module), d, dt).to(delta.dtype)
        return gx, gd, None, None


class _QuantizedLinearFn(torch.autograd.Function):
    """``F.linear`` on a quantized weight without letting autograd keep a dequantized copy.

    torchao's linear saves the dequantized (fp32) weight for the input gradient, so a quantized
    model would hold a full-precision copy of every layer from forward to backward: more than
    the fp32 base itself. Here the forward runs the quantized kernel without recording, and the
    backward dequantizes one layer's weight for ``gy @ W`` and frees it at once.
    """

    @staticmethod
    def forward(ctx, x, bias, module):  # noqa: D102
        ctx.module = module
        with torch.no_grad():
            return F.linear(x, module.weight, bias)

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = gy @ dequantized(ctx.module.weight).to(gy.dtype)
        if ctx.needs_input_grad[1]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, gb, None


def _base_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's own forward; for a plain ``nn.Linear`` holding a dequantizable (torchao)
    weight, the same product through :class:`_QuantizedLinearFn`."""
    prev = module.__dict__.get("_sg_prev_forward")
    if prev is not None:
        return prev(x)
    weight = module.weight
    plain_linear = type(module).forward is nn.Linear.forward
    if plain_linear and is_quantized(weight) and hasattr(weight, "dequantize") and torch.is_grad_enabled():
        return _QuantizedLinearFn.apply(x, module.bias, module)
    return type(module).forward(module, x)


def _additive_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    state: AdditiveEntryState = module._sg_entries
    y = _base_forward(module, x)
    if not state.active:
        return y
    delta = state.delta(module)
    if torch.is_grad_enabled() and delta.requires_grad:
        extra = _AdditiveFn.apply(x, delta, module, state)
    else:  # frozen for now (a schedule) or no grad: the trained values still count
        with torch.no_grad():
            dt = grad_dtype(delta, x.device)
            extra = _delta_term(x, state.matrix(module, delta.detach().to(dt)))
    return y + extra.to(y.dtype)


def attach_additive(module: nn.Module, indices: torch.Tensor) -> nn.Parameter:
    """Makes the entries ``indices`` of a Linear's weight trainable without writing the weight;
    returns the new zero-initialised ``weight_sg_delta`` parameter (float32 for a quantized
    weight, else the weight's dtype)."""
    weight = module.weight
    shape = (module.out_features, module.in_features)
    indices = indices.to(device=weight.device, dtype=index_dtype(shape[0] * shape[1]))
    weight.requires_grad_(False)
    state = AdditiveEntryState(param_name="weight", shape=shape)
    dtype = weight.dtype if is_plain(weight) and weight.is_floating_point() else torch.float32
    module.register_buffer("weight_sg_indices", indices, persistent=False)
    delta = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=weight.device))
    module.register_parameter(delta_attr("weight"), delta)
    install(module, state, _additive_forward)
    return delta
