"""Instruction batches: the loss covers the response (and EOS) only; padding and truncation."""

from __future__ import annotations

import pytest

from surgical.core.errors import SurgicalError
from surgical.data.instruct import IGNORE_INDEX, instruction_batches
from train_fixtures import tiny_tokenizer


def test_labels_mask_prompt_and_padding():
    tok = tiny_tokenizer()
    prompts, responses = ["the film was", "the movie was very very"], ["good", "bad fun"]
    (batch,) = instruction_batches(tok, prompts, responses, batch_size=2, max_length=32)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (2, 8)  # 5 prompt + 2 response + EOS
    eos = tok.eos_token_id
    p0 = len(tok("the film was")["input_ids"])
    assert labels[0, :p0].eq(IGNORE_INDEX).all()
    assert labels[0, p0:].tolist()[:2] == [tok.convert_tokens_to_ids("good"), eos]
    assert labels[0, p0 + 2 :].eq(IGNORE_INDEX).all() and mask[0].sum() == p0 + 2  # padding: no loss
    assert ids[0, p0 + 2 :].eq(tok.pad_token_id).all()
    assert labels[1, -3:].tolist() == [
        tok.convert_tokens_to_ids("bad"),
        tok.convert_tokens_to_ids("fun"),
        eos,
    ]


def test_truncation_and_examples_without_response_tokens():
    tok = tiny_tokenizer()
    (batch,) = instruction_batches(
        tok, ["the film was", "a"], ["good movie", "fun"], batch_size=4, max_length=4
    )
    assert batch["input_ids"].shape == (2, 4)
    assert batch["labels"][0].tolist()[-1] == tok.convert_tokens_to_ids("good")  # cut after 1 token
    with pytest.raises(SurgicalError, match="truncated away"):
        instruction_batches(tok, ["the film was very"], ["good"], batch_size=1, max_length=4)
