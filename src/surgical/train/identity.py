"""What defines a training run's trajectory: stored in every checkpoint, compared on resume.

Resuming is only sound when the resumed run would have taken the same steps as the interrupted
one; otherwise the result silently mixes two runs. A run's identity is a flat mapping of named
JSON values:

- ``batches``: the number of batches and a SHA-256 of their tensors, so other data, another
  tokenization, ``max_length`` or ``batch_size`` show even when every setting is unchanged (for
  processes that each train a share of every batch, :class:`~surgical.core.processes.RankShares`,
  the whole batches, so that every process computes the same identity);
- ``selection``: a SHA-256 of the trainable parameters' names and shapes and of the selected
  indices and base values at the start of training (before a checkpoint moves them), so another
  plan or another base model shows;
- the settings: for ``surgical train`` the run config minus the keys that cannot change the
  result (:meth:`surgical.train.config.RunConfig.trajectory`), for :func:`surgical.fit` its own
  arguments and the configs of hooks that declare one (:meth:`TrainHook.config`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.processes import RankShares
from surgical.train.hooks import TrainHook
from surgical.train.state import state_buffers


def _digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_batches(batches: Sequence[Mapping[str, torch.Tensor]]) -> str:
    """``"<n> batches, sha256 <hex>"`` over every tensor of every batch, in order.

    One batch at a time: batches tokenized on access (:class:`surgical.data.lazy.LazyBatches`)
    are tokenized once more here, and never held together.
    """
    items = ((f"{i}.{k}", b[k]) for i, b in enumerate(batches) for k in sorted(b) if torch.is_tensor(b[k]))
    return f"{len(batches)} batches, sha256 {_digest(items)}"


def fingerprint_selection(model: nn.Module) -> str:
    """``"<n> trainable tensors, sha256 <hex>"`` over what is trained and where."""
    trained = [(n, torch.tensor(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    # what pins down what is trained: entry indices and base values, block rows and base blocks
    buffers = list(state_buffers(model, ("moves", "fixed", "base")).items())
    return f"{len(trained)} trainable tensors, sha256 {_digest(trained + buffers)}"


def fit_settings(args: Mapping[str, Any], hooks: Sequence[TrainHook]) -> dict[str, Any]:
    """:func:`surgical.fit`'s arguments plus ``hooks``: the configs of hooks that declare one."""
    configs = [{"hook": type(h).__name__, **c} for h in hooks if (c := h.config()) is not None]
    return {**args, "hooks": configs}


def run_identity(
    model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """The identity to store and compare: the fingerprints plus ``settings``, as plain JSON values."""
    # several processes each training their share of every batch: the whole batches, the same on
    # every process
    whole = batches.batches if isinstance(batches, RankShares) else batches
    identity = {"batches": fingerprint_batches(whole), "selection": fingerprint_selection(model)}
    identity.update(settings)
    # JSON round trip: tuples become lists, so a config read back from YAML compares equal
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


_ABSENT = object()


#: Settings a resume may change when the caller names them (``allow_changes``): the remedies for
#: a diverged run (a lower learning rate, gradient clipping) and running it longer. The data,
#: the selection and everything else stay fixed. Keys as :func:`surgical.fit` names them; for
#: ``surgical train`` the same under ``training.``.
OVERRIDABLE = ("lr", "max_grad_norm", "max_steps", "epochs")


def check_allowed(allow: Sequence[str], current: Mapping[str, Any]) -> None:
    """Refuses an ``allow_changes`` key that is not a setting of this run or may not change."""
    for key in allow:
        if key not in current or key.rpartition(".")[2] not in OVERRIDABLE:
            names = [k for k in current if k.rpartition(".")[2] in OVERRIDABLE]
            raise SurgicalError(
                f"a resume cannot be allowed to change {key!r}",
                f"Allow only some of: {', '.join(names)}",
            )


def check_identity(
    saved: Mapping[str, Any] | None, current: Mapping[str, Any], where: str, allow: Sequence[str] = ()
) -> None:
    """Refuses a resume whose identity differs from the checkpoint's, naming every difference.

    A checkpoint written before identities were stored (``saved`` is None) is resumed with a
    warning, since nothing can be compared. Keys in ``allow`` (see :func:`check_allowed`) may
    differ.

    Raises:
        SurgicalError: one line listing each differing key with its old and new value.
    """
    if saved is None:
        warnings.warn(
            f"checkpoint {where} stores no run settings (written by an older surgical); resuming "
            "without checking that the settings are unchanged",
            stacklevel=3,
        )
        return
    diffs = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, _ABSENT), current.get(key, _ABSENT)
        if old != new and key not in allow:
            diffs.append(f"{key} was {_show(old)}, now {_show(new)}")
    if diffs:
        raise SurgicalError(
            f"checkpoint {where} belongs to a run with other settings: {'; '.join(diffs)}",
            "Resume with the original values (or allow a change of lr, max_grad_norm, max_steps "
            "or epochs: allow_changes / --allow-change), or start a fresh run in another directory "
            "(`out` for surgical train, checkpoint_dir for sg.fit)",
        )


def _show(value: Any) -> str:
    return "(not set)" if value is _ABSENT else json.dumps(value)
