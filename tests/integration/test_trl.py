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


def _prepared():
    """A tiny Llama prepared on a 5% magnitude plan, its base copy and the plan."""
    model = tiny_llama()
    base = copy.deepcopy(model)
    plan = sg.select(model, None, method="magnitude", density=0.05, progress=False)
    sg.prepare(model, plan)
    return model, base, plan


def _check_delta(out, model, base, plan) -> None:
    """The delta saved at the end, applied to the base, is the trained model exactly; only
    selected entries moved, and some did."""
    delta = sg.Delta.load(out / "surgical-delta")
    assert delta.num_entries == plan.num_entries
    fresh = copy.deepcopy(base)
    sg.apply(fresh, delta)
    sg.sync(model)
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters())  # round-trips exactly
    for name, p in base.named_parameters():
        moved = (p != trained[name]).view(-1).nonzero().view(-1)
        if name in plan.sparse_names:
            assert set(moved.tolist()) <= set(plan.entry_indices(name).tolist()), name
        else:
            assert moved.numel() == 0, name
    assert sum(int((p != trained[n]).sum()) for n, p in base.named_parameters()) > 0


def test_sft_trainer_trains_the_selection_and_saves_an_exact_delta(tmp_path):
    tok = tiny_chat_tokenizer()
    model, base, plan = _prepared()
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
    assert (tmp_path / "checkpoint-2" / "surgical-delta").is_dir()  # a delta in each checkpoint
    _check_delta(tmp_path, model, base, plan)


def test_trl_collates_the_same_tokens_and_loss_mask_as_surgical():
    tok = tiny_chat_tokenizer()
    ds = trl_dataset(tok, conversations(4))
    collator = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
    theirs = collator([ds[i] for i in range(4)])
    ours = chat_batches(tok, conversations(4), batch_size=4, max_length=512)[0]
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert torch.equal(theirs["labels"], ours["labels"]) and int((ours["labels"] != IGNORE_INDEX).sum()) > 0


def _preferences(n: int):
    """Conversational preference pairs: the sentiment word's answer is chosen, its opposite rejected."""
    import datasets

    rows = []
    for i in range(n):
        word = ["good", "great", "fun", "bad", "awful", "dull"][i % 6]
        right, wrong = ("good", "bad") if i % 6 < 3 else ("bad", "good")
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"the film was {word}"}],
                "chosen": [{"role": "assistant", "content": right}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return datasets.Dataset.from_list(rows)


def test_dpo_trainer_trains_the_selection_against_the_base_as_reference(tmp_path):
    tok = tiny_chat_tokenizer()
    model, base, plan = _prepared()
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=3e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        # the reference is the prepared model before its first step, i.e. the base: its log-probs
        # are computed once up front, so no second model is kept (TRL's ref-free full fine-tuning)
        precompute_ref_log_probs=True,
    )
    trainer = trl.DPOTrainer(
        model=model,
        args=args,
        train_dataset=_preferences(24),
        processing_class=tok,
        callbacks=[sg.SurgicalCallback(save_delta=True)],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert logs[0]["rewards/margins"] == 0.0  # the first step's policy is the reference
    assert logs[-1]["rewards/margins"] > 0 and logs[-1]["loss"] < logs[0]["loss"]
    assert (tmp_path / "checkpoint-3" / "surgical-delta").is_dir()
    _check_delta(tmp_path, model, base, plan)


def test_trl_dataset_maps_a_dataset_to_the_same_rows_as_a_list():
    import datasets

    tok = tiny_chat_tokenizer()
    convs = conversations(6)
    mapped = trl_dataset(
        tok, datasets.Dataset.from_list([{"messages": c, "id": i} for i, c in enumerate(convs)])
    )
    assert mapped.column_names == ["input_ids", "labels"]
    assert mapped.to_list() == trl_dataset(tok, convs).to_list()
