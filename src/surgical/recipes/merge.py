"""``surgical merge``: a mergekit-style YAML -> one merged delta (or a plain HF model).

    method: ties
    options: {density: 0.3}
    inputs:
      - delta: runs/sst/delta          # a surgical delta
        weight: 1.0
      - model: checkpoints/imdb-ft     # a fine-tuned HF checkpoint (its change from `base`)
        weight: 0.5
      - lora: adapters/yelp            # a PEFT LoRA adapter
    rules:                             # optional per-tensor overrides, first match wins
      - match: "*.attention.*"
        weights: [1.0, 0.2, 1.0]
        options: {density: 0.5}
    base: models/minilm                # needed for model and lora inputs, and for a model output
    out: merged
    output_format: delta               # or: model

Every input is checked before any weight is loaded: delta headers (``delta_config.json``: shapes
and base fingerprints), paths, the method's options. ``--check`` reports per tensor how the
deltas overlap and disagree (:func:`surgical.merge.interference`) instead of merging. The
config used is written next to the output (``merge_config.yaml`` inside it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from surgical.core.errors import SurgicalError
from surgical.core.io import atomic_write_text, check_output, check_replaceable
from surgical.core.marks import forget_applied
from surgical.core.runtime import plain_console
from surgical.delta import Delta, apply
from surgical.delta.delta import CONFIG_FILE
from surgical.merge import MERGE_METHODS, check_compatible, interference, interference_summary, merge
from surgical.merge.api import assign_rules, check_rules, check_weight
from surgical.merge.gradients import split_options
from surgical.recipes.config import _f
from surgical.recipes.models import load_base, save_model_dir

INPUT_KINDS = ("delta", "model", "lora")


@dataclass(frozen=True)
class MergeConfig:
    """A ``surgical merge`` run."""

    method: str = _f("linear", "Merge method (`surgical list merge-methods`).")
    options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "The method's options (`surgical list merge-methods`)."}
    )
    inputs: tuple[dict[str, Any], ...] = _f(
        (), "Inputs, each {delta: DIR | model: DIR | lora: DIR, weight: W (default 1)}."
    )
    rules: tuple[dict[str, Any], ...] = _f(
        (),
        "Per-tensor overrides, first match wins: each {match: PATTERNS, weights: [one per input], "
        "options: {...}}.",
    )
    base: str | None = _f(None, "Base model directory (for model and lora inputs, and a model output).")
    out: str = _f("surgical-merged", "Output directory.")
    output_format: str = _f("delta", "'delta' (a delta directory) or 'model' (a plain HF model).",
                            choices=("delta", "model"))  # fmt: skip
    dtype: str = _f("float32", "Value storage of a delta output: float32, float16, bfloat16, int8, sign.",
                    choices=("float32", "float16", "bfloat16", "int8", "sign"))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Everything that can be checked without loading a weight."""
        split_options(self.method, self.options, "options.")
        if not self.inputs:
            raise SurgicalError("the merge has no inputs", "List them under inputs: (- delta: DIR)")
        for i, item in enumerate(self.inputs, 1):
            kinds = [k for k in INPUT_KINDS if k in item]
            unknown = sorted(set(item) - {*INPUT_KINDS, "weight"})
            if unknown or len(kinds) != 1:
                raise SurgicalError(
                    f"input {i} must have exactly one of {', '.join(INPUT_KINDS)} and optionally weight, "
                    f"got keys {', '.join(map(str, item)) or 'none'}",
                    "Write it like - delta: DIR",
                )
            check_weight(item.get("weight", 1.0), f"input {i}")
            path = Path(str(item[kinds[0]]))
            if not path.is_dir():
                raise SurgicalError(f"input {i} ({kinds[0]}) {str(path)!r} does not exist", "Fix the path")
            if kinds[0] != "delta" and not self.base:
                raise SurgicalError(f"input {i} is a {kinds[0]}, which needs the base model", "Set base: DIR")
        check_rules(list(self.rules), self.method, len(self.inputs), self.options)
        if self.output_format == "model" and not self.base:
            raise SurgicalError("a model output needs the base model", "Set base: DIR")
        entry = MERGE_METHODS.entry(self.method)
        lo, hi = entry.extra.get("min_inputs", 1), entry.extra.get("max_inputs")
        if len(self.inputs) < lo or (hi is not None and len(self.inputs) > hi):
            need = f"exactly {hi}" if hi in (lo, 1) else f"at least {lo}"
            raise SurgicalError(
                f"{self.method} merges {need} input(s), the config lists {len(self.inputs)}",
                "Change the inputs or the method",
            )


def _kind(item: dict[str, Any]) -> tuple[str, str]:
    kind = next(k for k in INPUT_KINDS if k in item)
    return kind, str(item[kind])


def read_header(directory: str | Path) -> Delta:
    """A Delta holding only the shapes and metadata of a delta directory (no tensor is read)."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
        shapes = {n: tuple(int(s) for s in info["shape"]) for n, info in config["tensors"].items()}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise SurgicalError(
            f"{str(path)!r} is not a readable delta config ({e})", "Pass a delta directory"
        ) from None
    return Delta(shapes=shapes, meta={k: v for k, v in config.items() if k == "base"})


def load_inputs(cfg: MergeConfig) -> tuple[list[Delta], list[str]]:
    """The inputs as deltas (checked against each other from their headers first), and labels."""
    labels = [f"input {i} ({_kind(item)[1]})" for i, item in enumerate(cfg.inputs, 1)]
    headers = [read_header(_kind(item)[1]) for item in cfg.inputs if _kind(item)[0] == "delta"]
    check_compatible(headers, [lab for lab, item in zip(labels, cfg.inputs, strict=True) if "delta" in item])
    if cfg.rules and len(headers) == len(cfg.inputs):  # every tensor name is known before loading
        names = list(dict.fromkeys(n for h in headers for n in h.shapes))
        assign_rules(names, check_rules(list(cfg.rules), cfg.method, len(cfg.inputs), cfg.options))
    base = None
    deltas = []
    for item in cfg.inputs:
        kind, path = _kind(item)
        if kind == "delta":
            deltas.append(Delta.load(path))
            continue
        if base is None:
            base, _ = load_base(cfg.base)
        if kind == "model":
            tuned, _ = load_base(path, type(base).__name__)
            deltas.append(Delta.from_models(base, tuned))
        else:
            deltas.append(Delta.from_peft_lora(path, base=base))
    check_compatible(deltas, labels)
    return deltas, labels


def run_merge(cfg: MergeConfig, console: Console | None = None, check_only: bool = False) -> Delta | None:
    """Merges the inputs and writes the result; with ``check_only``, prints the interference
    report instead. Returns the merged delta (None for a check)."""
    console = console or plain_console()
    cfg.check()
    inputs = {f"input {i}": _kind(item)[1] for i, item in enumerate(cfg.inputs, 1)}
    if cfg.base:
        inputs["base model"] = cfg.base
    if not check_only:
        check_output(cfg.out, inputs, "out")
        if cfg.output_format == "delta":
            check_replaceable(cfg.out, "delta_config.json", "delta", "out")
        else:
            check_replaceable(cfg.out, "config.json", "model", "out")
    deltas, labels = load_inputs(cfg)
    if check_only:
        rows = interference(deltas)
        print_interference(rows, console)
        return None
    weights = [item.get("weight", 1.0) for item in cfg.inputs]  # numbers, or lists of anchors
    merged = merge(deltas, cfg.method, weights=weights, rules=list(cfg.rules) or None, **cfg.options)
    merged.meta["merge"]["config"] = cfg.to_dict()
    summary = interference_summary(interference(deltas)) if len(deltas) > 1 else {}
    merged.meta["merge"]["interference"] = summary
    out = Path(cfg.out)
    if cfg.output_format == "delta":
        merged.save(out, dtype=cfg.dtype)
    else:
        model, tokenizer = load_base(cfg.base)
        apply(model, merged)
        forget_applied(model)
        save_model_dir(model, tokenizer, out)
    atomic_write_text(out / "merge_config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    console.print(
        f"merged {len(deltas)} input(s) by {cfg.method}: {merged.num_entries:,} entries, "
        f"{merged.num_block_values:,} in rows/columns, {merged.num_dense:,} dense, {merged.num_full:,} "
        f"replaced values; wrote {out} ({cfg.output_format})"
    )
    print_summary(summary, console)
    stock_note(cfg.method, summary, len(deltas), console)
    return merged


# below this mean cosine of the sparse changes, Model Stock keeps little of them (its ratio is
# N c / (1 + (N - 1) c)); benchmarks/merge_quality.py measured c = 0.04 between two experts
LOW_COSINE = 0.2


def stock_note(method: str, summary: dict[str, dict[str, Any]], n: int, console: Console) -> None:
    """A note when Model Stock merges sparse changes that are nearly orthogonal."""
    sparse = summary.get("sparse")
    if method != "model_stock" or sparse is None or sparse["mean_cosine"] >= LOW_COSINE:
        return
    c = max(sparse["mean_cosine"], 0.0)
    console.print(
        f"note: the inputs' sparse changes are nearly orthogonal (mean cosine {sparse['mean_cosine']:+.3f}), "
        f"so model_stock keeps about {n * c / (1 + (n - 1) * c):.0%} of their mean change; "
        "it was made for fine-tunes of one task from one start. For experts on different data, "
        "ties, sce or fisher keep more (docs/merging.md)"
    )


def print_interference(rows: list[dict[str, Any]], console: Console) -> None:
    """A table of :func:`surgical.merge.interference` rows, then one summary line per kind."""
    t = Table(title="interference per tensor changed by two or more inputs")
    for col in ("tensor", "kind", "inputs", "overlap", "sign conflicts", "cosine"):
        t.add_column(col, justify="left" if col in ("tensor", "kind") else "right")
    for r in rows:
        t.add_row(r["name"], r["kind"], str(r["deltas"]), f"{r['overlap']:.1%}", f"{r['sign_conflict']:.1%}",
                  f"{r['cosine']:+.3f}")  # fmt: skip
    console.print(t)
    print_summary(interference_summary(rows), console)
    if not rows:
        console.print("no tensor is changed by two inputs: every method merges them without interference")


def print_summary(summary: dict[str, dict[str, Any]], console: Console) -> None:
    """One line per kind of tensor from :func:`surgical.merge.interference_summary`."""
    for kind, s in summary.items():
        n = s["tensors"]
        if kind == "sparse":
            what = (
                f"{n} sparse tensor{'s' * (n != 1)}: overlap {s['overlap']:.1%} of the values changed "
                f"(per-tensor mean {s['mean_overlap']:.1%}),"
            )
        else:
            what = f"{n} densely changed tensor{'s' * (n != 1)} (overlap {s['overlap']:.1%}, full by design):"
        console.print(f"{what} sign conflicts {s['mean_sign_conflict']:.1%}, cosine {s['mean_cosine']:+.3f}")
