"""Hugging Face glue: loading the base a delta belongs to and writing plain model directories."""

from __future__ import annotations

from pathlib import Path

import transformers

from surgical.delta.delta import Delta
from surgical.errors import SurgicalError
from surgical.utils import atomic_dir, quiet_transformers


def load_base_for(path: str | Path, delta: Delta):
    """Loads the base model (and its tokenizer, if any) in the architecture the delta was made on.

    The architecture is looked up by name among transformers' model classes; no code is loaded
    from the model directory.
    """
    quiet_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SurgicalError(
            f"base model path {str(path)!r} is not a model directory (no config.json)",
            "Pass the local Hugging Face model directory the delta was trained from",
        )
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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SurgicalError(
            f"cannot load the base model from {str(path)!r}: {first}", "Check the path"
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
