"""Chat data for causal LMs: conversations formatted by the tokenizer's chat template, with the
loss on the assistant turns only.

A conversation is a list of ``{"role": ..., "content": ...}`` messages (a ``messages`` column,
as TRL and the Hugging Face chat datasets store them). The assistant tokens are found without
relying on template markers: for each assistant message, the conversation before it is rendered
with the generation prompt, the conversation up to and including it is rendered, and the tokens
in between are that turn (its content and the end-of-turn tokens the template adds). A template
that does not render conversations as growing prefixes is refused, since no split of its tokens
into prompt and answer would be trustworthy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from surgical.core.errors import SurgicalError
from surgical.data.instruct import IGNORE_INDEX, causal_batches, pad_id

ROLES = ("system", "user", "assistant", "tool")


def _render(tokenizer, messages: list[dict[str, Any]], generation_prompt: bool, where: str) -> list[int]:
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    except TemplateError as e:  # raise_exception(...) in the template, or a field it lacks
        raise SurgicalError(
            f"the chat template rejects {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
            "Use the roles and order this template accepts, or prompt/response columns",
        ) from None
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers may return a BatchEncoding
        out = out["input_ids"]
    return [int(i) for i in out]


def check_conversation(messages: Any, where: str) -> list[dict[str, str]]:
    """``messages`` as a list of role/content dicts with an assistant turn, or a SurgicalError."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise SurgicalError(
            f"{where} is not a non-empty list of messages", "Store [{role, content}, ...] in it"
        )
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SurgicalError(f"{where} holds a message without role and content", "Fix that message")
        if m["role"] not in ROLES:
            raise SurgicalError(
                f"{where} has a message of role {m['role']!r}", f"Use one of: {', '.join(ROLES)}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise SurgicalError(
            f"{where} has no assistant message to learn", "Add the answer as role 'assistant'"
        )
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def chat_example(
    tokenizer, messages: Sequence[dict[str, Any]], where: str = "a conversation"
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one conversation; labels are ``IGNORE_INDEX`` outside the
    assistant turns.

    Raises:
        SurgicalError: the tokenizer has no chat template, the conversation is malformed, or the
            template does not render it as growing prefixes.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise SurgicalError(
            "the tokenizer has no chat template, so a messages column cannot be formatted",
            "Use a chat model's tokenizer, or prompt/response columns",
        )
    messages = check_conversation(messages, where)
    ids = _render(tokenizer, messages, False, where)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where) if i else []
        upto = _render(tokenizer, messages[: i + 1], False, where)
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            raise SurgicalError(
                f"the chat template does not render {where} as growing prefixes (turn {i + 1})",
                "Use prompt/response columns for this tokenizer",
            )
        labels[len(before) : len(upto)] = ids[len(before) : len(upto)]
    return {"input_ids": ids, "labels": labels}


def chat_batches(
    tokenizer,
    conversations: Sequence[Sequence[dict[str, Any]]],
    batch_size: int,
    max_length: int,
    *,
    packing: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Tokenized, right-padded causal-LM batches of conversations (loss on assistant turns), all
    in memory; :func:`surgical.data.lazy.lazy_chat_batches` gives the same batches tokenized on access.

    Examples longer than ``max_length`` are truncated from the right; one whose answer is
    truncated away entirely is dropped. With ``packing``, examples are concatenated into rows of
    ``max_length`` tokens (fewer padding tokens; attention crosses example boundaries, as in
    plain packing).
    """
    if not conversations:
        raise SurgicalError("the chat data is empty", "Pass at least one conversation")
    examples = (chat_pair(tokenizer, conv, n) for n, conv in enumerate(conversations))
    return causal_batches(examples, batch_size, max_length, pad_id(tokenizer), packing=packing, what="answer")


def chat_pair(tokenizer, conversation: Any, n: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of conversation number ``n`` (0-based), as :func:`chat_example`."""
    ex = chat_example(tokenizer, conversation, f"conversation {n + 1}")
    return ex["input_ids"], ex["labels"]


def trl_dataset(tokenizer, conversations: Any, column: str = "messages"):
    """Conversations as a tokenized ``datasets.Dataset`` for TRL's ``SFTTrainer``.

    Columns ``input_ids`` and ``labels`` (``IGNORE_INDEX`` outside the assistant turns), which
    TRL's collator uses as they are: the same tokens and the same loss mask as
    :func:`chat_batches`, whatever markers the chat template has (TRL's own assistant-only loss
    needs ``{% generation %}`` markers that many templates lack).

    ``conversations``: a list of conversations, or a ``datasets.Dataset`` whose ``column`` holds
    them; a Dataset is tokenized by ``Dataset.map`` (cached on disk when it is file-backed), so
    the tokens are not held in Python lists.
    """
    import datasets

    if not isinstance(conversations, datasets.Dataset):
        rows = [chat_example(tokenizer, c, f"conversation {n + 1}") for n, c in enumerate(conversations)]
        return datasets.Dataset.from_list(rows)
    if column not in conversations.column_names:
        raise SurgicalError(
            f"the dataset has no column {column!r} (it has {', '.join(conversations.column_names)})",
            "Pass the column that holds the conversations",
        )

    def encode(row: dict[str, Any], n: int) -> dict[str, list[int]]:
        return chat_example(tokenizer, row[column], f"conversation {n + 1}")

    return conversations.map(encode, with_indices=True, remove_columns=conversations.column_names)
