"""Run by test_train_deepspeed.py under `torchrun` (2 processes, gloo, CPU): DeepSpeed ZeRO
through accelerate.

The model and plan of ``fsdp_train_script`` (entries on every Linear weight, the final norm
trained densely) go through ``accelerate.Accelerator(deepspeed_plugin=...)`` at ZeRO stage
``<stage>``: stage 2 (optimizer state and gradients partitioned, weights whole) with entries
trained in place, stage 3 (weights partitioned too; ``stage3_param_persistence_threshold: 0``
so that even this tiny model's weights are partitioned) with ``additive=True``. Each rank trains
on its half of every global batch and saves the delta it extracts under ``<out>/rank<R>``;
rank 0 saves the single-process reference under ``<out>/single``.

accelerate does not start the process group for DeepSpeed on a CPU machine (it reports one
process), so it is started here; the DeepSpeed engine then runs on both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fsdp_train_script import LR, global_batches, halves, model_and_plan, train_single  # noqa: E402

import surgical as sg  # noqa: E402


def main(out: str, stage: str) -> None:
    stage_n = int(stage)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    plugin = DeepSpeedPlugin(zero_stage=stage_n, gradient_accumulation_steps=1)
    plugin.deepspeed_config.update(
        zero_allow_untested_optimizer=True, train_micro_batch_size_per_gpu=2, train_batch_size=2 * world
    )
    if stage_n == 3:
        plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    acc = Accelerator(deepspeed_plugin=plugin)
    model, plan = model_and_plan()
    sg.prepare(model, plan, additive=stage_n == 3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, opt = acc.prepare(model, opt)
    assert engine.world_size == world  # DeepSpeed itself runs on both processes
    for batch in global_batches():
        loss = engine(**halves(batch, world)[rank]).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
    delta = sg.extract(acc.unwrap_model(engine))  # a collective at stage 3: partitions gathered
    delta.meta["zero_stage"] = stage_n
    delta.save(Path(out) / f"rank{rank}")
    dist.barrier()
    if rank == 0:
        train_single(Path(out), additive=stage_n == 3)


if __name__ == "__main__":
    main(*sys.argv[1:])
