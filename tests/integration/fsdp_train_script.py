"""Run by test_train_fsdp.py under `torchrun` (2 processes, gloo, CPU): FSDP2 training.

A tiny Llama is prepared with ``additive=True`` (entries on every Linear weight, the final norm
trained densely), sharded with ``surgical.train.shard`` (FSDP2 ``fully_shard`` per block and at
the root) and trained on ``STEPS`` global batches, each split between the ranks. Every rank saves
the delta it extracts under ``<out>/rank<R>``; rank 0 then trains the same plan on one process,
each global batch as the mean of the two halves' losses (what FSDP's averaged gradient computes),
and saves that delta under ``<out>/single``. The ranks also record what they hold of the frozen
weights and check the refusals that need a process group, and compare ``sg.base_values`` on the
shards with the unsharded base. The same plan then trains on a torchao NF4 base, sharded (under
``<out>/nf4-rank<R>``) and on one process (``<out>/nf4-single``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the tiny model configs

import surgical as sg  # noqa: E402
from conftest import lm_batches, tiny_llama  # noqa: E402
from surgical.core.processes import RankShares  # noqa: E402
from surgical.core.tensors import is_dtensor  # noqa: E402
from surgical.select.plan import Plan  # noqa: E402
from surgical.train import Regrow, StepState, TrainHook, shard  # noqa: E402

STEPS = 4
LR = 1e-2


def model_and_plan():
    model = tiny_llama()
    plan = sg.select(model, method="random", density=0.05, seed=0, progress=False)
    norm = "model.norm.weight"
    plan = Plan(
        entries=plan.entries, dense=[norm], shapes={**plan.shapes, norm: (32,)}, meta={"method": "mixed"}
    )
    return model, plan


def global_batches():
    return lm_batches(n=STEPS, batch=4, seed=3)


def halves(batch: dict, n: int = 2) -> list[dict]:
    size = batch["input_ids"].shape[0] // n
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(n)]


def train_single(out: Path, additive: bool = True, bits: int | None = None) -> None:
    """The reference: one process, the same plan, each global batch's halves averaged (on an NF4
    base with ``bits=4``, saved as ``nf4-single``)."""
    model, plan = model_and_plan()
    if bits:
        sg.quantize_base(model, bits=bits)
    sg.prepare(model, plan, additive=additive)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for batch in global_batches():
        parts = halves(batch)
        loss = sum(model(**p).loss for p in parts) / len(parts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sg.extract(model).save(out / ("nf4-single" if bits else "single"))


class KeepStep2(TrainHook):
    """At step 3, process 0 copies the step-2 checkpoint aside: the state a run killed after step
    2 would have left (the next checkpoint, at step 4, replaces it)."""

    def __init__(self, src: Path, dst: Path) -> None:
        self.src, self.dst = src, dst

    def on_step_end(self, state: StepState) -> None:
        if state.step == 3 and dist.get_rank() == 0:
            shutil.copytree(self.src / "step-2", self.dst / "step-2")


def fit_sharded(rank: int, world: int, checkpoint_dir: Path, resume: bool = False, hooks=()):
    """``sg.fit`` on the sharded model, each rank on its share of every batch, checkpoints every 2 steps."""
    model, plan = model_and_plan()
    sg.prepare(model, plan, additive=True)
    shard(model)
    batches = RankShares(global_batches(), rank, world)
    result = sg.fit(model, batches, lr=LR, max_steps=STEPS, warmup=0.0, seed=0, checkpoint_dir=checkpoint_dir,
                    checkpoint_every=2, resume=resume, hooks=hooks, show=False)  # fmt: skip
    return sg.extract(model), result


def checkpoint_and_resume(out: Path, rank: int, world: int) -> None:
    """An uninterrupted sharded ``sg.fit`` with checkpoints, then one resumed from its step-2 checkpoint."""
    whole, first = fit_sharded(rank, world, out / "ckpt", hooks=[KeepStep2(out / "ckpt", out / "resumed")])
    resumed, second = fit_sharded(rank, world, out / "resumed", resume=True)
    whole.save(out / f"fit-whole-rank{rank}")
    resumed.save(out / f"fit-resumed-rank{rank}")
    runs = {k: [r.resumed_from, r.steps, r.losses] for k, r in (("whole", first), ("resumed", second))}
    (out / f"fit-rank{rank}.json").write_text(json.dumps(runs))


def refusals(rank: int) -> dict:
    """What must be refused with a process group: an in-place model, and a sharded one prepared."""
    seen = {}
    model, plan = model_and_plan()
    sg.prepare(model, plan)  # in place
    try:
        shard(model)
    except sg.SurgicalError as e:
        seen["shard_in_place"] = str(e)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:  # sharded behind surgical's back: refused at the first step
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model(**halves(global_batches()[0])[rank]).loss.backward()
    try:
        opt.step()
    except sg.SurgicalError as e:
        seen["step_in_place_sharded"] = str(e)
    other, plan = model_and_plan()
    for layer in other.model.layers:
        fully_shard(layer)
    fully_shard(other)
    try:
        sg.prepare(other, plan)
    except sg.SurgicalError as e:
        seen["prepare_sharded"] = str(e)
    return seen


def base_values_gap(model, batch: dict) -> dict:
    """How far the sharded model's logits inside ``sg.base_values`` are from the unsharded base's,
    and after it from its own trained logits; each pass follows a forward without gradients, after
    which FSDP2 keeps the root's parameters (the trained final norm among them) gathered."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base, _ = model_and_plan()
    with torch.no_grad():
        model.eval()
        trained = model(**inputs).logits
        with sg.base_values(model):
            swapped = model(**inputs).logits
        again = model(**inputs).logits
        want = base.eval()(**inputs).logits
    model.train()
    return {
        "base_gap": float((swapped - want).abs().max()),
        "trained_gap": float((again - trained).abs().max()),
        "trained_vs_base": float((trained - want).abs().max()),
    }


def train_sharded(model, rank: int, world: int) -> tuple[torch.optim.Optimizer, list[float]]:
    """AdamW on the sharded ``model``, each rank on its half of every global batch; returns the
    optimizer and this rank's losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    losses = []
    for batch in global_batches():
        loss = model(**halves(batch, world)[rank]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return opt, losses


def quantized_sharded(out: Path, rank: int, world: int) -> None:
    """The plan on a torchao NF4 base, sharded: saves the delta and what each rank holds of the
    quantized weights; torchao int8, which FSDP2 cannot split, is refused by ``shard``."""
    from surgical.train.quantize import _storage_bytes

    model, plan = model_and_plan()
    int8 = copy.deepcopy(model)
    report = sg.quantize_base(model, bits=4)
    sg.prepare(model, plan, additive=True)
    shard(model)
    quantized = [p for n, p in model.named_parameters() if n in report.quantized]
    held = sum(_storage_bytes(p.to_local()) for p in quantized)
    opt, losses = train_sharded(model, rank, world)
    sg.extract(model).save(out / f"nf4-rank{rank}")
    sg.quantize_base(int8)
    sg.prepare(int8, plan, additive=True)
    try:
        shard(int8)
        refused = None
    except sg.SurgicalError as e:
        refused = str(e)
    types = sorted({type(p.to_local()).__name__ for p in quantized})
    info = {
        "held": held,
        "total": report.bytes_after,
        "types": types,
        "losses": losses,
        "int8_refused": refused,
    }
    (out / f"nf4-rank{rank}.json").write_text(json.dumps(info))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out)
    model, plan = model_and_plan()
    sg.prepare(model, plan, additive=True)
    shard(model)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    held = sum(p.to_local().numel() if is_dtensor(p) else p.numel() for p in frozen)
    total = sum(p.numel() for p in frozen)
    opt, losses = train_sharded(model, rank, world)
    base_gap = base_values_gap(model, halves(global_batches()[0], world)[rank])
    regrow_refused = None
    try:  # prune-and-regrow ranks each tensor's entries on one process: refused when sharded
        Regrow(every=2).on_train_begin(StepState(model, opt, None, 0, STEPS))
    except sg.SurgicalError as e:
        regrow_refused = str(e)
    delta = sg.extract(model)  # a collective: every rank reads the sharded values whole
    delta.meta["world_size"] = world
    delta.save(out / f"rank{rank}")
    refused = {**refusals(rank), "regrow_sharded": regrow_refused}
    info = {"frozen_held": held, "frozen_total": total, "losses": losses, "refused": refused, **base_gap}
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    dist.barrier()
    checkpoint_and_resume(out, rank, world)
    nf4 = importlib.util.find_spec("torchao") is not None  # the quant extra
    if nf4:
        quantized_sharded(out, rank, world)
    if rank == 0:
        train_single(out)
        if nf4:
            train_single(out, bits=4)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
