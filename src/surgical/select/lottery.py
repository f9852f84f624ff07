"""``lottery`` (LT-SFT): |change| of each entry after a short dense warm-up, then an exact rewind.

The targeted weights are trained densely for one step per calibration batch (the rest of the
model stays frozen), the score is |w_after - w_before|, and every weight and buffer is then
copied back from a saved copy, so the model is left bit-identical. Memory: like dense
fine-tuning of the targeted weights (saved copy + gradient + optimizer state), as in LT-SFT.

Options: ``lr`` (default 1e-4), ``optimizer`` (``"adamw"`` as in LT-SFT, or ``"sgd"``, whose
changes are proportional to the summed gradients), ``weight_decay`` (default 0).
"""

from __future__ import annotations

import torch

from surgical.core.errors import SurgicalError
from surgical.core.loss import batch_to, model_loss
from surgical.core.registry import Option
from surgical.core.runtime import progress
from surgical.select.criteria import CRITERIA, ScoreContext
from surgical.select.scoring import calibration_batches


def _optimizer(name: str, params: list[torch.nn.Parameter], lr: float, wd: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=False)
    return torch.optim.SGD(params, lr=lr, weight_decay=wd, foreach=False)


@CRITERIA.register(
    "lottery",
    help="|change| after a short dense warm-up, then an exact rewind (LT-SFT)",
    options=[
        Option("lr", float, 1e-4, "learning rate of the warm-up", low=0, low_open=True),
        Option("optimizer", str, "adamw", "warm-up optimizer", choices=("adamw", "sgd")),
        Option("weight_decay", float, 0.0, "weight decay of the warm-up", low=0),
    ],
)
def lottery_scores(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """|w after a dense warm-up - w before| per targeted entry; the model is rewound exactly."""
    opts = ctx.options
    model, params = ctx.model, ctx.params
    batches = calibration_batches(ctx)
    device = next(iter(params.values())).device
    before = {n: p.detach().clone() for n, p in params.items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    scores: dict[str, torch.Tensor] = {}
    steps = 0
    try:
        model.eval()  # deterministic warm-up: no dropout
        for n, p in model.named_parameters():
            p.requires_grad_(n in params)
        opt = _optimizer(opts["optimizer"], list(params.values()), opts["lr"], opts["weight_decay"])
        with progress(disable=not ctx.progress) as bar:
            task = bar.add_task("warm-up", total=ctx.expected_batches, info="")
            for batch in batches:
                loss = model_loss(model, batch_to(batch, device))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
                bar.update(task, advance=1, info=f"loss {loss.item():.3f}")
        del opt  # free the optimizer state before the scores are allocated
        if steps:
            scores = {n: (p.detach().float() - before[n].float()).abs() for n, p in params.items()}
    finally:
        with torch.no_grad():  # the rewind: copies are bit-exact whatever happened above
            for n, p in params.items():
                p.copy_(before[n])
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = None
        model.train(was_training)
    if steps == 0:
        raise SurgicalError("the calibration data yielded no batches", "Pass a non-empty dataset")
    ctx.used = steps
    return scores
