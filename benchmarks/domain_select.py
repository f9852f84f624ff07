"""Choosing in-domain examples from a mixed pool: the ``importance`` criterion (DSIR-like).

MiniLM (all-MiniLM-L6-v2), sentiment. The pool mixes two domains half and half: 1,500 Rotten
Tomatoes sentences (the first half of benchmarks/quality.py's training split) and 1,500 IMDB
reviews (labelled too; disjoint from the 500 of the OOD test set), both read at 64 tokens. The
target is quality.py's validation split (500 RT sentences): the criteria that use a target see it,
nothing sees the test sets. Every criterion keeps half the pool (1,500 examples: as many as the
RT half), then the model trains on what was kept with quality.py's ``surgical-gradient-1pct``
recipe (plan scored on the whole pool; lr 3e-3, batch 32) for as many steps as one epoch of the
whole pool (94: two epochs of the kept half; one epoch of it, 47 steps, left even a random RT
half at chance at one seed in data_fraction.py, so the steps are held equal and only the data
differs), and is evaluated on the 1,000 held-out RT sentences (ID) and the 500 IMDB reviews at
256 tokens (OOD).

Rows: ``random`` (half the pool); ``importance`` (hashed uni- and bigrams, 10,000 buckets,
sampled in proportion to the weights, as DSIR); ``importance+normalize`` (weights per n-gram, no
favour for long reviews); ``importance-top`` (the largest weights, no sampling);
``rt-only`` (the pool's RT half itself: what a perfect domain filter keeps) and ``pool`` (every
example once, the same steps). Columns: the share of the kept examples that are RT,
selection seconds, ID, OOD and validation accuracy; mean ± std over the seeds (the seed drives
the selection, the plan and the training).

    python benchmarks/domain_select.py --cache results/domain_select_runs     # full (~18 points)
    python benchmarks/domain_select.py --cache results/domain_select_runs --cached-only
    python benchmarks/domain_select.py --quick --out X.json                  # tiny (a test runs it)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _data_select as ds
import torch

HERE = Path(__file__).resolve().parent
# row -> select_data options (None: no selection; the row keeps a fixed part of the pool)
ROWS: dict[str, dict | None] = {
    "random": {"method": "random"},
    "importance": {"method": "importance"},
    "importance+normalize": {"method": "importance", "normalize": True},
    "importance-top": {"method": "importance", "sample": False},
    "rt-only": None,
    "pool": None,
}


def pool_split(quick: bool):
    """``(pool, is_rt, validation, id, ood)``: half RT sentences, half IMDB reviews (not the OOD ones)."""
    from surgical.data import TextExamples
    from surgical.recipes.demo import DemoConfig, default_data_path, load_movie_reviews

    train, val, test, ood = ds.split(quick)
    half = 48 if quick else 1500
    ood_size = 32 if quick else 500
    _, _, imdb = load_movie_reviews(default_data_path(), DemoConfig(held_out=64, ood_size=ood_size + half))
    rt, reviews = train.subset(range(half)), imdb.subset(range(ood_size, ood_size + half))
    pool = TextExamples(rt.texts + reviews.texts, rt.labels + reviews.labels)
    return pool, [True] * half + [False] * half, val, test, ood


def run_point(row: str, seed: int, quick: bool) -> dict:
    """Selects, trains and evaluates one point in this process (one torch thread)."""
    torch.set_num_threads(1)
    import surgical as sg
    from surgical.core.runtime import quiet_transformers
    from surgical.recipes.demo import default_model_path
    from surgical.recipes.models import load_model

    quiet_transformers()
    pool, is_rt, val, test, ood = pool_split(quick)
    model, tok = load_model(default_model_path(), "classification", seed=seed)
    base = copy.deepcopy(model)
    plan = ds.plan(model, ds.train_batches(tok, pool, seed), seed)
    out: dict = {"row": row, "seed": seed, "selection_seconds": 0.0}
    if row == "rt-only":
        kept = [i for i, r in enumerate(is_rt) if r]
    elif row == "pool":
        kept = list(range(len(pool)))
    else:
        opts = dict(ROWS[row])
        method = opts.pop("method")
        extra = {"validation": ds.examples(tok, val)} if method == "importance" else {}
        examples = ds.examples(tok, pool)
        sel = sg.select_data(
            None, examples, method=method, fraction=0.5, seed=seed, progress=False, **extra, **opts
        )
        kept = sel.indices.tolist()
        out["selection_seconds"] = sel.meta["seconds"]
        out["info"] = {
            k: sel.meta[k] for k in ("log_weights", "target_coverage", "kl_to_target") if k in sel.meta
        }
    out["examples"] = len(kept)
    out["rt_share"] = sum(is_rt[i] for i in kept) / len(kept)
    out["positive_share"] = sum(pool.labels[i] for i in kept) / len(kept)
    t0 = time.perf_counter()
    sg.prepare(model, plan)
    batches = ds.train_batches(tok, pool.subset(kept), seed)
    steps = len(ds.train_batches(tok, pool, seed))  # one epoch of the whole pool, for every row
    fit = sg.fit(model, batches, max_steps=steps, lr=ds.LR, seed=seed, show=False)
    out["steps"], out["train_seconds"] = steps, time.perf_counter() - t0
    out["final_loss"] = round(statistics.fmean(fit.losses[-5:]), 4)
    out.update(ds.evaluate(base, sg.extract(model), tok, val, test, ood, quick))
    return out


def point_key(row: str, seed: int, quick: bool) -> str:
    """What a point depends on, hashed (its cache file's name)."""
    blob = {"row": row, "options": ROWS[row], "seed": seed, "quick": quick,
            "recipe": [ds.RECIPE, ds.LR, ds.BATCH, ds.MAX_LENGTH], "pool": "rt1500+imdb1500",
            "steps": "one epoch of the pool"}  # fmt: skip
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def summarise(points: list[dict]) -> dict:
    keys = ("rt_share", "id", "ood", "validation", "selection_seconds", "train_seconds", "positive_share")
    out = {}
    for row in ROWS:
        mine = [p for p in points if p["row"] == row]
        if mine:
            out[row] = {k: ds.stat([p[k] for p in mine]) for k in keys}
    return out


def figure(summary: dict, path: Path) -> None:
    """Two panels: the RT share of what each row kept, and ID / OOD accuracy (means ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from surgical.core.io import atomic_save_figure

    rows = list(summary)
    x = range(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.bar(x, [100 * summary[r]["rt_share"]["mean"] for r in rows], color="#4477aa")
    a.axhline(50, color="grey", linestyle=":", linewidth=0.8)
    a.set_ylabel("RT share of the kept examples, %")
    a.set_title("what each row kept (the pool is half RT)", fontsize=9)
    for k, (what, colour) in enumerate((("id", "#228833"), ("ood", "#ee6677"))):
        b.errorbar(
            [i + (k - 0.5) * 0.25 for i in x], [100 * summary[r][what]["mean"] for r in rows],
            yerr=[100 * summary[r][what]["std"] for r in rows], fmt="o", color=colour,
            label="RT test (ID, 1,000)" if what == "id" else "IMDB test (500; IMDB is half the pool)",
        )  # fmt: skip
    b.set_ylabel("accuracy, %")
    b.legend(fontsize=7)
    b.set_title("after the steps of one epoch of the pool (mean ± std over seeds)", fontsize=9)
    for ax in (a, b):
        ax.set_xticks(list(x), rows, rotation=20, fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


def write(args, points: list[dict], complete: bool, missing: list[tuple]) -> None:
    from surgical.core.io import atomic_write_text

    summary = summarise(points)
    report = {
        **ds.header("domain_select", torch_threads_per_worker=1),
        "setup": {
            "model": "all-MiniLM-L6-v2",
            "pool": "48 RT + 48 IMDB"
            if args.quick
            else "1,500 RT sentences (quality.py's training split, "
            "first half) + 1,500 IMDB reviews (not the OOD ones), 64 tokens",
            "target": "quality.py's validation split (RT): the importance rows' target",
            "kept": "half the pool",
            "id": "64 held-out RT" if args.quick else "1,000 held-out RT",
            "ood": "32 IMDB reviews, 128 tokens" if args.quick else "500 IMDB reviews, 256 tokens",
            "recipe": f"quality.py {ds.RECIPE}: lr {ds.LR}, batch {ds.BATCH}, the steps of one epoch of "
            f"the whole pool (two of the kept half), max_length {ds.MAX_LENGTH}; plan scored on the pool",
            "rows": {r: ROWS[r] for r in args.rows},
            "seeds": args.seeds,
            "quick": args.quick,
            "complete": complete,
            "missing": [{"row": r, "seed": s} for r, s in missing],
        },
        "summary": summary,
        "points": points,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    figure(summary, args.out.with_suffix(".png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny subsets, one seed")
    p.add_argument("--rows", help=f"comma-separated, of {', '.join(ROWS)} (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick: 0)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "domain_select.json")
    p.add_argument("--cache", type=Path, help="directory of finished points (read back, not run again)")
    p.add_argument("--cached-only", action="store_true", help="run nothing: assemble from --cache")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.result.write_text(json.dumps(run_point(args.row, args.seed, args.quick)))
        return
    if args.cached_only and args.cache is None:
        raise SystemExit("--cached-only reads finished points from --cache: pass --cache DIR")
    args.rows = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    points, missing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # seed by seed: a run cut short has whole seeds
            for row in args.rows:
                cached = args.cache / f"{point_key(row, seed, args.quick)}.json" if args.cache else None
                if cached is not None and cached.is_file():
                    points.append(json.loads(cached.read_text()))
                    continue
                if args.cached_only:
                    missing.append((row, seed))
                    continue
                cmd = [sys.executable, __file__, "--worker", "--row", row, "--seed", str(seed)]
                point = ds.cached_worker(cmd + (["--quick"] if args.quick else []), cached, Path(tmp))
                points.append(point)
                s = point
                print(f"{row:22s} seed {seed}: RT share {100 * s['rt_share']:.0f}%, ID {100 * s['id']:.1f}, "
                      f"OOD {100 * s['ood']:.1f}", flush=True)  # fmt: skip
                write(args, points, complete=False, missing=missing)
    write(args, points, complete=not missing, missing=missing)
    print(
        f"{len(points)} points, {len(missing)} missing; wrote {args.out} and {args.out.with_suffix('.png')}"
    )


if __name__ == "__main__":
    main()
