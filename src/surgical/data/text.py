"""Text classification data: reading tables and turning them into model batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from surgical.core.errors import SurgicalError
from surgical.data.table import describe, load_table


@dataclass
class TextExamples:
    """Texts with integer labels."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> TextExamples:
        """The examples at positions ``idx``, in that order."""
        return TextExamples([self.texts[i] for i in idx], [self.labels[i] for i in idx])

    @classmethod
    def load(
        cls,
        source: Any,
        text_column: str = "text",
        label_column: str | None = "label",
        *,
        split: str = "train",
        limit: int | None = None,
    ) -> TextExamples:
        """Texts and integer labels from any source :func:`surgical.data.load_table` reads.

        Args:
            source: A file or ``save_to_disk`` directory path, or a ``datasets.Dataset`` /
                ``DatasetDict``.
            text_column: Column holding the text.
            label_column: Column holding integer labels; None: no labels (all 0).
            split: Split of a ``DatasetDict``.
            limit: Read only the first ``limit`` examples.

        Raises:
            SurgicalError: for what :func:`load_table` refuses, and a label that is not an integer.
        """
        columns = [text_column] + ([label_column] if label_column else [])
        rows = load_table(source, columns, split=split, limit=limit)
        labels = [0] * len(rows)
        if label_column:
            try:
                labels = [int(r[label_column]) for r in rows]
            except (TypeError, ValueError) as e:
                raise SurgicalError(
                    f"column {label_column!r} of {describe(source, split)} must hold integer labels ({e})",
                    "Map the labels to 0..C-1",
                ) from None
        return cls([str(r[text_column]) for r in rows], labels)


def text_batches(
    tokenizer,
    data: Any,
    batch_size: int,
    max_length: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    text_column: str = "text",
    label_column: str = "label",
) -> list[dict[str, torch.Tensor]]:
    """Tokenizes ``data`` into batches with labels, padded to the longest text of each batch.

    Args:
        tokenizer: A Hugging Face tokenizer.
        data: :class:`TextExamples`, or anything :meth:`TextExamples.load` reads (a
            ``datasets.Dataset``, a file path), read with ``text_column`` and ``label_column``.
        batch_size: Examples per batch (the last batch may be smaller).
        max_length: Tokens per text; longer texts are truncated.
        shuffle: Shuffle the examples first, with ``seed``.
    """
    if not isinstance(data, TextExamples):
        data = TextExamples.load(data, text_column, label_column)
    if len(data) == 0:
        raise SurgicalError("the dataset is empty", "Pass a dataset with at least one example")
    order = list(range(len(data)))
    if shuffle:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [data.texts[i] for i in idx],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        enc["labels"] = torch.tensor([data.labels[i] for i in idx], dtype=torch.long)
        batches.append(enc)
    return batches
