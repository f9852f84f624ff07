"""A prepared model trains under TRL's SFTTrainer on chat data; the delta comes out exact."""

from __future__ import annotations

import copy

import pytest
import torch

import surgical as sg
from conftest import tiny_llama
from surgical.data.chat import IGNORE_INDEX, chat_batches, trl_dataset
from train_fixtures import conversations, tiny_chat_tokenizer

trl = pytest.importorskip("trl")


def test_sft_trainer_trains_the_selection_and_saves_an_exact_delta(tmp_path):
    tok = tiny_chat_tokenizer()
    model = tiny_llama()
    base = copy.deepcopy(model)
    plan = sg.select(model, None, method="magnitude", density=0.05, progress=False)
    sg.prepare(model, plan)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        save_strategy="steps",
        save_steps=2,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=trl_dataset(tok, conversations(16)),
        processing_class=tok,
        callbacks=[sg.SurgicalCallback(save_delta=True)],
    )
    trainer.train()
    delta = sg.Delta.load(tmp_path / "surgical-delta")
    assert (tmp_path / "checkpoint-2" / "surgical-delta").is_dir()  # a delta in each checkpoint
    assert delta.num_entries == plan.num_entries and delta.names()
    fresh = copy.deepcopy(base)
    sg.apply(fresh, delta)
    sg.sync(model)
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters())
    moved = sum(int((trained[n] != before[n]).sum()) for n in before if not n.endswith("_sg_delta"))
    assert 0 < moved <= plan.num_entries  # only the selected entries changed


def test_trl_collates_the_same_tokens_and_loss_mask_as_surgical():
    tok = tiny_chat_tokenizer()
    ds = trl_dataset(tok, conversations(4))
    collator = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
    theirs = collator([ds[i] for i in range(4)])
    ours = chat_batches(tok, conversations(4), batch_size=4, max_length=512)[0]
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert torch.equal(theirs["labels"], ours["labels"]) and int((ours["labels"] != IGNORE_INDEX).sum()) > 0
