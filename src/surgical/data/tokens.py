"""Token selection for causal LMs: which target tokens of a batch the loss is taken on.

``token_mask(model, batch, method=..., fraction=0.6)`` returns new ``labels``: the batch's own,
with -100 where a target token is *not* trained. Per example, the top ``fraction`` of its target
tokens by the criterion's score are kept (rounded half up, at least one when it has any).
Criteria are registered in :data:`TOKEN_CRITERIA` with declared options; each is a function
``(ctx: TokenContext) -> (B, T) scores`` (higher = keep), aligned with ``labels`` (position t
scores the label at t, which the logits at t - 1 predict).

- ``random`` (after Masked Thought): a seeded random ``fraction`` of each example's targets.
  Vary the seed per step (``seed=step``) or every step masks alike-shaped batches alike.
- ``excess_loss`` (after Rho-1): the token's loss under ``model`` minus its loss under
  ``reference``; tokens the reference already predicts well but the model does not rank first.

What is never a target, and so is never unmasked: labels already -100 (prompt tokens, with the
loss on the response only), the first position (nothing predicts it), and padding (attention
mask 0; a padding position that carried a label gets -100).

With surgical the reference costs nothing: it is the base model, the same weights with the delta
toggled off. For a model and a delta (``scores = tuned - base``)::

    def tuned(batch):
        with surgical.applied(model, delta):
            return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    labels = token_mask(tuned, batch, reference=model)   # model alone is the base

``model`` and ``reference`` are each a module (run without the labels, in eval mode, no
gradients) or a ``(batch) -> logits`` function. A reference that must not stay in memory beside
the model (a tuned reference when the model is sharded) can be a :class:`ReferenceLosses`: its
per-token losses computed in one pass before training, looked up by each batch's content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.registry import Registry, check_range
from surgical.core.runtime import progress
from surgical.data.examples import IGNORE_INDEX
from surgical.data.losses import LogitsFn, frozen_eval, logits_of, target_mask, token_losses


@dataclass
class TokenContext:
    """What a token criterion may use.

    Attributes:
        model: The model (a module or a ``(batch) -> logits`` function), or None.
        batch: The batch (``input_ids``, ``labels`` shaped like them, optional ``attention_mask``).
        targets: ``(B, T)`` bool, the positions that may be kept.
        reference: The reference (module, function or :class:`ReferenceLosses`), or None.
        seed: Seed for any randomness.
        options: The criterion's declared options, checked and completed with defaults.
    """

    model: nn.Module | LogitsFn | None
    batch: Mapping[str, torch.Tensor]
    targets: torch.Tensor
    reference: nn.Module | LogitsFn | ReferenceLosses | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


class ReferenceLosses:
    """A reference model given by its per-token losses on the batches it will score, computed once.

    Excess-loss token selection needs the reference's loss on every batch the model trains on.
    Keeping a second, tuned model in memory for that is what a sharded run cannot afford; its
    losses, ``(B, T)`` float32 per batch (4 bytes a token), can be. :meth:`compute` runs the
    reference over the batches (in eval mode, without gradients, exactly as :func:`token_mask`
    would run it) and keeps each batch's losses under a digest of its ``input_ids``, ``labels``
    and ``attention_mask``, so a batch met again in any order, on any device, finds them.

    Example (the reference is the model with a tuned delta applied, then reverted)::

        with surgical.applied(model, reference_delta):
            reference = ReferenceLosses.compute(model, batches)
        labels = token_mask(model, batch, reference=reference)
    """

    def __init__(self) -> None:
        self._losses: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._losses)

    @staticmethod
    def key(batch: Mapping[str, torch.Tensor]) -> str:
        """The digest a batch is looked up by: its token ids, labels and attention mask."""
        h = hashlib.blake2b(digest_size=16)
        for name in ("input_ids", "labels", "attention_mask"):
            value = batch.get(name)
            if value is None:
                h.update(f"{name}:none;".encode())
                continue
            t = value.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def add(self, batch: Mapping[str, torch.Tensor], losses: torch.Tensor) -> None:
        """Keeps ``losses`` (``(B, T)``, as :func:`per_token_losses` returns) for ``batch``."""
        self._losses[self.key(batch)] = losses.detach().float().cpu()

    def losses(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The reference's ``(B, T)`` losses on ``batch``; a SurgicalError for a batch never seen."""
        found = self._losses.get(self.key(batch))
        if found is None:
            raise SurgicalError(
                "the reference's losses were not computed for this batch",
                "Compute them with ReferenceLosses.compute over the batches that will be trained on",
            )
        return found

    @classmethod
    def compute(
        cls,
        reference: nn.Module | LogitsFn,
        batches: Iterable[Mapping[str, torch.Tensor]],
        show: bool = False,
    ) -> ReferenceLosses:
        """The losses of ``reference`` (a module or ``(batch) -> logits``) on every batch."""
        out = cls()
        total = len(batches) if hasattr(batches, "__len__") else None
        with progress(disable=not show) as bar:
            task = bar.add_task("reference losses", total=total, info="")
            for batch in batches:
                _check_batch(batch)
                out.add(batch, per_token_losses(reference, batch))
                bar.update(task, advance=1)
        return out


TokenCriterion = Callable[[TokenContext], torch.Tensor]

TOKEN_CRITERIA: Registry[TokenCriterion] = Registry("token criterion")


def per_token_losses(model: nn.Module | LogitsFn, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(B, T)`` float32 CPU loss of each label under ``model``, without gradients, in eval mode."""
    guard = frozen_eval(model) if isinstance(model, nn.Module) else torch.no_grad()
    with guard:
        logits = logits_of(model, batch)
        if logits.dim() != 3:
            raise SurgicalError(
                f"token selection needs causal-LM logits (B, T, V), got {tuple(logits.shape)}",
                "Use a ...ForCausalLM model",
            )
        return token_losses(logits, batch["labels"]).float().cpu()


@TOKEN_CRITERIA.register("random", help="a seeded random fraction of each example's targets (Masked Thought)")
def random_token_scores(ctx: TokenContext) -> torch.Tensor:
    """Uniform random scores."""
    return torch.rand(ctx.targets.shape, generator=torch.Generator().manual_seed(ctx.seed))


@TOKEN_CRITERIA.register(
    "excess_loss",
    help="token loss under the model minus under the reference, highest kept (Rho-1)",
    needs_model=True,
    needs_reference=True,
)
def excess_loss_scores(ctx: TokenContext) -> torch.Tensor:
    """``loss(model) - loss(reference)`` per token."""
    ref = ctx.reference
    base = ref.losses(ctx.batch) if isinstance(ref, ReferenceLosses) else per_token_losses(ref, ctx.batch)
    return per_token_losses(ctx.model, ctx.batch) - base


def _check_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    fix = "Pass a causal-LM batch: input_ids (B, T), labels shaped like them (-100 where no loss)"
    if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
        raise SurgicalError("token selection needs a dict batch with input_ids and labels", fix)
    ids, labels = batch["input_ids"], batch["labels"]
    if not torch.is_tensor(ids) or not torch.is_tensor(labels) or ids.dim() != 2 or labels.shape != ids.shape:
        shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise SurgicalError(f"token selection needs labels shaped like input_ids (B, T), got {shape}", fix)
    mask = batch.get("attention_mask")
    if mask is not None and (not torch.is_tensor(mask) or mask.shape != ids.shape):
        raise SurgicalError("attention_mask must be shaped like input_ids", fix)
    return labels, mask


def keep_top(scores: torch.Tensor, targets: torch.Tensor, fraction: float) -> torch.Tensor:
    """``(B, T)`` bool: per row, the ``round(fraction * n)`` (at least 1) highest-scoring of the
    row's ``n`` targets, ties to the earlier position."""
    n = targets.sum(1)
    k = torch.where(n > 0, (fraction * n.double() + 0.5).floor().long().clamp(min=1), 0)
    masked = torch.where(targets, scores.double(), torch.tensor(float("-inf"), dtype=torch.float64))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1]).expand_as(order).contiguous()
    )
    return targets & (ranks < k[:, None])


def token_mask(
    model: nn.Module | LogitsFn | None,
    batch: Mapping[str, torch.Tensor],
    method: str = "excess_loss",
    fraction: float = 0.6,
    reference: nn.Module | LogitsFn | ReferenceLosses | None = None,
    seed: int = 0,
    **options: Any,
) -> torch.Tensor:
    """New labels for ``batch`` that train only the selected target tokens.

    Args:
        model: The model being trained (module or ``(batch) -> logits``); None for ``random``.
        batch: ``input_ids`` (B, T), ``labels`` shaped like them, optional ``attention_mask``.
        method: A token criterion (``TOKEN_CRITERIA.names()``): ``excess_loss`` or ``random``.
        fraction: Share of each example's target tokens to keep, in (0, 1].
        reference: ``excess_loss``: the reference model or function (e.g. the base, see above),
            or its precomputed :class:`ReferenceLosses`.
        seed: Seed of ``random``.
        **options: The criterion's own options.

    Returns:
        A new ``(B, T)`` int64 labels tensor (on the labels' device): the given labels where kept,
        -100 elsewhere. Positions that were -100 stay -100.

    Raises:
        SurgicalError: an unknown method or option, a fraction outside (0, 1], a batch without
            token labels, a missing model or reference the method needs, non-finite scores.
    """
    entry = TOKEN_CRITERIA.entry(method)
    opts = TOKEN_CRITERIA.resolve(method, options)
    check_range(fraction, "fraction", 0, 1, low_open=True)
    labels, mask = _check_batch(batch)
    if entry.extra.get("needs_model") and model is None:
        raise SurgicalError(f"token criterion {method!r} needs a model", "Pass the model being trained")
    if entry.extra.get("needs_reference") and reference is None:
        raise SurgicalError(
            f"token criterion {method!r} needs a reference",
            "Pass reference= a model or (batch) -> logits function (the base: the delta toggled off)",
        )
    cpu_labels = labels.detach().cpu().long()
    targets = target_mask(cpu_labels)
    if mask is not None:
        targets &= mask.detach().cpu() != 0
    ctx = TokenContext(model, batch, targets, reference, seed, opts)
    scores = entry.obj(ctx).detach().cpu()
    if scores.shape != targets.shape:
        raise RuntimeError(f"token criterion {method!r} returned scores of shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores[targets]).all()):
        raise SurgicalError("token scores are NaN or infinite", "Check the model and the reference")
    keep = keep_top(scores, targets, fraction)
    keep[:, 0] = cpu_labels[:, 0] != IGNORE_INDEX  # the first label never counts: left as it was
    if mask is not None:
        keep[:, 0] &= mask[:, 0].detach().cpu() != 0
    out = torch.where(keep, cpu_labels, torch.full_like(cpu_labels, IGNORE_INDEX))
    return out.to(labels.device)


def token_report(
    tokenizer: Any, batch: Mapping[str, torch.Tensor], new_labels: torch.Tensor, n: int = 3
) -> str:
    """Text showing, for the first ``n`` examples, which target tokens were kept.

    Kept targets are shown ``[like this]``, dropped targets ``~like this~``, other tokens (the
    prompt) plain; padding is left out. Each example starts with a line ``example i: kept k of m
    target tokens``. ``tokenizer`` needs only ``decode(list_of_ids)``.
    """
    labels, mask = _check_batch(batch)
    if new_labels.shape != labels.shape:
        raise SurgicalError("new_labels must be shaped like the batch's labels", "Pass token_mask's result")
    ids = batch["input_ids"].cpu()
    old_t = target_mask(labels.cpu().long())
    new_t = target_mask(new_labels.cpu().long())
    lines = []
    for i in range(min(n, ids.shape[0])):
        attended = torch.ones(ids.shape[1], dtype=torch.bool) if mask is None else mask[i].cpu() != 0
        pieces = []
        for t in range(ids.shape[1]):
            if not attended[t]:
                continue
            text = tokenizer.decode([int(ids[i, t])])
            if new_t[i, t]:
                pieces.append(f"[{text}]")
            elif old_t[i, t]:
                pieces.append(f"~{text}~")
            else:
                pieces.append(text)
        kept, total = int(new_t[i].sum()), int((old_t[i] & attended).sum())
        lines.append(f"example {i}: kept {kept} of {total} target tokens")
        lines.append("  " + " ".join(pieces))
    return "\n".join(lines)
