"""Atomic training checkpoints: trained values, optimizer, scheduler, RNG states, step, hooks.

A checkpoint is a directory ``<checkpoint_dir>/step-<N>`` written through
:func:`surgical.core.io.atomic_dir`, so a process killed at any moment leaves either the complete
new checkpoint or none: never a half-written one. Older checkpoints are removed only after the
new one is in place.

Trained values are stored by parameter name (``weight_sg_delta`` parameters included) together
with the entry indices of every entry-sparse weight, since dynamic schedules may move them, and
the row or column indices of every block (tied embedding rows included), which must match on
resume: a block's values mean nothing against other rows. Each checkpoint also stores the run's
identity (:mod:`surgical.train.identity`), and loading compares it before restoring anything.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from surgical.core.errors import SurgicalError
from surgical.core.io import atomic_dir
from surgical.train.hooks import StepState, TrainHook
from surgical.train.identity import check_identity
from surgical.train.state import state_buffers, stateful_modules

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.pt"


def checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``checkpoint_dir``, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = checkpoints(checkpoint_dir)
    return found[-1] if found else None


def _trainable_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Values of every parameter the optimizer owns (schedules may have frozen some for now),
    the entry indices and base values (regrow moves them), the block row/column indices, and
    the requires_grad flags."""
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    values = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if id(p) in owned}
    def copies(role: str) -> dict[str, torch.Tensor]:
        return {n: b.detach().cpu().clone() for n, b in state_buffers(model, (role,)).items()}

    return {
        "values": values,
        "moving": copies("moves"),  # a schedule may have moved them: restored on resume
        "fixed": copies("fixed"),  # never change: must match on resume
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def save_checkpoint(
    checkpoint_dir: str | Path,
    state: StepState,
    hooks: Sequence[TrainHook] = (),
    keep: int = 1,
    identity: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``step-<state.step>`` atomically and keeps only the newest ``keep`` checkpoints.

    ``identity`` (what defines the run, see :func:`surgical.train.identity.run_identity`) is
    stored so that :func:`load_checkpoint` can refuse a resume with other settings.
    """
    payload = {
        "step": state.step,
        "identity": dict(identity) if identity is not None else None,
        "model": _trainable_state(state.model, state.optimizer),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        "hooks": [h.state_dict() for h in hooks],
    }
    target = Path(checkpoint_dir) / f"step-{state.step}"
    with atomic_dir(target) as tmp:
        torch.save(payload, tmp / STATE_FILE)
    for old in checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(
    path: str | Path,
    state: StepState,
    hooks: Sequence[TrainHook] = (),
    identity: Mapping[str, Any] | None = None,
    allow_changes: Sequence[str] = (),
) -> None:
    """Restores a checkpoint into a model prepared with the same plan, and its optimizer.

    Args:
        identity: The resuming run's identity; if given, it must equal the stored one (a
            checkpoint that stores none, written before identities existed, loads with a
            warning) except at the keys in ``allow_changes``. None: no check.

    Raises:
        SurgicalError: if the checkpoint is unreadable, belongs to a run with other settings
            (nothing is restored then), or does not fit the model.
    """
    path = Path(path)
    try:
        payload = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise SurgicalError(
            f"checkpoint {str(path)!r} is unreadable ({e})", "Delete it to start over"
        ) from None
    if identity is not None:
        check_identity(payload.get("identity"), identity, repr(str(path)), allow_changes)
    model = state.model
    saved = payload["model"]
    buffers = dict(model.named_buffers())
    params = dict(model.named_parameters())
    fix = "Resume with the same model, plan and config, or delete the checkpoint directory"
    for name, t in saved["fixed"].items():
        if name not in buffers or not torch.equal(buffers[name].cpu(), t):
            raise SurgicalError(f"checkpoint {str(path)!r} trained other rows or columns at {name!r}", fix)
    for name, t in saved["moving"].items():
        if name not in buffers:
            raise SurgicalError(f"checkpoint {str(path)!r} has {name!r}, which this model lacks", fix)
        if buffers[name].shape != t.shape:  # a schedule moved or resized the entries
            _replace_buffer(model, name, t)
        else:
            buffers[name].copy_(t)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in saved["values"].items():
            if name not in params or params[name].shape != t.shape:
                raise SurgicalError(f"checkpoint {str(path)!r} does not fit this model at {name!r}", fix)
            params[name].copy_(t)
    for name, flag in saved["requires_grad"].items():
        if name in params:
            params[name].requires_grad_(flag)
    _invalidate_entry_caches(model)
    state.optimizer.load_state_dict(payload["optimizer"])
    if state.scheduler is not None and payload["scheduler"] is not None:
        state.scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"]["torch"])
    random.setstate(payload["rng"]["python"])
    if payload["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    for h, s in zip(hooks, payload["hooks"], strict=False):
        h.load_state_dict(s)
    state.step = int(payload["step"])


def _replace_buffer(model: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    mname, _, bname = name.rpartition(".")
    module = model.get_submodule(mname) if mname else model
    old = getattr(module, bname)
    module.register_buffer(bname, t.to(old.device, old.dtype), persistent=False)


def _invalidate_entry_caches(model: torch.nn.Module) -> None:
    """Forces every entry-sparse weight to be rebuilt from its restored indices and values."""
    for _, module, state in stateful_modules(model):
        state.invalidate(module)
