"""The marks surgical leaves on a model, in one place.

Three plain attributes, never part of ``state_dict``:

- the *prepared* record, set by :func:`surgical.prepare` (the training layer owns its content);
- the *applied* stack, one :class:`AppliedRecord` per :func:`surgical.apply` still in place: the
  values each application overwrote, so that :func:`surgical.revert` restores them exactly and
  the base fingerprint reads the true base through them;
- the *quantized* record, set by :func:`surgical.train.quantize_base`: the full-precision values
  the base fingerprint samples, taken before the weights were quantized, so that a delta trained
  on the quantized base names the full-precision base it applies to.

Every layer reads these through the functions here, never by attribute name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

_PREPARED = "_sg_prepared"
_APPLIED = "_sg_applied"
_QUANTIZED = "_sg_quantized"


class Saved(NamedTuple):
    """Base values of one tensor that something overwrote in place.

    ``idx`` None: ``old`` is the whole tensor. ``axis`` None: ``idx`` are sorted flat indices and
    ``old`` the values there. ``axis`` 0 or 1: ``idx`` are sorted rows or columns and ``old`` the
    block ``tensor.index_select(axis, idx)``.
    """

    idx: torch.Tensor | None
    old: torch.Tensor
    axis: int | None = None


@dataclass
class AppliedRecord:
    """What one ``apply`` overwrote: parameter name -> :class:`Saved`, and which delta it was
    (by content digest, so a delta reloaded from disk is recognised)."""

    digest: str
    saved: dict[str, Saved] = field(default_factory=dict)


def prepared_record(model: nn.Module) -> Any | None:
    """What :func:`surgical.prepare` recorded on ``model``, or None."""
    return getattr(model, _PREPARED, None)


def is_prepared(model: nn.Module) -> bool:
    """Whether ``model`` is prepared for training."""
    return prepared_record(model) is not None


def set_prepared(model: nn.Module, record: Any | None) -> None:
    """Sets (or, with None, clears) the prepared record."""
    if record is None:
        model.__dict__.pop(_PREPARED, None)
    else:
        object.__setattr__(model, _PREPARED, record)  # a plain attribute, never a submodule


def applied_stack(model: nn.Module) -> list[AppliedRecord]:
    """The records of the deltas applied to ``model``, oldest first (a live list)."""
    stack = model.__dict__.get(_APPLIED)
    if stack is None:
        stack = []
        object.__setattr__(model, _APPLIED, stack)
    return stack


def forget_applied(model: nn.Module) -> None:
    """Drops the applied records (the saved originals), keeping the weights as they are."""
    model.__dict__.pop(_APPLIED, None)


def quantized_samples(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> the full-precision values the base fingerprint samples, recorded before
    the parameter was quantized (empty for a model that :func:`surgical.train.quantize_base`
    did not quantize)."""
    return model.__dict__.get(_QUANTIZED, {})


def record_quantized(model: nn.Module, samples: dict[str, torch.Tensor]) -> None:
    """Adds ``samples`` (name -> sampled full-precision values) to the quantized record."""
    if _QUANTIZED not in model.__dict__:
        object.__setattr__(model, _QUANTIZED, {})
    model.__dict__[_QUANTIZED].update(samples)
