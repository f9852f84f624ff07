"""Surgical fine-tuning (Lee et al., 2022) on scikit-learn's bundled digits: which block to tune.

The paper's finding: under an *input-level* shift (image corruptions) fine-tuning only the first
block beats fine-tuning everything, and under an *output-level* shift the last layer wins. Here,
with data that ships offline (``sklearn.datasets.load_digits``: 1,797 8x8 images, 10 classes):

- a small CNN (three blocks of two 3x3 convolutions, ``blocks.0`` .. ``blocks.2``, and a linear
  ``head`` on the pooled features; no normalisation layers, so nothing adapts outside the
  trained parameters) is pretrained on a *source* split (900 images) for a few seconds;
- a disjoint *target* split is shifted: Gaussian noise (std 0.5 on [0, 1] pixels), blur (two
  3x3 Gaussian blurs, sigma 1.5), rotation (45 degrees), or relabelled classes (a fixed
  permutation of the labels, images unchanged), and split into train (200), validation (150)
  and test (447);
- each unit alone (block 1, 2, 3, the head: a ``Plan`` with that unit's weights and biases
  dense), or all parameters, is fine-tuned with ``surgical.prepare`` + ``surgical.fit`` on the
  target train split; the learning rate of each (shift, unit) is the one with the best mean
  validation accuracy over the seeds, and the test accuracy at that rate is reported (mean and
  std over 3 seeds; a seed sets the pretraining and the fine-tuning);
- ``fim_layer`` and ``rgn`` score the four units on the target train split (``sg.select(...,
  granularity="layer")``: the blocks as layers, the head as a tensor of its own) and the
  top-ranked unit is their pick, with the blocks' own aggregate (``sum``, the default: a block's
  Fisher trace or its tensors' summed relative gradient norms) and with ``aggregate="mean"``
  (the mean over a block's tensors: both criteria score whole tensors). The pick is checked to
  be what ``sg.select`` returns with a budget of exactly that unit's size.

Writes JSON (every accuracy at every learning rate and seed, the criteria's scores and picks)
and a PNG (shifts x units, test accuracy mean +- std, picks marked).

    nice -n 10 python benchmarks/vision_surgical.py                 # ~5 minutes on 2 busy cores
    python benchmarks/vision_surgical.py --quick --out X.json       # seconds (run by a test)
    python benchmarks/vision_surgical.py --replot                   # the PNG again, from the JSON
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import surgical as sg
from surgical.core.io import atomic_save_figure, atomic_write_text
from surgical.select.plan import Plan

HERE = Path(__file__).resolve().parent
SHIFTS = ("noise", "blur", "rotation", "labels")
SHIFT_KIND = {"noise": "input", "blur": "input", "rotation": "input", "labels": "output"}
SHIFT_TEXT = {
    "noise": "Gaussian noise, std 0.5 (pixels in [0, 1])",
    "blur": "two 3x3 Gaussian blurs, sigma 1.5",
    "rotation": "rotation by 45 degrees (bilinear)",
    "labels": "labels permuted (0->3, 1->7, 2->0, 3->9, 4->5, 5->1, 6->8, 7->2, 8->6, 9->4)",
}
UNITS = {"block 1": "blocks.0.", "block 2": "blocks.1.", "block 3": "blocks.2.", "head": "head.", "all": ""}
#: the unit names fim_layer / rgn score at layer granularity -> the grid's names
SCORED_UNITS = {"blocks.0": "block 1", "blocks.1": "block 2", "blocks.2": "block 3", "head.weight": "head"}
LABEL_PERMUTATION = (3, 7, 0, 9, 5, 1, 8, 2, 6, 4)
CRITERIA_RUN = ("fim_layer", "rgn")
AGGREGATES = ("sum", "mean")
SPLIT_SEED, SHIFT_SEED = 1234, 11


@dataclass
class Output:
    """What the CNN returns: the loss (when labels are given) and the logits."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class DigitsCNN(nn.Module):
    """Three blocks of two 3x3 convolutions (8x8 -> 4x4 -> 2x2), global average pooling, a head.

    Block names ``blocks.N`` are what :func:`surgical.core.names.split_layer` reads as layers.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 32, 64), mean: float = 0.0, std: float = 1.0):
        super().__init__()
        c = (1, *widths)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c[i], c[i + 1], 3, padding=1, stride=1 if i == 0 else 2),
                nn.ReLU(),
                nn.Conv2d(c[i + 1], c[i + 1], 3, padding=1),
                nn.ReLU(),
            )
            for i in range(3)
        )
        self.head = nn.Linear(c[-1], 10)
        self.register_buffer("norm", torch.tensor([mean, std]))  # the source data's pixel statistics

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        h = (pixel_values - self.norm[0]) / self.norm[1]
        for block in self.blocks:
            h = block(h)
        logits = self.head(h.mean((2, 3)))
        return Output(F.cross_entropy(logits, labels) if labels is not None else None, logits)


def load_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The digits as (N, 1, 8, 8) floats in [0, 1], split once (fixed seed) into source and target."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    parts = {
        "source_train": order[:900],
        "source_val": order[900:1000],
        "target_train": order[1000:1200],
        "target_val": order[1200:1350],
        "target_test": order[1350:],
    }
    return {k: (x[i], y[i]) for k, i in parts.items()}


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.exp(-(torch.arange(-1.0, 2.0) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    return F.conv2d(x, (k[:, None] * k[None, :]).view(1, 1, 3, 3), padding=1)


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    t = math.radians(degrees)
    theta = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]])
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def shifted(name: str, x: torch.Tensor, y: torch.Tensor, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target images and labels under shift ``name`` (deterministic; ``salt`` varies the noise
    between the target splits)."""
    if name == "noise":
        g = torch.Generator().manual_seed(SHIFT_SEED + salt)
        return x + 0.5 * torch.randn(x.shape, generator=g), y
    if name == "blur":
        return _blur(_blur(x, 1.5), 1.5), y
    if name == "rotation":
        return _rotate(x, 45.0), y
    if name == "labels":
        return x, torch.tensor(LABEL_PERMUTATION)[y]
    raise ValueError(name)


def batches(x: torch.Tensor, y: torch.Tensor, size: int, epochs: int, seed: int) -> list[dict]:
    """``epochs`` reshuffled passes over (x, y) as a list of batches (``sg.fit`` with one epoch)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - size + 1, size):
            idx = order[i : i + size]
            out.append({"pixel_values": x[idx], "labels": y[idx]})
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).logits.argmax(1) == y).float().mean().item()


def unit_plan(model: nn.Module, unit: str) -> Plan:
    """Every parameter of one unit (weights and biases), trained densely."""
    names = [n for n, _ in model.named_parameters() if n.startswith(UNITS[unit])]
    return Plan(
        dense=names, shapes={n: tuple(model.get_parameter(n).shape) for n in names}, meta={"unit": unit}
    )


def pretrain(data, seed: int, epochs: int) -> tuple[DigitsCNN, dict]:
    x, y = data["source_train"]
    torch.manual_seed(seed)
    model = DigitsCNN(mean=x.mean().item(), std=x.std().item())
    t0 = time.perf_counter()
    fit = sg.fit(model, batches(x, y, 32, epochs, seed), lr=3e-3, seed=seed, show=False)
    info = {
        "seconds": time.perf_counter() - t0,
        "steps": fit.steps,
        "source_val_accuracy": accuracy(model, *data["source_val"]),
    }
    return model, info


def finetune(base: nn.Module, unit: str, train: list[dict], lr: float, seed: int) -> nn.Module:
    model = copy.deepcopy(base)
    sg.prepare(model, unit_plan(model, unit), new=None)
    sg.fit(model, train, lr=lr, seed=seed, show=False)
    return model


def criterion_pick(model: nn.Module, method: str, data: list[dict], aggregate: str) -> dict:
    """The four units' scores under ``method`` at layer granularity and the top one.

    The scores are those ``sg.select`` ranks (the criterion's per-tensor scores folded into
    blocks by ``build_units``); the pick is checked against ``sg.select`` with a budget of
    exactly the picked unit's size.
    """
    from surgical.select.api import resolve_targets
    from surgical.select.criteria import CRITERIA, ScoreContext
    from surgical.select.units import build_units, dense_sizes

    params, _ = resolve_targets(model, None, None, None, "layer")
    ctx = ScoreContext(model, params, data, len(data), 0, False, CRITERIA.resolve(method, {}))
    raw = CRITERIA.get(method)(ctx)
    units = build_units({n: raw[n] for n in params}, "layer", aggregate)
    dense_sizes(units, {n: tuple(p.shape) for n, p in params.items()})
    scores = {SCORED_UNITS[u.name]: float(u.scores[0]) for u in units}
    sizes = {SCORED_UNITS[u.name]: u.size for u in units}
    top = max(units, key=lambda u: float(u.scores[0]))
    blocks = [u for u in units if u.name.startswith("blocks.")]
    plan = sg.select(
        model,
        data,
        method=method,
        granularity="layer",
        aggregate=aggregate,
        count=top.size,
        max_batches=len(data),
        progress=False,
    )
    if sorted(plan.dense) != sorted(top.members):
        raise SystemExit(f"{method}/{aggregate}: sg.select chose {plan.dense}, the scores rank {top.members}")
    return {
        "pick": SCORED_UNITS[top.name],
        "pick_among_blocks": SCORED_UNITS[max(blocks, key=lambda u: float(u.scores[0])).name],
        "scores": scores,
        "sizes": sizes,
        "selected": sorted(plan.dense),
    }


def run_shift(shift: str, data, models: list[nn.Module], args) -> dict:
    (xtr, ytr), (xva, yva), (xte, yte) = (
        shifted(shift, *data[k], salt) for salt, k in enumerate(("target_train", "target_val", "target_test"))
    )
    out: dict = {
        "kind": SHIFT_KIND[shift],
        "shift": SHIFT_TEXT[shift],
        "before": [accuracy(m, xte, yte) for m in models],  # the source models, not fine-tuned
        "units": {},
        "criteria": {},
    }
    trains = [batches(xtr, ytr, args.batch, args.epochs, seed) for seed in range(len(models))]
    for method in CRITERIA_RUN:  # on the pretrained model and the first pass over the target train data
        per_agg: dict = {}
        for agg in AGGREGATES:
            picks = [
                criterion_pick(m, method, trains[s][: len(xtr) // args.batch], agg)
                for s, m in enumerate(models)
            ]
            per_agg[agg] = {
                "picks": [p["pick"] for p in picks],
                "picks_among_blocks": [p["pick_among_blocks"] for p in picks],  # the head left out
                "scores": [p["scores"] for p in picks],
            }
        per_agg["sizes"] = picks[0]["sizes"]  # parameters per unit as the criteria count them
        out["criteria"][method] = per_agg
    for unit in UNITS:
        val: dict[str, list[float]] = {}
        test: dict[str, list[float]] = {}
        for lr in args.lrs:
            for seed, base in enumerate(models):
                model = finetune(base, unit, trains[seed], lr, seed)
                val.setdefault(f"{lr:g}", []).append(accuracy(model, xva, yva))
                test.setdefault(f"{lr:g}", []).append(accuracy(model, xte, yte))
        chosen = max(args.lrs, key=lambda lr: (statistics.mean(val[f"{lr:g}"]), -lr))  # ties: the smaller
        acc = test[f"{chosen:g}"]
        out["units"][unit] = {
            "lr": chosen,
            "test": acc,
            "test_mean": statistics.mean(acc),
            "test_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "val_mean": statistics.mean(val[f"{chosen:g}"]),
            "val_by_lr": val,
            "test_by_lr": test,
        }
        print(
            f"{shift:>9} {unit:>8}: lr {chosen:g}  test {statistics.mean(acc):.3f} "
            f"+- {out['units'][unit]['test_std']:.3f}",
            flush=True,
        )
    singles = [u for u in UNITS if u != "all"]
    out["best_unit"] = max(UNITS, key=lambda u: out["units"][u]["test_mean"])
    out["best_single_unit_by_test"] = max(singles, key=lambda u: out["units"][u]["test_mean"])
    out["best_single_unit_by_val"] = max(singles, key=lambda u: out["units"][u]["val_mean"])
    for method in CRITERIA_RUN:
        for agg in AGGREGATES:
            c = out["criteria"][method][agg]
            c["test_of_pick"] = [out["units"][u]["test"][s] for s, u in enumerate(c["picks"])]
            c["test_of_pick_mean"] = statistics.mean(c["test_of_pick"])
    return out


def figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts, units = list(report["shifts"]), list(UNITS)
    before = {s: statistics.mean(report["shifts"][s]["before"]) for s in shifts}
    means = [[report["shifts"][s]["units"][u]["test_mean"] for u in units] for s in shifts]
    gain = [[m - row[-1] for m in row] for row in means]  # against fine-tuning all ("all" is last)
    fig, ax = plt.subplots(figsize=(8.6, 1.2 + 1.05 * len(shifts)))
    ax.imshow(gain, cmap="RdBu", vmin=-0.06, vmax=0.06, aspect="auto")
    marks = {("fim_layer", "sum"): "F", ("rgn", "sum"): "R", ("fim_layer", "mean"): "f", ("rgn", "mean"): "r"}
    for i, s in enumerate(shifts):
        r = report["shifts"][s]
        for j, u in enumerate(units):
            m, sd = r["units"][u]["test_mean"], r["units"][u]["test_std"]
            bold = u == r["best_unit"]
            ax.text(
                j,
                i,
                f"{m:.3f}\n± {sd:.3f}",
                ha="center",
                va="center",
                fontsize=9,
                color="black" if abs(gain[i][j]) < 0.045 else "white",
                fontweight="bold" if bold else "normal",
            )
            picked = [
                marks[(meth, agg)]
                for (meth, agg) in marks
                if r["criteria"][meth][agg]["picks"].count(u) * 2 > len(r["criteria"][meth][agg]["picks"])
            ]
            if picked:
                ax.text(
                    j + 0.45, i - 0.42, " ".join(picked), ha="right", va="top", fontsize=8, color="black",
                    bbox={"facecolor": "white", "edgecolor": "black", "linewidth": 0.5, "pad": 1.5},
                )  # fmt: skip
    ax.set_xticks(range(len(units)), [f"fine-tune {u}" for u in units], fontsize=8)
    ax.set_yticks(
        range(len(shifts)),
        [f"{s} ({report['shifts'][s]['kind']})\nno FT: {before[s]:.3f}" for s in shifts],
        fontsize=8,
    )
    seeds = report["setup"]["seeds"]
    seeds = f"{seeds} seed{'s' if seeds > 1 else ''}"
    ax.set_title(
        f"Digits CNN, target test accuracy (mean ± std over {seeds}; bold: best)\n"
        "colour: against fine-tuning all (blue better, red worse; ±0.06 saturates)\n"
        "boxed: the unit fim_layer (F) / rgn (R) rank first in most seeds (lower case: aggregate='mean')",
        fontsize=9,
    )
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 2 learning rates, few epochs (seconds)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "vision_surgical.json")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON at --out")
    args = p.parse_args()
    if args.replot:
        figure(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    torch.set_num_threads(1)
    if args.quick:
        args.seeds, args.pretrain_epochs, args.epochs, args.lrs = 1, 4, 3, (3e-3, 3e-2)
    else:
        args.pretrain_epochs, args.epochs, args.lrs = 30, 30, (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    args.batch = 20
    t0 = time.perf_counter()
    data = load_splits()
    models, pre = [], []
    for seed in range(args.seeds):
        m, info = pretrain(data, seed, args.pretrain_epochs)
        models.append(m)
        pre.append(info)
        print(
            f"pretrained seed {seed}: source val {info['source_val_accuracy']:.3f} in {info['seconds']:.1f} s"
        )
    shifts = {s: run_shift(s, data, models, args) for s in SHIFTS}
    report = {
        "benchmark": "vision_surgical",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "sklearn": __import__("sklearn").__version__,
            "surgical": sg.__version__,
        },
        "setup": {
            "data": "sklearn.datasets.load_digits (1,797 8x8 images, 10 classes)",
            "splits": {k: len(v[1]) for k, v in data.items()},
            "model": "DigitsCNN: 3 blocks x 2 conv3x3 (32, 32, 64 channels; 8x8, 4x4, 2x2), ReLU, "
            "average pool, linear head",
            "parameters": {
                u: sum(p.numel() for n, p in models[0].named_parameters() if n.startswith(pre_))
                for u, pre_ in UNITS.items()
            },
            "seeds": args.seeds,
            "pretrain": {"epochs": args.pretrain_epochs, "batch": 32, "lr": 3e-3, "runs": pre},
            "finetune": {
                "epochs": args.epochs,
                "batch": args.batch,
                "lrs": list(args.lrs),
                "optimizer": "AdamW (sg.fit: 10% warm-up, linear decay)",
                "lr_choice": "best mean target-validation accuracy over the seeds, per shift and unit",
            },
            "criteria": {
                "data": "the first pass over the target train split (its batches of the seed's order)",
                "granularity": "layer (blocks.N; the head as a tensor of its own)",
            },
        },
        "shifts": shifts,
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    figure(report, args.out.with_suffix(".png"))
    for s, r in shifts.items():
        picks = {f"{m}/{a}": r["criteria"][m][a]["picks"] for m in CRITERIA_RUN for a in AGGREGATES}
        print(
            f"{s:>9}: best {r['best_unit']}, best single unit {r['best_single_unit_by_test']}; picks {picks}"
        )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
