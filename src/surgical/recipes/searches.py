"""Searches that need evaluation: the WiSE-FT alpha sweep and greedy / uniform soups.

Both choose on a *validation* set only (carved from the training data, never the test sets);
the named test sets (``sets``: ``id``, ``ood``, ...) are evaluated at every point so the curve
can be drawn, and recorded, but never consulted for the choice. One base model is loaded and
each candidate delta is toggled in place (:func:`surgical.applied`): no second copy of the base.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from surgical.core.errors import SurgicalError
from surgical.core.io import atomic_save_figure, atomic_write_text, check_output, check_replaceable
from surgical.core.runtime import plain_console
from surgical.core.version import __version__
from surgical.delta import Delta, applied
from surgical.delta.base import check_base
from surgical.eval import evaluate, forgetting
from surgical.merge import merge
from surgical.recipes.config import DataConfig, ModelConfig, _f
from surgical.recipes.data import make_batches
from surgical.recipes.evaluate import REFERENCE, replaced_note
from surgical.recipes.models import detect_task, load_model

DEFAULT_ALPHAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class SearchData:
    """What every search evaluates on: the validation set that decides and the test sets that are
    only reported."""

    validation: str = _f("", "Validation data (carved from the training data): every choice is made on it.")
    sets: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Test sets reported at every point, name -> data path (e.g. id, ood); never chosen on."
        },
    )
    metric: str = _f("accuracy", "The validation metric to maximise (accuracy, answer_accuracy) or 'loss'.")


@dataclass(frozen=True)
class WiseFTConfig:
    """A ``surgical wise-ft`` sweep."""

    out: str = _f("surgical-wise-ft", "Report directory (wise_ft.json, wise_ft.png, the chosen delta).")
    delta: str = _f("", "The fine-tuned delta to interpolate toward the base.")
    alphas: tuple[float, ...] = _f(
        DEFAULT_ALPHAS, "The grid of alphas, each in [0, 1] (0: base, 1: the delta)."
    )
    seed: int = _f(0, "Seed for a new classification head (replaced tensors come from the delta).")
    reference: str = _f(
        "",
        "Data the tuning should not forget (general text, an earlier task): KL(base || tuned) and the "
        "loss change on it are measured at every alpha.",
    )
    max_kl: float | None = _f(
        None,
        "Forgetting budget: choose only among alphas whose KL(base || tuned) per token (per example "
        "for a classifier) on reference is at most this; needs reference. Alpha 0 is the base (plus "
        "any tensor the delta replaces, e.g. a new head).",
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The base model."})
    data: DataConfig = field(
        default_factory=DataConfig, metadata={"help": "Columns, batch size, max length."}
    )
    search: SearchData = field(default_factory=SearchData, metadata={"help": "Validation and test sets."})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """What the dataclass alone cannot check, before anything is loaded."""
        if not self.delta:
            raise SurgicalError("no delta to interpolate", "Set delta: DIR")
        if not self.alphas:
            raise SurgicalError("the alpha grid is empty", "Set alphas, e.g. [0, 0.5, 1]")
        bad = [a for a in self.alphas if not 0.0 <= a <= 1.0]
        if bad:
            raise SurgicalError(
                f"alpha {bad[0]} is outside [0, 1]", "WiSE-FT interpolates: use alphas in [0, 1]"
            )
        if self.max_kl is not None and not self.reference:
            raise SurgicalError(
                "max_kl is a budget on the KL measured on reference data, and no reference is set",
                "Set reference (data the tuning should not forget) or remove max_kl",
            )
        if self.max_kl is not None and not self.max_kl >= 0:
            raise SurgicalError(
                f"max_kl must be >= 0, got {self.max_kl}", "Set a KL budget in nats, e.g. 0.005"
            )
        if self.reference and REFERENCE in self.search.sets:
            raise SurgicalError(
                f"a test set is named {REFERENCE!r}, the name the forgetting results take", "Rename that set"
            )


@dataclass(frozen=True)
class SoupConfig:
    """A ``surgical soup``: greedy and uniform soups of candidate deltas."""

    out: str = _f("surgical-soup", "Report directory (soup.json, soup.png, greedy/ and uniform/ deltas).")
    candidates: tuple[str, ...] = _f((), "Candidate delta directories (fine-tuned from one base).")
    seed: int = _f(0, "Seed for a new classification head.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The base model."})
    data: DataConfig = field(
        default_factory=DataConfig, metadata={"help": "Columns, batch size, max length."}
    )
    search: SearchData = field(default_factory=SearchData, metadata={"help": "Validation and test sets."})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Evaluator:
    """The base model loaded once, the sets tokenized once; scores a delta by toggling it."""

    def __init__(self, cfg: WiseFTConfig | SoupConfig, deltas: list[Delta], show: bool) -> None:
        s = cfg.search
        if not s.validation:
            raise SurgicalError("no validation set", "Set search.validation (carved from the training data)")
        if "validation" in s.sets:
            raise SurgicalError(
                "a test set is named 'validation'", "Rename it: validation decides, sets report"
            )
        m = cfg.model
        self.task = detect_task(m.path) if m.task == "auto" else m.task
        self.model, tok = load_model(
            m.path, self.task, num_labels=m.num_labels, seed=cfg.seed, label="model.path"
        )
        for d in deltas:
            check_base(self.model, d)
        batches = lambda path: make_batches(  # noqa: E731
            dataclasses.replace(cfg.data, path=str(path)), self.task, tok, num_labels=m.num_labels
        )
        self.validation = batches(s.validation)
        self.sets = {name: batches(path) for name, path in s.sets.items()}
        reference = getattr(cfg, "reference", "")
        self.reference = batches(reference) if reference else None
        self.metric, self.show = s.metric, show

    def score(self, results: dict[str, dict[str, float]]) -> float:
        """The validation score to maximise (the negated loss when the metric is a loss)."""
        v = results["validation"]
        if self.metric not in v:
            raise SurgicalError(
                f"metric {self.metric!r} is not measured here (have {', '.join(v)})", "Set search.metric"
            )
        return -v[self.metric] if self.metric in ("loss", "perplexity") else v[self.metric]

    def __call__(self, delta: Delta | None, with_sets: bool = True) -> dict[str, dict[str, float]]:
        sets = {"validation": self.validation, **(self.sets if with_sets else {})}
        if delta is None:
            return evaluate(self.model, sets, task=self.task, show=self.show)
        with applied(self.model, delta):
            results = evaluate(self.model, sets, task=self.task, show=self.show)
        if with_sets and self.reference is not None:  # the delta toggled per batch: one model
            results[REFERENCE] = forgetting(self.model, self.reference, delta=delta, show=self.show)
        return results


def _meta(cfg: Any) -> dict[str, Any]:
    return {
        "config": cfg.to_dict(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "surgical": __version__,
    }


def run_wise_ft(cfg: WiseFTConfig, console: Console | None = None, show: bool = True) -> dict[str, Any]:
    """Evaluates base + alpha * delta over the grid, picks alpha on validation, writes the report
    (``wise_ft.json``, ``wise_ft.png``) and the chosen delta (``delta/``)."""
    console = console or plain_console()
    cfg.check()
    inputs = {"base model": cfg.model.path, "delta": cfg.delta, **cfg.search.sets}
    if cfg.reference:
        inputs["reference"] = cfg.reference
    out = check_output(cfg.out, inputs, "out")
    check_replaceable(out, "wise_ft.json", "WiSE-FT report", "out")
    delta = Delta.load(cfg.delta)
    note = replaced_note(delta) if cfg.reference else None
    if note:
        console.print(note, highlight=False)
    ev = _Evaluator(cfg, [delta], show)
    points = []
    for alpha in sorted(set(cfg.alphas)):
        scaled = merge([delta], "wise_ft", alpha=alpha)
        results = ev(scaled)
        points.append({"alpha": alpha, "results": results, "score": ev.score(results)})
        console.print(f"alpha {alpha:.2f}: " + _line(results), highlight=False)
    best = choose_alpha(points, cfg.max_kl)
    report = {
        "points": points,
        "chosen_alpha": best["alpha"],
        "metric": cfg.search.metric,
        "max_kl": cfg.max_kl,
        "meta": _meta(cfg),
    }
    merge([delta], "wise_ft", alpha=best["alpha"]).save(out / "delta")
    _write(
        out,
        "wise_ft",
        report,
        _wise_ft_figure(points, best, list(cfg.search.sets), cfg.search.metric, cfg.max_kl),
    )
    budget = f" within KL {cfg.max_kl:g} on reference" if cfg.max_kl is not None else ""
    console.print(
        f"chosen alpha {best['alpha']:.2f} on validation ({cfg.search.metric}){budget}; "
        f"wrote {out / 'wise_ft.json'}, {out / 'wise_ft.png'} and {out / 'delta'}"
    )
    return report


def choose_alpha(points: list[dict[str, Any]], max_kl: float | None = None) -> dict[str, Any]:
    """The point of the sweep with the best validation ``score`` (ties: the larger alpha, which
    learns more), among those whose KL on the reference is at most ``max_kl`` when it is set."""
    eligible = [p for p in points if max_kl is None or p["results"][REFERENCE]["kl"] <= max_kl]
    if not eligible:
        low = min(points, key=lambda p: p["results"][REFERENCE]["kl"])
        raise SurgicalError(
            f"no alpha keeps KL on reference within max_kl {max_kl:g} (the lowest, "
            f"{low['results'][REFERENCE]['kl']:.4g}, is at alpha {low['alpha']:g})",
            "Add smaller alphas (0 is the base) or raise max_kl",
        )
    return max(eligible, key=lambda p: (p["score"], p["alpha"]))


def run_soup(cfg: SoupConfig, console: Console | None = None, show: bool = True) -> dict[str, Any]:
    """Greedy soup (candidates sorted by validation score, each added only if the validation score
    does not drop) and the uniform soup of all; writes ``soup.json``, ``soup.png`` and both soups."""
    console = console or plain_console()
    if len(cfg.candidates) < 2:
        raise SurgicalError("a soup needs at least two candidates", "List them under candidates:")
    out = check_output(
        cfg.out, {"base model": cfg.model.path, **{f"candidate {c}": c for c in cfg.candidates}}, "out"
    )
    check_replaceable(out, "soup.json", "soup report", "out")
    deltas = [Delta.load(c) for c in cfg.candidates]
    ev = _Evaluator(cfg, deltas, show)
    single = [ev(d, with_sets=False) for d in deltas]
    order = sorted(range(len(deltas)), key=lambda i: -ev.score(single[i]))
    chosen = [order[0]]
    best = ev.score(single[order[0]])
    steps = [{"candidate": cfg.candidates[order[0]], "score": best, "added": True}]
    for i in order[1:]:
        trial = merge([deltas[j] for j in [*chosen, i]], "linear")
        score = ev.score(ev(trial, with_sets=False))
        added = score >= best
        steps.append({"candidate": cfg.candidates[i], "score": score, "added": added})
        if added:
            chosen.append(i)
            best = score
    greedy = merge([deltas[j] for j in chosen], "linear")
    uniform = merge(deltas, "linear")
    rows = {
        **{f"candidate {i + 1}": ev(d) for i, d in enumerate(deltas)},
        "greedy soup": ev(greedy),
        "uniform soup": ev(uniform),
    }
    greedy.save(out / "greedy")
    uniform.save(out / "uniform")
    report = {
        "candidates": list(cfg.candidates),
        "greedy": [cfg.candidates[j] for j in chosen],
        "steps": steps,
        "results": rows,
        "metric": cfg.search.metric,
        "meta": _meta(cfg),
    }
    _write(out, "soup", report, _soup_figure(rows, list(cfg.search.sets), cfg.search.metric))
    t = Table(title=f"soups (chosen on validation {cfg.search.metric})")
    names = ["validation", *cfg.search.sets]
    t.add_column("model")
    for n in names:
        t.add_column(n, justify="right")
    for label, res in rows.items():
        t.add_row(label, *[f"{res[n].get(cfg.search.metric, float('nan')):.4g}" for n in names])
    console.print(t)
    console.print(f"greedy soup: {len(chosen)} of {len(deltas)} candidates; wrote {out}")
    return report


def _line(results: dict[str, dict[str, float]]) -> str:
    shown = ("accuracy", "loss", "answer_accuracy", "kl", "loss_change")
    return ", ".join(
        f"{name} " + " ".join(f"{k} {v:.4f}" for k, v in m.items() if k in shown)
        for name, m in results.items()
    )


def _write(out: Path, stem: str, report: dict[str, Any], fig) -> None:
    import json

    import matplotlib.pyplot as plt

    try:
        atomic_save_figure(fig, out / f"{stem}.png")
    finally:
        plt.close(fig)
    atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=2, allow_nan=False, default=str))


def _metric_of(results: dict[str, float], metric: str) -> float:
    return results.get(metric, results.get("accuracy", results.get("loss", float("nan"))))


def _wise_ft_figure(
    points: list[dict], best: dict, sets: list[str], metric: str, max_kl: float | None = None
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forgetting_panel = REFERENCE in points[0]["results"]
    fig, axes = plt.subplots(1, 2 if forgetting_panel else 1, figsize=(11 if forgetting_panel else 5.5, 4.2))
    ax = axes[0] if forgetting_panel else axes
    if forgetting_panel:
        _forgetting_axis(axes[1], points, best, metric, max_kl)
    if "id" in sets and "ood" in sets:
        xs = [_metric_of(p["results"]["id"], metric) for p in points]
        ys = [_metric_of(p["results"]["ood"], metric) for p in points]
        ax.plot(xs, ys, "-o", color="#4477aa")
        for p, x, y in zip(points, xs, ys, strict=True):
            ax.annotate(f"{p['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        i = points.index(best)
        ax.plot(
            [xs[i]],
            [ys[i]],
            "*",
            color="#cc3311",
            markersize=14,
            label=f"chosen on validation (alpha {best['alpha']:g})",
        )
        ax.set_xlabel(f"ID {metric}")
        ax.set_ylabel(f"OOD {metric}")
    else:
        alphas = [p["alpha"] for p in points]
        for name in ["validation", *sets]:
            ax.plot(alphas, [_metric_of(p["results"][name], metric) for p in points], "-o", label=name)
        ax.axvline(best["alpha"], color="#cc3311", linestyle="--", label=f"chosen alpha {best['alpha']:g}")
        ax.set_xlabel("alpha (0: base, 1: fine-tuned)")
        ax.set_ylabel(metric)
    ax.set_title("WiSE-FT: base + alpha x delta", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _forgetting_axis(ax, points: list[dict], best: dict, metric: str, max_kl: float | None) -> None:
    """Validation ``metric`` against KL(base || tuned) on the reference, along alpha."""
    xs = [p["results"][REFERENCE]["kl"] for p in points]
    ys = [_metric_of(p["results"]["validation"], metric) for p in points]
    ax.plot(xs, ys, "-o", color="#228833")
    for p, x, y in zip(points, xs, ys, strict=True):
        ax.annotate(f"{p['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    i = points.index(best)
    ax.plot([xs[i]], [ys[i]], "*", color="#cc3311", markersize=14, label=f"chosen (alpha {best['alpha']:g})")
    if max_kl is not None:
        ax.axvline(max_kl, color="#999999", linestyle="--", label=f"max_kl {max_kl:g}")
    ax.set_xlabel("KL(base || tuned) on reference (less is less forgetting)")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("learning vs forgetting along alpha", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _soup_figure(rows: dict[str, dict], sets: list[str], metric: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    x_set = "id" if "id" in sets else "validation"
    y_set = "ood" if "ood" in sets else (sets[0] if sets else "validation")
    for label, res in rows.items():
        marker = "*" if "soup" in label else "o"
        ax.plot(
            [_metric_of(res[x_set], metric)],
            [_metric_of(res[y_set], metric)],
            marker,
            markersize=10 if marker == "*" else 6,
            label=label,
        )
    ax.set_xlabel(f"{x_set} {metric}")
    ax.set_ylabel(f"{y_set} {metric}")
    ax.set_title("candidates and soups", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
