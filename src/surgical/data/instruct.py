"""Instruction data for causal LMs: prompt + response, with the loss on the response only."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


def pad_id(tokenizer) -> int:
    """The id padding gets: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def instruction_example(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one prompt/response pair, untruncated: labels are ``IGNORE_INDEX``
    on the prompt and equal the ids on the response and the end-of-sequence token (if any)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
    return p + r, [IGNORE_INDEX] * len(p) + r


def has_target(labels: Sequence[int]) -> bool:
    """Whether ``labels`` hold a target the loss counts: HF shifts labels, the first never counts."""
    return any(x != IGNORE_INDEX for x in labels[1:])


def causal_batches(
    examples: Iterable[tuple[list[int], list[int]]],
    batch_size: int,
    max_length: int,
    pad: int,
    *,
    packing: bool = False,
    what: str = "target",
) -> list[dict[str, torch.Tensor]]:
    """Untruncated (input ids, labels) examples as right-padded causal-LM batches, all in memory.

    Without ``packing`` each example is truncated to ``max_length`` from the right; with it, the
    examples are concatenated and cut into rows of ``max_length`` tokens (fewer padding tokens;
    attention crosses example boundaries, as in plain packing). An example (or packed row) with
    no target left is dropped. :class:`surgical.data.lazy.LazyBatches` builds the same batches
    without holding them. Raises SurgicalError if nothing is left (naming ``what`` was lost).
    """
    kept = []
    for ids, labels in examples:
        cut = None if packing else max_length  # packed rows are cut after concatenation
        if has_target(labels[:cut]):
            kept.append((ids[:cut], labels[:cut]))
    if packing:
        flat_ids = [t for ids, _ in kept for t in ids]
        flat_labels = [t for _, labels in kept for t in labels]
        rows = range(0, len(flat_ids), max_length)
        kept = [(flat_ids[i : i + max_length], flat_labels[i : i + max_length]) for i in rows]
        kept = [e for e in kept if has_target(e[1])]
    if not kept:
        raise truncated_away(what)
    return pad_batches(kept, batch_size, pad)


def truncated_away(what: str) -> SurgicalError:
    """The error when no example keeps a target within ``max_length``."""
    return SurgicalError(f"every {what} was truncated away", "Raise data.max_length or shorten the prompts")


def instruction_batches(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int,
    max_length: int,
    *,
    packing: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Tokenizes prompt/response pairs into right-padded causal-LM batches.

    ``labels`` equal ``input_ids`` on response tokens (and the end-of-sequence token, if the
    tokenizer has one) and ``IGNORE_INDEX`` on prompt and padding tokens, so the loss measures
    the response only. Examples longer than ``max_length`` are truncated from the right; an
    example whose response is truncated away entirely is dropped. ``packing``: see
    :func:`causal_batches`.
    """
    if len(prompts) != len(responses) or not prompts:
        raise SurgicalError("instruction data is empty", "Pass at least one prompt/response pair")
    examples = (instruction_example(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True))
    return causal_batches(
        examples, batch_size, max_length, pad_id(tokenizer), packing=packing, what="response"
    )


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
