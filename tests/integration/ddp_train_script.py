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
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama  # noqa: E402
from surgical.select.plan import Plan  # noqa: E402


def _tied_llama_and_plan():
    """A Llama whose embedding is tied to its head: entries on every Linear, plus token rows of
    the shared embedding (one block that both the lookup and the head feed)."""
    model = tiny_llama()
    plan = sg.select(model, method="random", density=0.05, seed=0, progress=False)
    emb = "model.embed_tokens.weight"
    rows = torch.arange(1, 100, 7)  # tokens the batches use, and (by chance) some they don't
    plan = Plan(entries=plan.entries, rows={emb: rows}, shapes={**plan.shapes, emb: (100, 32)},
                meta={"method": "random+rows"})  # fmt: skip
    return model, lm_batches(n=8), plan


def main(out: str, kind: str = "entries") -> None:
    acc = Accelerator(cpu=True)
    if kind == "tied":
        model, batches, plan = _tied_llama_and_plan()
    else:
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
    main(*sys.argv[1:])
