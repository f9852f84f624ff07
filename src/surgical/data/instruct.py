"""Instruction data for causal LMs: prompt + response, with the loss on the response only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from surgical.core.errors import SurgicalError
from surgical.data.table import load_table

IGNORE_INDEX = -100  # the label value Hugging Face losses skip


def load_instructions(
    source: Any,
    prompt_column: str = "prompt",
    response_column: str = "response",
    *,
    split: str = "train",
    limit: int | None = None,
) -> tuple[list[str], list[str]]:
    """(prompts, responses) from any source :func:`surgical.data.load_table` reads.

    Use with :func:`instruction_batches`:
    ``instruction_batches(tok, *load_instructions(ds), batch_size=8, max_length=256)``.

    Args:
        source: A file or ``save_to_disk`` directory path, or a ``datasets.Dataset`` /
            ``DatasetDict``.
        split: Split of a ``DatasetDict``.
        limit: Read only the first ``limit`` examples.

    Raises:
        SurgicalError: for what :func:`load_table` refuses (missing columns, no rows, ...).
    """
    rows = load_table(source, [prompt_column, response_column], split=split, limit=limit)
    return [str(r[prompt_column]) for r in rows], [str(r[response_column]) for r in rows]


def instruction_batches(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int,
    max_length: int,
) -> list[dict[str, torch.Tensor]]:
    """Tokenizes prompt/response pairs into right-padded causal-LM batches.

    ``labels`` equal ``input_ids`` on response tokens (and the end-of-sequence token, if the
    tokenizer has one) and ``IGNORE_INDEX`` on prompt and padding tokens, so the loss measures
    the response only. Examples longer than ``max_length`` are truncated from the right; an
    example whose response is truncated away entirely is dropped.
    """
    if len(prompts) != len(responses) or not prompts:
        raise SurgicalError("instruction data is empty", "Pass at least one prompt/response pair")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for prompt, response in zip(prompts, responses, strict=True):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
        ids = (p + r)[:max_length]
        labels = ([IGNORE_INDEX] * len(p) + r)[:max_length]
        if any(x != IGNORE_INDEX for x in labels[1:]):  # HF shifts labels: the first never counts
            examples.append((ids, labels))
    if not examples:
        raise SurgicalError(
            "every response was truncated away", "Raise data.max_length or shorten the prompts"
        )
    return pad_batches(examples, batch_size, pad)


def pad_batches(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int, pad: int
) -> list[dict[str, torch.Tensor]]:
    """(input ids, labels) pairs as right-padded batches; padding gets ``IGNORE_INDEX`` labels and
    attention mask 0."""
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids_t = torch.full((len(chunk), width), pad, dtype=torch.long)
        lab_t = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, labels) in enumerate(chunk):
            ids_t[i, : len(ids)] = torch.tensor(list(ids))
            lab_t[i, : len(labels)] = torch.tensor(list(labels))
            mask[i, : len(ids)] = 1
        batches.append({"input_ids": ids_t, "attention_mask": mask, "labels": lab_t})
    return batches
