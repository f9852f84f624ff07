"""The one batch builder of every recipe: a data section and a task -> tokenized batches.

- ``classification``: a text column and an integer label column;
- ``causal_lm``: conversations (a ``messages`` column, formatted by the tokenizer's chat
  template, loss on the assistant turns) when the data has that column; else prompt and
  response columns (loss on the response only) when it has the response column; else the text
  column modelled whole (padding is not a target).

IMDB-style ``<br />`` line breaks become spaces, here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from surgical.core.errors import SurgicalError
from surgical.data.instruct import IGNORE_INDEX
from surgical.data.lazy import BatchesOf, LazyBatches, lazy_chat_batches, lazy_instruction_batches
from surgical.data.table import load_table, open_table
from surgical.data.text import TextExamples, text_batches
from surgical.recipes.config import DataConfig


def clean_text(text: str) -> str:
    """Text as the models see it: HTML line breaks (IMDB's ``<br />``) become spaces."""
    return text.replace("<br />", " ")


def read_examples(source: Any, text_column: str, label_column: str | None, split: str = "train",
                  limit: int | None = None) -> TextExamples:  # fmt: skip
    """Texts (and integer labels when ``label_column`` is given) from any source
    :func:`surgical.data.load_table` reads, cleaned by :func:`clean_text`."""
    ex = TextExamples.load(source, text_column, label_column, split=split, limit=limit)
    return TextExamples([clean_text(t) for t in ex.texts], ex.labels)


def _has_column(d: DataConfig, column: str) -> bool:
    return column in load_table(d.path, [], split=d.split, limit=1)[0]


def make_batches(
    d: DataConfig,
    task: str,
    tokenizer,
    *,
    num_labels: int | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> Sequence[dict[str, torch.Tensor]]:
    """Reads ``d`` and tokenizes it into batches for ``task``.

    Causal-LM batches are tokenized when asked for: a :class:`surgical.data.lazy.LazyBatches`
    (chat and prompt/response data; an index of a few bytes per example instead of the tokens,
    over rows that stay in the dataset for Arrow, Parquet and save_to_disk data, see
    :func:`surgical.data.table.open_table`), or batches of texts tokenized per batch.

    Args:
        d: The data section.
        task: ``classification`` or ``causal_lm``.
        tokenizer: The model's tokenizer.
        num_labels: Classification: labels must lie in ``0..num_labels-1``.
        sample: Keep a seeded random sample of this many examples (calibration data); None:
            every example in order.
        seed: Seed of the sample.

    Raises:
        SurgicalError: missing columns, empty data, labels out of range, responses truncated away.
    """
    if task == "causal_lm" and _has_column(d, d.messages_column):
        rows = _sample(open_table(d.path, [d.messages_column], split=d.split, limit=d.limit), sample, seed)
        return _indexed(
            lazy_chat_batches(
                tokenizer, rows, d.batch_size, d.max_length, packing=d.packing, column=d.messages_column
            )
        )
    if task == "causal_lm" and _has_column(d, d.response_column):
        rows = open_table(d.path, [d.prompt_column, d.response_column], split=d.split, limit=d.limit)
        return _indexed(
            lazy_instruction_batches(
                tokenizer,
                _sample(rows, sample, seed),
                d.batch_size,
                d.max_length,
                prompt_column=d.prompt_column,
                response_column=d.response_column,
                packing=d.packing,
                clean=clean_text,
            )
        )
    if task == "causal_lm" and not _has_column(d, d.text_column):
        names = ", ".join(load_table(d.path, [], split=d.split, limit=1)[0])
        raise SurgicalError(
            f"{d.path} has none of the columns a causal-LM dataset is read by (it has {names}): "
            f"{d.messages_column!r} (chat), {d.response_column!r} with {d.prompt_column!r}, or "
            f"{d.text_column!r} (plain text)",
            "Name its columns with data.messages_column, data.response_column and data.prompt_column, "
            "or data.text_column",
        )
    labelled = task == "classification"
    ex = read_examples(d.path, d.text_column, d.label_column if labelled else None, d.split, d.limit)
    if sample is not None:
        order = torch.randperm(len(ex), generator=torch.Generator().manual_seed(seed))
        ex = ex.subset(order[:sample].tolist())
    if labelled and num_labels is not None:
        bad = [x for x in ex.labels if not 0 <= x < num_labels]
        if bad:
            raise SurgicalError(f"label {bad[0]} is outside 0..{num_labels - 1}", "Set model.num_labels")
    if labelled:
        return text_batches(tokenizer, ex, d.batch_size, d.max_length)
    if not len(ex):
        raise SurgicalError("the dataset is empty", "Pass a dataset with at least one example")
    size = d.batch_size

    def text_lm_batch(i: int) -> dict[str, torch.Tensor]:
        chunk = ex.subset(range(i * size, min((i + 1) * size, len(ex))))
        (b,) = text_batches(tokenizer, chunk, size, d.max_length)
        labels = b["input_ids"].clone()
        labels[b["attention_mask"] == 0] = IGNORE_INDEX  # padding is not a target
        b["labels"] = labels
        b.pop("token_type_ids", None)
        return b

    return BatchesOf(-(-len(ex) // size), text_lm_batch)  # tokenized when asked for


def _indexed(batches: LazyBatches) -> LazyBatches:
    """``batches`` with their index made: every example is tokenized (and checked) once, here,
    so bad data fails before any model work, as when the batches were built up front."""
    len(batches)
    return batches


def _sample(rows: Sequence, sample: int | None, seed: int) -> Sequence:
    if sample is None:
        return rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return [rows[i] for i in order[:sample].tolist()]
