"""Quality side by side: which fine-tuning method learns the task and keeps what the base knew.

MiniLM (all-MiniLM-L6-v2), Rotten Tomatoes -> IMDB. The demo's split (1,000 RT sentences held
out: ID), 500 more training sentences carved out as the validation set that makes every choice
(learning rate, WiSE-FT alpha), OOD = 500 IMDB reviews at 256 tokens. For every row, each learning
rate of its small grid is tried with seed 0 and the one best on validation is kept; then the
row runs with every seed at that rate. Mean and standard deviation over the seeds.

Rows: head only; full fine-tuning; PEFT LoRA r=8 (query/key/value/dense, head trained); PEFT
SHiRA at LoRA's count; surgical entries at 0.5% and 1% of the encoder's Linear weights by each
criterion (biases, LayerNorms and the head dense); surgical rows at 1%; ``fim_layer`` (the best
transformer block by Fisher); LISA; and WiSE-FT (alpha on validation) of full fine-tuning, of
LoRA and of the best surgical row. Baselines go through their own libraries (PEFT, the HF model).

Columns: trainable parameters, ID, OOD, validation, train time, peak memory (RSS of the worker
process), artifact size. Each training runs in a fresh worker process (its peak RSS is its own).

    python benchmarks/quality.py                         # full mode (~2 h on 2 CPU cores)
    python benchmarks/quality.py --rows full,lora,surgical-gradient-1pct --seeds 0 1 2
    python benchmarks/quality.py --quick --out X.json    # tiny subsets, a few rows (a test runs it)

``--curves full,lora,...`` adds a whole WiSE-FT curve per named row (ID and OOD at every alpha,
at the row's chosen lr, with ``--curve-seeds``; the first seed by default): the scatter draws
them as lines. The row runs themselves score every alpha on validation only.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import surgical as sg
from surgical.core.io import atomic_save_figure, atomic_write_text, dir_size
from surgical.core.runtime import peak_rss_bytes, reset_peak_rss
from surgical.data.text import text_batches
from surgical.recipes.demo import DemoConfig, default_data_path, default_model_path, load_movie_reviews
from surgical.recipes.models import load_model
from surgical.train import LISA

HERE = Path(__file__).resolve().parent
CRITERIA = ("gradient", "fisher", "magnitude", "random", "salience", "lottery", "principal")
ALWAYS = ["classifier", "bias", "LayerNorm"]
WISE_ALPHAS = (0.5, 0.7, 0.9)  # and 1.0, the fine-tuned model itself
LAYER_LINEARS = "re:encoder\\.layer\\.\\d+\\..*\\.weight$"  # the six layers' Linear weights


def row_specs() -> dict[str, dict]:
    """Every row: its kind, settings and learning-rate grid (the first lr is the reference).

    The order is the order of the run, most telling first, so that a run cut short keeps the rows
    that decide the default recipe. A row with ``lr_from`` takes the lr its named row chose on
    validation instead of searching its own (no row here does: the 0.5% rows, which once reused
    their criterion's 1% choice, search the same grid themselves; ``forgetting.py``'s
    token-selection rows, which share :func:`run_row`, still do).
    """
    rows: dict[str, dict] = {
        "full": {"kind": "full", "lrs": [5e-5, 2e-5]},
        "lora": {"kind": "lora", "lrs": [5e-4, 1e-3]},
    }
    for crit in CRITERIA:
        rows[f"surgical-{crit}-1pct"] = {
            "kind": "surgical",
            "method": crit,
            "density": 0.01,
            "lrs": [3e-3, 5e-3],  # 1e-2 diverged for gradient (validation 49%, results/quality_runs)
        }
    # the 1% rows above train 0.6% of the encoder (1% of the layers' Linear weights plus 31,874
    # dense values); this one spends the goal's whole budget, 1% of the encoder's 22.7M parameters
    rows["surgical-gradient-1pct-of-encoder"] = {
        "kind": "surgical",
        "method": "gradient",
        "density": 0.0183,  # 194,288 entries + 31,874 dense = 226,162 <= 227,139
        "lrs": [2e-3, 3e-3],
    }
    # the two criteria best on validation at 0.6%, given the whole budget too
    for crit, lrs in (("lottery", [2e-3, 3e-3]), ("salience", [3e-3, 5e-3])):
        rows[f"surgical-{crit}-1pct-of-encoder"] = {
            "kind": "surgical",
            "method": crit,
            "density": 0.0183,
            "lrs": lrs,
        }
    rows["head"] = {"kind": "head", "lrs": [3e-3, 1e-3]}
    rows["surgical-rows-1pct"] = {
        "kind": "surgical",
        "method": "gradient",
        "density": 0.01,
        "granularity": "row",
        "lrs": [1e-3, 3e-3],
    }
    rows["fim_layer"] = {
        "kind": "surgical",
        "method": "fim_layer",
        "density": 1 / 6,
        "granularity": "layer",
        "lrs": [5e-5, 2e-4],
    }
    rows["lisa"] = {"kind": "lisa", "lrs": [5e-5, 1e-4]}
    rows["shira"] = {"kind": "shira", "lrs": [5e-4, 2e-3]}
    for crit in CRITERIA:  # the 1% rows' grid, searched again (a budget may want its own rate)
        rows[f"surgical-{crit}-0.5pct"] = {
            "kind": "surgical",
            "method": crit,
            "density": 0.005,
            "lrs": [3e-3, 5e-3],
        }
    return rows


#: the rows that collapsed to one class at one seed (seed 1), with the lr each chose on seed 0's
#: validation and the next lower rate (for the 0.5% rows, below their grid)
COLLAPSED = {
    "surgical-magnitude-1pct": (5e-3, 3e-3),
    "surgical-random-1pct": (5e-3, 3e-3),
    "surgical-principal-1pct": (5e-3, 3e-3),
    "surgical-fisher-0.5pct": (3e-3, 2e-3),
    "surgical-salience-0.5pct": (3e-3, 2e-3),
}


def collapse_specs() -> dict[str, dict]:
    """The collapse study's rows, not part of the default run (``--rows`` names them):
    ``<row>-clip1``, the same settings and lr with the gradient norm clipped at 1, and
    ``<row>-lower-lr``, the same settings at the next lower rate (its seed-0 run, when the grid
    search made it, comes from the cache)."""
    rows = row_specs()
    clipped = {
        f"{n}-clip1": {**rows[n], "max_grad_norm": 1.0, "lrs": [lr]} for n, (lr, _) in COLLAPSED.items()
    }
    lower = {f"{n}-lower-lr": {**rows[n], "lrs": [lr]} for n, (_, lr) in COLLAPSED.items()}
    return clipped | lower


def wants_wise_ft(name: str) -> bool:
    """WiSE-FT curves for full fine-tuning, LoRA and every surgical entries row at 1% (a lower-lr
    variant as its row, so that they share cached runs)."""
    name = name.removesuffix("-lower-lr")
    return name in ("full", "lora") or (name.startswith("surgical-") and name.endswith("-1pct"))


# --------------------------------------------------------------------------------------------
# the worker: one training run in its own process


def split(quick: bool):
    sizes = dict(held_out=64, ood_size=32) if quick else dict(held_out=1000, ood_size=500)
    train, test, ood = load_movie_reviews(default_data_path(), DemoConfig(**sizes, train_size=None))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234)).tolist()
    n_val = 32 if quick else 500
    val = train.subset(order[:n_val])
    rest = order[n_val:]
    train = train.subset(rest[: (96 if quick else 3000)])
    return train, val, test, ood


def train_row(spec: dict, lr: float, seed: int, quick: bool, workdir: Path) -> dict:
    torch.set_num_threads(1 if quick else int(os.environ.get("BENCH_THREADS", "2")))
    train, val, test, ood = split(quick)
    model, tok = load_model(default_model_path(), "classification", seed=seed)
    base = copy.deepcopy(model)
    train_b = text_batches(tok, train, 32, 64, shuffle=True, seed=seed)
    sets = {
        "validation": text_batches(tok, val, 64, 64),
        "id": text_batches(tok, test, 64, 64),
        "ood": text_batches(tok, ood, 32, 128 if quick else 256),
    }
    reset_peak_rss()
    t0 = time.perf_counter()
    kind = spec["kind"]
    artifact = workdir / "artifact"
    if kind in ("head", "full"):
        for n, p in model.named_parameters():
            p.requires_grad_(kind == "full" or n.startswith("classifier"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        sg.fit(model, train_b, lr=lr, seed=seed, max_grad_norm=spec.get("max_grad_norm"), show=False)
        delta = _as_delta(base, model)
        delta.save(artifact)
    elif kind in ("lora", "shira"):
        model, trainable = _peft_train(model, kind, train_b, lr, seed)
        model.save_pretrained(str(artifact))
        merged = model.merge_and_unload()
        delta = _as_delta(base, merged)
    else:
        plan = _plan(spec, model, train_b, seed)
        hooks = [LISA(gamma=2, every=max(1, len(train_b) // 6), seed=seed)] if kind == "lisa" else []
        sg.prepare(model, plan)
        trainable = sg.trainable_count(model)
        sg.fit(
            model, train_b, lr=lr, seed=seed, hooks=hooks, max_grad_norm=spec.get("max_grad_norm"), show=False
        )
        delta = sg.extract(model)
        delta.save(artifact)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    with sg.applied(base, delta):
        res = sg.evaluate(base, sets, task="classification", show=False)
    points = {}
    if spec.get("wise_ft_curve"):  # a whole curve: validation, ID and OOD at every alpha
        for alpha in WISE_ALPHAS:
            with sg.applied(base, sg.merge([delta], "wise_ft", alpha=alpha)):
                r = sg.evaluate(base, sets, task="classification", show=False)
            points[str(alpha)] = {k: v["accuracy"] for k, v in r.items()}
        points["1.0"] = {k: v["accuracy"] for k, v in res.items()}
    elif spec.get("wise_ft"):  # every alpha on validation (cheap); ID and OOD at this run's best only
        val = {"validation": sets["validation"]}
        for alpha in WISE_ALPHAS:
            with sg.applied(base, sg.merge([delta], "wise_ft", alpha=alpha)):
                r = sg.evaluate(base, val, task="classification", show=False)
            points[str(alpha)] = {"validation": r["validation"]["accuracy"]}
        points["1.0"] = {k: v["accuracy"] for k, v in res.items()}
        best = max(points, key=lambda a: (points[a]["validation"], float(a)))
        if best != "1.0":
            with sg.applied(base, sg.merge([delta], "wise_ft", alpha=float(best))):
                r = sg.evaluate(base, {k: sets[k] for k in ("id", "ood")}, task="classification", show=False)
            points[best].update({k: v["accuracy"] for k, v in r.items()})
    return {
        "trainable": int(trainable),
        "validation": res["validation"]["accuracy"],
        "id": res["id"]["accuracy"],
        "ood": res["ood"]["accuracy"],
        "train_seconds": seconds,
        "peak_rss_mib": peak / 2**20,
        "artifact_kib": _size(artifact) / 1024,
        "wise_ft": points,
    }


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else dir_size(path)


def _as_delta(base, tuned) -> sg.Delta:
    """The tuned model as a delta on ``base``; the new head is kept whole (it has no base)."""
    delta = sg.Delta.from_models(base, tuned)
    params = dict(tuned.named_parameters())
    for name in [n for n in delta.dense if n.startswith("classifier")]:
        delta.full[name] = params[name].detach().float().clone()
        del delta.dense[name]
    return delta


def _plan(spec: dict, model, train_b, seed: int) -> sg.Plan:
    if spec["kind"] == "lisa":  # every parameter, dense: LISA samples which layers train
        names = [n for n, _ in model.named_parameters()]
        return sg.Plan(
            dense=names,
            shapes={n: tuple(p.shape) for n, p in model.named_parameters()},
            meta={"method": "lisa"},
        )
    return sg.select(
        model,
        train_b,
        method=spec["method"],
        density=spec["density"],
        granularity=spec.get("granularity"),
        targets=[LAYER_LINEARS],
        always=ALWAYS,
        max_batches=16 if len(train_b) >= 16 else len(train_b),
        seed=seed,
        progress=False,
    )


def _peft_train(model, kind: str, train_b, lr: float, seed: int):
    from peft import LoraConfig, ShiraConfig, get_peft_model

    targets = ["query", "key", "value", "dense"]
    if kind == "lora":
        cfg = LoraConfig(r=8, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"])
    else:  # SHiRA at LoRA's count: r (in + out) values per layer, as LoRA's r=8
        cfg = ShiraConfig(r=8, target_modules=targets, modules_to_save=["classifier"], random_seed=seed)
    peft_model = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    sg.fit(peft_model, train_b, lr=lr, seed=seed, show=False)
    return peft_model, trainable


def worker_main(args) -> None:
    spec = json.loads(args.spec)
    with tempfile.TemporaryDirectory() as tmp:
        result = train_row(spec, args.lr, args.seed, args.quick, Path(tmp))
    args.result.write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# the driver


class NotCached(Exception):
    """A run ``--cached-only`` found no result for (its cache key)."""


def run_key(spec: dict, lr: float, seed: int, quick: bool) -> str:
    """What a worker's result depends on: the row's settings (not its grid), the lr and the seed."""
    settings = {k: v for k, v in spec.items() if k not in ("lrs", "lr_from")}
    blob = json.dumps({"spec": settings, "lr": lr, "seed": seed, "quick": quick}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_worker(
    spec: dict,
    lr: float,
    seed: int,
    quick: bool,
    tmp: Path,
    cache: Path | None = None,
    script: str = __file__,
    cached_only: bool = False,
) -> dict:
    """One training run of ``script``'s worker in a fresh process; with ``cache``, a run already
    made is read back (the forgetting benchmark's workers take the same arguments). With
    ``cached_only``, a run not in the cache raises :class:`NotCached` instead of training."""
    key = run_key(spec, lr, seed, quick)
    if cache is not None and (cache / f"{key}.json").is_file():
        return json.loads((cache / f"{key}.json").read_text())
    if cached_only:
        raise NotCached(key)
    out = tmp / f"r{time.perf_counter_ns()}.json"
    cmd = [
        sys.executable,
        script,
        "--worker",
        "--spec",
        json.dumps(spec),
        "--lr",
        str(lr),
        "--seed",
        str(seed),
        "--result",
        str(out),
    ] + (["--quick"] if quick else [])
    subprocess.run(cmd, check=True)
    result = json.loads(out.read_text())
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache / f"{key}.json", json.dumps(result))
    return result


def run_row(spec: dict, results: dict, seeds: list[int], run, *, search: bool, choose: str = "first") -> dict:
    """One row: each lr of its grid (only the first without ``search``; the lr its ``lr_from``
    row chose when that row ran), the best on validation kept, then the other seeds at it.
    ``choose``: ``"first"`` tries the grid with ``seeds[0]`` alone; ``"mean"`` runs every rate at
    every seed and keeps the best mean validation accuracy (a small validation split and one seed
    can pick a rate by one example that fails at the next seed). ``run(spec, lr, seed) -> result``.
    The row's record, without its summary; ``grid_runs``: every rate's runs, whole."""
    source = spec.get("lr_from") if spec.get("lr_from") in results else None
    grid = [results[source]["lr"]] if source else list(spec["lrs"] if search else spec["lrs"][:1])
    if choose not in ("first", "mean"):
        raise ValueError(f"choose must be 'first' or 'mean', not {choose!r}")
    by = seeds if choose == "mean" and len(grid) > 1 else seeds[:1]
    tried = {lr: [run(spec, lr, s) for s in by] for lr in grid}
    score = {lr: statistics.fmean(r["validation"] for r in runs) for lr, runs in tried.items()}
    lr = max(grid, key=lambda x: score[x])
    return {
        "lr": lr,
        "lr_grid": grid,
        "lr_from": source,
        "lr_chosen_on": "mean validation over the seeds" if len(by) > 1 else "validation at the first seed",
        "validation_by_lr": {str(k): v for k, v in score.items()},
        "grid_runs": {str(k): v for k, v in tried.items()},
        "runs": tried[lr] + [run(spec, lr, s) for s in seeds[len(by) :]],
    }


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in ("validation", "id", "ood", "train_seconds", "peak_rss_mib", "artifact_kib", "trainable"):
        vals = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def wise_ft_row(runs: list[dict]) -> dict | None:
    """WiSE-FT of a row: each run at the alpha its own validation accuracy chose (ties: the larger).

    Every alpha is scored on validation; ID and OOD are measured at the chosen one only (a full
    curve per run would cost three more evaluations of 2,000 examples).
    """
    if not runs or not runs[0]["wise_ft"]:
        return None
    chosen = []
    for r in runs:
        pts = r["wise_ft"]
        best = max(pts, key=lambda a: (pts[a]["validation"], float(a)))
        chosen.append({**r, **pts[best], "alpha": float(best)})
    alphas = [c["alpha"] for c in chosen]
    return {"alpha": statistics.fmean(alphas), "alphas": alphas, "runs": chosen, "summary": summarise(chosen)}


def curve_spec(spec: dict) -> dict:
    """A row's settings for its WiSE-FT curve runs (their own cache keys: the row's runs stay)."""
    return {**spec, "wise_ft": False, "wise_ft_curve": True}


def wise_ft_curve(runs: list[dict], lr: float, seeds: list[int]) -> dict:
    """One row's WiSE-FT curve: per alpha, mean ± std over the curve runs of each accuracy."""
    alphas = sorted(runs[0]["wise_ft"], key=float)
    curve = {
        a: {
            k: {
                "mean": statistics.fmean(r["wise_ft"][a][k] for r in runs),
                "std": statistics.stdev(r["wise_ft"][a][k] for r in runs) if len(runs) > 1 else 0.0,
            }
            for k in ("validation", "id", "ood")
        }
        for a in alphas
    }
    return {"lr": lr, "seeds": seeds, "alphas": curve}


def _colour(name: str) -> str:
    if name.startswith("full"):
        return "#4477aa"
    if name.startswith(("lora", "shira")):
        return "#228833"
    if name.startswith(("surgical", "fim", "lisa")):
        return "#ee6677"
    return "#999999"


def figure(results: dict, path: Path, curves: dict | None = None) -> None:
    """Three panels: every row's ID vs OOD (means ± std over seeds; WiSE-FT at the alpha each run's
    validation chose as stars), the goal's corner zoomed with the whole WiSE-FT curves, and ID
    accuracy against trainable parameters. Dashed: full fine-tuning's ID and LoRA's OOD (the goal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom, ax2) = plt.subplots(1, 3, figsize=(17, 5.4))
    mean = {
        n: (100 * r["summary"]["id"]["mean"], 100 * r["summary"]["ood"]["mean"]) for n, r in results.items()
    }
    for name, r in results.items():
        s, colour, wise = r["summary"], _colour(name), "wise-ft" in name
        x, y = mean[name]
        ax.errorbar(
            x, y, xerr=100 * s["id"]["std"], yerr=100 * s["ood"]["std"], fmt="*" if wise else "o",
            color=colour, markersize=8 if wise else 5, elinewidth=0.6, alpha=0.45 if wise else 0.8,
        )  # fmt: skip
        if not wise:  # a WiSE-FT star sits by its row's label
            ax.annotate(
                name.removeprefix("surgical-"), (x, y), fontsize=5, xytext=(3, 3), textcoords="offset points"
            )
            ax2.plot(max(1, s["trainable"]["mean"]), x, "o", color=colour)
            ax2.annotate(
                name.removeprefix("surgical-"), (max(1, s["trainable"]["mean"]), x), fontsize=5,
                xytext=(3, 3), textcoords="offset points",
            )  # fmt: skip
    # the goal's corner: rows near both references, and the WiSE-FT curves (alpha 0.5 -> 1)
    near = [n for n, (x, y) in mean.items() if "wise-ft" not in n and x >= 74 and y >= 76]
    for name in near:
        zoom.plot(*mean[name], "o", color=_colour(name))
        zoom.annotate(
            name.removeprefix("surgical-"), mean[name], fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    for name, c in (curves or {}).items():
        pts = [(100 * v["id"]["mean"], 100 * v["ood"]["mean"]) for v in c["alphas"].values()]
        seeds = ", ".join(map(str, c["seeds"]))
        zoom.plot(*zip(*pts, strict=True), "--", marker=".", linewidth=1, label=f"{name} (seed {seeds})")
        zoom.annotate(
            "a=" + next(iter(c["alphas"])), pts[0], fontsize=6, xytext=(-6, -10), textcoords="offset points"
        )
    if "full" in mean and "lora" in mean:
        for a in (ax, zoom):
            a.axvline(mean["full"][0], color="#4477aa", linestyle=":", linewidth=0.8)
            a.axhline(mean["lora"][1], color="#228833", linestyle=":", linewidth=0.8)
    if curves:
        zoom.legend(fontsize=6, loc="lower right", title="WiSE-FT curves, alpha 0.5 to 1", title_fontsize=6)
    for a in (ax, zoom):
        a.set_xlabel("ID accuracy, % (RT held-out)")
        a.set_ylabel("OOD accuracy, % (IMDB)")
        a.grid(alpha=0.3)
    ax.set_title("ID vs OOD, every row (mean ± std over seeds; stars: WiSE-FT)", fontsize=9)
    zoom.set_title("the goal's corner (dotted: full's ID, LoRA's OOD); dots: means", fontsize=9)
    ax2.set_xscale("log")
    ax2.set_xlabel("trainable parameters")
    ax2.set_ylabel("ID accuracy, %")
    ax2.set_title("ID accuracy vs trainable parameters (means)", fontsize=9)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


def driver_args(doc: str, out: Path, rows_help: str, assemble: bool = False) -> argparse.Namespace:
    """The command line of a row-by-row benchmark driver (this one and forgetting.py): the public
    flags, and the hidden ones :func:`run_worker` passes to the script's worker."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", help=rows_help)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-lr-search", action="store_true", help="each row's first (reference) lr, no search")
    if assemble:
        p.add_argument(
            "--choose",
            choices=("first", "mean"),
            default="first",
            help="how a row's lr is chosen: on the first seed's validation (then the other seeds run at "
            "it), or on the mean validation over every seed (every lr runs at every seed)",
        )
    p.add_argument("--out", type=Path, default=out)
    p.add_argument(
        "--cache",
        type=Path,
        help="directory of finished runs (one JSON per row settings, lr and seed): a run found there "
        "is read back instead of trained again, so an interrupted full run resumes",
    )
    if assemble:
        p.add_argument(
            "--cached-only",
            action="store_true",
            help="train nothing: assemble the report from --cache, listing the rows with a run missing",
        )
    if assemble:
        p.add_argument(
            "--curves",
            help="comma-separated rows of this run to draw a whole WiSE-FT curve for (ID and OOD at "
            "every alpha: three more evaluations a run), each at its chosen lr",
        )
        p.add_argument(
            "--curve-seeds", type=int, nargs="+", help="the seeds of the curve runs (default: the first)"
        )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = driver_args(
        __doc__,
        HERE / "results" / "quality.json",
        "comma-separated row names (default: all; quick: a few)",
        assemble=True,
    )
    if args.cached_only and args.cache is None:
        raise SystemExit("--cached-only reads finished runs from --cache: pass --cache DIR")
    if args.worker:
        worker_main(args)
        return
    specs = row_specs()
    names = (
        args.rows.split(",")
        if args.rows
        else (["head", "full", "surgical-gradient-1pct"] if args.quick else list(specs))
    )
    specs |= collapse_specs()
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(specs)}")
    curve_rows = args.curves.split(",") if args.curves else []
    if [n for n in curve_rows if n not in names]:
        raise SystemExit(
            f"--curves names rows this run does not run: {[n for n in curve_rows if n not in names]}; "
            "add them to --rows"
        )
    seeds = args.seeds[:1] if args.quick else args.seeds
    curve_seeds = args.curve_seeds or seeds[:1]
    results: dict[str, dict] = {}
    curves: dict[str, dict] = {}
    missing: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            spec = dict(specs[name])
            spec["wise_ft"] = wants_wise_ft(name)

            def run(spec: dict, lr: float, seed: int) -> dict:
                return run_worker(
                    spec, lr, seed, args.quick, Path(tmp), args.cache, cached_only=args.cached_only
                )

            try:
                row = run_row(
                    spec,
                    results,
                    seeds,
                    run,
                    search=not (args.quick or args.no_lr_search),
                    choose=args.choose,
                )
            except NotCached:
                missing.append(name)
                continue
            runs, lr = row["runs"], row["lr"]
            results[name] = {**row, "summary": summarise(runs)}
            s = results[name]["summary"]
            print(
                f"{name:28s} lr {lr:g}: ID {100 * s['id']['mean']:.1f} ± {100 * s['id']['std']:.1f}, "
                f"OOD {100 * s['ood']['mean']:.1f} ± {100 * s['ood']['std']:.1f}",
                flush=True,
            )
            wf = wise_ft_row(runs)
            if wf is not None:
                results[f"{name} + wise-ft"] = {"lr": lr, **wf}
            write(args, seeds, results, complete=False, missing=missing, curves=curves)
        for name in curve_rows:
            if name not in results:
                continue  # its row is missing (listed already)
            lr = results[name]["lr"]
            try:
                runs = [run(curve_spec(specs[name]), lr, s) for s in curve_seeds]
            except NotCached:
                missing.append(f"{name} (WiSE-FT curve)")
                continue
            curves[name] = wise_ft_curve(runs, lr, curve_seeds)
            write(args, seeds, results, complete=False, missing=missing, curves=curves)
    write(args, seeds, results, complete=not missing, missing=missing, curves=curves)
    if missing:
        print(f"not in the cache (left out): {', '.join(missing)}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def write(
    args, seeds: list[int], results: dict, complete: bool, missing: list[str] = (), curves: dict | None = None
) -> None:
    """Writes the report (after every row too, so a long run keeps what it finished)."""
    report = {
        "benchmark": "quality",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "surgical": sg.__version__},
        "setup": {
            "model": "all-MiniLM-L6-v2",
            "train": "RT sentences (3,000 in the full mode)",
            "validation": 500,
            "id": "1,000 held-out RT",
            "ood": "500 IMDB reviews, 256 tokens",
            "epochs": 1,
            "batch": 32,
            "max_length": 64,
            "seeds": seeds,
            "quick": args.quick,
            "protocol": (
                "reference lr per row, no search"
                if args.no_lr_search
                else "lr chosen on the mean validation over the seeds"
                if args.choose == "mean"
                else "lr chosen on validation with seed 0"
            )
            + "; WiSE-FT alpha on each run's validation",
            "wise_ft_alphas": [*WISE_ALPHAS, 1.0],
            "complete": complete,
            "missing_rows": list(missing),
        },
        "results": results,
        "wise_ft_curves": curves or {},
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    figure(results, args.out.with_suffix(".png"), curves)


if __name__ == "__main__":
    main()
