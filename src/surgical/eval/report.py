"""Evaluation reports: ``report.json`` and a ``report.png`` scatter, and a table on the console.

Results come in one of two shapes:

- one model: set name -> metric name -> value, as :func:`surgical.eval.evaluate` returns (a
  :func:`surgical.eval.forgetting` result may be added as one more set, e.g. ``"reference"``);
- several models (a sweep of delta scales, base vs tuned, ...): run label -> such a mapping.

The scatter draws one point per model at (``x``, ``y``), each a (set, metric) pair: ID against
OOD accuracy, or a task score against forgetting.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from surgical.core.errors import SurgicalError
from surgical.core.io import atomic_save_figure, atomic_write_text

Metrics = Mapping[str, float]
Results = Mapping[str, Any]
"""``{set: {metric: value}}`` (one model) or ``{run: {set: {metric: value}}}`` (several)."""

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"


def runs_of(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """Results in the several-models shape: one model's results become the single run ``""``.

    Raises:
        SurgicalError: if ``results`` is empty or neither shape (values must be numbers).
    """
    if not isinstance(results, Mapping) or not results:
        raise SurgicalError("results are empty", "Pass what surgical.eval.evaluate returned")
    if all(_is_metrics(v) for v in results.values()):
        return {"": {str(s): dict(m) for s, m in results.items()}}
    if all(
        isinstance(r, Mapping) and r and all(_is_metrics(v) for v in r.values()) for r in results.values()
    ):
        return {str(run): {str(s): dict(m) for s, m in sets.items()} for run, sets in results.items()}
    raise SurgicalError(
        "results must map set -> metric -> number (one model) or run -> set -> metric -> number",
        "Pass what surgical.eval.evaluate returned, or a mapping of run labels to such results",
    )


def _is_metrics(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
    )


def _point(sets: Mapping[str, Metrics], axis: tuple[str, str], run: str, which: str) -> float:
    set_name, metric = axis
    if set_name not in sets or metric not in sets[set_name]:
        have = ", ".join(f"{s}.{m}" for s, ms in sets.items() for m in ms)
        where = f" of run {run!r}" if run else ""
        raise SurgicalError(
            f"the results{where} have no {set_name}.{metric} for the {which} axis (they have: {have})",
            f"Pass {which}=(SET, METRIC) naming one of them",
        )
    return float(sets[set_name][metric])


def _axis(value: Any, which: str) -> tuple[str, str]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise SurgicalError(
            f"{which} must be a (set, metric) pair, got {value!r}", f"Pass e.g. {which}=('id', 'accuracy')"
        )
    return value[0], value[1]


def _jsonable(value: Any) -> Any:
    """Plain JSON (strict: NaN and infinities become null)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_report(
    results: Results,
    out_dir: str | Path,
    *,
    title: str,
    x: tuple[str, str] = ("id", "accuracy"),
    y: tuple[str, str] = ("ood", "accuracy"),
    meta: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Writes ``report.json`` and the ``report.png`` scatter of ``y`` against ``x`` into ``out_dir``.

    Both files are written atomically, the PNG first, so a ``report.json`` on disk always comes
    with its picture. Every run must have both axes' metrics; this is checked before anything is
    written.

    Args:
        results: One model's results or several models' (see the module docstring).
        out_dir: Directory for the two files (created if missing; other files are left alone).
        title: Title of the plot, also stored in the JSON.
        x: (set, metric) on the horizontal axis.
        y: (set, metric) on the vertical axis.
        meta: Anything JSON-able to record beside the results (config, versions, date).

    Returns:
        (path of report.json, path of report.png).

    Raises:
        SurgicalError: malformed results, or an axis naming a set or metric a run lacks.
    """
    x, y = _axis(x, "x"), _axis(y, "y")
    runs = runs_of(results)
    points = {run: (_point(sets, x, run, "x"), _point(sets, y, run, "y")) for run, sets in runs.items()}
    out = Path(out_dir)
    png = _scatter(points, x, y, title, out / REPORT_PNG)
    doc = {"title": title, "x": list(x), "y": list(y), "results": results, "meta": dict(meta or {})}
    json_path = out / REPORT_JSON
    atomic_write_text(json_path, json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n")
    return json_path, png


def _scatter(
    points: Mapping[str, tuple[float, float]], x: tuple[str, str], y: tuple[str, str], title: str, path: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    try:
        finite = {r: p for r, p in points.items() if all(math.isfinite(v) for v in p)}
        xs = [p[0] for p in finite.values()]
        ys = [p[1] for p in finite.values()]
        ax.scatter(xs, ys, s=36, color="#3b6ea5", zorder=3)
        for run, (px, py) in finite.items():
            if run:
                ax.annotate(run, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if x[1] == y[1] and len(xs) > 0:  # the same metric on two sets: y = x marks "no shift"
            low, high = min(xs + ys), max(xs + ys)
            pad = (high - low) * 0.05 or 0.01
            ax.plot([low - pad, high + pad], [low - pad, high + pad], ls="--", lw=0.8, color="#999999")
        skipped = len(points) - len(finite)
        note = f"\n({skipped} point(s) not finite, not drawn)" if skipped else ""
        ax.set_xlabel(f"{x[0]} {x[1]}")
        ax.set_ylabel(f"{y[0]} {y[1]}")
        ax.set_title(title + note, fontsize=9)
        ax.grid(True, lw=0.4, alpha=0.5)
        fig.tight_layout()
        return atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


def print_table(results: Results, console: Console, *, title: str | None = None) -> Table:
    """Prints the results as a table: one row per set (per run and set for several models), one
    column per metric (in order of first appearance). Returns the rich Table.

    Raises:
        SurgicalError: malformed results.
    """
    runs = runs_of(results)
    metrics: list[str] = []
    for sets in runs.values():
        for ms in sets.values():
            metrics += [m for m in ms if m not in metrics]
    several = list(runs) != [""]
    table = Table(title=title)
    if several:
        table.add_column("run")
    table.add_column("set")
    for m in metrics:
        table.add_column(m, justify="right")
    for run, sets in runs.items():
        for set_name, ms in sets.items():
            cells = [_fmt(ms[m]) if m in ms else "" for m in metrics]
            table.add_row(*([run] if several else []), set_name, *cells)
    console.print(table)
    return table


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"
