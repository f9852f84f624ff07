"""Hugging Face glue: loading the base a delta belongs to and writing plain model directories."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from surgical.delta.delta import Delta
from surgical.errors import SurgicalError
from surgical.utils import atomic_dir, quiet_transformers


def check_model_dir(path: str | Path, label: str = "model path") -> Path:
    """``path`` as a Path if it holds a Hugging Face model (config.json), else a SurgicalError."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SurgicalError(
            f"{label} {str(path)!r} is not a model directory (no config.json)",
            "Pass a local Hugging Face model directory",
        )
    return path


def load_model(
    path: str | Path,
    task: str = "classification",
    *,
    num_labels: int = 2,
    seed: int = 0,
    label: str = "model path",
):
    """Loads ``(model, tokenizer)`` for ``task`` ("classification" or "causal-lm") offline.

    A new classification head is initialised from ``seed``. A missing or unloadable directory is
    a SurgicalError naming ``label`` (the option the user set, e.g. ``model.path``).
    """
    quiet_transformers()
    path = check_model_dir(path, label)
    torch.manual_seed(seed)
    try:
        if task == "classification":
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=num_labels, local_files_only=True
            )
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SurgicalError(
            f"cannot load a model from {str(path)!r}: {_first_line(e)}", f"Check {label}"
        ) from None
    return model.eval(), tokenizer


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_base_for(path: str | Path, delta: Delta):
    """Loads the base model (and its tokenizer, if any) in the architecture the delta was made on.

    The architecture is looked up by name among transformers' model classes; no code is loaded
    from the model directory.
    """
    quiet_transformers()
    path = check_model_dir(path, "base model path")
    base = delta.meta.get("base", {})
    arch = base.get("architecture") or "AutoModel"
    cls = getattr(transformers, arch, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise SurgicalError(
            f"the delta names architecture {arch!r}, which transformers {transformers.__version__} lacks",
            "Upgrade transformers",
        )
    kwargs = {}
    if base.get("num_labels") and "SequenceClassification" in arch:
        kwargs["num_labels"] = base["num_labels"]
    try:
        model = cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise SurgicalError(
            f"cannot load the base model from {str(path)!r}: {_first_line(e)}", "Check the path"
        ) from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer


def save_model_dir(model, tokenizer, out: str | Path) -> Path:
    """``save_pretrained`` of model and tokenizer into ``out``, atomically."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out)
