"""Delta size vs accuracy on the demo task: float32 / bf16 / int8 / sign, with and without top-k.

Runs the demo at its default configuration (``surgical demo``: MiniLM on Rotten Tomatoes, see
DemoConfig; ``--quick``: the small test configuration) to get a delta, or takes the delta a demo
run wrote (``--delta surgical-demo-delta``), then evaluates every stored variant with
``sg.applied`` on one base model: ID accuracy (held-out RT) and OOD accuracy (IMDB), file size
and bytes per entry. The accuracy change is against the uncompressed float32 delta.
The SHiRA export of the same delta is sized too.

    nice -n 10 python benchmarks/delta_compression.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

import surgical as sg
from surgical.core.io import dir_size
from surgical.data.text import text_batches
from surgical.delta.export import export_shira
from surgical.eval.accuracy import predict
from surgical.recipes.demo import DemoConfig, default_data_path, load_classifier, load_movie_reviews, run_demo

VARIANTS = [  # (label, keep density, stored dtype)
    ("float32", 1.0, "float32"),
    ("bfloat16", 1.0, "bfloat16"),
    ("float16", 1.0, "float16"),
    ("int8", 1.0, "int8"),
    ("sign (ComPEFT)", 1.0, "sign"),
    ("top 50% + int8", 0.5, "int8"),
    ("top 50% + sign", 0.5, "sign"),
    ("top 20% + sign", 0.2, "sign"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the demo's small test configuration")
    ap.add_argument(
        "--delta", help="evaluate this delta from `surgical demo` (same configuration) instead of training"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "delta_compression.json"))
    args = ap.parse_args()
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="surgical-compress-"))
    out = args.delta or str(work / "delta")
    cfg = DemoConfig.quick(out=out) if args.quick else DemoConfig(out=out)
    if args.delta:
        delta = sg.Delta.load(args.delta)
        demo = {**delta.meta.get("training", {}), "entries": delta.num_entries}
    else:
        demo = run_demo(cfg, console)
        delta = sg.Delta.load(cfg.out)
    model, tok = load_classifier(default_model_path_of(cfg), seed=cfg.seed)
    _, test, ood = load_movie_reviews(default_data_path(), cfg)
    test_b = text_batches(tok, test, 64, cfg.max_length)
    ood_b = text_batches(tok, ood, 32, cfg.ood_max_length)
    rows = []
    for label, density, dtype in VARIANTS:
        d = delta.compress(density, dtype) if (density < 1 or dtype in ("int8", "sign")) else delta
        path = work / label.replace(" ", "_").replace("%", "").replace("(", "").replace(")", "")
        d.save(path, dtype=dtype)
        stored = sg.Delta.load(path)
        with sg.applied(model, stored):
            _, _, acc_id = predict(model, test_b, show=False)
            _, _, acc_ood = predict(model, ood_b, show=False)
        size = dir_size(path)
        rows.append(
            {
                "variant": label,
                "entries": stored.num_entries,
                "bytes": size,
                # whole tensors are stored in float32 or, with a 16-bit or int8/sign codec, bf16
                "bytes_per_entry": (size - (4 if dtype == "float32" else 2) * stored.num_full)
                / max(1, stored.num_entries),
                "id_accuracy": acc_id,
                "ood_accuracy": acc_ood,
            }
        )
    ref = rows[0]
    for r in rows:
        r["id_change"] = r["id_accuracy"] - ref["id_accuracy"]
        r["ood_change"] = r["ood_accuracy"] - ref["ood_accuracy"]
    try:
        export_shira(delta, model, work / "shira")
        shira_bytes, shira_note = dir_size(work / "shira"), None
    except sg.SurgicalError as e:  # e.g. the demo's dense biases share modules with the entries
        shira_bytes, shira_note = None, str(e)
    t = Table(title="delta compression on the demo task (accuracy change vs float32)")
    for col in ("variant", "entries", "KiB", "B/entry", "ID", "dID", "OOD", "dOOD"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        t.add_row(
            r["variant"],
            f"{r['entries']:,}",
            f"{r['bytes'] / 1024:.0f}",
            f"{r['bytes_per_entry']:.2f}",
            f"{r['id_accuracy']:.1%}",
            f"{r['id_change'] * 100:+.1f}",
            f"{r['ood_accuracy']:.1%}",
            f"{r['ood_change'] * 100:+.1f}",
        )
    console.print(t)
    if shira_bytes is None:
        console.print(f"PEFT SHiRA export not possible: {shira_note}")
    else:
        console.print(
            f"PEFT SHiRA export of the float32 delta: {shira_bytes / 1024:.0f} KiB "
            f"({shira_bytes / ref['bytes']:.1f}x our float32 file, "
            f"{shira_bytes / rows[1]['bytes']:.1f}x our bf16 file)"
        )
    result = {
        "task": "demo: MiniLM, RT train -> RT held-out (ID) / IMDB (OOD)"
        + (" (quick configuration)" if args.quick else " (default demo configuration)"),
        "config": {k: v for k, v in vars(cfg).items() if k != "out"},
        "demo": {
            k: demo.get(k) for k in ("id_accuracy", "ood_accuracy", "entries", "seconds_per_step", "steps")
        },
        "variants": rows,
        "shira_bytes": shira_bytes,
        "shira_note": shira_note,
        "note": "bytes_per_entry excludes the tensors stored in full (head, pooler, biases, norms; "
        "float32, else bf16); only the sparse entries are compressed; one seed",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


def default_model_path_of(cfg: DemoConfig) -> Path:
    from surgical.recipes.demo import default_model_path

    return Path(cfg.model) if cfg.model else default_model_path()


if __name__ == "__main__":
    main()
