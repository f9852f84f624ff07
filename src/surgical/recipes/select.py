"""``surgical select``: model + calibration data -> a Plan directory with a per-layer report.

Shares the model, data and selection sections of ``surgical train`` (the same keys in YAML and
as flags), so a plan selected here is the plan a train run with the same sections selects.
Calibration batches are a seeded random sample of ``selection.max_batches * data.batch_size``
examples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from surgical.core.errors import SurgicalError
from surgical.core.io import atomic_write_bytes, check_output, check_png, check_replaceable
from surgical.core.runtime import plain_console
from surgical.recipes.config import DataConfig, ModelConfig, SelectionConfig, _f
from surgical.recipes.data import make_batches
from surgical.recipes.models import detect_task, load_model
from surgical.select import CRITERIA, Plan, select
from surgical.select.report import always_names, heatmap_png, layer_report, plan_title


@dataclass(frozen=True)
class SelectConfig:
    """A ``surgical select`` run."""

    out: str = _f("surgical-plan", "Directory for the plan (plan.json, plan.safetensors, selection.png).")
    png: str | None = _f(None, "Heatmap path (default: OUT/selection.png).")
    seed: int = _f(0, "Seed for sampling calibration data, random scores and a new head.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The model."})
    data: DataConfig = field(
        default_factory=lambda: DataConfig(batch_size=16), metadata={"help": "The calibration data."}
    )
    selection: SelectionConfig = field(default_factory=SelectionConfig, metadata={"help": "What to select."})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_select(cfg: SelectConfig, console: Console | None = None, show: bool = True) -> Plan:
    """Selects and saves a plan, prints its per-layer table and writes its heatmap."""
    console = console or plain_console()
    s = cfg.selection
    if not cfg.model.path or not cfg.data.path:
        raise SurgicalError("select needs a model and data", "Pass MODEL and --data FILE")
    CRITERIA.resolve(s.method, s.options, "selection.options.")  # fail before loading anything
    out = check_output(cfg.out, {"model": cfg.model.path, "data": cfg.data.path})
    check_replaceable(out, "plan.json", "plan")
    if cfg.png:
        check_png(cfg.png)
    task = detect_task(cfg.model.path) if cfg.model.task == "auto" else cfg.model.task
    model, tok = load_model(cfg.model.path, task, num_labels=cfg.model.num_labels, seed=cfg.seed)
    calib = make_batches(
        cfg.data, task, tok, num_labels=cfg.model.num_labels,
        sample=s.max_batches * cfg.data.batch_size, seed=cfg.seed,
    )  # fmt: skip
    plan = select(model, calib, progress=show, **s.select_kwargs(cfg.seed, model, task))
    plan.meta.update(model=str(cfg.model.path), data=str(cfg.data.path), task=task)
    plan.save(out)
    console.print(f"wrote plan {cfg.out}: {plan.summary()}")
    inspect_plan(cfg.out, cfg.png, console)
    return plan


def inspect_plan(path: str, png: str | None, console: Console) -> Path:
    """Prints a plan's per-layer table and writes its heatmap PNG; returns the PNG's path."""
    target = check_png(png) if png else Path(path) / "selection.png"
    plan = Plan.load(path)
    report = layer_report(plan)
    t = Table(title=f"plan {path}: share of each layer and tensor type selected")
    t.add_column("layer")
    for typ in report.types:
        t.add_column(typ, justify="right")
    t.add_column("layer total", justify="right")
    for row, shares, total in zip(report.layers, report.share, report.layer_share, strict=True):
        cells = ["" if v is None else f"{v:.2%}" for v in shares]
        t.add_row(row, *cells, f"{total:.2%}")
    t.add_row("all", *[f"{v:.2%}" for v in report.type_share], "", style="bold")
    console.print(t)
    m = plan.meta
    extra = always_names(plan)
    always_count = sum(_numel(plan.shapes[n]) for n in extra)
    console.print(
        f"{m.get('method', '?')}, granularity {m.get('granularity', 'entry')}, allocation "
        f"{m.get('allocation', 'global')}: {m.get('selected', plan.num_entries):,} of "
        f"{m.get('targeted', 0):,} targeted parameters (budget {m.get('budget', 0):,}), "
        f"{m.get('calibration_batches', 0)} calibration batches"
        + (f"; always dense: {always_count:,} in {len(extra)} tensors" if extra else "")
    )
    atomic_write_bytes(target, heatmap_png(report, plan_title(plan)))
    console.print(f"heatmap: {target}")
    return target


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
