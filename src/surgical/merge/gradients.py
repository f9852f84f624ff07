"""Values that vary over the layers (mergekit's gradients): a list of anchors instead of a number.

A weight or a float option of a merge (``t: [0, 0.5, 1]``) may be a list of anchor values, spread
evenly from the first numbered layer (position 0) to the last (position 1) and interpolated
linearly in between: a tensor of layer ``i`` of ``L`` (its name's first dotted integer, as in
``encoder.layer.3.`` or ``model.layers.10.``) sits at ``i / (L - 1)``. Tensors outside the
numbered layers have no position of their own: embeddings (a name containing ``embed``, ``wte``
or ``wpe``) take position 0, every other one (final norm, pooler, head) position 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from surgical.core.errors import SurgicalError
from surgical.merge.registry import MERGE_METHODS

LAYER_INDEX = re.compile(r"\.(\d+)\.")
EARLY = ("embed", "wte", "wpe")


def is_gradient(value: Any) -> bool:
    """Whether ``value`` is a list of anchors rather than one value."""
    return isinstance(value, (list, tuple))


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """Each tensor name's position in [0, 1] along the numbered layers (see the module doc)."""
    index = {n: int(m.group(1)) for n in names if (m := LAYER_INDEX.search(f".{n}."))}
    top = max(index.values(), default=0)
    out = {}
    for n in names:
        if n in index:
            out[n] = index[n] / top if top else 0.0
        else:
            out[n] = 0.0 if any(e in n.lower() for e in EARLY) else 1.0
    return out


def interpolate(anchors: Sequence[float], x: float) -> float:
    """The piecewise-linear value at ``x`` in [0, 1] of anchors spread evenly over [0, 1]."""
    if len(anchors) == 1:
        return float(anchors[0])
    pos = x * (len(anchors) - 1)
    i = min(int(math.floor(pos)), len(anchors) - 2)
    f = pos - i
    return float(anchors[i] * (1 - f) + anchors[i + 1] * f)


def check_anchors(value: Any, where: str) -> list[float]:
    """A gradient's anchors as floats (finite, at least one), or a SurgicalError naming ``where``."""
    if len(value) == 0:
        raise SurgicalError(f"{where} is an empty list", "Give one value, or a list of anchors")
    out = []
    for a in value:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise SurgicalError(f"{where} must hold finite numbers, got {a!r}", "Fix the value")
        out.append(float(a))
    return out


def split_options(
    method: str, given: Mapping[str, Any], where: str = ""
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The method's options resolved (``fixed``, gradients at their defaults) and the gradients
    (float options given as lists of anchors, each anchor checked against the option's range)."""
    entry = MERGE_METHODS.entry(method)
    kinds = {o.name: o for o in entry.options}
    fixed, gradients = {}, {}
    for key, value in given.items():
        if not is_gradient(value):
            fixed[key] = value
            continue
        label = f"{where}{key}" if where else f"option {key!r} of merge method {method!r}"
        if key not in kinds:
            fixed[key] = value  # resolve names the unknown option
            continue
        if kinds[key].type is not float:
            raise SurgicalError(
                f"{label} is a list, but only float options can vary over the layers", "Give one value"
            )
        anchors = check_anchors(value, label)
        for a in anchors:
            kinds[key].check(a, label)
        gradients[key] = anchors
    return MERGE_METHODS.resolve(method, fixed, where), gradients
