"""``merge``: combine deltas by a registered method, on the union of their supports.

Every added change (entries, rows, columns, dense) is merged tensor by tensor through the
method's per-tensor function (:mod:`surgical.merge.registry`); the result is sparse where the
inputs were, so merging costs what the changed values cost, never a dense copy of the base.
Replaced tensors (``full``: a freshly initialised head has no base to add to) are not task
vectors: identical replacements are kept, different ones are averaged by weight (the uniform
soup of the heads), and ``wise_ft`` keeps them as they are.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from surgical.core.errors import SurgicalError
from surgical.core.patterns import as_patterns, matches
from surgical.delta.base import base_checks
from surgical.delta.delta import Delta
from surgical.merge.gradients import check_anchors, interpolate, is_gradient, layer_positions, split_options
from surgical.merge.registry import MERGE_METHODS
from surgical.merge.support import stack, unstack


def check_compatible(deltas: Sequence[Delta], labels: Sequence[str] | None = None) -> None:
    """Raises a SurgicalError unless the deltas fit one base: same shapes for shared names, and
    base fingerprints that agree where two deltas record one over the same parameters."""
    labels = list(labels or [f"delta {i + 1}" for i in range(len(deltas))])
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for d, label in zip(deltas, labels, strict=True):
        for name, shape in d.shapes.items():
            if name in shapes and tuple(shapes[name][0]) != tuple(shape):
                raise SurgicalError(
                    f"{label} has {name!r} as {tuple(shape)}, {shapes[name][1]} as {tuple(shapes[name][0])}",
                    "Merge deltas of the same base model",
                )
            shapes.setdefault(name, (tuple(shape), label))
    seen: dict[tuple[str, ...], tuple[str, str]] = {}
    for d, label in zip(deltas, labels, strict=True):
        for fp, excludes in base_checks(d):
            key = tuple(excludes)
            if key in seen and seen[key][0] != fp:
                raise SurgicalError(
                    f"{label} was made on another base model than {seen[key][1]} (fingerprint {fp} vs "
                    f"{seen[key][0]})",
                    "Merge deltas of the same base model",
                )
            seen.setdefault(key, (fp, label))


RULE_KEYS = ("match", "weights", "options")


def check_weights(weights: Any, n: int, where: str) -> list[float | list[float]]:
    """``weights`` as ``n`` finite floats (or lists of anchors: a weight that varies over the
    layers, :mod:`surgical.merge.gradients`), or a SurgicalError naming ``where``."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise SurgicalError(
            f"{where} must be a list of {n} numbers, got {weights!r}", "Pass one weight per input"
        )
    if len(weights) != n:
        raise SurgicalError(f"{n} inputs but {len(weights)} {where}", "Pass one weight per input")
    return [check_weight(x, where) for x in weights]


def check_weight(x: Any, where: str) -> float | list[float]:
    """One input's weight: a finite float, or a list of anchors (a weight that varies over the
    layers); a SurgicalError naming ``where`` otherwise."""
    if is_gradient(x):
        return check_anchors(x, where)
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise SurgicalError(f"{where}: a weight must be a finite number, got {x!r}", "Fix the weight")
    return float(x)


def check_nonnegative(method: str, lists: list[tuple[str, list]]) -> None:
    """A SurgicalError naming the first negative weight (or anchor) for a method that averages
    by weight, where a negative weight has no meaning."""
    for where, weights in lists:
        for i, x in enumerate(weights):
            if any(v < 0 for v in (x if is_gradient(x) else [x])):
                raise SurgicalError(
                    f"{method} takes weights >= 0, but {where}[{i}] is {x!r}",
                    "Use task_arithmetic or ties to subtract a change",
                )


def check_rules(rules: Any, method: str, n: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-tensor rules checked and completed: each ``{"match": [patterns], "weights": [n floats] or
    None, "options": the method's options with the rule's overrides}``; a SurgicalError names the
    first problem (``rules[i]...``)."""
    if rules is None:
        return []
    if isinstance(rules, Mapping) or not isinstance(rules, Sequence):
        raise SurgicalError("rules must be a list of {match, weights, options}", "Write rules as a list")
    out = []
    for i, rule in enumerate(rules):
        where = f"rules[{i}]"
        if not isinstance(rule, Mapping):
            raise SurgicalError(f"{where} must be a mapping with match, weights, options", "Fix the rule")
        unknown = sorted(set(rule) - set(RULE_KEYS))
        if unknown or "match" not in rule:
            raise SurgicalError(
                f"{where} has {'unknown keys ' + ', '.join(map(str, unknown)) if unknown else 'no match'}",
                "A rule has match (patterns) and weights and/or options",
            )
        patterns = as_patterns(rule["match"]) if isinstance(rule["match"], (str, list, tuple)) else []
        if not patterns:
            raise SurgicalError(f"{where}.match must name tensor patterns", "e.g. match: '*.attention.*'")
        if "weights" not in rule and "options" not in rule:
            raise SurgicalError(f"{where} changes nothing", "Give it weights, options or both")
        w = check_weights(rule["weights"], n, f"{where}.weights") if "weights" in rule else None
        given = rule.get("options") or {}
        if not isinstance(given, Mapping):
            raise SurgicalError(f"{where}.options must be a mapping", "e.g. options: {density: 0.5}")
        opts, gradients = split_options(method, {**options, **given}, f"{where}.options.")
        out.append({"match": patterns, "weights": w, "options": opts, "gradients": gradients})
    return out


def rule_for(name: str, rules: list[dict[str, Any]]) -> int | None:
    """The index of the first rule whose patterns match ``name``, or None."""
    return next((i for i, r in enumerate(rules) if any(matches(name, p) for p in r["match"])), None)


def assign_rules(
    names: list[str], rules: list[dict[str, Any]]
) -> tuple[dict[str, int | None], list[list[str]]]:
    """Each tensor name's rule (the first that matches, or None) and each rule's tensors; a rule
    that takes no tensor (it matches none, or only tensors an earlier rule takes) is an error."""
    chosen = {name: rule_for(name, rules) for name in names}
    hits = [[n for n in names if chosen[n] == i] for i in range(len(rules))]
    for i, r in enumerate(rules):
        if not hits[i]:
            shadowed = any(matches(n, p) for n in names for p in r["match"])
            raise SurgicalError(
                f"rules[{i}].match {r['match']} matches "
                + (
                    "only tensors an earlier rule takes (the first match wins)"
                    if shadowed
                    else "no tensor of the inputs"
                ),
                "Reorder the rules"
                if shadowed
                else f"Use a glob over tensor names such as {names[0]!r} (or 're:REGEX')",
            )
    return chosen, hits


def merge(
    deltas: Sequence[Delta],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    *,
    rules: Sequence[Mapping[str, Any]] | None = None,
    **options: Any,
) -> Delta:
    """Merges deltas made on one base into one delta.

    Args:
        deltas: The inputs (at least one; some methods need two).
        method: A registered merge method (``surgical list merge-methods``): linear,
            task_arithmetic, ties, dare, breadcrumbs, della, model_stock, slerp, wise_ft, fisher.
        weights: One weight per delta (default 1 each); a list of anchors instead of a number
            varies over the layers (mergekit's gradients, :mod:`surgical.merge.gradients`).
        rules: Per-tensor overrides (mergekit's filters), first match wins: each a mapping with
            ``match`` (a pattern or list of patterns over tensor names: globs, or ``re:REGEX``)
            and ``weights`` (one per delta) and/or ``options`` (the method's, over ``**options``).
            Tensors no rule matches use ``weights`` and ``**options``. Every rule must match a
            tensor of the inputs.
        **options: The method's declared options (e.g. ``density``, ``seed``, ``alpha``); a
            float option given as a list of anchors varies over the layers, as weights can.

    Returns:
        A new Delta; merging one delta with ``linear`` returns its changes unchanged. Its
        ``meta["merge"]`` records the method, weights, options and rules (with the tensors each
        matched), and where anything varies over the layers, each tensor's position and values
        (``per_tensor``).

    Raises:
        SurgicalError: unknown method or option, wrong number of weights or inputs, a bad rule or
            one that matches no tensor, deltas of different bases or shapes, or a tensor
            replaced by one delta and added by another.
    """
    entry = MERGE_METHODS.entry(method)
    opts, gradients = split_options(method, options)
    deltas = list(deltas)
    if not deltas:
        raise SurgicalError("nothing to merge", "Pass at least one delta")
    lo, hi = entry.extra.get("min_inputs", 1), entry.extra.get("max_inputs")
    if len(deltas) < lo or (hi is not None and len(deltas) > hi):
        need = f"exactly {hi}" if hi == lo or (hi is not None and lo == 1 and hi == 1) else f"at least {lo}"
        raise SurgicalError(f"{method} merges {need} delta(s), got {len(deltas)}", "Pass that many deltas")
    w = [1.0] * len(deltas) if weights is None else check_weights(weights, len(deltas), "weights")
    checked = check_rules(rules, method, len(deltas), options)
    if entry.extra.get("nonnegative_weights"):
        check_nonnegative(
            method,
            [("weights", w)] + [(f"rules[{i}].weights", r["weights"] or []) for i, r in enumerate(checked)],
        )
    check_compatible(deltas)
    names = list(dict.fromkeys(n for d in deltas for n in d.names()))
    chosen, hits = assign_rules(names, checked)
    fn = entry.obj
    out = Delta(meta=_merge_meta(deltas, method, w, {**opts, **gradients}))
    if checked:
        out.meta["merge"]["rules"] = [{**r, "tensors": h} for r, h in zip(checked, hits, strict=True)]
    varying = bool(gradients) or any(is_gradient(x) for x in w)
    varying |= any(r["gradients"] or any(is_gradient(x) for x in r["weights"] or ()) for r in checked)
    positions = layer_positions(names) if varying else {}
    per_tensor = {}
    for name in names:
        rule = checked[chosen[name]] if chosen[name] is not None else None
        w_n = rule["weights"] if rule and rule["weights"] is not None else w
        opts_n, grads_n = (rule["options"], rule["gradients"]) if rule else (opts, gradients)
        if varying:  # anchors -> this tensor's values at its layer position
            x = positions[name]
            w_n = [interpolate(v, x) if is_gradient(v) else v for v in w_n]
            opts_n = {**opts_n, **{k: interpolate(v, x) for k, v in grads_n.items()}}
            per_tensor[name] = {"position": round(x, 6), "weights": w_n, **{k: opts_n[k] for k in grads_n}}
        replaced = [i for i, d in enumerate(deltas) if name in d.full]
        if replaced:
            _merge_full(deltas, name, replaced, w_n, out, keep=entry.extra.get("keeps_full", False))
            continue
        t = stack(deltas, name, torch.tensor(w_n, dtype=torch.float32), opts_n)
        if entry.extra.get("needs_scores"):
            _attach_importance(t, deltas, name)
        unstack(t, fn(t).float(), out)
    if varying:
        out.meta["merge"]["per_tensor"] = per_tensor
    return out


def _attach_importance(t, deltas: list[Delta], name: str) -> None:
    """Lays each delta's importance scores for ``name`` out like its values (zeros if none)."""
    views = []
    for d in deltas:
        view = Delta(shapes={name: d.shapes.get(name, t.shape)})
        if name in d.names():
            kind = d.kind_of(name)
            stored = getattr(d, kind)[name]
            score = d.scores.get(name, torch.zeros_like(d.values_of(name), dtype=torch.float32))
            getattr(view, kind)[name] = (stored[0], score) if isinstance(stored, tuple) else score
        views.append(view)
    t.importance = stack(views, name, t.weights, {}).values if any(name in v.names() for v in views) else None
    t.scored = torch.tensor([name in d.scores for d in deltas])


def _merge_full(
    deltas: list[Delta], name: str, replaced: list[int], w: list[float], out: Delta, keep: bool
) -> None:
    """Replaced tensors: kept when identical (or by ``wise_ft``), else their weighted mean."""
    added = [i for i, d in enumerate(deltas) if name in d.names() and name not in d.full]
    if added:
        raise SurgicalError(
            f"delta {replaced[0] + 1} replaces {name!r} and delta {added[0] + 1} adds to it",
            "Merge deltas that train that tensor the same way",
        )
    tensors = [deltas[i].full[name].float() for i in replaced]
    out.shapes[name] = tuple(deltas[replaced[0]].shapes[name])
    if keep or all(torch.equal(tensors[0], t) for t in tensors[1:]):
        out.full[name] = tensors[0].clone()
        return
    ws = torch.tensor([w[i] for i in replaced])
    total = float(ws.sum())
    if total == 0:
        raise SurgicalError(f"the weights of the deltas replacing {name!r} sum to zero", "Change the weights")
    out.full[name] = sum(wi * t for wi, t in zip(ws.tolist(), tensors, strict=True)) / total


def _merge_meta(deltas: list[Delta], method: str, weights: list[float], options: dict) -> dict:
    base = copy.deepcopy(deltas[0].meta.get("base", {}))
    checks = []
    for d in deltas:
        for c in base_checks(d):
            if list(c) not in checks:
                checks.append([c[0], list(c[1])])
    if len(checks) > 1:
        base.pop("fingerprint", None)
        base.pop("fingerprint_excludes", None)
        base["checks"] = checks
    keep = ("plan", "training", "source", "ops", "merged_from")
    return {
        "base": base,
        "merged_from": [{k: d.meta[k] for k in keep if k in d.meta} for d in deltas],
        "merge": {"method": method, "weights": weights, "options": options},
    }


def interference(deltas: Sequence[Delta]) -> list[dict[str, Any]]:
    """Per tensor changed by two or more deltas: how much they overlap and disagree.

    Returns rows with ``name``, ``deltas`` (how many change it), ``kind`` (``"dense"`` when every
    one of them changes the whole tensor, such as a bias or LayerNorm trained densely, else
    ``"sparse"``), ``shared`` and ``union`` (how many values two or more of them change, and how
    many any of them changes), ``overlap`` (shared / union), ``sign_conflict`` (share of shared
    values whose signs differ between two deltas), ``cosine`` (mean pairwise cosine of the
    changes). Replaced tensors are skipped. :func:`interference_summary` sums the rows up.
    """
    check_compatible(deltas)
    rows = []
    names = list(dict.fromkeys(n for d in deltas for n in d.names()))
    for name in names:
        having = [d for d in deltas if name in d.names() and name not in d.full]
        if len(having) < 2:
            continue
        t = stack(having, name, torch.ones(len(having)), {})
        nz = t.values != 0
        shared = nz.sum(0) >= 2
        signs = torch.sign(t.values)
        conflict = shared & (signs.max(0).values > 0) & (signs.min(0).values < 0)
        v = t.values.double()
        norms = v.norm(dim=1)
        cos = [
            float(v[i] @ v[j] / (norms[i] * norms[j])) if norms[i] * norms[j] > 0 else 0.0
            for i in range(len(having))
            for j in range(i + 1, len(having))
        ]
        union = int(nz.any(0).sum())
        rows.append(
            {
                "name": name,
                "deltas": len(having),
                "kind": "dense" if all(name in d.dense for d in having) else "sparse",
                "shared": int(shared.sum()),
                "union": union,
                "overlap": int(shared.sum()) / max(1, union),
                "sign_conflict": int(conflict.sum()) / max(1, int(shared.sum())),
                "cosine": sum(cos) / len(cos),
            }
        )
    return rows


def interference_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """:func:`interference` rows summed up per kind (``"sparse"``, ``"dense"``): how many tensors,
    ``overlap`` over all their values (shared / union, so large tensors weigh more), and the
    per-tensor means of ``overlap``, ``sign_conflict`` and ``cosine``. Densely trained tensors
    overlap fully by construction; the sparse line is the one that says whether supports collide."""
    out = {}
    for kind in ("sparse", "dense"):
        part = [r for r in rows if r["kind"] == kind]
        if not part:
            continue
        keys = ("overlap", "sign_conflict", "cosine")
        mean = {f"mean_{k}": sum(r[k] for r in part) / len(part) for k in keys}
        union = sum(r["union"] for r in part)
        out[kind] = {"tensors": len(part), "overlap": sum(r["shared"] for r in part) / max(1, union), **mean}
    return out
