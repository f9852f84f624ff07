"""The configuration of a ``surgical train`` run: frozen dataclasses, YAML their serialized form.

Every field has a help string (``field(metadata={"help": ...})``). Loading checks keys strictly:
an unknown key is an error that names it, so a typo never silently falls back to a default.
Flag overrides use dotted paths (``training.lr=3e-4``) and go through the same checks.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from surgical.errors import SurgicalError


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")  # frozen configs hold immutable values
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    """Which model to fine-tune."""

    path: str = _f("", "Local Hugging Face model directory (nothing is downloaded).")
    task: str = _f("classification", "'classification' (sequence classification) or 'causal_lm'.")
    num_labels: int = _f(2, "Number of classes for classification.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")


@dataclass(frozen=True)
class DataConfig:
    """Training data: a file or a ``datasets`` save_to_disk directory with named columns."""

    path: str = _f(
        "", "A .csv, .jsonl, .parquet or .arrow file, or a directory written by datasets' save_to_disk."
    )
    split: str = _f("train", "Split to read when data.path holds a DatasetDict.")
    text_column: str = _f("text", "Classification: column holding the text.")
    label_column: str = _f("label", "Classification: column holding the integer label.")
    prompt_column: str = _f("prompt", "Causal LM: column holding the prompt (no loss on it).")
    response_column: str = _f("response", "Causal LM: column holding the response (the loss).")
    max_length: int = _f(128, "Tokens per example (longer ones are truncated).")
    batch_size: int = _f(8, "Examples per batch.")
    limit: int | None = _f(None, "Use only the first N examples.")


@dataclass(frozen=True)
class SelectionConfig:
    """What to train; passed to ``surgical.select`` (or a saved plan)."""

    method: str = _f("gradient", "Selection criterion (see `surgical.CRITERIA.names()`).")
    density: float | None = _f(0.01, "Fraction of the targeted weights to train.")
    count: int | None = _f(None, "Exact number of entries instead of a density.")
    targets: tuple[str, ...] = _f((), "Patterns of Linear weights to select from (default: all).")
    exclude: tuple[str, ...] = _f((), "Patterns removed from the targets.")
    always: tuple[str, ...] = _f((), "Patterns of parameters trained in full (heads, norms).")
    allocation: str = _f("global", "'global' top-k or 'per_tensor' (same share of each tensor).")
    max_batches: int = _f(8, "Calibration batches for data-driven criteria.")
    plan: str | None = _f(None, "Directory of a saved plan to use instead of selecting.")


@dataclass(frozen=True)
class ScheduleConfig:
    """A dynamic schedule that changes what is trained during the run."""

    name: str = _f("none", "'none', 'lisa', 'regrow' (SpIEL prune-and-regrow) or 'hft'.")
    every: int = _f(10, "Steps between changes (LISA period, regrow period, HFT stage length).")
    gamma: int = _f(2, "LISA: number of layers active at a time.")
    fraction: float = _f(0.1, "regrow: share of each tensor's entries dropped and regrown.")


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation, precision and checkpointing."""

    epochs: int = _f(1, "Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps.")
    lr: float = _f(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup: float = _f(0.1, "Share of the steps spent warming the learning rate up.")
    grad_accum: int = _f(1, "Batches per optimizer step.")
    max_grad_norm: float | None = _f(None, "Clip the gradient norm to this value.")
    bf16: bool = _f(False, "Run the forward pass under bf16 autocast.")
    seed: int = _f(0, "Seed for selection, batch order and dropout.")
    checkpoint_every: int = _f(0, "Checkpoint every N steps (0: only at the end).")
    resume: bool = _f(False, "Continue from the newest checkpoint in the output directory.")


# Keys that cannot change what a run computes, so ``--resume`` accepts a change to them: where
# the run lives (a moved run directory resumes), how often it checkpoints (saving touches no
# value or RNG state), the resume flag itself, and gradient checkpointing (it recomputes the
# same forward with the same RNG state; switching it on after running out of memory is a
# reason to resume). Every other key is part of the run's identity.
RESUMABLE_CHANGES = frozenset(
    {"out", "training.checkpoint_every", "training.resume", "model.gradient_checkpointing"}
)


@dataclass(frozen=True)
class RunConfig:
    """A whole ``surgical train`` run."""

    out: str = _f("surgical-run", "Run directory: delta/, plan/, checkpoints/, summary.json.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "The training data."})
    selection: SelectionConfig = field(default_factory=SelectionConfig, metadata={"help": "What to train."})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "Dynamic schedule."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "Optimisation."})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (tuples become lists)."""
        return dataclasses.asdict(self)

    def trajectory(self) -> dict[str, Any]:
        """The settings a resumed run must share with the checkpoint's: every key as a dotted
        path, minus :data:`RESUMABLE_CHANGES` (and ``training.epochs`` when max_steps is set)."""
        flat: dict[str, Any] = {}
        for section, value in self.to_dict().items():
            if isinstance(value, dict):
                flat.update({f"{section}.{k}": v for k, v in value.items()})
            else:
                flat[section] = value
        if self.training.max_steps is not None:
            flat.pop("training.epochs")
        return {k: v for k, v in flat.items() if k not in RESUMABLE_CHANGES}


def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Coerces YAML scalars to the field's type, or raises naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        return _check_type(path, value, tp)
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise SurgicalError(
                f"config key {path!r} must be a list of strings, got {value!r}", "Fix the value"
            )
        return tuple(items)
    if tp is bool:
        if not isinstance(value, bool):
            raise SurgicalError(f"config key {path!r} must be true or false, got {value!r}", "Fix the value")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SurgicalError(f"config key {path!r} must be an integer, got {value!r}", "Fix the value")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SurgicalError(f"config key {path!r} must be a number, got {value!r}", "Fix the value")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise SurgicalError(f"config key {path!r} must be a string, got {value!r}", "Fix the value")
        return str(value)
    return value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Builds the dataclass ``cls`` from nested dicts; unknown keys are errors naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = f"section {prefix.rstrip('.')!r}" if prefix else "the config"
        raise SurgicalError(f"{where} must be a mapping of keys to values", "Check the YAML's indentation")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise SurgicalError(
                f"unknown config key {path!r}", f"Use one of: {', '.join(prefix + k for k in known)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{path}.")
        else:
            kwargs[key] = _check_type(path, value, tp)
    return cls(**kwargs)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Reads a YAML config (or none: defaults) and applies dotted-path overrides.

    Raises:
        SurgicalError: for a missing file, malformed YAML, an unknown key or a value of the
            wrong type, naming the file, line or key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SurgicalError(f"config file {str(p)!r} does not exist", "Pass the path of a YAML file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise SurgicalError(
                f"config file {str(p)!r} is not valid YAML{where}: {problem}", "Fix the YAML syntax"
            ) from None
        if not isinstance(data, dict):
            raise SurgicalError(
                f"config file {str(p)!r} must hold a mapping", "Start it with keys like model:"
            )
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SurgicalError(f"cannot override {dotted!r}: {part!r} is not a section", "Fix the flag")
        node[leaf] = value
    return from_dict(RunConfig, data)


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.lr=3e-4"`` -> ``("training.lr", 3e-4)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SurgicalError(f"override {text!r} is not KEY=VALUE", "Write it like --set training.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def help_text(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """``key: help`` lines for every field, nested sections flattened with dots."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += help_text(hints[f.name], f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
    return lines
