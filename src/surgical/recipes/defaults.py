"""The default recipe of ``surgical train`` and ``surgical select``, chosen by the benchmarks.

When a config leaves them unset, what is selected and what trains densely follow the rows the
quality benchmark (MiniLM, classification) and the forgetting benchmark (SmolLM2, chat SFT)
chose on validation (docs/benchmarks.md):

- ``selection.targets``: the Linear weights inside the numbered transformer blocks (attention
  and MLP projections), not the heads, the pooler or the embeddings;
- ``selection.always`` (trained densely, outside the budget): for classification the new task
  head, every bias and every normalisation layer; for causal LM the final normalisation layer
  (the one outside the blocks);
- the budget (when no density, count or byte budget is given): 1.83% of the targeted weights for
  classification (with the dense values, 1% of MiniLM's parameters: the quality benchmark's best
  row of the default criterion, ``gradient``, on validation), 1% for causal LM;
- ``training.lr``: 2e-3 for classification, 1e-4 for causal LM (at 1e-3 the 1% entries of
  SmolLM2 moved the model far from its base: KL 0.84 nats per token).

An explicit value replaces the default: ``targets: []`` selects from every Linear weight,
``always: []`` trains nothing densely. The criterion stays ``gradient`` for every task: on MiniLM
``lottery`` at the same budget and lr scored higher on validation (the demo uses it), but its
warm-up costs dense fine-tuning memory for the targets, and one benchmark is too few to change
the default criterion of every model.
"""

from __future__ import annotations

import re

from torch import nn

from surgical.core.names import split_layer

#: training.lr when the config leaves it unset, by task (chosen on validation by the benchmarks)
DEFAULT_LR = {"classification": 2e-3, "causal_lm": 1e-4}
#: The benchmark rows these defaults are (benchmarks/quality.py, benchmarks/forgetting.py)
ROWS = {"classification": "surgical-gradient-1pct-of-encoder", "causal_lm": "surgical-gradient-1pct"}
#: selection.density when no budget is given, by task (the benchmarks' rows)
DEFAULT_DENSITY = {"classification": 0.0183, "causal_lm": 0.01}


def _linears(model: nn.Module) -> list[str]:
    """Names of the modules that hold a Linear weight (``nn.Linear`` and GPT-2's ``Conv1D``)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(
        ("RMSNorm", "LayerNorm", "Norm")
    )


def default_targets(model: nn.Module) -> list[str]:
    """One pattern for the Linear weights inside the numbered blocks (none: every Linear weight)."""
    by_prefix: dict[str, set[str]] = {}
    for name in _linears(model):
        prefix, rest = split_layer(f"{name}.weight")
        if prefix is not None:
            by_prefix.setdefault(prefix.rsplit(".", 1)[0], set()).add(rest)
    if not by_prefix:
        return []
    patterns = [
        f"^{re.escape(stack)}\\.\\d+\\.({'|'.join(re.escape(r) for r in sorted(rests))})\\.weight$"
        for stack, rests in sorted(by_prefix.items())
    ]
    return ["re:" + "|".join(f"(?:{p})" for p in patterns)]


def default_always(model: nn.Module, task: str) -> list[str]:
    """What trains densely by default: see the module docstring."""
    norms = [n for n, m in model.named_modules() if n and _is_norm(m)]
    if task == "causal_lm":  # the final norm: a norm module outside the numbered blocks
        return [n for n in norms if split_layer(f"{n}.weight")[0] is None and _has_params(model, n)]
    base = getattr(model, "base_model_prefix", "")
    head = [n for n, _ in model.named_children() if n != base and _has_params(model, n)]
    kinds = sorted({n.rsplit(".", 1)[-1] for n in norms})
    has_bias = any(n.endswith(".bias") for n, _ in model.named_parameters())
    return [*head, *(["bias"] if has_bias else []), *kinds]


def _has_params(model: nn.Module, module_name: str) -> bool:
    return next(model.get_submodule(module_name).parameters(), None) is not None
