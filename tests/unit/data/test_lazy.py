"""Lazy causal-LM batches: the same tensors as the batches built up front, without holding them."""

from __future__ import annotations

import tracemalloc

import pytest
import torch

from surgical.core.errors import SurgicalError
from surgical.data.chat import chat_batches
from surgical.data.instruct import instruction_batches
from surgical.data.lazy import LazyBatches, lazy_chat_batches, lazy_instruction_batches
from surgical.train.identity import fingerprint_batches
from train_fixtures import WORDS, conversations, tiny_chat_tokenizer, tiny_tokenizer


def _pairs(n: int) -> tuple[list[str], list[str]]:
    prompts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(i % 9)) for i in range(n)]
    responses = [" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(1 + i % 5)) for i in range(n)]
    return prompts, responses


def _same(lazy, eager) -> None:
    assert len(lazy) == len(eager)
    for a, b in zip(lazy, eager, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fingerprint_batches(lazy) == fingerprint_batches(eager)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("max_length, batch_size", [(64, 3), (16, 2), (23, 4)])
def test_lazy_chat_batches_equal_the_eager_ones(packing, max_length, batch_size):
    tok = tiny_chat_tokenizer()
    convs = conversations(11, seed=1)
    convs[3] = convs[3][:3]  # one answer only: some examples lose every target when truncated
    eager = chat_batches(tok, convs, batch_size, max_length, packing=packing)
    _same(lazy_chat_batches(tok, convs, batch_size, max_length, packing=packing), eager)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("max_length, batch_size", [(32, 4), (6, 3), (3, 2)])
def test_lazy_instruction_batches_equal_the_eager_ones(packing, max_length, batch_size):
    tok = tiny_tokenizer()
    prompts, responses = _pairs(23)
    eager = instruction_batches(tok, prompts, responses, batch_size, max_length, packing=packing)
    rows = [{"q": p, "a": r} for p, r in zip(prompts, responses, strict=True)]
    lazy = lazy_instruction_batches(
        tok, rows, batch_size, max_length, prompt_column="q", response_column="a", packing=packing
    )
    _same(lazy, eager)
    assert torch.equal(lazy[-1]["input_ids"], eager[-1]["input_ids"])  # negative indices and slices
    pairs = list(zip(lazy[1:3], eager[1:3], strict=True))
    assert len(pairs) == min(2, len(eager) - 1) and all(
        torch.equal(a["labels"], b["labels"]) for a, b in pairs
    )


class Counted:
    """A large synthetic dataset that counts the rows read from it."""

    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        return {"q": f"the film was {WORDS[i % len(WORDS)]}", "a": "very good"}


@pytest.mark.parametrize("packing", [False, True])
def test_a_large_dataset_is_never_materialised(packing):
    tok = tiny_tokenizer()
    rows = Counted(5_000)
    tracemalloc.start()
    try:
        batches = lazy_instruction_batches(
            tok, rows, 8, 16, prompt_column="q", response_column="a", packing=packing
        )
        assert rows.reads == 0  # building it reads nothing
        held = tracemalloc.get_traced_memory()[0]
        n = len(batches)  # one pass to index: each row read once, its tokens dropped
        assert rows.reads == rows.n
        held = tracemalloc.get_traced_memory()[0] - held
    finally:
        tracemalloc.stop()
    # the index is two 8-byte numbers per example at most (the tokens alone are ~8 ints each)
    assert held < 2 * 8 * rows.n + 100_000, held
    rows.reads = 0
    batch = batches[n // 2]
    own = 8 * 16 // 7 + 2 if packing else 8  # packed: the 7-token examples that overlap its 8 rows
    assert rows.reads <= own and batch["input_ids"].shape[0] == 8  # only its own rows are read


def test_errors_show_when_the_batches_are_indexed():
    tok = tiny_chat_tokenizer()
    bad = [*conversations(3), [{"role": "user", "content": "the film"}]]
    batches = lazy_chat_batches(tok, bad, 2, 64)  # nothing is read yet
    with pytest.raises(SurgicalError, match="conversation 4 has no assistant message"):
        len(batches)
    with pytest.raises(SurgicalError, match="every answer was truncated away"):
        len(lazy_chat_batches(tok, conversations(3), 2, 1))
    with pytest.raises(SurgicalError, match="is empty"):
        lazy_chat_batches(tok, [], 2, 64)


def test_a_tokenizer_that_changes_under_packing_is_caught():
    tok = tiny_tokenizer()
    calls = []

    def encode(item, n):
        calls.append(n)
        extra = [5] if len(calls) > 4 else []  # tokenizes longer after the index pass
        return [1, 2, 3, *extra], [-100, 2, 3, *extra]

    batches = LazyBatches(list(range(4)), encode, 2, 5, tok.pad_token_id, packing=True)
    with pytest.raises(SurgicalError, match="tokenized differently"):
        batches[0]
