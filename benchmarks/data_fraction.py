"""Accuracy vs data fraction: which data criterion keeps full-data accuracy with the least data.

MiniLM (all-MiniLM-L6-v2), Rotten Tomatoes -> IMDB, exactly benchmarks/quality.py's split
(3,000 training sentences, 500 validation, 1,000 held-out RT as ID, 500 IMDB reviews at 256
tokens as OOD). Every point trains with quality.py's ``surgical-gradient-1pct`` recipe (1% of
the six layers' Linear weights by gradient, always the classifier, biases and LayerNorms; lr
3e-3, batch 32, 1 epoch, 64 tokens) on the examples a data criterion keeps.

For each criterion (random, loss, learnability, trajectory, diversity, dedup, gradient,
gradient+adam, trajectory+classes: trajectory keeping the class shares) and fraction (10%, 30%,
50%), and each seed, plus 100% (once per seed, shared by all criteria): the plan is scored on
all the training data (as ``surgical train`` does before its data selection), the selection is
made on the base model from the training set only (the gradient criteria take the validation
split as their target set; the ID and OOD test sets are never seen), then the model trains on
the kept examples. The seed drives the selection, the plan and the training. Each point runs in
a fresh worker process with one torch thread; ``--jobs 2`` runs two at a time. The JSON is
rewritten after every point (a run cut short keeps what it finished), with ID, OOD and
validation mean ± std per (criterion, fraction), selection and training seconds; the PNG plots
ID and OOD accuracy against the fraction, one line per criterion.

``--stratify``: score-based criteria select with ``sg.select_data(..., stratify=True)``, the best
of each class with the budget split by class size (the base model's untrained head makes loss and
gradient scores favour one class); the JSON records it.

    python benchmarks/data_fraction.py --jobs 2                 # full mode (84 points)
    python benchmarks/data_fraction.py --jobs 2 --stratify      # the same, class shares kept
    python benchmarks/data_fraction.py --criteria random,gradient --fractions 0.1 0.3 --seeds 0
    python benchmarks/data_fraction.py --quick --out X.json     # tiny subsets (a test runs it)

``--cache DIR`` keeps each finished point as one JSON file there (named by a hash of what it
depends on: criterion and options, fraction, seed, stratify, the recipe), and reads a point found
there back instead of running it again: a long run resumes where it stopped, and drivers started
with disjoint ``--seeds`` or ``--criteria`` can share the work. ``--cached-only`` runs nothing and
assembles the report from the cache, listing the points it lacks in ``setup.missing``.

    python benchmarks/data_fraction.py --stratify --cache results/data_fraction_runs --seeds 0
    python benchmarks/data_fraction.py --stratify --cache results/data_fraction_runs --cached-only

``--equal-steps`` separates which data from how much training: every point takes as many optimizer
steps as one epoch of all the data (cycling through the kept examples), so 10% is ten epochs of
its 300 examples instead of ten steps. The 100% points are the same run either way (one cache
entry); the other points have their own.

    python benchmarks/data_fraction.py --stratify --equal-steps --criteria random,learnability \
        --fractions 0.1 0.3 1.0 --seeds 0 --cache results/data_fraction_runs \
        --out results/data_fraction_equal_steps.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import _data_select as ds
import torch

HERE = Path(__file__).resolve().parent
FULL = "all"  # the 100% points' criterion name
FRACTIONS = (0.1, 0.3, 0.5, 1.0)
# what a point keeps of its selection's record (trajectory: its clusters and what was kept of each)
INFO = ("kept", "unwarmed", "features", "clusters", "cluster_sizes", "kept_by_cluster", "checkpoint_steps",
        "cluster_mean_losses", "dropped", "dropped_clusters", "subset_of", "balance_cut",
        "by_class_before")  # fmt: skip


# --------------------------------------------------------------------------------------------
# the worker: one point in its own process


def run_point(
    name: str, fraction: float, seed: int, quick: bool, stratify: bool = False, equal_steps: bool = False
) -> dict:
    """Selects (unless 100%), trains and evaluates one point; returns its numbers. ``equal_steps``:
    train as many optimizer steps as one epoch of all the data takes, not one epoch of the kept."""
    torch.set_num_threads(1)
    import surgical as sg
    from surgical.core.runtime import quiet_transformers
    from surgical.recipes.demo import default_model_path
    from surgical.recipes.models import load_model

    quiet_transformers()
    train, val, test, ood = ds.split(quick)
    model, tok = load_model(default_model_path(), "classification", seed=seed)
    base = copy.deepcopy(model)
    all_batches = ds.train_batches(tok, train, seed)
    plan = ds.plan(model, all_batches, seed)
    out: dict = {"criterion": name, "fraction": fraction, "seed": seed}
    kept = train
    if name != FULL:
        sel = ds.select(
            name, model, tok, train, val, plan, fraction=fraction, seed=seed, quick=quick, stratify=stratify
        )
        kept = train.subset(sel.indices.tolist())
        out.update(
            selection_seconds=sel.meta["seconds"],
            selection_peak_rss_mib=sel.meta["peak_memory_bytes"] / 2**20,
            options=sel.options,
            info={k: sel.meta[k] for k in INFO if k in sel.meta},
        )
    else:
        out["selection_seconds"] = 0.0
    out["examples"] = len(kept)
    out["positive_share"] = sum(kept.labels) / len(kept)  # class balance of what was kept
    t0 = time.perf_counter()
    sg.prepare(model, plan)
    batches = ds.train_batches(tok, kept, seed)
    steps = len(all_batches) if equal_steps else None  # None: one epoch of the kept examples
    fit = sg.fit(model, batches, max_steps=steps, lr=ds.LR, seed=seed, show=False)
    out["steps"] = steps or len(batches)
    out["losses"] = [round(x, 4) for x in fit.losses]  # every step's: a run stuck at ln 2 shows
    delta = sg.extract(model)
    out["train_seconds"] = time.perf_counter() - t0
    out.update(ds.evaluate(base, delta, tok, val, test, ood, quick))
    return out


def worker_main(args) -> None:
    result = run_point(args.criterion, args.fraction, args.seed, args.quick, args.stratify, args.equal_steps)
    args.result.write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# the driver


def run_worker(
    point: tuple[str, float, int], quick: bool, stratify: bool, tmp: Path, equal_steps: bool = False
) -> dict:
    name, fraction, seed = point
    out = tmp / f"p{time.perf_counter_ns()}_{threading.get_ident()}.json"
    cmd = [sys.executable, __file__, "--worker", "--criterion", name, "--fraction", str(fraction)]
    cmd += ["--seed", str(seed), "--result", str(out)] + (["--quick"] if quick else [])
    cmd += ["--stratify"] if stratify else []
    cmd += ["--equal-steps"] if equal_steps else []
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return {**json.loads(out.read_text()), "worker_seconds": time.perf_counter() - t0}


def point_key(point: tuple[str, float, int], quick: bool, stratify: bool, equal_steps: bool = False) -> str:
    """What a point's result depends on, hashed: its cache file's name (``equal_steps`` enters only
    when it changes the run: a point below 100%)."""
    name, fraction, seed = point
    method = ds.criterion(name, quick) if name != FULL else None
    blob = {"criterion": name, "method": method, "fraction": fraction, "seed": seed, "quick": quick}
    blob |= {"stratify": stratify, "recipe": [ds.RECIPE, ds.LR, ds.BATCH, ds.MAX_LENGTH]}
    if equal_steps and fraction < 1.0:
        blob["equal_steps"] = True
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def plan_points(
    criteria: list[str], fractions: list[float], seeds: list[int]
) -> list[tuple[str, float, int]]:
    """Seed by seed (a run cut short has whole seeds), 100% first, then fraction by criterion."""
    points = []
    for seed in seeds:
        if 1.0 in fractions:
            points.append((FULL, 1.0, seed))
        points += [(c, f, seed) for f in fractions if f < 1.0 for c in criteria]
    return points


def summarise(points: list[dict]) -> dict:
    """criterion -> fraction -> mean ± std of ID, OOD, validation, selection and training seconds."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for p in points:
        groups.setdefault(p["criterion"], {}).setdefault(str(p["fraction"]), []).append(p)
    keys = ("id", "ood", "validation", "selection_seconds", "train_seconds")
    order = [*ds.CRITERIA, FULL]
    return {
        c: {f: {k: ds.stat([r[k] for r in runs]) for k in keys} for f, runs in sorted(groups[c].items())}
        for c in sorted(groups, key=order.index)
    }


def figure(summary: dict, path: Path, heading: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from surgical.core.io import atomic_save_figure

    full = summary.get(FULL, {}).get("1.0")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, key, title in zip(axes, ("id", "ood"), ("ID: held-out RT", "OOD: IMDB"), strict=True):
        lines = [s for s in summary.items() if s[0] != FULL]
        for i, (name, by) in enumerate(lines):
            fr = sorted(float(f) for f in by)
            mean = [100 * by[str(f)][key]["mean"] for f in fr]
            std = [100 * by[str(f)][key]["std"] for f in fr]
            if full is not None:  # every line ends at the shared 100% point
                fr, mean, std = fr + [1.0], mean + [100 * full[key]["mean"]], std + [100 * full[key]["std"]]
            offset = [100 * f + 0.4 * (i - (len(lines) - 1) / 2) for f in fr]  # error bars side by side
            ax.errorbar(offset, mean, yerr=std, marker="o", markersize=4, capsize=2, label=name)
        if full is not None:
            ax.axhline(
                100 * full[key]["mean"], color="black", linestyle="--", linewidth=0.8, label="all data"
            )
        ax.set_xlabel("share of the training data, %")
        ax.set_ylabel("accuracy, %")
        ax.set_title(f"{title} (mean ± std over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if heading:
        fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


def write(args, points: list[dict], failures: list[dict], complete: bool, missing: list[tuple] = ()) -> None:
    """Writes the report and the figure (after every point, so a long run keeps what it finished)."""
    from surgical.core.io import atomic_write_text

    summary = summarise(points)
    report = {
        **ds.header("data_fraction", torch_threads_per_worker=1, jobs=args.jobs),
        "setup": {
            "model": "all-MiniLM-L6-v2",
            "split": "benchmarks/quality.py split()",
            "train": 96 if args.quick else 3000,
            "validation": 32 if args.quick else 500,
            "id": "64 held-out RT" if args.quick else "1,000 held-out RT",
            "ood": "32 IMDB reviews, 128 tokens" if args.quick else "500 IMDB reviews, 256 tokens",
            "recipe": f"quality.py {ds.RECIPE}: lr {ds.LR}, batch {ds.BATCH}, "
            + ("the steps of one epoch of all the data" if args.equal_steps else "1 epoch")
            + f", max_length {ds.MAX_LENGTH}",
            "equal_steps": args.equal_steps,
            "plan": "scored on all the training data; the selection on the base model, training set only",
            "criteria": {
                c: dict(zip(("method", "options"), ds.criterion(c, args.quick), strict=True))
                for c in args.criteria
            },  # fmt: skip
            "stratify": (
                "select_data(stratify=True) for score-based criteria: the best of each class, by class size"
                if args.stratify
                else False
            ),
            "fractions": args.fractions,
            "seeds": args.seeds,
            "quick": args.quick,
            "complete": complete,
            "missing": [{"criterion": c, "fraction": f, "seed": sd} for c, f, sd in missing],
        },
        "summary": summary,
        "points": points,
        "failures": failures,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    steps = "the steps of one epoch of all the data" if args.equal_steps else "one epoch of the kept examples"
    figure(summary, args.out.with_suffix(".png"), heading=f"Every point trains {steps}")


def _floats(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1], got {text}")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny subsets, random and gradient+adam at 50%%")
    p.add_argument("--criteria", help=f"comma-separated, of {', '.join(ds.CRITERIA)} (default: all)")
    p.add_argument("--fractions", type=_floats, nargs="+", help="default 0.1 0.3 0.5 1.0 (1.0: all data)")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick: 0)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes at a time")
    p.add_argument(
        "--stratify",
        action="store_true",
        help="score-based criteria keep the same fraction of each class (the top scores within it)",
    )
    p.add_argument(
        "--equal-steps",
        action="store_true",
        help="every point trains the optimizer steps of one epoch of all the data (not one epoch of its own)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "data_fraction.json")
    p.add_argument("--cache", type=Path, help="directory of finished points: read back, not run again")
    p.add_argument("--cached-only", action="store_true", help="run nothing: assemble the report from --cache")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--criterion", help=argparse.SUPPRESS)
    p.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
        return
    args.criteria = ds.parse_criteria(
        args.criteria, ["random", "gradient+adam"] if args.quick else ds.CRITERIA
    )
    args.fractions = sorted(set(args.fractions or ([0.5, 1.0] if args.quick else FRACTIONS)))
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.jobs < 1:
        raise SystemExit("--jobs must be at least 1")
    if args.cached_only and args.cache is None:
        raise SystemExit("--cached-only reads finished points from --cache: pass --cache DIR")
    points = plan_points(args.criteria, args.fractions, args.seeds)
    done: list[dict] = []
    failures: list[dict] = []
    todo = []
    for pt in points:
        key = point_key(pt, args.quick, args.stratify, args.equal_steps)
        path = args.cache / f"{key}.json" if args.cache else None
        if path is not None and path.is_file():
            done.append(json.loads(path.read_text()))
        else:
            todo.append(pt)
    done.sort(key=lambda r: (r["seed"], r["fraction"], r["criterion"]))
    if args.cached_only:
        write(args, done, failures, complete=not todo, missing=todo)
        print(f"{len(done)} points from {args.cache}, {len(todo)} missing; wrote {args.out}")
        return
    print(f"{len(points)} points ({len(done)} cached), {args.jobs} at a time", flush=True)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            pool.submit(run_worker, pt, args.quick, args.stratify, Path(tmp), args.equal_steps): pt
            for pt in todo
        }
        for fut in as_completed(futures):
            name, fraction, seed = futures[fut]
            try:
                r = fut.result()
            except subprocess.CalledProcessError as e:
                failures.append({"criterion": name, "fraction": fraction, "seed": seed, "error": str(e)})
                print(f"FAILED {name} {fraction:g} seed {seed}: {e}", flush=True)
            else:
                done.append(r)
                if args.cache is not None:
                    from surgical.core.io import atomic_write_text

                    args.cache.mkdir(parents=True, exist_ok=True)
                    key = point_key((name, fraction, seed), args.quick, args.stratify, args.equal_steps)
                    atomic_write_text(args.cache / f"{key}.json", json.dumps(r))
                print(
                    f"[{len(done)}/{len(points)}] {name:14s} {100 * fraction:3.0f}% seed {seed}: "
                    f"ID {100 * r['id']:.1f}, OOD {100 * r['ood']:.1f}, val {100 * r['validation']:.1f}; "
                    f"select {r['selection_seconds']:.0f}s, train {r['train_seconds']:.0f}s, "
                    f"worker {r['worker_seconds']:.0f}s",
                    flush=True,
                )
            done.sort(key=lambda r: (r["seed"], r["fraction"], r["criterion"]))
            write(args, done, failures, complete=False)
    write(args, done, failures, complete=not failures)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
