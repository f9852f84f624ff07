"""Text classification data: reading tables and turning them into model batches."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from surgical.errors import SurgicalError


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


def load_table(path: str | Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Reads a CSV or JSON-lines file and checks that ``columns`` are present.

    Raises:
        SurgicalError: if the file is missing or unreadable, lacks a column, or has no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise SurgicalError(
            f"data file {str(path)!r} does not exist", "Pass the path of a .csv or .jsonl file"
        )
    try:
        if path.suffix in (".jsonl", ".json"):
            with open(path) as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
        else:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise SurgicalError(f"cannot parse {str(path)!r}: {e}", "Check the file's format") from None
    if not rows:
        raise SurgicalError(f"data file {str(path)!r} has no rows", "Pass a non-empty dataset")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise SurgicalError(
            f"data file {str(path)!r} lacks column(s) {', '.join(missing)} (it has {', '.join(rows[0])})",
            "Rename the columns or pass the right column names",
        )
    return rows


def text_batches(
    tokenizer,
    data: TextExamples,
    batch_size: int,
    max_length: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Tokenizes ``data`` into batches with labels, padded to the longest text of each batch."""
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
