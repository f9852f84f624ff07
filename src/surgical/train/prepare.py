"""``prepare``: make exactly a plan's parameters trainable, at the memory floor.

After ``prepare(model, plan)``:
- every parameter not in the plan has ``requires_grad=False`` (no gradient, no optimizer state);
- each planned Linear weight is frozen and gets a ``weight_sg_delta`` parameter holding the k
  trainable values (see :mod:`surgical.train.sparse`);
- planned rows/columns train as a dense block (:mod:`surgical.train.structured`); token rows of
  an embedding tied to the LM head as one block read by both modules (:mod:`surgical.train.tied`);
- entries of a transformers ``Conv1D`` weight (GPT-2) like those of a Linear weight
  (:mod:`surgical.train.conv1d`);
- entries, rows or columns of any other floating parameter (``Conv1D`` rows and columns, convolutions,
  fused MoE expert tensors) train through the generic path (:mod:`surgical.train.generic`): the
  same in-place scheme, with the module's own dense gradient of that tensor gathered and freed;
- the plan's dense parameters train as usual;
- entries of a Linear weight that cannot be written in place (a quantized weight, or any weight
  with ``additive=True``, which FSDP2 sharding needs) are added in the forward pass instead
  (:mod:`surgical.train.additive`).

A tied parameter may be named in the plan by any of its names; it trains under the one
``named_parameters()`` reports.

So ``[p for p in model.parameters() if p.requires_grad]`` is exactly what an optimizer needs,
and the HF ``Trainer`` picks the same set by itself.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.fingerprint import BaseOverlay
from surgical.core.marks import Saved, is_prepared, prepared_record, set_prepared
from surgical.core.patterns import as_patterns, matches
from surgical.core.tensors import drop_gathered, is_dtensor, is_plain, logical_shape, shard_like
from surgical.select.api import is_transposed_linear
from surgical.select.plan import Plan
from surgical.train.additive import attach_additive
from surgical.train.conv1d import attach_conv1d_entries
from surgical.train.generic import attach_generic, generic_refusal
from surgical.train.sparse import attach_entries
from surgical.train.state import delta_attr, detach, state_of, stateful_modules
from surgical.train.structured import attach_block
from surgical.train.tied import attach_tied_rows, tied_row_owner, weight_users


@dataclass
class Prepared:
    """What ``prepare`` recorded on the model (``model._sg_prepared``).

    Not the plan itself: its int64 entry indices would stay resident for the whole run (8 bytes
    per entry beside the 4-byte copy the module keeps), so only what later steps read is kept.
    """

    dense: list[str]  # parameters trained densely
    meta: dict  # the plan's provenance (method, budget, ...), recorded in the delta
    entry_modules: dict[str, nn.Module]  # parameter name -> module holding it
    # base values of the densely trained parameters that existed in the base (CPU copies), so
    # extract stores their change; parameters in ``new`` (a freshly initialised head) have none
    dense_base: dict[str, torch.Tensor] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)


#: Names of task heads that ``from_pretrained`` initialises afresh for a new task.
HEAD_MODULES = ("classifier", "score", "qa_outputs")


def new_parameters(model: nn.Module, names: list[str], new: str | Sequence[str] | None) -> list[str]:
    """The densely trained ``names`` that have no base value (stored whole by extract).

    ``new="auto"``: the parameters of a task head (``classifier``, ``score``, ``qa_outputs``) of
    a ``...For{Sequence,Token}Classification`` / ``...ForQuestionAnswering`` model, which
    ``from_pretrained`` initialises at random. Otherwise patterns (see
    :func:`surgical.core.patterns.matches`) or None for none.
    """
    if new == "auto":
        arch = type(model).__name__
        if not arch.endswith(("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")):
            return []
        return [n for n in names if n.split(".")[0] in HEAD_MODULES]
    patterns = as_patterns(new)
    return [n for n in names if any(matches(n, p) for p in patterns)]


def _pname(name: str) -> str:
    """A parameter's name inside its module (``"weight"`` of ``"layers.0.fc.weight"``)."""
    return name.rpartition(".")[2]


def _module_of(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    mname, _, pname = param_name.rpartition(".")
    try:
        module = model.get_submodule(mname) if mname else model
    except AttributeError:
        module = None
    if module is None or not isinstance(getattr(module, pname, None), torch.Tensor):
        raise SurgicalError(
            f"the plan names parameter {param_name!r}, which this model does not have",
            "Use the plan with the base model it was selected on",
        )
    return module, pname


def check_plan(model: nn.Module, plan: Plan) -> None:
    """Raises a SurgicalError if the plan does not fit the model (names, shapes, indices)."""
    params = dict(model.named_parameters())
    for name, shape in plan.shapes.items():
        if name not in params:
            _module_of(model, name)  # raises with the standard message
        if logical_shape(params[name]) != tuple(shape):
            raise SurgicalError(
                f"the plan was made for another model: {name!r} has shape {tuple(shape)} in the "
                f"plan but {logical_shape(params[name])} in this model",
                "Use the plan with the base model it was selected on",
            )
    for name in plan.sparse_names:
        shape = logical_shape(params[name])
        if name in plan.entries:
            idx, bound = plan.entries[name], math.prod(shape)
        elif name in plan.rows:  # a 0-d parameter has no rows: refused with the reason by _kind
            idx, bound = plan.rows[name], shape[0] if shape else None
        else:
            idx, bound = plan.cols[name], shape[1] if len(shape) >= 2 else None
        if bound is not None and idx.numel() and (int(idx.max()) >= bound or int(idx.min()) < 0):
            raise SurgicalError(f"plan indices for {name!r} are out of range", "Re-run selection")


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name of a shared (tied) parameter -> the one ``named_parameters()`` reports."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return {n: c for n, c in out.items() if n != c}


def canonical_plan(model: nn.Module, plan: Plan) -> Plan:
    """``plan`` with any other name of a tied parameter (``lm_head.weight``) replaced by the one
    ``named_parameters()`` reports (``model.embed_tokens.weight``), under which it is trained,
    extracted and saved once.

    Raises:
        SurgicalError: if the plan names one tied parameter twice.
    """
    alias = canonical_names(model)
    if not any(n in alias for n in [*plan.shapes, *plan.sparse_names, *plan.dense]):
        return plan

    def canon(name: str) -> str:
        return alias.get(name, name)

    named = [canon(n) for n in [*plan.sparse_names, *plan.dense]]  # one tied weight, one way to train
    twice = sorted({n for n in named if named.count(n) > 1})
    if twice:
        raise SurgicalError(
            f"the plan names the tied parameter {twice[0]!r} twice (under both of its names)",
            "Keep one of the names in the plan",
        )
    return replace(
        plan,
        entries={canon(n): t for n, t in plan.entries.items()},
        rows={canon(n): t for n, t in plan.rows.items()},
        cols={canon(n): t for n, t in plan.cols.items()},
        dense=[canon(n) for n in plan.dense],
        shapes={canon(n): s for n, s in plan.shapes.items()},
    )


def _plain_lookup(module: nn.Embedding, name: str) -> nn.Embedding:
    """The embedding, or a SurgicalError if its lookup rescales gradients or renormalises rows
    (the token-row gradient is the plain ``index_add`` of the output gradient)."""
    if module.scale_grad_by_freq or module.max_norm is not None:
        raise SurgicalError(
            f"token rows of {name!r} cannot train: its embedding uses scale_grad_by_freq or max_norm",
            "Train that weight densely (list it under 'always')",
        )
    return module


def _kind(model: nn.Module, plan: Plan, name: str, additive: bool = False) -> tuple[str, nn.Module]:
    """How a sparse plan entry trains and the module that holds its state, or a SurgicalError.

    Specialised paths: ``"entries"``, ``"rows"``, ``"cols"`` of an ``nn.Linear`` weight, token
    ``"rows"`` of an ``nn.Embedding``, ``"tied_rows"`` of an embedding tied to an LM head,
    ``"conv1d_entries"`` of a transformers ``Conv1D`` weight (:mod:`surgical.train.conv1d`),
    ``"additive_entries"`` of an ``nn.Linear`` weight that is quantized or, with ``additive``,
    any (:mod:`surgical.train.additive`). Any other floating parameter trains through the generic
    path (:mod:`surgical.train.generic`): ``"generic_entries"``, ``"generic_rows"``,
    ``"generic_cols"``.
    """
    module, pname = _module_of(model, name)
    kind = "rows" if name in plan.rows else "cols" if name in plan.cols else "entries"
    param = getattr(module, pname)
    if is_dtensor(param):
        raise SurgicalError(
            f"{name!r} is already sharded (FSDP2 fully_shard), and a sharded model cannot be prepared",
            "Call surgical.prepare(model, plan, additive=True) first, then shard the model "
            "(surgical.train.shard)",
        )
    if additive or not is_plain(param):
        why = "with additive=True" if is_plain(param) else f"on a quantized weight ({type(param).__name__})"
        if kind == "entries" and isinstance(module, nn.Linear) and pname == "weight":
            if len(weight_users(model, param)) == 1:
                return "additive_entries", module
        raise SurgicalError(
            f"{kind} of {name!r} cannot train {why}: only entries of an unshared nn.Linear weight "
            "train without writing the weight",
            "Select entries of Linear weights for it, or keep that weight out of quantization "
            "(quantize_base(..., exclude=[...])) and out of additive=True",
        )
    users = weight_users(model, module.weight) if pname == "weight" else [module]
    if len(users) > 1:  # a tied embedding and LM head: one weight, one block, two gradient paths
        return "tied_rows", _plain_lookup(tied_row_owner(name, users, kind), name)
    if isinstance(module, nn.Embedding) and pname == "weight" and kind == "rows":
        return kind, _plain_lookup(module, name)  # token rows
    if isinstance(module, nn.Linear) and pname == "weight":
        return kind, module
    if is_transposed_linear(module) and pname == "weight" and kind == "entries":
        return "conv1d_entries", module  # GPT-2's Conv1D: the sampled entry gradient
    why = generic_refusal(model, module, pname, kind)
    if why is not None:
        raise SurgicalError(
            f"{kind} of {name!r} cannot train sparsely: {why}",
            "Train that parameter densely (list it under 'always'), or leave it out of the plan",
        )
    return f"generic_{kind}", module


def _one_path_per_module(kinds: dict[str, tuple[str, nn.Module]]) -> None:
    """A module whose forward a specialised path replaces trains no other parameter sparsely."""
    by_module: dict[int, list[str]] = {}
    for name, (_, module) in kinds.items():
        by_module.setdefault(id(module), []).append(name)
    for names in by_module.values():
        special = [n for n in names if not kinds[n][0].startswith("generic_")]
        if special and len(names) > 1:
            other = next(n for n in names if n != special[0])
            raise SurgicalError(
                f"{special[0]!r} and {other!r} belong to one module, and only one parameter of an "
                "nn.Linear, Conv1D or nn.Embedding trains sparsely",
                f"Train {other!r} densely (list it under 'always')",
            )


def prepare(
    model: nn.Module, plan: Plan, new: str | Sequence[str] | None = "auto", additive: bool = False
) -> nn.Module:
    """Makes exactly the plan's entries and dense parameters trainable; returns the model.

    Args:
        model: The model to train (its parameter names never change).
        plan: What to train (:func:`surgical.select`).
        new: Densely trained parameters without a base value (a task head initialised at
            random): ``extract`` stores them whole. Every other densely trained parameter is
            stored as its change, a task vector that merging and WiSE-FT can scale. ``"auto"``
            finds a classification head (see :func:`new_parameters`); patterns or None.
        additive: Train every entry-sparse Linear weight without writing into it (its entries
            added in the forward pass, :mod:`surgical.train.additive`), as a model about to be
            sharded with FSDP2 needs (:func:`surgical.train.shard`); the plan may then hold only
            entries of Linear weights and dense parameters. Quantized weights
            (:func:`surgical.train.quantize_base`) train this way regardless.

    Raises:
        SurgicalError: if the model is already prepared or sharded, the plan does not fit it, a
            part of the plan cannot train on a quantized weight (or with ``additive``).
    """
    if is_prepared(model):
        raise SurgicalError("this model is already prepared", "Call surgical.unprepare(model) first")
    plan = canonical_plan(model, plan)
    check_plan(model, plan)
    kinds = {name: _kind(model, plan, name, additive) for name in plan.sparse_names}  # validate all first
    _one_path_per_module(kinds)
    _check_dense(model, plan)
    for p in model.parameters():
        p.requires_grad_(False)
    entry_modules: dict[str, nn.Module] = {}
    for name, (kind, module) in kinds.items():
        if kind == "tied_rows":
            heads = [m for m in weight_users(model, module.weight) if m is not module]
            attach_tied_rows(module, heads, plan.rows[name])
        elif kind == "rows":  # dense sub-blocks: one small matmul (or index_add) for the gradient
            attach_block(module, plan.rows[name], axis=0)
        elif kind == "cols":
            attach_block(module, plan.cols[name], axis=1)
        elif kind == "conv1d_entries":
            attach_conv1d_entries(module, plan.entries[name])
        elif kind == "additive_entries":  # quantized or to be sharded: added in the forward pass
            attach_additive(module, plan.entries[name])
        elif kind.startswith("generic_"):  # any other parameter: its dense gradient, gathered
            kind = kind[len("generic_") :]
            sel = plan.entries[name] if kind == "entries" else getattr(plan, kind)[name]
            attach_generic(module, name.rpartition(".")[2], kind, sel)
        else:
            attach_entries(module, plan.entries[name])
        entry_modules[name] = module
    params = dict(model.named_parameters())
    for name in plan.dense:
        params[name].requires_grad_(True)
    fresh = new_parameters(model, list(plan.dense), new)
    dense_base = {n: params[n].detach().to("cpu", copy=True) for n in plan.dense if n not in fresh}
    record = Prepared(list(plan.dense), dict(plan.meta), entry_modules, dense_base, fresh)
    set_prepared(model, record)
    return model


def _check_dense(model: nn.Module, plan: Plan) -> None:
    """Refuses a densely trained parameter that is quantized (it has no values to train) or sharded."""
    params = dict(model.named_parameters())
    for name in plan.dense:
        p = params.get(name)
        if p is not None and not is_plain(p):
            what = "sharded (FSDP2)" if is_dtensor(p) else f"quantized ({type(p).__name__})"
            raise SurgicalError(
                f"{name!r} cannot train densely: it is {what}",
                "Keep it out of quantization (quantize_base(..., exclude=[...]), "
                "model.quantization.exclude), or select entries of it instead",
            )


def prepared(model: nn.Module) -> Prepared:
    """The record ``prepare`` left on the model, or a SurgicalError if there is none."""
    info = prepared_record(model)
    if info is None:
        raise SurgicalError("this model was not prepared", "Call surgical.prepare(model, plan) first")
    return info


def sync(model: nn.Module) -> None:
    """Writes every trained delta into its weight, so the weights hold the fine-tuned values.

    Forward passes do this lazily; call it before reading weights or a state dict directly.
    """
    for name, module in prepared(model).entry_modules.items():
        state_of(module, _pname(name)).sync(module)


def unprepare(model: nn.Module) -> nn.Module:
    """Removes the delta parameters, leaving a plain model that holds the fine-tuned weights.

    Raises:
        SurgicalError: if a weight trained additively is quantized or sharded and so cannot hold
            the trained values (extract the delta and apply it to the full-precision base).
    """
    info = prepared(model)
    for name, module in info.entry_modules.items():  # refuse before changing anything
        st = state_of(module, _pname(name))
        weight = getattr(module, st.param_name)
        if not st.in_place and not is_plain(weight):
            raise SurgicalError(
                f"cannot unprepare: {name!r} is stored as {type(weight).__name__} (quantized or sharded) and "
                "cannot hold the trained values",
                "Extract the delta (surgical.extract) and apply it to the full-precision base instead",
            )
    for name, module in info.entry_modules.items():
        detach(module, _pname(name))
    set_prepared(model, None)
    return model


def base_overlay(model: nn.Module) -> BaseOverlay:
    """The base values a prepared model's states overwrote, and its trainable values' names:
    what the base fingerprint needs to see the model as its base."""
    info = prepared(model)
    values = {}
    for name, module in info.entry_modules.items():
        saved = state_of(module, _pname(name)).saved_base(module)
        if saved is not None:
            values[name] = saved
    for name, base in info.dense_base.items():  # densely trained: the whole base tensor
        values[name] = Saved(None, base)
    skip = [f"{name.rpartition('.')[0]}.{delta_attr(name.rpartition('.')[2])}".lstrip(".")
            for name in info.entry_modules]  # fmt: skip
    return BaseOverlay(values=values, skip=skip)


def trainable_count(model: nn.Module) -> int:
    """Number of trainable values (delta entries plus dense parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def base_values(model: nn.Module) -> Iterator[nn.Module]:
    """``with base_values(model): ...`` runs the body with a prepared model's trained values
    swapped back to their base values, then puts the trained values back exactly.

    The base model for free, without a second copy: the reference of excess-loss token selection
    and of reducible-loss batch selection, or forgetting measured mid-run. Costs time
    proportional to the trained values (entries, blocks and densely trained tensors).
    """
    info = prepared(model)
    sync(model)  # so that no forward inside re-writes the trained values (nothing is dirty)
    # FSDP2: the shards, not whole parameters still gathered by a forward, are what is written
    # (and what the body's forward will gather)
    drop_gathered(model)
    params = dict(model.named_parameters())
    swapped: list[tuple[torch.Tensor, Saved, torch.Tensor]] = []
    added = [st for _, _, st in stateful_modules(model) if not st.in_place and st.active]
    for st in added:  # entries added in the forward pass: left out for the body
        st.active = False
    with torch.no_grad():
        for name, module in info.entry_modules.items():
            saved = state_of(module, _pname(name)).saved_base(module)
            if saved is None:
                continue
            weight = getattr(module, _pname(name))
            idx, old, axis = saved
            now = (
                weight.view(-1).index_select(0, idx.long())
                if axis is None
                else weight.index_select(axis, idx)
            )
            swapped.append((weight, saved, now))
            _write(weight, saved, old)
        for name, base in info.dense_base.items():
            p = params[name]
            swapped.append((p, Saved(None, base), p.detach().clone()))
            p.copy_(shard_like(base, p))  # a sharded parameter (FSDP2) takes its own shard
    try:
        yield model
    finally:
        drop_gathered(model)  # the body's forward gathered the base values
        with torch.no_grad():
            for tensor, saved, now in reversed(swapped):
                _write(tensor, saved, now)
        for st in added:
            st.active = True


def _write(tensor: torch.Tensor, where: Saved, values: torch.Tensor) -> None:
    idx, _, axis = where
    values = values.to(tensor.device, tensor.dtype)
    if idx is None:
        tensor.copy_(values)
    elif axis is None:
        tensor.view(-1).index_copy_(0, idx.long(), values)
    else:
        tensor.index_copy_(axis, idx.to(tensor.device), values)
