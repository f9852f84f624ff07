"""``gradient``: accumulated absolute gradient over calibration batches (SPEFT's best static score).

Each parameter's |grad| is added to its score the moment the gradient is accumulated, and the
gradient is freed at once, so scoring holds one extra copy of the targeted weights (the scores),
never a full set of gradients next to them.
"""

from __future__ import annotations

import itertools

import torch

from surgical.errors import SurgicalError
from surgical.select.criteria import CRITERIA, ScoreContext
from surgical.utils import progress


def batch_to(batch, device: torch.device):
    """Moves the tensors of a dict batch to ``device``."""
    if isinstance(batch, dict):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    raise SurgicalError(
        f"calibration batches must be dicts of tensors the model accepts, got {type(batch).__name__}",
        "Yield dicts such as a tokenizer's output plus 'labels'",
    )


def accumulate_gradients(ctx: ScoreContext, transform) -> tuple[dict[str, torch.Tensor], int]:
    """Runs forward+backward over the calibration batches, summing ``transform(grad)`` per param.

    Returns the sums and the number of batches used. Only the targeted parameters require grad
    while scoring; every parameter's ``requires_grad`` and the model's train/eval mode are restored.
    """
    model, params = ctx.model, ctx.params
    if ctx.data is None:
        raise SurgicalError("this criterion needs calibration data", "Pass data=<iterable of batches>")
    device = next(iter(params.values())).device
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    handles = []

    def make_hook(name):
        def hook(p):
            sums[name].add_(transform(p.grad.float()))
            p.grad = None

        return hook

    used = 0
    try:
        model.eval()  # no dropout: scores depend on the data, not on noise
        for n, p in model.named_parameters():
            p.requires_grad_(n in params)
        for n, p in params.items():
            handles.append(p.register_post_accumulate_grad_hook(make_hook(n)))
        batches = itertools.islice(iter(ctx.data), ctx.max_batches)
        with progress(disable=not ctx.progress) as bar:
            task = bar.add_task("scoring", total=ctx.max_batches, info="")
            for batch in batches:
                out = model(**batch_to(batch, device))
                loss = getattr(out, "loss", None)
                if loss is None:
                    raise SurgicalError(
                        "the model returned no loss for a calibration batch",
                        "Include 'labels' in each batch so the model computes its loss",
                    )
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
    return sums, used


@CRITERIA.register("gradient")
def gradient_scores(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Sum over calibration batches of |dL/dw| for every targeted entry."""
    sums, _ = accumulate_gradients(ctx, torch.abs)
    return sums
