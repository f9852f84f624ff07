"""The scoring machinery that the gradient-based criteria share.

Each parameter's
``transform(grad)`` is added to its score the moment the gradient is accumulated, and the gradient
is freed at once, so scoring holds one extra copy of the targeted weights (the scores), never a
full set of gradients next to them. A transform may also reduce a gradient to a scalar (per-tensor
criteria such as ``rgn`` and ``fim_layer``), in which case scoring holds no extra copy at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from surgical.core.errors import SurgicalError
from surgical.core.loss import LossFn, batch_to, model_loss
from surgical.core.runtime import progress
from surgical.select.criteria import ScoreContext


def calibration_batches(ctx: ScoreContext):
    """The first ``ctx.max_batches`` batches of ``ctx.data``; a SurgicalError if there is no data."""
    if ctx.data is None:
        raise SurgicalError("this criterion needs calibration data", "Pass data=<iterable of batches>")
    return itertools.islice(iter(ctx.data), ctx.max_batches)


def accumulate_gradients(
    ctx: ScoreContext,
    transform: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: LossFn = model_loss,
) -> tuple[dict[str, torch.Tensor], int]:
    """Runs forward+backward over the calibration batches, summing ``transform(grad)`` per param.

    Args:
        ctx: The scoring context (model, targeted parameters, data, ``max_batches``).
        transform: Maps one batch's fp32 gradient of a parameter to its score contribution: a
            tensor of the parameter's shape, or a 0-d tensor for per-tensor scores.
        loss_fn: Computes the scalar loss of a batch (default: the model's own ``.loss``).

    Returns:
        The sums (fp32, on the parameters' device) and the number of batches used. Only the
        targeted parameters require grad while scoring; every parameter's ``requires_grad``, its
        ``.grad`` (left ``None``) and the model's train/eval mode are restored.

    Raises:
        SurgicalError: no data, no batches, or a batch without a loss.
    """
    model, params = ctx.model, ctx.params
    batches = calibration_batches(ctx)
    device = next(iter(params.values())).device
    sums: dict[str, torch.Tensor] = {}
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    handles = []

    def make_hook(name):
        def hook(p):
            contribution = transform(p.grad.float())
            if name in sums:
                sums[name].add_(contribution)
            else:  # clone: a transform may return the gradient itself, which is about to be freed
                sums[name] = contribution.detach().clone()
            p.grad = None

        return hook

    used = 0
    try:
        model.eval()  # no dropout: scores depend on the data, not on noise
        for n, p in model.named_parameters():
            p.requires_grad_(n in params)
        for n, p in params.items():
            handles.append(p.register_post_accumulate_grad_hook(make_hook(n)))
        with progress(disable=not ctx.progress) as bar:
            task = bar.add_task("scoring", total=ctx.expected_batches, info="")
            for batch in batches:
                loss = loss_fn(model, batch_to(batch, device))
                loss.backward()
                used += 1
                bar.update(task, advance=1, info=f"loss {loss.item():.3f}")
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = None
        model.train(was_training)
    if used == 0:
        raise SurgicalError("the calibration data yielded no batches", "Pass a non-empty dataset")
    ctx.used = used
    for n, p in params.items():  # a parameter the loss does not reach scores zero
        if n not in sums:
            sums[n] = torch.zeros_like(transform(torch.zeros(p.shape, device=device)))
    return sums, used
