"""Recipe configs: frozen dataclasses with a help string per field, YAML their serialized form.

One config style for every recipe (``train``, ``select``, ``demo``, ...), built from the shared
sections here (model, data, selection, schedule, training). Loading checks keys strictly: an
unknown key is an error that names it, so a typo never silently falls back to a default; every
value is checked against its field's type and declared range or choices where it is read. Flag
overrides use dotted paths (``training.lr=3e-4``) and go through the same checks. Sections that
dispatch by name through a registry (``selection.options``, ``schedule.options``) are checked
against the options the chosen entry declares.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from surgical.core.errors import SurgicalError
from surgical.core.registry import check_range, coerce
from surgical.recipes.defaults import DEFAULT_DENSITY as DENSITY_BY_TASK
from surgical.recipes.defaults import default_always, default_targets

T = TypeVar("T")


def _f(default: Any, help: str, **check: Any) -> Any:
    """A config field with its help string and, optionally, ``choices`` / ``low`` / ``high`` /
    ``low_open`` / ``high_open`` checked when the config is read (one place per key)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")  # frozen configs hold immutable values
    return field(default=default, metadata={"help": help, **check})


TASKS = ("auto", "classification", "causal_lm")
DEFAULT_DENSITY = 0.01


@dataclass(frozen=True)
class ModelConfig:
    """Which model to fine-tune or score."""

    path: str = _f("", "Local Hugging Face model directory (nothing is downloaded).")
    task: str = _f(
        "auto",
        "'classification' (sequence classification), 'causal_lm', or 'auto' (causal_lm when the "
        "config names a ...ForCausalLM/LMHeadModel architecture).",
        choices=TASKS,
    )
    num_labels: int = _f(2, "Number of classes for classification (a new head is initialised).", low=2)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")


@dataclass(frozen=True)
class QuantizationConfig:
    """Train on a quantized frozen base (``surgical train`` only)."""

    backend: str = _f(
        "none",
        "'none', 'torchao' (int8 weight-only Linear weights, or NF4 with bits: 4, the one format "
        "training.fsdp can shard) or 'bnb' (bitsandbytes NF4, QLoRA's format); "
        "pip install 'surgical[quant]'.",
        choices=("none", "torchao", "bnb"),
    )
    bits: int | None = _f(
        None, "Bits per quantized weight (default: the backend's; torchao: 8 or 4, bnb: 4).", low=1
    )
    exclude: tuple[str, ...] = _f(
        (),
        "Patterns of Linear weights kept in full precision (LM/task heads, tied weights and the "
        "plan's densely trained weights always are).",
    )


@dataclass(frozen=True)
class TrainModelConfig(ModelConfig):
    """Which model to fine-tune, and whether its frozen base is quantized."""

    quantization: QuantizationConfig = field(
        default_factory=QuantizationConfig,
        metadata={"help": "Quantize the frozen base; the selection is made on the full-precision model."},
    )


@dataclass(frozen=True)
class DataConfig:
    """Data: a file or a ``datasets`` save_to_disk directory with named columns."""

    path: str = _f(
        "", "A .csv, .jsonl, .parquet or .arrow file, or a directory written by datasets' save_to_disk."
    )
    split: str = _f("train", "Split to read when data.path holds a DatasetDict.")
    text_column: str = _f("text", "Column holding the text (classification; causal_lm without a prompt).")
    label_column: str = _f("label", "Classification: column holding the integer label.")
    prompt_column: str = _f("prompt", "Causal LM: column holding the prompt (no loss on it).")
    response_column: str = _f(
        "response",
        "Causal LM: column holding the response (the loss); without it, the text column is modelled.",
    )
    messages_column: str = _f(
        "messages",
        "Causal LM: column of conversations ([{role, content}, ...]) formatted by the chat template.",
    )
    packing: bool = _f(False, "Causal LM: concatenate examples into rows of max_length tokens (fewer pads).")
    max_length: int = _f(128, "Tokens per example (longer ones are truncated).", low=1)
    batch_size: int = _f(8, "Examples per batch.", low=1)
    limit: int | None = _f(None, "Use only the first N examples.", low=1)


@dataclass(frozen=True)
class SelectionConfig:
    """What to train: every argument of ``surgical.select`` (or a saved plan)."""

    method: str = _f("gradient", "Selection criterion (`surgical list criteria`).")
    density: float | None = _f(
        None,
        "Fraction of the targeted parameters to train (when no count or byte budget is given: "
        "0.0183 for classification, 0.01 for causal LM).",
        low=0,
        high=1,
        low_open=True,
    )
    count: int | None = _f(None, "Exact number of parameters instead of a density.", low=1)
    optimizer_bytes: int | None = _f(None, "AdamW fp32 state budget in bytes (16 per parameter).", low=16)
    granularity: str | None = _f(
        None, "entry, row, column, head, channel, expert, tensor or layer (default: the criterion's own).",
        choices=("entry", "row", "column", "head", "tensor", "layer", "channel", "expert"),
    )  # fmt: skip
    allocation: str = _f(
        "global", "global, per_tensor or per_layer.", choices=("global", "per_tensor", "per_layer")
    )
    aggregate: str = _f("sum", "A unit's score: sum or mean of its entries' scores.", choices=("sum", "mean"))
    targets: tuple[str, ...] | None = _f(
        None,
        "Patterns of weights to select from (default: the Linear weights inside the transformer "
        "blocks; [] for every Linear weight).",
    )
    exclude: tuple[str, ...] = _f((), "Patterns removed from the targets.")
    always: tuple[str, ...] | None = _f(
        None,
        "Patterns of parameters trained in full, outside the budget (default: classification the "
        "task head, biases and norms; causal LM the final norm; [] for none).",
    )
    max_batches: int = _f(16, "Calibration batches for data-driven criteria.", low=1)
    options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "The criterion's own options (`surgical list criteria`)."}
    )
    plan: str | None = _f(None, "Directory of a saved plan to use instead of selecting.")

    def budget(self, default_density: float = DEFAULT_DENSITY) -> dict[str, Any]:
        """density / count / optimizer_bytes as ``select`` takes them (at most one may be set;
        none: ``default_density``)."""
        given = [k for k in ("density", "count", "optimizer_bytes") if getattr(self, k) is not None]
        if len(given) > 1:
            raise SurgicalError(
                f"give exactly one of density, count and optimizer_bytes (the selection sets {given[0]} "
                f"and {given[1]})",
                "Remove one of them",
            )
        if not given:
            return {"density": default_density, "count": None, "optimizer_bytes": None}
        return {"density": self.density, "count": self.count, "optimizer_bytes": self.optimizer_bytes}

    def select_kwargs(self, seed: int, model: Any, task: str) -> dict[str, Any]:
        """Keyword arguments of :func:`surgical.select` (beside model and data); unset targets and
        always take the default recipe's for ``model`` and ``task`` (:mod:`surgical.recipes.defaults`)."""
        targets = default_targets(model) if self.targets is None else list(self.targets)
        always = default_always(model, task) if self.always is None else list(self.always)
        budget = self.budget(DENSITY_BY_TASK.get(task, DEFAULT_DENSITY))
        return dict(
            method=self.method, **budget, granularity=self.granularity,
            allocation=self.allocation, aggregate=self.aggregate, targets=targets or None,
            exclude=list(self.exclude) or None, always=always or None,
            max_batches=self.max_batches, seed=seed, **self.options,
        )  # fmt: skip


@dataclass(frozen=True)
class ScheduleConfig:
    """A dynamic schedule that changes what is trained during the run."""

    name: str = _f("none", "'none' or a registered schedule (`surgical list schedules`): lisa, regrow, hft.")
    options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "The schedule's own options (`surgical list schedules`)."}
    )


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation, precision and checkpointing."""

    epochs: int = _f(1, "Passes over the data (ignored when max_steps is set).", low=1)
    max_steps: int | None = _f(None, "Stop after this many optimizer steps.", low=1)
    lr: float | None = _f(
        None,
        "Peak learning rate (AdamW; default by task: 2e-3 classification, 1e-4 causal LM, as the "
        "benchmarks chose).",
        low=0,
        low_open=True,
    )
    weight_decay: float = _f(0.0, "AdamW weight decay.", low=0)
    warmup: float = _f(0.1, "Share of the steps spent warming the learning rate up.", low=0, high=1)
    grad_accum: int = _f(1, "Batches per optimizer step.", low=1)
    max_grad_norm: float | None = _f(None, "Clip the gradient norm to this value.", low=0, low_open=True)
    bf16: bool = _f(False, "Run the forward pass under bf16 autocast.")
    seed: int = _f(0, "Seed for selection, batch order, dropout and a new head.")
    checkpoint_every: int = _f(0, "Checkpoint every N steps (0: only at the end).", low=0)
    resume: bool = _f(False, "Continue from the newest checkpoint in the output directory.")
    fsdp: bool = _f(
        False,
        "Shard the model with FSDP2 across the processes of a launch (torchrun --nproc_per_node N, "
        "N >= 2): each holds 1/N of the frozen weights, deltas and optimizer state and trains on "
        "1/N of every batch.",
    )


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
        item = args[0] if args else str
        items = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        if not isinstance(items, (list, tuple)):
            raise SurgicalError(f"config key {path!r} must be a list, got {value!r}", "Fix the value")
        if item is str and not all(isinstance(v, str) for v in items):
            raise SurgicalError(
                f"config key {path!r} must be a list of strings, got {value!r}", "Fix the value"
            )
        if item is float:
            return tuple(coerce(v, float, f"config key {path!r}") for v in items)
        if typing.get_origin(item) is dict and not all(isinstance(v, dict) for v in items):
            raise SurgicalError(
                f"config key {path!r} must be a list of mappings, got {value!r}", "Fix the value"
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
    if tp is float:  # PyYAML reads 1e-3 (no dot) as a string: coerce takes it; NaN/inf are refused
        return coerce(value, float, f"config key {path!r}")
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise SurgicalError(f"config key {path!r} must be a mapping of names to values", "Fix the value")
        return dict(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise SurgicalError(f"config key {path!r} must be a string, got {value!r}", "Fix the value")
        return str(value)
    return value


def _check_value(path: str, value: Any, meta: Any) -> Any:
    """Checks a typed value against the field's declared choices and range."""
    if value is None:
        return None
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise SurgicalError(
            f"config key {path!r} must be one of {', '.join(meta['choices'])}, got {value!r}", "Fix the value"
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        check_range(value, f"config key {path!r}", meta.get("low"), meta.get("high"),
                    meta.get("low_open", False), meta.get("high_open", False))  # fmt: skip
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
            kwargs[key] = _check_value(path, _check_type(path, value, tp), known[key].metadata)
    return cls(**kwargs)


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (plain YAML keeps the
    last silently, so a repeated ``training:`` section would drop the first one's keys)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"the key {key!r} appears twice (first at line {seen[key].line + 1}); "
                    "merge the two into one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_config(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None = None) -> T:
    """Reads a YAML config (or none: defaults) and applies dotted-path overrides.

    Raises:
        SurgicalError: for a missing file, malformed YAML, an unknown key or a value of the
            wrong type, naming the file, line or key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise SurgicalError(f"config path {str(p)!r} is a directory", "Pass the path of a YAML file")
        if not p.is_file():
            raise SurgicalError(f"config file {str(p)!r} does not exist", "Pass the path of a YAML file")
        try:
            data = yaml.load(p.read_bytes().decode("utf-8"), Loader=StrictLoader) or {}
        except UnicodeDecodeError as e:
            raise SurgicalError(
                f"config file {str(p)!r} is not UTF-8 text (byte {e.start}: {e.reason})",
                "Pass a YAML file saved as UTF-8",
            ) from None
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
    return from_dict(cls, data)


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


def help_text(cls: type, prefix: str = "") -> list[str]:
    """``key: help`` lines for every field, nested sections flattened with dots."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += help_text(hints[f.name], f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
    return lines
