"""The one model loader of every recipe: local Hugging Face directories, offline, no remote code."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError

from surgical.core.errors import SurgicalError
from surgical.core.io import atomic_dir
from surgical.core.runtime import quiet_transformers


def check_model_dir(path: str | Path, label: str = "model path") -> Path:
    """``path`` as a Path if it holds a Hugging Face model (config.json), else a SurgicalError."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SurgicalError(
            f"{label} {str(path)!r} is not a model directory (no config.json)",
            "Pass a local Hugging Face model directory",
        )
    return path


def architectures(model_dir: str | Path) -> list[str]:
    """The architectures a model directory's config.json names (empty if none or unreadable)."""
    try:
        return list(json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []


def detect_task(model_dir: str | Path) -> str:
    """``causal_lm`` if config.json names a ForCausalLM/LMHeadModel architecture, else classification."""
    archs = architectures(model_dir)
    return "causal_lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "classification"


def load_model(
    path: str | Path,
    task: str = "classification",
    *,
    num_labels: int = 2,
    seed: int = 0,
    label: str = "model path",
    gradient_checkpointing: bool = False,
):
    """Loads ``(model, tokenizer)`` for ``task`` (``classification``, ``causal_lm`` or ``auto``) offline.

    A new classification head is initialised from ``seed``. A tokenizer without a pad token
    pads with its end-of-sequence token. A missing or unloadable directory is a SurgicalError
    naming ``label`` (the option the user set, e.g. ``model.path``).
    """
    quiet_transformers()
    path = check_model_dir(path, label)
    task = detect_task(path) if task == "auto" else task
    if task == "causal_lm" and detect_task(path) != "causal_lm" and architectures(path):
        raise SurgicalError(
            f"{label} {str(path)!r} is a {architectures(path)[0]}, not a causal language model: its LM "
            "head would be initialised at random and lost",
            "Use task classification, or a ...ForCausalLM checkpoint",
        )
    torch.manual_seed(seed)
    try:
        if task == "classification":
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                # a head of another size is replaced by a new one, as num_labels asks
                str(path),
                num_labels=num_labels,
                local_files_only=True,
                ignore_mismatched_sizes=True,
            )
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # a truncated weights file
        raise SurgicalError(
            f"cannot load a model from {str(path)!r}: {_first_line(e)}", f"Check {label}"
        ) from None
    tokenizer = load_tokenizer(path, label)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        # non-reentrant: gradients must reach trained values even when the block's input is frozen
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.eval(), tokenizer


def load_tokenizer(path: str | Path, label: str = "model path"):
    """The model directory's tokenizer, offline; one without a pad token pads with its
    end-of-sequence token. Unloadable or without a vocabulary: a SurgicalError naming ``label``."""
    quiet_transformers()
    path = check_model_dir(path, label)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise SurgicalError(
            f"cannot load a tokenizer from {str(path)!r}: {_first_line(e)}", f"Check {label}"
        ) from None
    if len(tokenizer) <= len(tokenizer.all_special_tokens) + 1:  # no vocabulary: every word is [UNK]
        raise SurgicalError(
            f"{label} {str(path)!r} has no usable tokenizer (its vocabulary is empty)",
            "Save the tokenizer into the model directory (tokenizer.save_pretrained)",
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def model_type(model_dir: str | Path) -> str | None:
    """The ``model_type`` a model directory's config.json names (None if unreadable)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def load_base(
    path: str | Path,
    architecture: str | None = None,
    num_labels: int | None = None,
    expect_type: str | None = None,
    against: str = "delta",
):
    """Loads a base model (and its tokenizer, if any) in the named architecture.

    ``architecture`` is looked up by name among transformers' model classes (default: the
    first one the directory's config names; ``AutoModel`` if none); no code is loaded from the
    model directory. ``expect_type`` (a delta's recorded ``model_type``) must match the
    directory's, so weights of one architecture are never loaded into another (which would
    initialise them at random). ``against`` names where ``expect_type`` comes from in the
    message: ``"delta"`` (made on that type) or ``"fine-tuned model"`` (of that type).
    """
    quiet_transformers()
    path = check_model_dir(path, "base model path")
    found = model_type(path)
    if expect_type and found and found != expect_type:
        if against == "delta":
            raise SurgicalError(
                f"the base model {str(path)!r} is a {found!r} model, the delta was made on a "
                f"{expect_type!r} one",
                "Pass the base model the delta was trained on",
            )
        raise SurgicalError(
            f"the base model {str(path)!r} is a {found!r} model, the {against} a {expect_type!r} one",
            "Pass two checkpoints of the same architecture",
        )
    arch = architecture or (architectures(path) or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise SurgicalError(
            f"architecture {arch!r} is not in transformers {transformers.__version__}", "Upgrade transformers"
        )
    kwargs = {}
    if num_labels and "SequenceClassification" in arch:
        kwargs["num_labels"] = num_labels
    try:
        model = cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
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
