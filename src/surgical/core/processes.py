"""The processes of a multi-process run (torchrun, accelerate launch) and the few collectives the
training loop and ``surgical train`` need; each is a no-op on a single process."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from surgical.core.errors import SurgicalError

T = TypeVar("T")


def world_size() -> int:
    """Processes in the running process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def launched_processes() -> int:
    """Processes the launcher (torchrun, accelerate launch) started, from ``WORLD_SIZE`` (1 if unset)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def start_process_group() -> torch.device:
    """Joins the launcher's process group (NCCL on CUDA, else gloo) unless one is running; returns
    this process's device (``cuda:LOCAL_RANK`` when CUDA is available, else the CPU)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def on_first_rank(fn: Callable[[], T]) -> T:
    """Runs ``fn`` on rank 0 only and hands its result to every rank. A SurgicalError it raises is
    raised on every rank (with the same message), so no rank waits for one that has failed."""
    if world_size() < 2:
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except SurgicalError as e:
            box[0] = ("error", (e.problem, e.fix))
    dist.broadcast_object_list(box, src=0)  # between the run's own processes, never a user's file
    kind, value = box[0]
    if kind == "error":
        raise SurgicalError(*value)
    return value


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (a collective; just ``flag`` without a group)."""
    if world_size() < 2:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean_over_ranks(value: float) -> float:
    """The mean of ``value`` over the processes (a collective; ``value`` without a group)."""
    n = world_size()
    if n < 2:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item()) / n


def _collective_device() -> torch.device:
    cuda = dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


class RankShares(Sequence):
    """This process's share of every batch: part ``rank`` of the batch's rows cut into ``n``
    contiguous parts (``torch.tensor_split``), read lazily. The batches are full but for the
    last (the batch size splits evenly between the processes); a last batch with fewer rows than
    processes is left out, so that no process gets an empty share."""

    def __init__(self, batches: Sequence[dict], rank: int, n: int) -> None:
        self.batches, self.rank, self.n = batches, rank, n
        self.count = len(batches) - (1 if len(batches) and _rows(batches[len(batches) - 1]) < n else 0)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:  # type: ignore[override]
        if not -self.count <= i < self.count:
            raise IndexError(i)
        batch = self.batches[i % self.count]
        return {
            k: torch.tensor_split(v, self.n)[self.rank] if torch.is_tensor(v) else v for k, v in batch.items()
        }


def _rows(batch: dict) -> int:
    return next(int(v.shape[0]) for v in batch.values() if torch.is_tensor(v))
