"""Loading a model and calibration batches from files, for ``surgical select``.

Two tasks: ``classification`` (a sequence classifier; the table needs a text and an integer
label column) and ``causal-lm`` (a causal language model; only the text column is used and the
labels are the input ids, with padding ignored). ``auto`` picks ``causal-lm`` when the model's
config names a ``...ForCausalLM`` architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from surgical.data.text import TextExamples, text_batches
from surgical.errors import SurgicalError
from surgical.utils import quiet_transformers

TASKS = ("auto", "classification", "causal-lm")


def detect_task(model_dir: Path) -> str:
    """``causal-lm`` if config.json names a ForCausalLM/LMHeadModel architecture, else classification."""
    try:
        archs = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        archs = []
    return "causal-lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "classification"


def read_examples(
    source: Any, text_column: str, label_column: str | None, split: str = "train"
) -> TextExamples:
    """Texts (and integer labels when ``label_column`` is given) from any source
    :func:`surgical.data.load_table` reads; IMDB's ``<br />`` line breaks become spaces."""
    ex = TextExamples.load(source, text_column, label_column, split=split)
    return TextExamples([t.replace("<br />", " ") for t in ex.texts], ex.labels)


def load_for_selection(
    model_dir: str | Path,
    data: Any,
    *,
    task: str = "auto",
    split: str = "train",
    text_column: str = "text",
    label_column: str = "label",
    batches: int = 16,
    batch_size: int = 16,
    max_length: int = 128,
    seed: int = 0,
):
    """Loads the model and up to ``batches`` shuffled calibration batches; returns (model, batches, task).

    ``data`` is a file or ``save_to_disk`` directory path (``split`` picks a DatasetDict's
    split) or a ``datasets.Dataset``.
    """
    from surgical.hf import check_model_dir, load_model

    quiet_transformers()
    if task not in TASKS:
        raise SurgicalError(f"unknown task {task!r}", f"Use one of: {', '.join(TASKS)}")
    if batches < 1 or batch_size < 1:
        raise SurgicalError(
            f"--batches and --batch-size must be at least 1 (got {batches}, {batch_size})",
            "Pass positive numbers",
        )
    model_dir = check_model_dir(model_dir)
    task = detect_task(model_dir) if task == "auto" else task
    examples = read_examples(data, text_column, label_column if task == "classification" else None, split)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    examples = examples.subset(order[: batches * batch_size].tolist())
    num_labels = max(2, max(examples.labels) + 1) if task == "classification" else 2
    model, tok = load_model(model_dir, task, num_labels=num_labels, seed=seed)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = text_batches(tok, examples, batch_size, max_length)
    if task == "causal-lm":
        for b in out:
            labels = b["input_ids"].clone()
            labels[b["attention_mask"] == 0] = -100  # padding is not a target
            b["labels"] = labels
            b.pop("token_type_ids", None)
    return model.eval(), out, task
