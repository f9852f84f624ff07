"""``surgical eval``: a model (optionally plus a delta) on named sets -> report.json, report.png and a table.

Every set is read with the settings of the ``data`` section (columns, split, batch size, max
length, limit); only its path comes from ``sets``. With a delta, the metrics are those of the
base plus the delta, and a ``reference`` set measures forgetting by toggling the delta on the one
model in memory (:func:`surgical.eval.forgetting`); the reference set appears in the report as
the set ``reference``.

The scatter in report.png plots, from the first set's task score (accuracy for classification,
answer accuracy or else loss for language models):

- against the reference KL to the base, when a reference set is given;
- else against the same score on the second set (``id`` against ``ood`` when those names exist);
- else against the first set's loss (or perplexity).
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.console import Console

from surgical.core.errors import SurgicalError
from surgical.core.io import check_output, check_replaceable
from surgical.core.runtime import plain_console
from surgical.core.version import __version__
from surgical.delta import Delta, applied
from surgical.delta.base import check_base
from surgical.eval import evaluate, forgetting, print_table, write_report
from surgical.eval.report import REPORT_JSON
from surgical.recipes.config import DataConfig, ModelConfig, _f
from surgical.recipes.data import make_batches
from surgical.recipes.models import check_model_dir, detect_task, load_model

REFERENCE = "reference"


@dataclass(frozen=True)
class EvalConfig:
    """A ``surgical eval`` run."""

    out: str = _f("surgical-eval", "Report directory (report.json, report.png).")
    seed: int = _f(0, "Seed for a new classification head (initialised when the model has none).")
    model: ModelConfig = field(
        default_factory=ModelConfig, metadata={"help": "The model (the base, with delta)."}
    )
    delta: str | None = _f(
        None, "Delta directory applied to the model for every metric (its base is checked)."
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(batch_size=16),
        metadata={
            "help": "How every set is read (columns, split, batch size, max length, limit); not its path."
        },
    )
    sets: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Evaluation sets: name -> data path, e.g. {id: test.csv, ood: shifted.csv}."},
    )
    reference: str | None = _f(
        None, "Held-out data for forgetting (loss change and KL to the base); needs delta."
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form."""
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Checks what the dataclasses alone cannot, before anything is loaded."""
        if not self.model.path:
            raise SurgicalError("model.path is not set", "Pass MODEL or set model.path in the config")
        if self.data.path:
            raise SurgicalError(
                "eval reads its data from sets, not data.path",
                "Name each set: sets.NAME=PATH (e.g. sets.id=test.csv); remove data.path",
            )
        if not self.sets:
            raise SurgicalError(
                "no evaluation sets", "Add at least one: sets.NAME=PATH (e.g. sets.id=test.csv)"
            )
        for name, path in self.sets.items():
            if not name or not isinstance(path, str) or not path:
                raise SurgicalError(
                    f"config key 'sets.{name}' must be a data path, got {path!r}", "Fix the value"
                )
        if self.reference is not None and not self.delta:
            raise SurgicalError(
                "a reference set measures forgetting against the base and needs a delta",
                "Pass delta (the fine-tuning delta of model.path) or remove reference",
            )
        if self.reference is not None and REFERENCE in self.sets:
            raise SurgicalError(
                f"a set is named {REFERENCE!r}, the name the forgetting results take",
                "Rename that set",
            )


def replaced_note(delta: Delta) -> str | None:
    """A line for a forgetting measure of a delta that replaces tensors (a new head): the base's
    own values there are not what the tuning started from, so KL to the base says little."""
    if not delta.full:
        return None
    return (
        f"note: the delta replaces {', '.join(sorted(delta.full))} (a new head?); KL on reference "
        "compares against the base's own values there, which are not what it learned from"
    )


def _check_out(cfg: EvalConfig) -> Path:
    inputs = {"model": cfg.model.path, **{f"set {n!r}": p for n, p in cfg.sets.items()}}
    if cfg.delta:
        inputs["delta"] = cfg.delta
    if cfg.reference:
        inputs["reference set"] = cfg.reference
    out = check_output(cfg.out, inputs, "out")
    check_replaceable(out, REPORT_JSON, "report", "out")
    return out


def _load_delta(cfg: EvalConfig, task: str) -> Delta | None:
    if not cfg.delta:
        return None
    delta = Delta.load(cfg.delta)
    labels = (delta.meta.get("base") or {}).get("num_labels")
    if task == "classification" and isinstance(labels, int) and labels != cfg.model.num_labels:
        raise SurgicalError(
            f"the delta was trained with {labels} labels, model.num_labels is {cfg.model.num_labels}",
            f"Set model.num_labels {labels}",
        )
    return delta


def axes(results: dict[str, dict[str, float]], names: list[str]) -> tuple[tuple[str, str], tuple[str, str]]:
    """The (x, y) axes of the report scatter for these results (see the module docstring)."""

    def score(set_name: str) -> str:
        m = results[set_name]
        return next(k for k in ("accuracy", "answer_accuracy", "loss") if k in m)

    first = "id" if "id" in names else names[0]
    if REFERENCE in results:
        return (first, score(first)), (REFERENCE, "kl")
    if len(names) > 1:
        second = "ood" if "ood" in names and first == "id" else next(n for n in names if n != first)
        return (first, score(first)), (second, score(second))
    other = "loss" if score(first) != "loss" else "perplexity"
    return (first, other), (first, score(first))


def run_evaluate(cfg: EvalConfig, console: Console | None = None, show: bool = True) -> dict[str, Any]:
    """Evaluates a model (plus a delta) on named sets, measures forgetting, writes the report.

    Returns:
        The report written to ``out/report.json``: ``title``, ``x``, ``y``, ``results`` (set ->
        metric -> value, with ``reference`` holding the forgetting measures) and ``meta``
        (config, versions, date).

    Raises:
        SurgicalError: bad config (checked before any model or data is loaded), unreadable
            data, a delta that does not fit the model.
    """
    cfg.check()
    console = console or plain_console()
    out = _check_out(cfg)
    check_model_dir(cfg.model.path, "model.path")
    task = detect_task(cfg.model.path) if cfg.model.task == "auto" else cfg.model.task
    delta = _load_delta(cfg, task)  # a bad delta fails before the model is loaded
    model, tokenizer = load_model(
        cfg.model.path, task, num_labels=cfg.model.num_labels, seed=cfg.seed, label="model.path"
    )
    if delta is not None:
        check_base(model, delta)
        note = replaced_note(delta) if cfg.reference else None
        if note:
            console.print(note, highlight=False)
    sets = {
        name: make_batches(
            dataclasses.replace(cfg.data, path=path), task, tokenizer, num_labels=cfg.model.num_labels
        )
        for name, path in cfg.sets.items()
    }
    reference = (
        make_batches(
            dataclasses.replace(cfg.data, path=cfg.reference),
            task,
            tokenizer,
            num_labels=cfg.model.num_labels,
        )
        if cfg.reference
        else None
    )
    if delta is None:
        results = evaluate(model, sets, task=task, show=show)
    else:
        with applied(model, delta):
            results = evaluate(model, sets, task=task, show=show)
    if reference is not None and delta is not None:
        results[REFERENCE] = forgetting(model, reference, delta=delta, show=show)
    x, y = axes(results, list(cfg.sets))
    what = f"{cfg.model.path} + {cfg.delta}" if cfg.delta else str(cfg.model.path)
    title = f"{what}: {y[0]} {y[1]} vs {x[0]} {x[1]}"
    meta = {
        "config": cfg.to_dict(),
        "task": task,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "surgical": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    json_path, png_path = write_report(results, out, title=title, x=x, y=y, meta=meta)
    print_table(results, console, title=f"eval {what}")
    console.print(f"wrote {json_path} and {png_path}")
    return {"title": title, "x": list(x), "y": list(y), "results": results, "meta": meta}
