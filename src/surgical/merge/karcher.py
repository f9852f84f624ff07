"""``karcher``: the Riemannian (Karcher) mean of the changes' directions on the sphere, at their
mean length, tensor by tensor.

Each input's change ``v_i`` is split into a length ``r_i`` and a direction ``u_i``. The mean
direction ``x`` minimises the weighted sum of squared arc lengths to the ``u_i``; it is found by
the fixed-point iteration: map every ``u_i`` to the tangent space at ``x`` (``log_x(u_i) = theta_i
/ sin(theta_i) (u_i - cos(theta_i) x)``, ``theta_i`` the angle between them), average those by
weight, step along the average (``exp_x``), until the step is shorter than ``tol`` or after
``max_iter`` steps. The result is ``sum_i w_i r_i`` times ``x``, weights (>= 0) normalized to sum to one.
With two inputs of equal weight it is slerp's midpoint direction; with one direction it is that
direction. An input that does not change a tensor has no direction there and is left out of that
tensor's mean (as the other disjoint means leave it out). This is mergekit's ``karcher`` on task
vectors (theirs averages full weights, which would need a dense copy of the base here).
"""

from __future__ import annotations

import math

import torch

from surgical.core.registry import Option
from surgical.merge.registry import MERGE_METHODS
from surgical.merge.support import TensorMerge

FLAT = 1e-12  # below this sin(theta), the direction lies on x (or opposite it): no tangent step


@MERGE_METHODS.register(
    "karcher",
    help="the Riemannian mean of the changes' directions at their mean length (per tensor)",
    options=[
        Option("max_iter", int, 10, "most fixed-point steps", low=1),
        Option("tol", float, 1e-5, "stop when the tangent step is shorter than this", low=0, low_open=True),
    ],
    reference="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
    min_inputs=2,
    nonnegative_weights=True,
)
def karcher(t: TensorMerge) -> torch.Tensor:
    """Fixed-point iteration on the unit sphere; weights normalized over the inputs that change it."""
    v = t.values.double()
    r = v.norm(dim=1)
    live = r > 0
    w = t.weights.double()[live]
    u = v[live] / r[live, None]
    x = (w[:, None] * u).sum(0)  # zeros when no input changes this tensor
    # nothing changed, zero weights, or directions that cancel: no mean direction
    if float(w.sum()) == 0 or float(x.norm()) < FLAT * float(w.sum()):
        return torch.zeros(v.shape[1], dtype=torch.float32)
    w = w / w.sum()
    length = float((w * r[live]).sum())
    x = x / x.norm()
    for _ in range(t.options["max_iter"]):
        cos = (u @ x).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        sin = torch.sin(theta)
        factor = torch.where(sin > FLAT, theta / torch.where(sin > FLAT, sin, 1.0), torch.ones_like(sin))
        step = (w[:, None] * factor[:, None] * (u - cos[:, None] * x)).sum(0)
        size = float(step.norm())
        if size < t.options["tol"]:
            break
        x = math.cos(size) * x + math.sin(size) * (step / size)
        x = x / x.norm()
    return (length * x).float()
