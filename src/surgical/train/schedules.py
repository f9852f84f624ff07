"""Dynamic schedules: change what is trained during a run (LISA, prune-and-regrow, HFT).

Each schedule is a :class:`~surgical.train.hooks.TrainHook`: pass it to ``fit(hooks=[...])``,
wrap it in :class:`~surgical.train.callback.SurgicalCallback` for the HF ``Trainer``, or name it
in the ``schedule:`` section of a ``surgical train`` config (``name:`` and ``options:``, checked
against the options each one declares in :data:`SCHEDULES`).

Schedules only ever choose among what ``prepare`` made trainable (the optimizer's parameters).
Random choices are drawn from a generator seeded by ``(seed, period)``, so a resumed run makes
the same choices as an uninterrupted one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.names import layer_index, split_layer
from surgical.core.registry import Option, Registry
from surgical.core.tensors import is_dtensor, is_zero3
from surgical.train.hooks import StepState, TrainHook
from surgical.train.state import state_of, stateful_modules

SCHEDULES: Registry[Callable[..., TrainHook]] = Registry("schedule")
"""Dynamic schedules by name; each entry builds a hook from ``seed`` and its declared options."""

_EVERY = Option("every", int, 10, "steps between changes", low=1)


def _generator(seed: int, period: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + period)


def _optimizer_params(state: StepState) -> dict[str, nn.Parameter]:
    ids = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
    return {n: p for n, p in state.model.named_parameters() if id(p) in ids}


def set_active(
    optimizer: torch.optim.Optimizer,
    params: dict[str, nn.Parameter],
    active: set[str],
    keep_requires_grad: bool = False,
) -> list[nn.Parameter]:
    """Trains exactly the ``active`` names among ``params``; frees the optimizer state of the rest.

    Freed state is really freed: the moments are dropped from ``optimizer.state``, and a
    parameter that becomes active again starts with fresh moments. Returns the inactive ones.

    ``keep_requires_grad`` (a model sharded by FSDP2, which settles at its first forward which
    parameters get their gradients reduced): the inactive parameters keep ``requires_grad``, and
    the caller drops their gradients before each optimizer step (:meth:`_Freezer.on_before_step`).
    """
    inactive = []
    for name, p in params.items():
        on = name in active
        if not keep_requires_grad:
            p.requires_grad_(on)
        if not on:
            p.grad = None
            optimizer.state.pop(p, None)
            inactive.append(p)
    return inactive


class _Freezer(TrainHook):
    """Activates a random subset of units (groups of parameters) every ``every`` steps."""

    def __init__(self, every: int = 10, seed: int = 0) -> None:
        if every < 1:
            raise SurgicalError(f"schedule.every must be at least 1, got {every}", "Pass a positive period")
        self.every = every
        self.seed = seed
        self.active_units: list[str] = []
        self._dropped: list[nn.Parameter] = []  # sharded model: inactive, gradients dropped

    def units(self, params: dict[str, nn.Parameter]) -> tuple[dict[str, list[str]], list[str]]:
        """(unit -> parameter names) and the names that always stay trainable."""
        raise NotImplementedError

    def pick(self, units: list[str], gen: torch.Generator) -> list[str]:
        raise NotImplementedError

    def _apply(self, state: StepState) -> None:
        params = _optimizer_params(state)
        units, always = self.units(params)
        names = sorted(units)
        self.active_units = sorted(self.pick(names, _generator(self.seed, state.step // self.every)))
        active = set(always)
        for u in self.active_units:
            active.update(units[u])
        sharded = any(is_dtensor(p) for p in state.model.parameters())
        inactive = set_active(state.optimizer, params, active, keep_requires_grad=sharded)
        self._dropped = inactive if sharded else []

    def config(self) -> dict[str, Any]:
        return {"every": self.every, "seed": self.seed}

    def on_train_begin(self, state: StepState) -> None:
        self._apply(state)

    def on_before_step(self, state: StepState) -> None:
        for p in self._dropped:  # computed (a sharded model trains them all) but not applied
            p.grad = None

    def on_step_end(self, state: StepState) -> None:
        if state.step % self.every == 0:
            self._apply(state)


@SCHEDULES.register(
    "lisa",
    help="train gamma randomly chosen layers, resampled every K steps (LISA)",
    options=[_EVERY, Option("gamma", int, 2, "layers active at a time", low=1)],
)
class LISA(_Freezer):
    """Layerwise Importance Sampling: train ``gamma`` randomly chosen layers, resampled every K steps.

    Parameters outside the repeated layers (embeddings, final norm, heads) train throughout,
    as in the LISA paper. Deactivated layers get ``requires_grad=False`` and their optimizer
    state is freed, so memory follows the active layers only; autograd stops below the lowest
    active layer when nothing beneath it is trainable. On a model sharded by FSDP2 the
    deactivated layers keep ``requires_grad`` (FSDP2 settles at its first forward which
    parameters get gradients) and their gradients are dropped before each step: the same
    updates, without the savings in backward compute and gradient memory.
    """

    def __init__(self, gamma: int = 2, every: int = 10, seed: int = 0) -> None:
        super().__init__(every, seed)
        if gamma < 1:
            raise SurgicalError(f"schedule.gamma must be at least 1, got {gamma}", "Pass a positive count")
        self.gamma = gamma

    def config(self) -> dict[str, Any]:
        return {**super().config(), "gamma": self.gamma}

    def units(self, params):
        layers: dict[str, list[str]] = defaultdict(list)
        always = []
        for name in params:
            prefix, _ = split_layer(name)
            if prefix is not None:
                layers[f"{layer_index(prefix):05d}"].append(name)
            else:
                always.append(name)
        if not layers:
            raise SurgicalError(
                "LISA found no numbered layers among the trained parameters", "Use another schedule"
            )
        return dict(layers), always

    def pick(self, units, gen):
        perm = torch.randperm(len(units), generator=gen).tolist()
        return [units[i] for i in perm[: min(self.gamma, len(units))]]


@SCHEDULES.register(
    "hft", help="each stage of K steps trains a random half of the trained tensors (HFT)", options=[_EVERY]
)
class HFT(_Freezer):
    """Half Fine-Tuning: each stage of ``every`` steps trains a random half of the trained tensors."""

    def units(self, params):
        return {n: [n] for n in params}, []

    def pick(self, units, gen):
        perm = torch.randperm(len(units), generator=gen).tolist()
        return [units[i] for i in perm[: max(1, len(units) // 2)]]


@SCHEDULES.register(
    "regrow",
    help="every K steps, drop the smallest entries and regrow where the gradient is largest (SpIEL)",
    options=[_EVERY, Option("fraction", float, 0.1, "share of each tensor's entries moved", low=0, high=1,
                            low_open=True, high_open=True)],
)  # fmt: skip
class Regrow(TrainHook):
    """Prune-and-regrow (SpIEL): every K steps, per entry-sparse weight, drop the ``fraction`` of
    entries with the smallest ``|delta|`` and grow as many where the accumulated gradient is largest.

    The gradient of the whole weight is accumulated during the one step before each update only
    (K-1 steps pay nothing). Dropped entries go back to their exact base value; grown entries
    start at delta 0 with fresh Adam moments, kept entries keep their values and moments. The
    number of entries per tensor never changes, so the optimizer keeps the same parameters.
    """

    def __init__(self, every: int = 10, fraction: float = 0.1, seed: int = 0) -> None:
        if every < 1:
            raise SurgicalError(f"schedule.every must be at least 1, got {every}", "Pass a positive period")
        if not 0.0 < fraction < 1.0:
            raise SurgicalError(f"schedule.fraction must be in (0, 1), got {fraction}", "Pass e.g. 0.1")
        self.every, self.fraction, self.seed = every, fraction, seed
        self.changes = 0  # entries moved so far

    def _states(self, state: StepState) -> list[tuple[nn.Module, Any]]:
        return [(m, st) for _, m, st in stateful_modules(state.model) if st.kind == "entries"]

    def _arm(self, state: StepState) -> None:
        arm = (state.step + 1) % self.every == 0
        for _, st in self._states(state):
            st.accumulate = arm
            st.grad_acc = None

    def on_train_begin(self, state: StepState) -> None:
        for m, st in self._states(state):
            if is_dtensor(st.delta(m)) or is_zero3(st.delta(m)):
                raise SurgicalError(
                    "prune-and-regrow cannot run on a sharded model (FSDP2 or DeepSpeed ZeRO-3): it "
                    "ranks and moves each tensor's entries on one process",
                    "Train without the regrow schedule, or unsharded (one process or DDP)",
                )
        self._arm(state)

    def on_step_end(self, state: StepState) -> None:
        if state.step % self.every == 0:
            for m, st in self._states(state):
                self.changes += regrow_module(m, state.optimizer, self.fraction, st)
        self._arm(state)

    def config(self) -> dict[str, Any]:
        return {"every": self.every, "fraction": self.fraction, "seed": self.seed}

    def state_dict(self):
        return {"changes": self.changes}

    def load_state_dict(self, state):
        self.changes = int(state.get("changes", 0))


@torch.no_grad()
def regrow_module(
    module: nn.Module, optimizer: torch.optim.Optimizer, fraction: float, st: Any | None = None
) -> int:
    """One prune-and-regrow update of an entry-sparse parameter of ``module`` (its state ``st``,
    default: the module's first); returns the number of entries moved."""
    st = st if st is not None else state_of(module)
    acc, st.grad_acc, st.accumulate = st.grad_acc, None, False
    delta, idx = st.delta(module), st.indices(module)
    k = idx.numel()
    n = int(fraction * k)
    if acc is None or n == 0:
        return 0
    drop_pos = torch.topk(delta.abs(), n, largest=False).indices
    keep = torch.ones(k, dtype=torch.bool, device=idx.device)
    keep[drop_pos] = False
    score = acc.reshape(-1).abs()
    score[idx[keep]] = -1.0  # kept entries cannot be grown again
    grown = torch.topk(score, n).indices
    new_idx = torch.cat([idx[keep], grown])
    order = torch.argsort(new_idx)
    new_idx = new_idx[order]
    moved = int((~torch.isin(grown, idx)).sum())
    if st.in_place:  # the weight holds base + delta: dropped entries go back to the exact base
        orig = st.orig(module)
        st.sync(module)
        weight = getattr(module, st.param_name).view(-1)
        weight.index_copy_(0, idx[drop_pos].long(), orig[drop_pos].to(weight.dtype))
        new_orig = torch.cat([orig[keep], weight.index_select(0, grown).to(orig.dtype)])[order]
        orig.copy_(new_orig)
    # (an additive state's weight holds the base throughout: moving the indices is all)

    def rearrange(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[keep], torch.zeros(n, dtype=t.dtype, device=t.device)])[order]

    delta.copy_(rearrange(delta))
    opt_state = optimizer.state.get(delta, {})
    for value in opt_state.values():
        if torch.is_tensor(value) and value.shape == delta.shape:
            value.copy_(rearrange(value))
    idx.copy_(new_idx)
    st.invalidate(module)
    return moved


def make_schedule(name: str, options: dict[str, Any] | None = None, seed: int = 0) -> list[TrainHook]:
    """The hooks of the schedule registered as ``name`` (none for ``"none"``), options checked.

    Raises:
        SurgicalError: an unknown schedule or option, or an option value out of range.
    """
    if name == "none":
        if options:
            raise SurgicalError("schedule 'none' takes no options", "Remove schedule.options")
        return []
    return [SCHEDULES.get(name)(seed=seed, **SCHEDULES.resolve(name, options, "schedule.options."))]
