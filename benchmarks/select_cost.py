"""Cost of scoring: n calibration batches of gradient scoring vs n full fine-tuning steps.

Each configuration runs in its own subprocess (so its peak RSS is its own), alternating
full fine-tuning and scoring, ``--reps`` times; the printed ratios are medians of those runs,
measured side by side in one invocation.

- full fine-tuning: AdamW over every parameter, ``n`` steps (one untimed warm-up step first).
- scoring: ``sg.select(method=..., density=0.01)`` over ``n`` batches (including allocation),
  after one untimed 1-batch warm-up selection.

Models: all-MiniLM-L6-v2 (batch 32 x 64 tokens, sentiment labels) and SmolLM2-135M-Instruct
(batch 4 x 128 tokens, causal LM on the same texts). ``--quick`` uses tiny random BERT/Llama
models built from configs, for tests. Results go to ``benchmarks/results/select_cost.json``.

    python benchmarks/select_cost.py            # ~10 min on 2 CPU cores
    python benchmarks/select_cost.py --quick    # tiny models, to check the harness
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "select_cost.json"
MODELS = {  # name -> (batch size, tokens per example)
    "minilm": (32, 64),
    "smollm2": (4, 128),
    "tiny-bert": (8, 16),
    "tiny-llama": (4, 16),
}


def load(name: str, n: int):
    """(model, batches) for a benchmark model; ``n + 1`` batches (one for the warm-up)."""
    import torch

    from surgical.core.runtime import quiet_transformers

    quiet_transformers()
    bs, seq = MODELS[name]
    if name.startswith("tiny"):
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama

        if name == "tiny-bert":
            return tiny_bert(), cls_batches(n + 1, bs, seq)
        return tiny_llama(), lm_batches(n + 1, bs, seq)
    from surgical.data.text import TextExamples, text_batches
    from surgical.recipes.demo import default_data_path, default_model_path, load_movie_reviews

    from_demo = __import__("surgical.recipes.demo", fromlist=["DemoConfig"]).DemoConfig
    train, _, ood = load_movie_reviews(default_data_path(), from_demo(held_out=100, ood_size=(n + 1) * bs))
    if name == "minilm":
        from surgical.recipes.demo import load_classifier

        model, tok = load_classifier(default_model_path())
        return model, text_batches(tok, train.subset(range((n + 1) * bs)), bs, seq)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgical.recipes.smollm2 import smollm2_path

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.pad_token = tok.pad_token or tok.eos_token
    texts = TextExamples(ood.texts[: (n + 1) * bs], [0] * ((n + 1) * bs))
    batches = text_batches(tok, texts, bs, seq)
    for b in batches:
        b.pop("token_type_ids", None)
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    return model, batches


def worker(config: str, name: str, n: int, threads: int) -> dict:
    """Runs one configuration in this process; returns seconds for n batches and peak RSS."""
    import torch

    import surgical as sg
    from surgical.core.runtime import peak_rss_bytes

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, batches = load(name, n)
    rss_loaded = peak_rss_bytes()
    warm, timed = batches[:1], batches[1 : n + 1]
    if config == "full_ft":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(b):
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(warm[0])
        t0 = time.perf_counter()
        for b in timed:
            step(b)
        seconds = time.perf_counter() - t0
    else:
        method = config.split(":", 1)[1]
        gran = {"rgn": "tensor", "fim_layer": "layer"}.get(method, "entry")
        density = 0.01 if gran == "entry" else 0.5

        def run(data):
            return sg.select(
                model,
                data,
                method=method,
                density=density,
                granularity=gran,
                max_batches=len(data),
                progress=False,
            )

        run(warm)
        t0 = time.perf_counter()
        run(timed)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "rss_after_load_bytes": rss_loaded}


def spawn(config: str, name: str, n: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        config,
        "--model",
        name,
        "--n",
        str(n),
        "--threads",
        str(threads),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode:
        raise RuntimeError(f"{config} on {name} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, 1 repetition (for tests)")
    ap.add_argument("--n", type=int, default=None, help="batches/steps per measurement")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (median reported)")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=["gradient"], help="criteria to time")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (1: on a shared machine, oversubscribed OpenMP threads dominate timings)",
    )
    ap.add_argument("--out", default=None, help=f"results JSON (default {RESULTS})")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.n, args.threads)))
        return
    models = args.models or (["tiny-bert", "tiny-llama"] if args.quick else ["minilm", "smollm2"])
    n = args.n or (2 if args.quick else 4)
    reps = args.reps or (1 if args.quick else 3)
    if "smollm2" in models:
        from surgical.recipes.smollm2 import smollm2_path

        smollm2_path()  # convert once, outside the measurements
    configs = ["full_ft", *[f"score:{m}" for m in args.methods]]
    results: dict = {}
    for name in models:
        runs: dict[str, list[dict]] = {c: [] for c in configs}
        for _ in range(reps):
            for c in configs:  # alternate, so load on a shared machine hits every config alike
                runs[c].append(spawn(c, name, n, args.threads))
        ft_t = statistics.median(r["seconds"] for r in runs["full_ft"])
        ft_m = statistics.median(r["peak_rss_bytes"] for r in runs["full_ft"])
        entry: dict = {"batch": MODELS[name], "n": n, "reps": reps, "full_ft": _summary(runs["full_ft"])}
        for c in configs[1:]:
            t = statistics.median(r["seconds"] for r in runs[c])
            m = statistics.median(r["peak_rss_bytes"] for r in runs[c])
            entry[c] = {**_summary(runs[c]), "time_ratio": t / ft_t, "peak_rss_ratio": m / ft_m}
            print(
                f"{name:10s} {c:16s} {t / n:7.3f} s/batch vs full FT {ft_t / n:7.3f} s/step: "
                f"time x{t / ft_t:.2f} (target <= 1.3), peak RSS {m / 2**20:,.0f} MiB vs "
                f"{ft_m / 2**20:,.0f} MiB: x{m / ft_m:.2f} (target <= 1.0)"
            )
        results[name] = entry
    out = Path(args.out) if args.out else RESULTS
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    payload = {
        "benchmark": "select_cost",
        "quick": args.quick,
        "torch_threads": args.threads,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1min_at_end": load_avg,
        },
        "note": "shared machine (other engineers' jobs running): absolute timings are noisy; ratios are "
        "medians of alternating runs measured side by side",
        "results": results,
    }
    from surgical.core.io import atomic_write_text

    atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


def _summary(runs: list[dict]) -> dict:
    return {
        "seconds_median": statistics.median(r["seconds"] for r in runs),
        "seconds_all": [round(r["seconds"], 4) for r in runs],
        "peak_rss_bytes_median": statistics.median(r["peak_rss_bytes"] for r in runs),
        "rss_after_load_bytes_median": statistics.median(r["rss_after_load_bytes"] for r in runs),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
