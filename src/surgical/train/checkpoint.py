"""Atomic training checkpoints: trained values, optimizer, scheduler, RNG states, step, hooks.

A checkpoint is a directory ``<checkpoint_dir>/step-<N>`` written through
:func:`surgical.core.io.atomic_dir`, so a process killed at any moment leaves either the complete
new checkpoint or none: never a half-written one. Older checkpoints are removed only after the
new one is in place.

Format (version 2): two files and no pickle, so reading a checkpoint can never run code.

- ``tensors.safetensors``: every tensor: the trained values, the state buffers, the optimizer's
  state tensors and the RNG states (uint8).
- ``checkpoint.json``: everything else (step, run identity, requires_grad flags, optimizer
  param groups and numeric state, scheduler state, python ``random`` state, hook states, the
  loss of every step so far), the
  name, dtype and shape of every tensor it expects in ``tensors.safetensors``, and the SHA-256 of
  that file, verified before anything is read from it.

Trained values are stored by parameter name (``weight_sg_delta`` parameters included) together
with the entry indices of every entry-sparse weight, since dynamic schedules may move them, and
the row or column indices of every block (tied embedding rows included), which must match on
resume: a block's values mean nothing against other rows. Each checkpoint also stores the run's
identity (:mod:`surgical.train.identity`), and loading compares it before restoring anything.

Checkpoints written by surgical before version 2 (a pickled ``state.pt``) are refused, never
unpickled: a crafted one would run arbitrary code on ``--resume``.

Several processes (DDP, FSDP2): every process calls :func:`save_checkpoint`; sharded values and
optimizer state are gathered whole (a collective, one tensor at a time), the RNG states of every
process are gathered, and process 0 alone writes the one checkpoint, in the same format as a
single process's (the other processes' RNG states as ``rng.rank<R>.*``). Every process reads it
back (they share a filesystem: one machine, or a shared disk) and takes its own part: its shard
of each sharded value and optimizer state, its own RNG states.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from surgical.core.errors import SurgicalError
from surgical.core.io import atomic_dir
from surgical.core.processes import world_size
from surgical.core.tensors import full_tensor, is_dtensor, shard_like
from surgical.train.hooks import StepState, TrainHook
from surgical.train.identity import check_identity
from surgical.train.state import state_buffers, stateful_modules

_STEP_DIR = re.compile(r"^step-(\d+)$")
FORMAT = "surgical-checkpoint"
VERSION = 2
INFO_FILE = "checkpoint.json"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.pt"  # the pickle of checkpoints before version 2: recognised, never loaded
_ROLES = ("values", "moving", "fixed")  # tensor groups of the model part, each keyed "<role>.<name>"
_FIT_FIX = "Resume with the same model, plan and config, or delete the checkpoint directory"


def checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Checkpoints in ``checkpoint_dir``, oldest first.

    A ``step-<N>`` directory counts if it holds ``checkpoint.json`` (a complete checkpoint: the
    atomic write makes the directory appear whole) or only an old ``state.pt``. The latter are
    listed so that a resume meets them and :func:`load_checkpoint` refuses them by name, instead
    of silently starting the run over beside them.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / INFO_FILE).is_file() or (p / STATE_FILE).is_file()]


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest checkpoint (see :func:`checkpoints`), or None."""
    found = checkpoints(checkpoint_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------
# Saving


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check_json(value: Any, what: str, tuples: bool = False) -> None:
    """Raises unless ``value`` comes back from a JSON round trip as itself.

    Tuples (which JSON turns into lists) are accepted only with ``tuples``, where the loader
    turns them back; non-string dict keys (which JSON turns into strings) never are.

    Raises:
        SurgicalError: naming ``what`` and the offending type.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list) or (tuples and isinstance(value, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{what}[{i}]", tuples)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise SurgicalError(
                    f"cannot write a checkpoint: {what} has the key {k!r} ({type(k).__name__}), "
                    "but checkpoints store JSON, whose keys are strings",
                    "Use string keys",
                )
            _check_json(v, f"{what}[{k!r}]", tuples)
        return
    raise SurgicalError(
        f"cannot write a checkpoint: {what} is a {type(value).__name__}, which a checkpoint cannot "
        "store exactly (checkpoints hold JSON values: dicts with string keys, lists, strings, "
        "numbers, booleans, None)",
        "Return JSON values from state_dict()",
    )


def _trainable_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Tensors and JSON of the model part: values of every parameter the optimizer owns
    (schedules may have frozen some for now), the entry indices and base values (regrow moves
    them), the block row/column indices, and the requires_grad flags."""
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    groups = {
        "values": {n: p for n, p in model.named_parameters() if id(p) in owned},
        "moving": state_buffers(model, ("moves",)),  # a schedule may have moved them: restored on resume
        "fixed": state_buffers(model, ("fixed",)),  # never change: must match on resume
    }
    # sharded values are gathered whole (a collective, in the same order on every process)
    tensors = {f"{role}.{n}": _whole(t) for role, g in groups.items() for n, t in g.items()}
    info = {role: sorted(g) for role, g in groups.items()}
    info["requires_grad"] = {n: p.requires_grad for n, p in model.named_parameters()}
    return tensors, info


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``t``'s whole value to write. A sharded tensor is gathered (a collective: every
    process calls this in the same order); only process 0, which writes, keeps the copy."""
    whole = full_tensor(t).detach()
    return whole.cpu().clone() if _rank() == 0 else whole.new_empty(0)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Tensors (``optimizer.state.<i>.<name>``) and JSON (param groups, numbers) of the optimizer."""
    sd = optimizer.state_dict()
    tensors, state = {}, {}
    for i, entry in sorted(sd["state"].items()):  # the same order on every process (collectives)
        names, numbers = [], {}
        for name, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.state.{i}.{name}"] = _whole(v)
                names.append(name)
            else:
                _check_json(v, f"the optimizer state {name!r}")
                numbers[name] = v
        state[str(i)] = {"tensors": names, "numbers": numbers}
    _check_json(sd["param_groups"], "the optimizer's param_groups", tuples=True)
    return tensors, {"param_groups": sd["param_groups"], "state": state}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


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

    Raises:
        SurgicalError: if a hook's ``state_dict()``, the scheduler's state or the optimizer's
            non-tensor state is not made of JSON values (nothing is written then).
    """
    model_tensors, model_info = _trainable_state(state.model, state.optimizer)
    opt_tensors, opt_info = _optimizer_state(state.optimizer)
    rng, cuda = _gather_rng()
    tensors = {**model_tensors, **opt_tensors, **rng}
    scheduler = state.scheduler.state_dict() if state.scheduler is not None else None
    _check_json(scheduler, "the scheduler's state_dict()")
    _check_json(dict(identity) if identity is not None else None, "the run identity")
    hook_states = [h.state_dict() for h in hooks]
    for h, s in zip(hooks, hook_states, strict=True):
        _check_json(s, f"the state_dict() of hook {type(h).__name__}")
    version, internal, gauss = random.getstate()
    info = {
        "format": FORMAT,
        "version": VERSION,
        "step": state.step,
        "identity": dict(identity) if identity is not None else None,
        "model": model_info,
        "optimizer": opt_info,
        "scheduler": scheduler,
        "rng": {"python": [version, list(internal), gauss], "cuda": cuda},
        "hooks": hook_states,
        "history": [float(x) for x in state.history],
        "tensors": {k: {"dtype": _dtype_name(t), "shape": list(t.shape)} for k, t in sorted(tensors.items())},
    }
    if world_size() > 1:
        info["rng"]["processes"] = world_size()
    target = Path(checkpoint_dir) / f"step-{state.step}"
    if _rank() == 0:
        with atomic_dir(target) as tmp:
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp / TENSORS_FILE))
            info["sha256"] = _sha256(tmp / TENSORS_FILE)
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        for old in checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if world_size() > 1:
        dist.barrier()  # no process goes on before the checkpoint is in place
    return target


def _rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def _rng_key(rank: int, name: str) -> str:
    """Process 0's RNG states are ``rng.<name>`` (as a single process's), the others'
    ``rng.rank<R>.<name>``."""
    return f"rng.{name}" if rank == 0 else f"rng.rank{rank}.{name}"


def _gather_rng() -> tuple[dict[str, torch.Tensor], int | None]:
    """Every process's RNG states as checkpoint tensors (on process 0; a collective with several
    processes), and how many CUDA generators each holds (None without CUDA)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    own = {"torch": torch.get_rng_state(), **{f"cuda.{i}": t.cpu() for i, t in enumerate(cuda or [])}}
    ranks = [own]
    if world_size() > 1:  # uint8 tensors between the run's own processes, never a user's file
        ranks = [None] * world_size()
        dist.all_gather_object(ranks, own)
    return {_rng_key(r, k): t for r, states in enumerate(ranks) for k, t in states.items()}, (
        len(cuda) if cuda is not None else None
    )


# ---------------------------------------------------------------------------------------------
# Loading


class _Reader:
    """Typed access to ``checkpoint.json`` that turns any missing or mistyped key into one
    SurgicalError naming the checkpoint and the key."""

    def __init__(self, where: str) -> None:
        self.where = where

    def corrupted(self, why: str) -> SurgicalError:
        return SurgicalError(f"checkpoint {self.where} is corrupted ({why})", "Delete it to start over")

    def get(self, obj: Any, key: str | int, kind: type | tuple[type, ...], path: str) -> Any:
        if isinstance(obj, dict):
            if key not in obj:
                raise self.corrupted(f"{INFO_FILE} lacks {path!r}")
            value = obj[key]
        elif isinstance(obj, list) and isinstance(key, int) and 0 <= key < len(obj):
            value = obj[key]
        else:
            raise self.corrupted(f"{INFO_FILE} lacks {path!r}")
        # bool is an int subclass: a flag where a count belongs (or the reverse) is still wrong
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
            raise self.corrupted(f"{INFO_FILE} has a {type(value).__name__} at {path!r}")
        return value

    def names(self, obj: Any, key: str, path: str) -> list[str]:
        names = self.get(obj, key, list, path)
        if not all(isinstance(n, str) for n in names):
            raise self.corrupted(f"{INFO_FILE} has a non-string name in {path!r}")
        return names


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _read_info(path: Path) -> tuple[dict, _Reader]:
    """Parses ``checkpoint.json``, refusing old pickled checkpoints without opening them."""
    where = repr(str(path))
    r = _Reader(where)
    if not (path / INFO_FILE).is_file():
        if (path / STATE_FILE).exists():
            raise SurgicalError(
                f"checkpoint {where} was written by an older surgical as a pickle ({STATE_FILE}), a "
                "format that is no longer loaded because loading it could execute code",
                "Delete it and re-run the training from the start",
            )
        raise SurgicalError(f"checkpoint {where} has no {INFO_FILE}", "Delete it to start over")
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SurgicalError(f"checkpoint {where} is unreadable ({e})", "Delete it to start over") from None
    if not isinstance(info, dict):
        raise r.corrupted(f"{INFO_FILE} is not an object")
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise SurgicalError(
            f"checkpoint {where} has format {info.get('format')!r} version {info.get('version')!r}; this "
            f"surgical reads {FORMAT!r} version {VERSION}",
            "Resume with the surgical that wrote it, or delete it to start over",
        )
    return info, r


def _read_tensors(path: Path, info: dict, r: _Reader) -> dict[str, torch.Tensor]:
    """Loads ``tensors.safetensors`` after checking its SHA-256, and checks that it holds exactly
    the tensors ``checkpoint.json`` lists, with their dtypes and shapes."""
    expected = r.get(info, "sha256", str, "sha256")
    try:
        actual = _sha256(path / TENSORS_FILE)
    except OSError as e:
        raise SurgicalError(f"checkpoint {r.where} is unreadable ({e})", "Delete it to start over") from None
    if actual != expected:
        raise r.corrupted("checksum mismatch")
    try:
        tensors = load_file(str(path / TENSORS_FILE))
    except (SafetensorError, OSError) as e:
        raise r.corrupted(f"{TENSORS_FILE}: {e}") from None
    manifest = r.get(info, "tensors", dict, "tensors")
    for key in sorted(set(manifest) | set(tensors)):
        if key not in tensors:
            raise r.corrupted(f"{TENSORS_FILE} lacks {key!r}")
        if key not in manifest:
            raise r.corrupted(f"{TENSORS_FILE} holds {key!r}, which {INFO_FILE} does not list")
        want = r.get(manifest, key, dict, f"tensors.{key}")
        dtype = r.get(want, "dtype", str, f"tensors.{key}.dtype")
        shape = r.get(want, "shape", list, f"tensors.{key}.shape")
        t = tensors[key]
        if _dtype_name(t) != dtype or list(t.shape) != shape:
            raise r.corrupted(
                f"{key!r} is {_dtype_name(t)} {list(t.shape)} in {TENSORS_FILE} but {dtype} {shape} in "
                f"{INFO_FILE}"
            )
    return tensors


def _python_rng(info: dict, r: _Reader) -> tuple:
    """The python ``random`` state as :func:`random.setstate` takes it."""
    rng = r.get(info, "rng", dict, "rng")
    py = r.get(rng, "python", list, "rng.python")
    version = r.get(py, 0, int, "rng.python[0]")
    internal = r.get(py, 1, list, "rng.python[1]")
    gauss = r.get(py, 2, (float, type(None)), "rng.python[2]")
    restored = (version, tuple(internal), gauss)
    try:  # on a throwaway generator: the live one is set only once everything has been checked
        random.Random().setstate(restored)
    except (TypeError, ValueError, OverflowError):
        raise r.corrupted(f"{INFO_FILE} has a malformed 'rng.python'") from None
    return restored


def _tensor(tensors: dict[str, torch.Tensor], key: str, r: _Reader) -> torch.Tensor:
    if key not in tensors:
        raise r.corrupted(f"{TENSORS_FILE} lacks {key!r}")
    return tensors[key]


def _optimizer_state_dict(
    info: dict, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, r: _Reader
) -> dict:
    """Rebuilds ``optimizer.state_dict()`` as saved, checking that it fits ``optimizer``.

    Tuples (AdamW's ``betas``), which JSON stored as lists, become tuples again wherever the live
    optimizer's param group holds a tuple, so the restored groups equal the saved ones exactly.
    """
    opt = r.get(info, "optimizer", dict, "optimizer")
    groups = r.get(opt, "param_groups", list, "optimizer.param_groups")
    live = optimizer.param_groups
    if len(groups) != len(live):
        raise SurgicalError(
            f"checkpoint {r.where} does not fit this run's optimizer ({len(groups)} param groups, "
            f"here {len(live)})",
            _FIT_FIX,
        )
    owned: set[int] = set()
    for gi, now in enumerate(live):
        group = r.get(groups, gi, dict, f"optimizer.param_groups[{gi}]")
        ids = r.get(group, "params", list, f"optimizer.param_groups[{gi}].params")
        if not all(isinstance(i, int) for i in ids):
            raise r.corrupted(f"{INFO_FILE} has a non-integer id in 'optimizer.param_groups[{gi}].params'")
        if len(ids) != len(now["params"]):
            raise SurgicalError(
                f"checkpoint {r.where} does not fit this run's optimizer (param group {gi} has "
                f"{len(ids)} parameters, here {len(now['params'])})",
                _FIT_FIX,
            )
        owned.update(ids)
        for key, value in group.items():
            if isinstance(now.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
    state = {}
    for key, entry in r.get(opt, "state", dict, "optimizer.state").items():
        if not key.isdigit() or int(key) not in owned:
            raise r.corrupted(f"optimizer state {key!r} belongs to no parameter")
        where = f"optimizer.state.{key}"
        entry = r.get(opt["state"], key, dict, where)
        restored = dict(r.get(entry, "numbers", dict, f"{where}.numbers"))
        for name in r.names(entry, "tensors", f"{where}.tensors"):
            restored[name] = _tensor(tensors, f"optimizer.state.{key}.{name}", r)
        state[int(key)] = restored
    return {"state": state, "param_groups": groups}


def load_checkpoint(
    path: str | Path,
    state: StepState,
    hooks: Sequence[TrainHook] = (),
    identity: Mapping[str, Any] | None = None,
    allow_changes: Sequence[str] = (),
) -> None:
    """Restores a checkpoint into a model prepared with the same plan, and its optimizer.

    Every file is checked (format, version, checksum, the tensors ``checkpoint.json`` lists) and
    the run's identity compared before anything is restored. Nothing is ever unpickled: a
    checkpoint written before version 2 (``state.pt``) is refused.

    Args:
        identity: The resuming run's identity; if given, it must equal the stored one (a
            checkpoint that stores none, written with ``identity=None``, loads with a warning)
            except at the keys in ``allow_changes``. None: no check.

    Raises:
        SurgicalError: (one line) if the checkpoint is of the old pickled format, unreadable,
            corrupted (checksum mismatch, a missing key or tensor), belongs to a run with other
            settings (nothing is restored then), or does not fit the model.
    """
    path = Path(path)
    info, r = _read_info(path)
    tensors = _read_tensors(path, info, r)
    step = r.get(info, "step", int, "step")
    saved_identity = r.get(info, "identity", (dict, type(None)), "identity")
    if identity is not None:  # first: another run's checkpoint would also fail the checks below
        check_identity(saved_identity, identity, r.where, allow_changes)
    # everything is read and checked before the first write into the model or optimizer
    saved = r.get(info, "model", dict, "model")
    names = {role: r.names(saved, role, f"model.{role}") for role in _ROLES}
    requires_grad = r.get(saved, "requires_grad", dict, "model.requires_grad")
    opt_state = _optimizer_state_dict(info, tensors, state.optimizer, r)
    _shard_like_params(opt_state, state.optimizer)
    scheduler = r.get(info, "scheduler", (dict, type(None)), "scheduler")
    if state.scheduler is not None and scheduler is not None:
        # load_state_dict updates the scheduler's __dict__: let the file set only what it saves
        unknown = set(scheduler) - set(state.scheduler.state_dict())
        if unknown:
            raise r.corrupted(f"scheduler state has unknown keys {sorted(unknown)}")
    python_rng = _python_rng(info, r)
    processes = r.get(info["rng"], "processes", int, "rng.processes") if "processes" in info["rng"] else 1
    if processes != world_size():
        raise SurgicalError(
            f"checkpoint {r.where} was written by {processes} process(es), this run has {world_size()}",
            f"Resume with {processes} process(es), or start a fresh run in another directory",
        )
    rank = _rank()
    key = _rng_key(rank, "torch")
    torch_rng = _tensor(tensors, key, r)
    if torch_rng.dtype != torch.uint8 or torch_rng.shape != torch.get_rng_state().shape:
        raise r.corrupted(f"{key!r} is {_dtype_name(torch_rng)} {list(torch_rng.shape)}")
    cuda = r.get(info["rng"], "cuda", (int, type(None)), "rng.cuda")
    cuda_rng = [_tensor(tensors, _rng_key(rank, f"cuda.{i}"), r) for i in range(cuda or 0)]
    hook_states = r.get(info, "hooks", list, "hooks")
    history = r.get(info, "history", list, "history") if "history" in info else []  # older: none
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in history):
        raise r.corrupted(f"{INFO_FILE} has a non-number in 'history'")

    model = state.model
    buffers = dict(model.named_buffers())
    params = dict(model.named_parameters())
    fix = _FIT_FIX
    for name in names["fixed"]:
        t = _tensor(tensors, f"fixed.{name}", r)
        if name not in buffers or not torch.equal(buffers[name].cpu(), t):
            raise SurgicalError(f"checkpoint {r.where} trained other rows or columns at {name!r}", fix)
    for name in names["moving"]:
        if name not in buffers:
            raise SurgicalError(f"checkpoint {r.where} has {name!r}, which this model lacks", fix)
    for name in names["values"]:
        t = _tensor(tensors, f"values.{name}", r)
        if name not in params or params[name].shape != t.shape:
            raise SurgicalError(f"checkpoint {r.where} does not fit this model at {name!r}", fix)
    for name in names["moving"]:
        t = _tensor(tensors, f"moving.{name}", r)
        if buffers[name].shape != t.shape:  # a schedule moved or resized the entries
            _replace_buffer(model, name, t)
        else:
            buffers[name].copy_(t)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names["values"]:
            _copy_into(params[name], tensors[f"values.{name}"])
    for name, flag in requires_grad.items():
        if name in params:
            params[name].requires_grad_(bool(flag))
    _invalidate_entry_caches(model)
    try:
        state.optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise r.corrupted(f"the optimizer state does not load: {e}") from None
    if state.scheduler is not None and scheduler is not None:
        try:
            state.scheduler.load_state_dict(scheduler)
        except (KeyError, TypeError, ValueError) as e:
            raise r.corrupted(f"the scheduler state does not load: {e!r}") from None
    torch.set_rng_state(torch_rng)
    random.setstate(python_rng)
    if cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    for h, s in zip(hooks, hook_states, strict=False):
        h.load_state_dict(s)
    state.step = step
    state.history = [float(x) for x in history]


def _copy_into(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Copies a saved whole value into ``param``; a sharded parameter takes its own shard."""
    param.copy_(shard_like(whole, param))


def _shard_like_params(opt_state: dict, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state saved whole, sharded like the parameter it belongs to (Adam's moments of a
    sharded parameter are sharded the same way; a scalar ``step`` stays as it is)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in opt_state["param_groups"] for i in g["params"]]
    owner = dict(zip(ids, params, strict=True))
    for i, entry in opt_state["state"].items():
        p = owner[i]
        if not is_dtensor(p):
            continue
        for name, v in entry.items():
            if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape):
                entry[name] = shard_like(v, p)


def _replace_buffer(model: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    mname, _, bname = name.rpartition(".")
    module = model.get_submodule(mname) if mname else model
    old = getattr(module, bname)
    module.register_buffer(bname, t.to(old.device, old.dtype), persistent=False)


def _invalidate_entry_caches(model: torch.nn.Module) -> None:
    """Forces every entry-sparse weight to be rebuilt from its restored indices and values."""
    for _, module, state in stateful_modules(model):
        state.invalidate(module)
