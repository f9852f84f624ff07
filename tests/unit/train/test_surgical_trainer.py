"""SurgicalTrainer: the HF Trainer with a per-step batch filter (token or online selection)."""

from __future__ import annotations

import torch
from transformers import TrainingArguments

import surgical as sg
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama


def _rows(batches):
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]


def test_the_filter_sees_every_step_and_its_sub_batch_is_what_trains(tmp_path):
    model = tiny_bert()
    sg.prepare(model, sg.select(model, None, method="magnitude", density=0.05, progress=False))
    seen = []

    def first_two(m, batch, step):
        seen.append((step, batch["input_ids"].shape[0]))
        return {k: v[:2] for k, v in batch.items()}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=3,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        save_strategy="no",
    )
    sg.SurgicalTrainer(
        model=model, args=args, train_dataset=_rows(cls_batches()), batch_filter=first_two
    ).train()
    assert seen == [(0, 8), (1, 8), (2, 8)]


def test_online_selection_through_the_trainer_keeps_the_fraction(tmp_path):
    model = tiny_llama()
    sg.prepare(model, sg.select(model, None, method="magnitude", density=0.05, progress=False))
    selector = sg.OnlineSelector(fraction=0.5)
    kept = []

    def select(m, batch, step):
        sub = selector(m, batch)
        kept.append(sub["input_ids"].shape[0])
        return sub

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        save_strategy="no",
    )
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    sg.SurgicalTrainer(model=model, args=args, train_dataset=_rows(lm_batches()), batch_filter=select).train()
    assert kept == [2, 2]
    assert any(
        not torch.equal(b, p)
        for b, p in zip(before, [p for p in model.parameters() if p.requires_grad], strict=True)
    )
