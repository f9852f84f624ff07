"""The generic path: entries, rows or columns of any floating parameter, whatever module reads it.

The specialised paths (:mod:`surgical.train.sparse`, :mod:`surgical.train.structured`) know how
an ``nn.Linear`` or ``nn.Embedding`` forms its weight gradient and compute only the selected part
of it. For any other parameter (GPT-2's ``Conv1D``, ``nn.Conv1d/2d/3d``, the fused 3-D expert
tensors of an MoE layer, a router, a custom module's weight) the same contract holds here:

- the parameter stays frozen (``requires_grad=False``) and holds ``base + delta`` at the selected
  entries, rows or columns, written in place before a forward in which the delta changed (the
  version counter and the ``dirty`` flag set after every optimizer step, as for Linear weights);
  no dense copy of the weight is made in the forward pass;
- the trainable parameter ``<param>_sg_delta`` holds the selected values only (1-D for entries, a
  block for rows or columns), so ``[p for p in model.parameters() if p.requires_grad]``, the HF
  Trainer and any optimizer see the deltas and nothing else;
- the module's forward is routed through a wrapper that, for the duration of the call, puts in
  the parameter's place a view of it produced by a custom autograd function of (parameter,
  delta). The module computes exactly what it computed before. In the backward pass the
  gradient autograd forms for that view (the module's own dense weight gradient) arrives in the
  function's backward, is gathered at the selected entries, rows or columns into the delta's
  gradient, and is freed when the function returns.

**Cost**: one transient dense gradient of that tensor per backward pass of the module (for a fused
expert tensor, of the whole tensor, as autograd forms it), on top of the floor; nothing is kept
between steps. No persistent ``.grad``, no optimizer state for frozen values, parameter names
unchanged.

**What can be intercepted**: a parameter that its own module reads in its ``forward`` through
the attribute (``self.weight``, ``self.gate_up_proj``), which is what every torch and
transformers module does. ``prepare`` refuses, before changing anything, a parameter held by a
module without a forward of its own (``nn.ModuleList``, ``nn.ParameterList``, the container of a
``torch.nn.utils.parametrize`` parametrization), one shared by several modules, a non-contiguous
one, and an embedding whose lookup writes its weight (``max_norm``) or forms a sparse gradient.
A parameter that some *other* module's code reads directly (``self.child.weight`` in a parent's
forward) cannot be detected there: it would get no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.train.sparse import EntryState, index_dtype
from surgical.train.state import delta_attr, install, states_of
from surgical.train.structured import BlockState

#: plan kind -> the generic state that trains it
GENERIC_KINDS = ("entries", "rows", "cols")


@dataclass
class GenericEntryState(EntryState):
    """Entries of any floating parameter (the bookkeeping and sync of
    :class:`~surgical.train.sparse.EntryState`; the gradient comes from :func:`gather`)."""

    kind: ClassVar[str] = "entries"

    def gather(self, module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
        """The delta's gradient: the dense gradient ``grad`` at the selected flat entries."""
        delta = self.delta(module)
        if self.accumulate:  # a prune-and-regrow schedule asked for one dense gradient
            dense = grad.detach().to(delta.dtype)
            self.grad_acc = dense.clone() if self.grad_acc is None else self.grad_acc.add_(dense)
        return grad.reshape(-1).index_select(0, self.indices(module)).to(delta.dtype)


@dataclass
class GenericBlockState(BlockState):
    """Rows (dim 0, any parameter with a dimension) or columns (dim 1 of a 2-D parameter) of any
    floating parameter (the bookkeeping and sync of :class:`~surgical.train.structured.BlockState`)."""

    def gather(self, module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
        """The block's gradient: the dense gradient ``grad`` at the selected rows or columns."""
        block = self.block(module)
        return grad.index_select(self.axis, self.sel(module)).to(block.dtype)


class _GenericFn(torch.autograd.Function):
    """Stands in for a frozen parameter inside its module's forward: returns (a view of) the
    parameter itself, and turns the parameter's gradient into the delta's."""

    @staticmethod
    def forward(ctx, param, trainable, module, state):  # noqa: D102
        ctx.module, ctx.state = module, state
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return None, ctx.state.gather(ctx.module, grad), None, None


def _generic_forward(module: nn.Module, *args, **kwargs):
    """The module's own forward, with every generically trained parameter stood in for."""
    states = states_of(module)
    swapped = {}
    for pname, st in states.items():
        st.sync(module)
        if torch.is_grad_enabled() and st.trainable(module).requires_grad:
            swapped[pname] = module._parameters[pname]
    inner = module.__dict__.get("_sg_prev_forward")
    try:
        for pname, p in swapped.items():
            st = states[pname]
            module._parameters[pname] = _GenericFn.apply(p, st.trainable(module), module, st)
        if inner is not None:
            return inner(*args, **kwargs)
        return type(module).forward(module, *args, **kwargs)
    finally:
        for pname, p in swapped.items():
            module._parameters[pname] = p


def generic_refusal(model: nn.Module, module: nn.Module, pname: str, kind: str) -> str | None:
    """Why ``kind`` of parameter ``pname`` of ``module`` cannot train through the generic path,
    or None if it can."""
    param = module._parameters.get(pname)
    if param is None:
        return "it is not a parameter of its module (a buffer or a computed attribute)"
    if not param.is_floating_point():
        return f"it is not a floating-point tensor ({param.dtype})"
    if type(module).forward is nn.Module.forward:
        return (
            f"its module ({type(module).__name__}) has no forward of its own, so the code that reads "
            "it cannot be intercepted"
        )
    if not param.is_contiguous():
        return "it is not contiguous in memory"
    if kind == "rows" and param.dim() < 1:
        return "rows need a parameter with at least one dimension"
    if kind == "cols" and param.dim() != 2:
        return f"columns need a 2-D parameter, it is {param.dim()}-D"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "its embedding rewrites the weight in the lookup (max_norm) or forms sparse gradients"
    users = [m for m in model.modules() if any(p is param for p in m._parameters.values())]
    if len(users) > 1:
        return f"it is shared by {len(users)} modules"
    return None


def attach_generic(module: nn.Module, pname: str, kind: str, sel: torch.Tensor) -> nn.Parameter:
    """Makes ``sel`` (sorted flat entry indices, or row / column indices) of parameter ``pname``
    of ``module`` trainable through the generic path; returns the delta parameter.

    ``kind`` is ``"entries"``, ``"rows"`` or ``"cols"``. The module may already train other
    parameters this way (the gate/up and down tensors of one experts module).
    """
    if kind not in GENERIC_KINDS:
        raise SurgicalError(f"unknown kind {kind!r} for {pname!r}", f"Use one of: {', '.join(GENERIC_KINDS)}")
    param = module._parameters[pname]
    param.requires_grad_(False)
    if kind == "entries":
        sel = sel.to(device=param.device, dtype=index_dtype(param.numel()))
        state = GenericEntryState(param_name=pname, shape=tuple(param.shape))
        base = param.detach().reshape(-1).index_select(0, sel).clone()
        module.register_buffer(f"{pname}_sg_indices", sel, persistent=False)
        module.register_buffer(f"{pname}_sg_orig", base, persistent=False)
        trainable = nn.Parameter(torch.zeros(sel.numel(), dtype=param.dtype, device=param.device))
    else:
        axis = 0 if kind == "rows" else 1
        sel = sel.to(device=param.device, dtype=torch.int64)
        state = GenericBlockState(param_name=pname, shape=tuple(param.shape), axis=axis)
        base = param.detach().index_select(axis, sel).clone()
        module.register_buffer(f"{pname}_sg_sel", sel, persistent=False)
        module.register_buffer(f"{pname}_sg_base", base, persistent=False)
        trainable = nn.Parameter(torch.zeros_like(base))
    module.register_parameter(delta_attr(pname), trainable)
    state.synced_version = trainable._version
    install(module, state, _generic_forward)
    return trainable
