"""``fisher``: per-value weights from the importance scores the deltas carry (Fisher merging).

For every value, ``sum_i w_i F_i v_i / sum_i w_i F_i``, where ``F_i`` is delta i's score at that
value (the diagonal Fisher its selection computed: ``sg.select(method="fisher")``, attached by
``sg.extract(model, scores=plan)``; any criterion's scores work the same way). A delta without a
score for a value it changes counts with its plain weight there if ``missing`` is ``"weight"``,
or is refused (``"error"``). Where no delta has a positive score, the weighted mean is used.
"""

from __future__ import annotations

import torch

from surgical.core.errors import SurgicalError
from surgical.core.registry import Option
from surgical.merge.registry import MERGE_METHODS
from surgical.merge.support import TensorMerge


@MERGE_METHODS.register(
    "fisher",
    help="per-value weights w_i F_i from the scores the deltas carry (Fisher merging)",
    options=[
        Option(
            "missing",
            str,
            "weight",
            "a delta without scores: 'weight' (plain weight) or 'error'",
            choices=("weight", "error"),
        ),
    ],  # fmt: skip
    reference="https://arxiv.org/abs/2111.09832",
    needs_scores=True,
    nonnegative_weights=True,
)
def fisher(t: TensorMerge) -> torch.Tensor:
    """sum_i w_i F_i v_i / sum_i w_i F_i per value (weighted mean where every F is zero)."""
    w = t.weights[:, None]
    changed = t.values != 0
    if t.importance is None or t.scored is None or not bool(t.scored[t.present].all()):
        if t.options["missing"] == "error":
            raise SurgicalError(
                f"a delta changes {t.name!r} without importance scores",
                "Extract the deltas with sg.extract(model, scores=plan), or pass missing='weight'",
            )
    imp = t.importance if t.importance is not None else torch.zeros_like(t.values)
    if t.scored is not None:  # deltas without scores count with their plain weight
        imp = torch.where(t.scored[:, None], imp, torch.ones_like(imp))
    else:
        imp = torch.ones_like(imp)
    num = (w * imp * t.values).sum(0)
    den = (w * imp * changed).sum(0)
    mean_den = (w * changed).sum(0)
    mean = torch.where(mean_den != 0, (w * t.values).sum(0) / torch.where(mean_den != 0, mean_den, 1), 0.0)
    return torch.where(den != 0, num / torch.where(den != 0, den, 1), mean)
