"""The trainable-state protocol: what ``prepare`` attaches to a module, and how others read it.

Every sparsely trained parameter carries one state object on the module that holds it (entries,
a row/column block, or the LM head of a tied embedding, which reads its owner's block); a module
usually holds one, and one holding several generically trained parameters (the fused expert
tensors of an MoE layer, :mod:`surgical.train.generic`) one per parameter. The rest of the
library (``extract``, checkpoints, run identity, the base fingerprint of a prepared model,
schedules) goes through the methods declared here and never tells the kinds apart by class.

Tensors live on the module, so that ``model.to(...)`` moves them: the trainable parameter
``<param>_sg_delta`` and non-persistent buffers ``<param>_<suffix>`` declared in
:attr:`SparseState.buffers` with their role:

- ``"moves"``: the selection, which a schedule may change (entry indices and base values);
  checkpoints store and restore it;
- ``"fixed"``: the selection, which never changes (block rows or columns); checkpoints store it
  and a resume must match it;
- ``"base"``: base values that follow from the selection (a block's base rows);
- ``"derived"``: caches rebuilt from the others (an embedding's row lookup).
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from surgical.core.errors import SurgicalError
from surgical.core.marks import Saved
from surgical.core.tensors import is_dtensor, is_zero3

_ATTR = "_sg_entries"  # the module's (first) state
_STATES = "_sg_states"  # parameter name -> state
DELTA_SUFFIX = "sg_delta"


def delta_attr(param_name: str) -> str:
    """Name of the trainable parameter registered beside ``param_name`` in its module."""
    return f"{param_name}_{DELTA_SUFFIX}"


class SparseState(ABC):
    """The trainable state of one module's weight (see the module docstring).

    Attributes:
        param_name: The weight's name inside its module (``"weight"``).
        dirty: Set after every optimizer step; the next ``sync`` rewrites the weight.
    """

    #: ``"entries"``, ``"rows"``, ``"cols"``, or ``"tied"`` (holds no values of its own)
    kind: ClassVar[str]
    #: buffer suffix -> role (``moves``, ``fixed``, ``base``, ``derived``)
    buffers: ClassVar[dict[str, str]] = {}
    #: True: the weight holds base + trained values (written by ``sync``); False: the weight
    #: keeps the base and the trained values are added in the forward pass
    #: (:mod:`surgical.train.additive`: quantized or sharded weights)
    in_place: ClassVar[bool] = True
    param_name: str
    dirty: bool

    @abstractmethod
    def sync(self, module: nn.Module) -> None:
        """Writes base + trained values into the frozen weight if they changed since the last sync."""

    def export(self, module: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor] | None:
        """(delta kind, sorted int64 indices, float32 values), copies on the CPU; None if the
        state holds no values of its own."""
        return None

    def saved_base(self, module: nn.Module) -> Saved | None:
        """The base values the state overwrote in the weight (for the base fingerprint)."""
        return None

    def trainable(self, module: nn.Module) -> nn.Parameter | None:
        """The parameter the optimizer updates, or None."""
        return getattr(module, delta_attr(self.param_name), None)

    def invalidate(self, module: nn.Module) -> None:
        """Drops caches derived from the selection (after a checkpoint restored or a schedule
        moved it) and re-syncs the weight."""
        self.dirty = True
        self.sync(module)


def states_of(module: nn.Module) -> dict[str, SparseState]:
    """Parameter name -> state for every parameter of ``module`` that carries one (most modules
    carry at most one; a module holding several generically trained parameters, such as the
    fused expert tensors of an MoE layer, carries one per parameter)."""
    return module.__dict__.get(_STATES, {})


def state_of(module: nn.Module, param_name: str | None = None) -> SparseState | None:
    """The state ``prepare`` attached to ``module`` for ``param_name`` (default: its first, for a
    module that carries one), or None."""
    states = states_of(module)
    if param_name is None:
        return next(iter(states.values()), None)
    return states.get(param_name)


def set_state(module: nn.Module, state: SparseState | None) -> None:
    """Attaches a module's state (beside any of its other parameters'), or with None removes
    every state of the module."""
    if state is None:
        module.__dict__.pop(_STATES, None)
        module.__dict__.pop(_ATTR, None)
        return
    module.__dict__.setdefault(_STATES, {})[state.param_name] = state
    module.__dict__[_ATTR] = state_of(module)  # the specialised forwards read the one state here


def _drop_state(module: nn.Module, param_name: str) -> None:
    states = states_of(module)
    states.pop(param_name, None)
    if states:
        module.__dict__[_ATTR] = state_of(module)
    else:
        set_state(module, None)


def stateful_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, SparseState]]:
    """(module name, module, state) for every state of ``model`` (a module with several states
    appears once per state)."""
    for name, module in model.named_modules():
        for state in list(states_of(module).values()):
            yield name, module, state


def state_buffers(model: nn.Module, roles: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Full buffer name -> tensor for every state buffer of ``model`` with one of ``roles``."""
    out = {}
    for mname, module, state in stateful_modules(model):
        for suffix, role in state.buffers.items():
            attr = f"{state.param_name}_{suffix}"
            if role in roles and hasattr(module, attr):
                out[f"{mname}.{attr}" if mname else attr] = getattr(module, attr)
    return out


_LIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # modules carrying a state
_HOOK_HANDLE = None


def _sharded(t: torch.Tensor) -> bool:
    return is_dtensor(t) or is_zero3(t)


def check_writable(module: nn.Module, state: SparseState) -> None:
    """Refuses an in-place state whose weight has been sharded after ``prepare`` (a DTensor of
    FSDP2's ``fully_shard``, a DeepSpeed ZeRO-3 partition): the values written into it would be
    lost at the next gather (outside a forward pass the sharded parameter shows, which is when
    this runs)."""
    if state.in_place and _sharded(getattr(module, state.param_name)):
        raise SurgicalError(
            f"{type(module).__name__}.{state.param_name} was prepared for in-place training but has "
            "been sharded (FSDP2 fully_shard or DeepSpeed ZeRO-3), which would lose the trained values",
            "Prepare with surgical.prepare(model, plan, additive=True) before sharding "
            "(surgical.train.shard does both checks), and train only entries of Linear weights or "
            "dense parameters",
        )


def _mark_dirty_after_step(optimizer, args, kwargs) -> None:
    owned = None
    for module in list(_LIVE):
        for state in states_of(module).values():
            weight = getattr(module, state.param_name)
            if state.in_place and is_zero3(weight):  # DeepSpeed steps a flat copy: never "owned"
                check_writable(module, state)
            elif state.in_place and is_dtensor(weight):
                if owned is None:  # refuse only for the model this optimizer trains
                    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
                if id(state.trainable(module)) in owned:
                    check_writable(module, state)
            state.dirty = True


def _sync_before_state_dict(module, prefix, keep_vars) -> None:
    for state in list(states_of(module).values()):
        check_writable(module, state)
        state.sync(module)


def install(module: nn.Module, state: SparseState, forward) -> None:
    """Attaches ``state`` to ``module`` and routes its forward through ``forward``.

    The weight is kept in sync with the state after every optimizer step (a global step
    post-hook marks every state dirty: fused AdamW, the HF Trainer's default, writes parameters
    without bumping their version counter) and before every ``state_dict()``. A module that
    already carries a state (another of its parameters) only gains ``state``: its forward is
    routed once, and ``forward`` must be the one it was routed through.
    """
    global _HOOK_HANDLE
    if states_of(module):
        if module.__dict__["forward"].__func__ is not forward:
            raise ValueError("a module's parameters must all train through the same forward")
        set_state(module, state)
        return
    set_state(module, state)
    if "forward" in module.__dict__:  # an instance forward set by someone else: restored at uninstall
        module._sg_prev_forward = module.__dict__["forward"]
    module.forward = forward.__get__(module)  # a bound method on this instance only
    module._sg_sd_hook = module.register_state_dict_pre_hook(_sync_before_state_dict)
    _LIVE.add(module)
    if _HOOK_HANDLE is None:
        _HOOK_HANDLE = register_optimizer_step_post_hook(_mark_dirty_after_step)


def uninstall(module: nn.Module, param_name: str | None = None) -> None:
    """Undoes :func:`install` for ``param_name`` (default: the module's first state): removes the
    state, its trainable parameter and its buffers; the module's forward goes back to what it
    was once no state is left."""
    state = state_of(module, param_name)
    for suffix in (DELTA_SUFFIX, *state.buffers):
        if hasattr(module, f"{state.param_name}_{suffix}"):
            delattr(module, f"{state.param_name}_{suffix}")
    _drop_state(module, state.param_name)
    if states_of(module):
        return
    del module.forward  # back to the class's forward
    prev = module.__dict__.pop("_sg_prev_forward", None)
    if prev is not None:
        module.forward = prev
    module._sg_sd_hook.remove()
    del module._sg_sd_hook
    _LIVE.discard(module)


def detach(module: nn.Module, param_name: str | None = None) -> None:
    """Writes the trained values of ``param_name`` (default: the module's first state) into the
    parameter for good and removes its state (a state that is not in place needs a plain weight,
    see :meth:`surgical.train.additive.AdditiveEntryState.write_into_weight`)."""
    state = state_of(module, param_name)
    if state.in_place:
        state.sync(module)
    else:  # the trained values were added in the forward pass: now into the weight, once
        state.write_into_weight(module)
    for other in getattr(state, "tied", ()):  # modules that only read this state (a tied LM head)
        uninstall(other)
    uninstall(module, state.param_name)
