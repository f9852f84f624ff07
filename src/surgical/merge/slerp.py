"""``slerp``: spherical interpolation between two changes, tensor by tensor.

Two task vectors of one base, per tensor: with ``omega`` the angle between the changes ``a`` and
``b``, the result is ``sin((1 - t) omega) / sin(omega) a + sin(t omega) / sin(omega) b``: it
follows the arc between their directions instead of the chord, so that two changes that point
apart are not shrunk towards zero at ``t = 0.5`` as their mean is. This is what mergekit's
``nuslerp`` does with a base model (slerp of the task vectors), per whole tensor; its plain
``slerp`` interpolates the full weights, which would need a dense copy of the base here. Where
the changes are (nearly) parallel or opposite (``sin(omega)`` below ``1e-6``) or one of them is
zero, the arc is undefined or flat and the linear interpolation ``(1 - t) a + t b`` is used.
Weights are ignored (``t`` sets the mix; a rule can set it per tensor). Values outside the union
of the supports are zero in both, so the angle over the union is the angle of the whole tensors.
"""

from __future__ import annotations

import math

import torch

from surgical.core.registry import Option
from surgical.merge.registry import MERGE_METHODS
from surgical.merge.support import TensorMerge

FLAT = 1e-6  # below this sin(omega), the linear interpolation


@MERGE_METHODS.register(
    "slerp",
    help="spherical interpolation between two changes by t (per tensor; mergekit's nuslerp with a base)",
    options=[Option("t", float, 0.5, "0: the first change, 1: the second", low=0, high=1)],
    reference="https://dl.acm.org/doi/10.1145/325165.325242",
    min_inputs=2,
    max_inputs=2,
)
def slerp(t: TensorMerge) -> torch.Tensor:
    """The arc between the two changes at ``t`` (linear where the arc is undefined)."""
    a, b = t.values.double()
    x = t.options["t"]
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return ((1 - x) * a + x * b).float()
    cos = max(-1.0, min(1.0, float(a @ b) / (na * nb)))
    omega = math.acos(cos)
    s = math.sin(omega)
    if s < FLAT:
        return ((1 - x) * a + x * b).float()
    return (math.sin((1 - x) * omega) / s * a + math.sin(x * omega) / s * b).float()
