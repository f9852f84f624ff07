"""Mixture-of-experts parameters, recognised from names and shapes.

Two layouts exist:

- **fused**: an experts module (its name ends in a word containing ``experts``, e.g.
  ``model.layers.0.mlp.experts``) holds every expert in 3-D parameters of shape (experts, ...),
  as transformers 5 stores Mixtral, Qwen-MoE and others (``gate_up_proj``, ``down_proj``). Expert
  ``e`` is row ``e`` (dim 0) of each of them.
- **a ModuleList of expert modules**: ``...experts.N.<module>.weight``; expert ``N`` is every
  parameter under ``...experts.N``.

Also Expert-Specialized Fine-Tuning (ESFT, Wang et al. 2024): :func:`expert_routing` measures how
the task's tokens are routed (each expert's mean gate score and share of token selections), and
:func:`esft_plan` trains, per layer, the most-routed experts until a cumulative share is reached.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.loss import batch_to
from surgical.select.plan import Plan

_LIST_EXPERT = re.compile(r"^(.*?(?:^|\.)\w*experts\.\d+)\.")


def _is_experts_module(module_name: str) -> bool:
    return "experts" in module_name.rpartition(".")[2]


def is_fused_expert(name: str, shape: Sequence[int]) -> bool:
    """Whether parameter ``name`` of ``shape`` is a fused expert tensor: 3-D, held directly by an
    experts module."""
    return len(shape) == 3 and _is_experts_module(name.rpartition(".")[0])


def fused_experts_module(name: str) -> str:
    """The experts module that holds the fused expert tensor ``name``."""
    return name.rpartition(".")[0]


def listed_expert(name: str) -> str | None:
    """The expert module (``...experts.N``) a parameter of a ModuleList of experts belongs to, or
    None."""
    m = _LIST_EXPERT.match(name)
    return m.group(1) if m else None


def fused_expert_parameters(model: nn.Module) -> list[str]:
    """Names of every fused expert tensor of ``model`` (floating, 3-D, held by an experts module)."""
    out = []
    for mname, module in model.named_modules():
        if not _is_experts_module(mname):
            continue
        for pname, p in module._parameters.items():
            if p is not None and p.is_floating_point() and p.dim() == 3:
                out.append(f"{mname}.{pname}" if mname else pname)
    return out


def is_expert_parameter(name: str, shape: Sequence[int] | torch.Size) -> bool:
    """Whether ``name`` belongs to one expert (a fused tensor's rows, or a listed expert module)."""
    return is_fused_expert(name, tuple(shape)) or listed_expert(name) is not None


# ---------------------------------------------------------------------------- ESFT routing scores

ROUTER_NAMES = ("gate", "router")


def experts_modules(model: nn.Module) -> dict[str, int]:
    """Every experts module of ``model`` (fused, or a ModuleList of experts) -> its expert count."""
    out = {}
    for mname, module in model.named_modules():
        if not _is_experts_module(mname):
            continue
        if isinstance(module, nn.ModuleList) and len(module):
            out[mname] = len(module)
        else:
            fused = [p for p in module._parameters.values() if p is not None and p.dim() == 3]
            if fused:
                out[mname] = int(fused[0].shape[0])
    return out


def find_router(model: nn.Module, experts: str, routers: dict[str, str] | None = None) -> str:
    """The router that feeds the experts module ``experts``: ``routers[experts]`` if given, else a
    sibling named ``gate`` or ``router`` (Mixtral, Qwen-MoE, OLMoE, DeepSeek, Switch)."""
    if routers and experts in routers:
        return routers[experts]
    parent = experts.rpartition(".")[0]
    for name in ROUTER_NAMES:
        full = f"{parent}.{name}" if parent else name
        try:
            model.get_submodule(full)
        except AttributeError:
            continue
        return full
    raise SurgicalError(
        f"found no router beside the experts module {experts!r} (a sibling named gate or router)",
        "Name it: routers={'<experts module>': '<router module>'}",
    )


def _top_k(model: nn.Module, router: nn.Module, parent: nn.Module) -> int:
    for holder in (router, parent):
        k = getattr(holder, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    return int(k) if k else 1


def _routing(output, experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate scores, chosen mask), both (tokens, experts), from a router's output: the (logits,
    scores, indices) a transformers 5 router returns, or logits (softmax, then the top k)."""
    if isinstance(output, (tuple, list)) and len(output) == 3 and not output[2].is_floating_point():
        _, scores, indices = output
        scores, indices = (
            scores.reshape(-1, indices.shape[-1]).float(),
            indices.reshape(-1, indices.shape[-1]),
        )
    else:
        logits = output[0] if isinstance(output, (tuple, list)) else output
        probs = torch.softmax(logits.reshape(-1, experts).float(), -1)
        scores, indices = torch.topk(probs, top_k, dim=-1)
    gate = torch.zeros(indices.shape[0], experts, device=indices.device)
    gate.scatter_(1, indices.long(), scores)
    chosen = torch.zeros_like(gate).scatter_(1, indices.long(), 1.0)
    return gate, chosen


@torch.no_grad()
def expert_routing(
    model: nn.Module,
    data: Iterable[Any],
    *,
    max_batches: int = 16,
    routers: dict[str, str] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """How the task's tokens are routed, per experts module (ESFT's two relevance scores).

    Returns ``{experts module: {"gate": ..., "token": ...}}``, each a float64 tensor of one share
    per expert that sums to 1 over the module: ``gate`` the expert's share of the summed gate
    scores (its mean gate score, a token that did not choose it counting 0), ``token`` its share
    of the token selections (how often it is among a token's top k). Every token the router sees
    counts, padding included. The model is run in eval mode under ``no_grad`` and left as it was.
    """
    found = experts_modules(model)
    if not found:
        raise SurgicalError(
            "the model has no experts module (fused 3-D expert tensors, or a ModuleList named experts)",
            "Routing scores need a mixture-of-experts model",
        )
    device = next(model.parameters()).device
    sums = {
        name: [torch.zeros(e, dtype=torch.float64), torch.zeros(e, dtype=torch.float64)]
        for name, e in found.items()
    }
    handles = []
    for name, count in found.items():
        rname = find_router(model, name, routers)
        router = model.get_submodule(rname)
        k = _top_k(model, router, model.get_submodule(name.rpartition(".")[0]) if "." in name else model)

        def hook(module, args, output, name=name, count=count, k=k):
            gate, chosen = _routing(output, count, k)
            sums[name][0] += gate.sum(0).double().cpu()
            sums[name][1] += chosen.sum(0).double().cpu()

        handles.append(router.register_forward_hook(hook))
    was_training = model.training
    used = 0
    try:
        model.eval()
        for batch in itertools.islice(iter(data), max_batches):
            model(**batch_to(batch, device))
            used += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if used == 0:
        raise SurgicalError("the calibration data yielded no batches", "Pass a non-empty dataset")
    out = {}
    for name, (gate, token) in sums.items():
        out[name] = {
            "gate": gate / gate.sum() if gate.sum() > 0 else gate,
            "token": token / token.sum() if token.sum() > 0 else token,
        }
    return out


def esft_plan(
    model: nn.Module,
    data: Iterable[Any],
    *,
    score: str = "gate",
    share: float = 0.2,
    max_batches: int = 16,
    routers: dict[str, str] | None = None,
) -> Plan:
    """Expert-Specialized Fine-Tuning (ESFT): per experts module, the experts with the highest
    routing share on the task, taken in order until their cumulative ``share`` is reached.

    Args:
        model: A mixture-of-experts model (fused expert tensors or a ModuleList of experts).
        data: Task batches (dicts the model accepts).
        score: ``"gate"`` (the experts' mean gate score, ESFT-Gate) or ``"token"`` (their share of
            token selections, ESFT-Token); see :func:`expert_routing`.
        share: Cumulative share in (0, 1] to reach in every layer (ESFT uses 0.1 to 0.2).
        max_batches: Batches of ``data`` to route.
        routers: Experts module -> router module, where the router is not a sibling named
            ``gate`` or ``router``.

    Returns:
        A :class:`Plan` that trains only the chosen experts: their rows of every fused expert
        tensor (``rows``), or every parameter of a listed expert module (``dense``). Nothing else
        trains; add heads or other parameters to ``plan.dense`` if wanted.
    """
    if score not in ("gate", "token"):
        raise SurgicalError(f"unknown ESFT score {score!r}", "Use 'gate' or 'token'")
    if not 0.0 < float(share) <= 1.0:
        raise SurgicalError(f"share must be in (0, 1], got {share}", "Pass e.g. 0.2")
    routing = expert_routing(model, data, max_batches=max_batches, routers=routers)
    params = dict(model.named_parameters())
    plan = Plan()
    chosen_by_module: dict[str, list[int]] = {}
    for name, scores in routing.items():
        s = scores[score]
        order = torch.sort(s, descending=True, stable=True).indices
        cumulative = torch.cumsum(s[order], 0)
        n = int((cumulative < float(share) - 1e-12).sum()) + 1  # up to and including the one that reaches it
        chosen = sorted(order[: min(n, s.numel())].tolist())
        chosen_by_module[name] = chosen
        module = model.get_submodule(name)
        if isinstance(module, nn.ModuleList):
            for e in chosen:
                prefix = f"{name}.{e}."
                plan.dense.extend(
                    n for n, p in params.items() if n.startswith(prefix) and p.is_floating_point()
                )
        else:
            for pname, p in module._parameters.items():
                if p is not None and p.dim() == 3 and p.is_floating_point():
                    plan.rows[f"{name}.{pname}"] = torch.tensor(chosen, dtype=torch.int64)
    plan.shapes = {n: tuple(params[n].shape) for n in [*plan.sparse_names, *plan.dense]}
    selected = sum(int(r.numel()) * (params[n][0].numel()) for n, r in plan.rows.items())
    selected += sum(params[n].numel() for n in plan.dense)
    plan.meta = {
        "method": f"esft_{score}",
        "share": float(share),
        "granularity": "expert",
        "selected": selected,
        "targeted": sum(
            p.numel() for n, p in params.items() if is_expert_parameter(n, p.shape) and p.is_floating_point()
        ),
        "experts": chosen_by_module,
        "routing": {n: [float(v) for v in s[score]] for n, s in routing.items()},
        "max_batches": max_batches,
    }
    return plan
