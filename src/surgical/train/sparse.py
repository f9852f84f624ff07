"""Entry-sparse training of a Linear weight at the memory floor.

The frozen weight ``W`` always holds the current fine-tuned values, so the forward pass is a
plain ``F.linear``. The trainable state is a 1-D parameter ``delta`` of the k selected entries;
``W.flat[idx] == orig + delta`` is restored lazily before each forward in which ``delta`` has
changed (its version counter moved), which works with any optimizer and training loop.

Optimizers that write parameters without bumping the version counter (fused AdamW, the HF
Trainer's default, does this) are covered by a global optimizer step post-hook that marks every
entry-sparse weight dirty after any ``optimizer.step()``.

The backward pass returns the input gradient ``gy @ W`` and the gradient of ``delta`` only at the
selected entries. On CPU that is a sampled dense-dense product (:mod:`surgical.train.cpu_kernel`,
else ``torch.sparse.sampled_addmm``): no dense weight gradient is formed. On CUDA, and on CPU
above ``DENSE_GATHER_DENSITY``, the layer's dense product is gathered at the entries and freed
at once, which is faster there.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from surgical.train import cpu_kernel

#: Above this density the dense product followed by a gather is faster than a sampled matmul.
DENSE_GATHER_DENSITY = 0.25
#: The same on CUDA, where cuSPARSE's SDDMM was slower than the dense product gathered at every
#: density measured (0.5% to 4.6% of SmolLM2's weights on an H100: 1.65x LoRA's step time against
#: 1.01x, the same peak memory). The product is a per-layer transient, freed at once.
CUDA_DENSE_GATHER_DENSITY = 0.0


@dataclass
class EntryState:
    """Bookkeeping of an entry-sparse weight.

    The tensors live on the module so that ``model.to(...)`` moves them: the parameter
    ``<name>_sg_delta`` (k trainable values) and the non-persistent buffers ``<name>_sg_indices``
    (sorted flat indices; int32 when the weight has fewer than 2**31 entries, half the memory of
    int64) and ``<name>_sg_orig`` (the base values at those indices).
    """

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


def sampled_weight_grad(
    gy: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    pattern: torch.Tensor | Callable[[], torch.Tensor],
) -> torch.Tensor:
    """``(gy^T @ x).flatten()[indices]``, without the dense product when sparse enough.

    On CPU the product at the entries is :mod:`surgical.train.cpu_kernel`'s when it could be
    built, else ``torch.sparse.sampled_addmm``. On CUDA the dense product is gathered (see
    ``CUDA_DENSE_GATHER_DENSITY``).

    Args:
        gy: Output gradient, (tokens, out).
        x: Layer input, (tokens, in).
        indices: Sorted flat indices into the (out, in) weight.
        pattern: CSR tensor of shape (out, in) with non-zeros at ``indices`` and dtype of ``gy``,
            or a function returning it, called only when the sampled product needs it (so that
            the dense-product path, CUDA's default, never builds it: 4 bytes per entry).
    """
    out_f, in_f = gy.shape[-1], x.shape[-1]
    threshold = CUDA_DENSE_GATHER_DENSITY if gy.is_cuda else DENSE_GATHER_DENSITY
    if indices.numel() > threshold * out_f * in_f:
        return (gy.t() @ x).view(-1).index_select(0, indices)
    if callable(pattern):
        pattern = pattern()
    if gy.device.type == "cpu":
        grad = cpu_kernel.sampled_grad(gy, x, pattern)
        if grad is not None:
            return grad
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
            # the delta's gradient is computed in the delta's dtype, which keeps bf16-autocast
            # gradients of fp32 deltas accurate; on CPU a half-precision delta (a model loaded in
            # bf16/fp16) is computed in fp32, since neither the CPU kernel nor sampled_addmm
            # takes half precision there
            gdt = state.delta(module).dtype
            if not gy.is_cuda and gdt not in (torch.float32, torch.float64):
                gdt = torch.float32
            gy2 = gy2.to(gdt)
            x2 = x.reshape(-1, x.shape[-1]).to(gdt)
            if state.accumulate:  # a prune-and-regrow schedule asked for one dense gradient
                dense = gy2.t() @ x2
                state.grad_acc = dense if state.grad_acc is None else state.grad_acc.add_(dense)
            pattern = functools.partial(state.csr, module, gy2.dtype)
            gd = sampled_weight_grad(gy2, x2, state.indices(module), pattern).to(state.delta(module).dtype)
        return gx, None, gb, gd, None


def index_dtype(numel: int) -> torch.dtype:
    """The smallest integer dtype that indexes a weight of ``numel`` entries (int32 or int64)."""
    return torch.int32 if numel < 2**31 - 1 else torch.int64


def delta_attr(param_name: str) -> str:
    """Name of the trainable delta parameter registered beside ``param_name`` in its module."""
    return f"{param_name}_sg_delta"


def sync_entries(module: nn.Module, state: EntryState) -> None:
    """Writes ``orig + delta`` into the frozen weight if ``delta`` changed since the last sync."""
    if not isinstance(state, EntryState):  # a row/column block (surgical.train.structured)
        state.sync(module)
        return
    delta = state.delta(module)
    if delta._version == state.synced_version and not state.dirty:
        return
    weight = getattr(module, state.param_name)
    with torch.no_grad():
        idx, orig = state.indices(module), state.orig(module)
        if not cpu_kernel.write_entries(weight, idx, orig, delta.detach()):
            new = torch.add(orig, delta.detach())
            # index_copy_ wants int64: a per-layer transient is cheaper than keeping int64 resident
            weight.view(-1).index_copy_(0, idx.long(), new.to(weight.dtype))
    state.synced_version = delta._version
    state.dirty = False


def rebuild_entries(module: nn.Module) -> None:
    """Re-derives a weight's cached pattern after its indices changed, and re-syncs it.

    The caller must first have restored the weight to the base values at any index it dropped.
    """
    state: EntryState = module._sg_entries
    if not isinstance(state, EntryState):
        state.dirty = True
        state.sync(module)
        return
    state.pattern = None
    state.dirty = True
    sync_entries(module, state)


_LIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # modules with entry-sparse weights
_HOOK_HANDLE = None


def _mark_dirty_after_step(optimizer, args, kwargs) -> None:
    for module in list(_LIVE):
        state = getattr(module, "_sg_entries", None)
        if state is not None:
            state.dirty = True


def _ensure_step_hook() -> None:
    global _HOOK_HANDLE
    if _HOOK_HANDLE is None:
        _HOOK_HANDLE = register_optimizer_step_post_hook(_mark_dirty_after_step)


def install(module: nn.Module, state, forward) -> None:
    """Routes ``module``'s forward through ``forward`` and keeps its weight in sync with ``state``.

    Shared by entry-sparse weights and row/column blocks (:mod:`surgical.train.structured`): the
    weight is re-synced after every optimizer step and before every ``state_dict()``.
    """
    module._sg_entries = state
    module.forward = forward.__get__(module)  # a bound method on this instance only
    module._sg_sd_hook = module.register_state_dict_pre_hook(_sync_before_state_dict)
    _LIVE.add(module)
    _ensure_step_hook()


def uninstall(module: nn.Module, suffixes: tuple[str, ...]) -> None:
    """Undoes :func:`install` and removes the ``<param>_<suffix>`` attributes that exist."""
    state = module._sg_entries
    for suffix in suffixes:
        if hasattr(module, f"{state.param_name}_{suffix}"):
            delattr(module, f"{state.param_name}_{suffix}")
    del module._sg_entries
    del module.forward  # back to the class's forward
    module._sg_sd_hook.remove()
    del module._sg_sd_hook
    _LIVE.discard(module)


def _sync_before_state_dict(module, prefix, keep_vars) -> None:
    state = getattr(module, "_sg_entries", None)
    if state is not None:
        sync_entries(module, state)


def _entry_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    state: EntryState = module._sg_entries
    sync_entries(module, state)
    delta = state.delta(module)
    if not (torch.is_grad_enabled() and delta.requires_grad):
        return F.linear(x, module.weight, module.bias)
    return _EntryLinearFn.apply(x, module.weight, module.bias, delta, module)


def attach_entries(module: nn.Linear, indices: torch.Tensor) -> nn.Parameter:
    """Makes the entries ``indices`` of ``module.weight`` trainable through a delta parameter.

    The weight is frozen, a zero-initialised parameter ``weight_sg_delta`` of ``len(indices)``
    values is registered on the module, and the module's forward is routed through the sparse
    autograd function. Returns the new parameter.
    """
    weight = module.weight
    indices = indices.to(device=weight.device, dtype=index_dtype(weight.numel()))
    weight.requires_grad_(False)
    state = EntryState(param_name="weight", shape=tuple(weight.shape))
    orig = weight.detach().view(-1).index_select(0, indices).clone()
    module.register_buffer("weight_sg_indices", indices, persistent=False)
    module.register_buffer("weight_sg_orig", orig, persistent=False)
    delta = nn.Parameter(torch.zeros(indices.numel(), dtype=weight.dtype, device=weight.device))
    module.register_parameter(delta_attr("weight"), delta)
    state.synced_version = delta._version
    install(module, state, _entry_linear_forward)
    return delta


def detach_entries(module: nn.Linear) -> None:
    """Undoes :func:`attach_entries` (or :func:`~surgical.train.structured.attach_block`)."""
    state: EntryState = module._sg_entries
    if not isinstance(state, EntryState):
        from surgical.train.structured import detach_block

        detach_block(module)
        return
    sync_entries(module, state)
    uninstall(module, ("sg_delta", "sg_indices", "sg_orig"))
