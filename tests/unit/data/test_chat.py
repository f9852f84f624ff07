"""Chat data: the loss is on the assistant turns only, formatted by the chat template."""

from __future__ import annotations

import pytest

from surgical.core.errors import SurgicalError
from surgical.data.chat import IGNORE_INDEX, chat_batches, chat_example
from train_fixtures import conversations, tiny_chat_tokenizer, tiny_tokenizer


def test_labels_cover_exactly_the_assistant_turns():
    tok = tiny_chat_tokenizer()
    conv = conversations(1)[0]
    ex = chat_example(tok, conv)
    ids, labels = ex["input_ids"], ex["labels"]
    text = tok.convert_ids_to_tokens(ids)
    learned = [t for t, lab in zip(text, labels, strict=True) if lab != IGNORE_INDEX]
    answers = " ".join(m["content"] for m in conv if m["role"] == "assistant").split()
    assert [t for t in learned if t != "[EOS]"] == answers  # the answers' words, in order
    assert learned.count("[EOS]") == 2  # each turn's end is learned too
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(labels, ids, strict=True))
    assert "user" not in learned and "system" not in learned and ":" not in learned


def test_batches_pad_and_never_label_padding_or_prompts():
    tok = tiny_chat_tokenizer()
    batches = chat_batches(tok, conversations(5), batch_size=2, max_length=64)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    for b in batches:
        assert ((b["attention_mask"] == 0) <= (b["labels"] == IGNORE_INDEX)).all()
    packed = chat_batches(tok, conversations(5), batch_size=2, max_length=16, packing=True)
    assert all(b["input_ids"].shape[1] <= 16 for b in packed)
    unpacked_targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    packed_targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in packed)
    # every target is kept but the first token of each packed row (no token before it predicts it)
    assert unpacked_targets - len(packed) <= packed_targets <= unpacked_targets


@pytest.mark.parametrize(
    "conv, needle",
    [
        ([], "is not a non-empty list of messages"),
        ([{"role": "user"}], "without role and content"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "user", "content": "x"}], "no assistant message"),
    ],
)
def test_bad_conversations_are_one_line_errors(conv, needle):
    with pytest.raises(SurgicalError, match=needle):
        chat_example(tiny_chat_tokenizer(), conv)


def test_a_tokenizer_without_a_chat_template_is_refused():
    with pytest.raises(SurgicalError, match="has no chat template"):
        chat_example(tiny_tokenizer(), conversations(1)[0])


def test_a_template_that_is_not_prefix_stable_is_refused():
    tok = tiny_chat_tokenizer()
    tok.chat_template = "{% for m in messages|reverse %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(SurgicalError, match="growing prefixes"):
        chat_example(tok, conversations(1)[0])


def test_a_template_that_raises_is_one_line_naming_the_conversation():
    tok = tiny_chat_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
    )
    with pytest.raises(
        SurgicalError, match="the chat template rejects conversation 3: System role not supported"
    ):
        chat_example(tok, conversations(1)[0], "conversation 3")
