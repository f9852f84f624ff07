"""WiSE-FT of full fine-tuning and of surgical's demo recipe, alpha chosen on validation.

MiniLM (all-MiniLM-L6-v2) fine-tuned on Rotten Tomatoes sentences (the demo's split: 1,000 held
out for ID), with 500 of the remaining training sentences carved out as the validation set
that picks alpha; ID = the 1,000 held-out RT sentences, OOD = the first N IMDB reviews (256
tokens). Two fine-tunings, each followed by a sweep of base + alpha x delta:

- full fine-tuning (every parameter, lr 5e-5; the classification head is new, so it is kept
  whole and only the encoder's change is scaled);
- surgical's demo recipe (0.4% of the layers' Linear weights as entries by |gradient|, the
  pooler, biases and LayerNorms dense, 0.97% of the encoder; lr 3e-3).

Both use one epoch, batch 32, 64 tokens, AdamW with warm-up and linear decay, seed 0. Nothing
is chosen on the ID or OOD sets. Writes JSON (every point) and a PNG (ID vs OOD along alpha).

    python benchmarks/wise_ft.py                       # ~20 min on 2 CPU cores
    python benchmarks/wise_ft.py --quick --out X.json  # tiny subsets, seconds (run by a test)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

import surgical as sg
from surgical.core.io import atomic_save_figure, atomic_write_text
from surgical.data.text import TextExamples, text_batches
from surgical.recipes.demo import DemoConfig, default_data_path, default_model_path, load_movie_reviews
from surgical.recipes.models import load_model

HERE = Path(__file__).resolve().parent
ALPHAS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0)


def split(args):
    cfg = DemoConfig(held_out=args.id_size, ood_size=args.ood_size, train_size=None)
    train, test, ood = load_movie_reviews(default_data_path(), cfg)
    g = torch.Generator().manual_seed(1234)  # the validation carve-out is fixed across seeds
    order = torch.randperm(len(train), generator=g).tolist()
    val = train.subset(order[: args.val_size])
    train = train.subset(
        order[args.val_size :][: args.train_size] if args.train_size else order[args.val_size :]
    )
    return train, val, test, ood


def batches(tok, ex: TextExamples, bs: int, length: int, shuffle: bool = False, seed: int = 0):
    return text_batches(tok, ex, bs, length, shuffle=shuffle, seed=seed)


def full_finetune(args, train_b):
    model, _ = load_model(default_model_path(), "classification", seed=args.seed)
    base = copy.deepcopy(model)
    t0 = time.perf_counter()
    result = sg.fit(model, train_b, lr=args.full_lr, seed=args.seed, show=not args.quiet)
    delta = sg.Delta.from_models(base, model)
    for name in [n for n in delta.dense if n.startswith("classifier")]:  # the new head: kept whole
        delta.full[name] = dict(model.named_parameters())[name].detach().float().clone()
        del delta.dense[name]
    return base, delta, {"steps": result.steps, "seconds": time.perf_counter() - t0}


def surgical_finetune(args, train_b):
    model, _ = load_model(default_model_path(), "classification", seed=args.seed)
    base = copy.deepcopy(model)
    demo = DemoConfig()
    plan = sg.select(
        model,
        train_b,
        method=demo.method,
        density=demo.density,
        always=list(demo.always),
        max_batches=args.calib_batches,
        seed=args.seed,
        progress=not args.quiet,
    )
    sg.prepare(model, plan)
    t0 = time.perf_counter()
    result = sg.fit(model, train_b, lr=args.surgical_lr, seed=args.seed, show=not args.quiet)
    return (
        base,
        sg.extract(model),
        {"steps": result.steps, "seconds": time.perf_counter() - t0, "trainable": sg.trainable_count(model)},
    )


def sweep(base, delta, sets, args):
    points = []
    for alpha in ALPHAS:
        scaled = sg.merge([delta], "wise_ft", alpha=alpha)
        with sg.applied(base, scaled):
            res = sg.evaluate(base, sets, task="classification", show=not args.quiet)
        points.append({"alpha": alpha, **{k: v["accuracy"] for k, v in res.items()}})
        print(
            f"  alpha {alpha:.1f}: " + "  ".join(f"{k} {v['accuracy']:.4f}" for k, v in res.items()),
            flush=True,
        )
    best = max(points, key=lambda p: (p["validation"], p["alpha"]))
    return points, best


def figure(runs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    colours = {"full fine-tuning": "#4477aa", "surgical (demo recipe)": "#ee6677"}
    for name, run in runs.items():
        xs = [100 * p["id"] for p in run["points"]]
        ys = [100 * p["ood"] for p in run["points"]]
        ax.plot(xs, ys, "-o", color=colours.get(name), label=name, markersize=4)
        for p, x, y in zip(run["points"], xs, ys, strict=True):
            ax.annotate(f"{p['alpha']:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
        b = run["chosen"]
        ax.plot(
            [100 * b["id"]],
            [100 * b["ood"]],
            "*",
            color=colours.get(name),
            markersize=15,
            markeredgecolor="black",
            label=f"{name}: alpha {b['alpha']:g} (chosen on validation)",
        )
    ax.set_xlabel("ID accuracy, % (1,000 held-out RT sentences)")
    ax.set_ylabel("OOD accuracy, % (IMDB reviews)")
    ax.set_title("WiSE-FT: base + alpha x delta (numbers: alpha)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny subsets (seconds)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "wise_ft.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    full = dict(id_size=1000, ood_size=1000, val_size=500, train_size=None, calib_batches=16)
    quick = dict(id_size=64, ood_size=32, val_size=32, train_size=128, calib_batches=2)
    for k, v in (quick if args.quick else full).items():
        setattr(args, k, v)
    args.full_lr, args.surgical_lr = 5e-5, 3e-3
    torch.manual_seed(args.seed)
    _, tok = load_model(default_model_path(), "classification", seed=args.seed)
    train, val, test, ood = split(args)
    train_b = batches(tok, train, 32, 64, shuffle=True, seed=args.seed)
    sets = {
        "validation": batches(tok, val, 64, 64),
        "id": batches(tok, test, 64, 64),
        "ood": batches(tok, ood, 32, 128 if args.quick else 256),
    }
    runs = {}
    for name, fn in (("full fine-tuning", full_finetune), ("surgical (demo recipe)", surgical_finetune)):
        print(f"{name}: training", flush=True)
        base, delta, info = fn(args, train_b)
        points, best = sweep(base, delta, sets, args)
        runs[name] = {"training": info, "points": points, "chosen": best}
        print(
            f"{name}: chosen alpha {best['alpha']} -> ID {best['id']:.4f}, OOD {best['ood']:.4f}", flush=True
        )
    report = {
        "benchmark": "wise_ft",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
            "surgical": sg.__version__,
        },
        "setup": {
            "train": len(train),
            "validation": len(val),
            "id": len(test),
            "ood": len(ood),
            "seed": args.seed,
            "alphas": list(ALPHAS),
            "full_lr": args.full_lr,
            "surgical_lr": args.surgical_lr,
            "epochs": 1,
            "batch": 32,
            "max_length": 64,
            "ood_max_length": 128 if args.quick else 256,
        },
        "runs": runs,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    figure(runs, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
