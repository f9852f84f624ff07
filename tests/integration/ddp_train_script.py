"""Run by test_train_ddp.py under `torchrun` or `accelerate launch` (2 processes): DDP training.

Each rank trains on its own shard of the batches with accelerate (gloo, CPU) and saves the delta
it ends with under ``<out>/rank<R>``; the test checks that both ranks hold the same delta.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the tiny model configs

import surgical as sg  # noqa: E402
from conftest import cls_batches, tiny_bert  # noqa: E402


def main(out: str) -> None:
    acc = Accelerator(cpu=True)
    model = tiny_bert()
    batches = cls_batches(n=8)
    plan = sg.select(
        model, batches, method="random", density=0.05, always=["classifier"], seed=0, progress=False
    )
    sg.prepare(model, plan)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ddp_model, opt = acc.prepare(model, opt)
    mine = batches[acc.process_index :: acc.num_processes]  # a different shard on each rank
    ddp_model.train()
    for batch in mine * 2:
        loss = ddp_model(**batch).loss
        opt.zero_grad()
        acc.backward(loss)
        opt.step()
    delta = sg.extract(acc.unwrap_model(ddp_model))
    delta.meta["world_size"] = acc.num_processes
    delta.meta["distributed_type"] = str(acc.distributed_type)
    delta.save(Path(out) / f"rank{acc.process_index}")
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
