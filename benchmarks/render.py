"""Writes the Markdown tables of the docs from the committed benchmark JSON, and the demo's
recorded baselines, so that no figure in the docs is typed by hand.

    python benchmarks/render.py            # every section whose JSON exists
    python benchmarks/render.py --check    # exit 1 if a rendered section is out of date

Sections live in ``docs/benchmarks.md``, ``docs/data.md`` and the README between ``<!-- render:NAME -->`` and
``<!-- /render:NAME -->`` markers; a section whose JSON is missing is left as it is. The demo's
recorded baselines (``src/surgical/recipes/demo_reference.json``, what ``surgical demo`` prints
beside its own numbers) come from the quality benchmark's seed-0 runs of full fine-tuning and LoRA,
which use the demo's split and loop.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from surgical.core.io import atomic_write_text

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOC = REPO / "docs" / "benchmarks.md"
RESULTS = HERE / "results"
DEMO_REFERENCE = REPO / "src" / "surgical" / "recipes" / "demo_reference.json"


def pct(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def size(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB" if kib >= 1024 else f"{kib:,.0f} KiB"


def quality_table(report: dict) -> str:
    rows = report["results"]
    lines = [
        "| row | lr (grid) | trainable | validation | ID | OOD | train s | peak RSS | artifact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        s = r["summary"]
        if "alphas" in r:  # a WiSE-FT row: the alpha each run's validation chose
            lr = "alpha " + ", ".join(f"{a:g}" for a in r["alphas"])
        elif "alpha" in r:
            lr = f"alpha {r['alpha']:g}"
        elif r.get("lr_from"):
            lr = f"{r['lr']:g} (from {r['lr_from']})"
        else:
            lr = f"{r['lr']:g} ({', '.join(f'{x:g}' for x in r['lr_grid'])})"
        lines.append(
            f"| {name} | {lr} | {count(s['trainable']['mean'])} | {pct(s['validation'])} | "
            f"{pct(s['id'])} | {pct(s['ood'])} | {s['train_seconds']['mean']:.0f} | "
            f"{s['peak_rss_mib']['mean']:,.0f} MiB | {size(s['artifact_kib']['mean'])} |"
        )
    missing = report["setup"].get("missing_rows") or []
    tail = f"\n\nNot run yet (no finished runs in the cache): {', '.join(missing)}." if missing else ""
    return "\n".join(lines) + "\n\n" + quality_verdict(report) + tail


def quality_verdict(report: dict) -> str:
    """The default-recipe goal, checked: ID >= full fine-tuning's and OOD >= LoRA's, at <= 1%."""
    rows = report["results"]
    if "full" not in rows or "lora" not in rows:
        return "The goal cannot be checked yet: the full and LoRA rows are missing."
    full_id = rows["full"]["summary"]["id"]["mean"]
    lora_ood = rows["lora"]["summary"]["ood"]["mean"]
    encoder = rows["full"]["summary"]["trainable"]["mean"]
    mine = {
        n: r["summary"]
        for n, r in rows.items()
        if n.startswith("surgical-") and r["summary"]["trainable"]["mean"] <= 0.01 * encoder
    }
    if not mine:
        return "No surgical row at <= 1% of the encoder has finished yet."
    lines = [
        f"Goal (means over seeds, <= 1% of the encoder): ID >= full fine-tuning's {100 * full_id:.1f} "
        f"and OOD >= LoRA's {100 * lora_ood:.1f}."
    ]
    both = [n for n, s in mine.items() if s["id"]["mean"] >= full_id and s["ood"]["mean"] >= lora_ood]
    best_id = max(mine, key=lambda n: mine[n]["id"]["mean"])
    best_ood = max(mine, key=lambda n: mine[n]["ood"]["mean"])
    if both:
        lines.append(f"Reached by: {', '.join(both)}.")
    else:
        lines.append(
            f"Not reached. Best ID: {best_id} at {100 * mine[best_id]['id']['mean']:.1f} "
            f"({100 * (mine[best_id]['id']['mean'] - full_id):+.1f} against full fine-tuning); best OOD: "
            f"{best_ood} at {100 * mine[best_ood]['ood']['mean']:.1f} "
            f"({100 * (mine[best_ood]['ood']['mean'] - lora_ood):+.1f} against LoRA)."
        )
    paired = [paired_gaps(rows, n) for n in dict.fromkeys([best_id, best_ood, *both])]
    if all(paired):
        lines.append(
            "Paired by seed (each run minus the baseline's run at the same seed, mean ± std): "
            + "; ".join(paired)
            + "."
        )
    return " ".join(lines)


def paired_gaps(rows: dict, name: str) -> str | None:
    """A row's ID gap to full fine-tuning and OOD gap to LoRA, seed by seed (runs are in seed
    order in every row), as 'name: ID +a ± b, OOD +c ± d'; None without three paired runs."""
    import statistics

    out = []
    for key, ref in (("id", "full"), ("ood", "lora")):
        mine, theirs = rows[name].get("runs", []), rows[ref].get("runs", [])
        if len(mine) != len(theirs) or len(mine) < 2:
            return None
        gaps = [100 * (a[key] - b[key]) for a, b in zip(mine, theirs, strict=True)]
        out.append(f"{key.upper()} {statistics.fmean(gaps):+.1f} ± {statistics.stdev(gaps):.1f}")
    return f"{name}: {', '.join(out)}"


def forgetting_table(report: dict) -> str:
    base = report.get("base") or {}
    lines = [
        "| row | lr (grid) | trainable | task accuracy | KL(base \\|\\| tuned) | reference loss change "
        "| train s | peak RSS | artifact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if base:
        lines.append(f"| base, zero-shot | | 0 | {100 * base['test']:.1f} | 0 | 0 | | | |")
    for name, r in report["results"].items():
        s = r["summary"]
        if "wise_ft" in s:  # the same runs as their plain rows; their curves: forgetting_wise_table
            continue
        lr = (
            f"{r['lr']:g} (from {r['lr_from']})"
            if r.get("lr_from")
            else f"{r['lr']:g} ({', '.join(f'{x:g}' for x in r['lr_grid'])})"
        )
        lines.append(
            f"| {name} | {lr} | {count(s['trainable']['mean'])} | {pct(s['test'])} | "
            f"{s['kl']['mean']:.4f} ± {s['kl']['std']:.4f} | "
            f"{s['loss_change']['mean']:+.4f} ± {s['loss_change']['std']:.4f} | "
            f"{s['train_seconds']['mean']:.0f} | {s['peak_rss_mib']['mean']:,.0f} MiB | "
            f"{size(s['artifact_kib']['mean'])} |"
        )
    return "\n".join(lines)


def forgetting_wise_table(report: dict) -> str:
    """The forgetting benchmark's WiSE-FT rows: each method's change scaled by alpha, then the
    alpha each run's validation accuracy chose, and where the surgical curve meets LoRA's KL."""
    base = report.get("base") or {}
    rows = {n: r for n, r in report["results"].items() if "wise_ft" in r["summary"]}
    lines = [
        "| row | alpha | validation | task accuracy | KL(base \\|\\| tuned) | reference loss change |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    if base:
        lines.append(
            f"| base, zero-shot | 0 | {100 * base['validation']:.1f} | {100 * base['test']:.1f} | 0 | 0 |"
        )
    for name, r in rows.items():
        for a, p in sorted(r["summary"]["wise_ft"]["alphas"].items(), key=lambda x: float(x[0])):
            lines.append(
                f"| {name} | {float(a):g} | {pct(p['validation'])} | {pct(p['test'])} | "
                f"{p['kl']['mean']:.4f} ± {p['kl']['std']:.4f} | "
                f"{p['loss_change']['mean']:+.4f} ± {p['loss_change']['std']:.4f} |"
            )
    notes = []
    for name, r in rows.items():
        c = r["summary"]["wise_ft"]["chosen"]
        notes.append(
            f"{name} at alpha {', '.join(f'{a:g}' for a in c['alphas'])}: task {pct(c['test'])}, "
            f"KL {c['kl']['mean']:.4f}"
        )
    text = "\n".join(lines)
    if notes:
        text += (
            "\n\nAlpha chosen on validation by each seed's run (ties: the larger): " + "; ".join(notes) + "."
        )
    lora = rows.get("lora-wise")
    for name, r in rows.items():
        if not name.startswith("surgical") or lora is None:
            continue
        budget = lora["summary"]["wise_ft"]["alphas"]["1.0"]
        under = {
            a: p
            for a, p in r["summary"]["wise_ft"]["alphas"].items()
            if p["kl"]["mean"] <= budget["kl"]["mean"]
        }
        if not under:
            text += f" No point of {name} is at or below LoRA's KL ({budget['kl']['mean']:.4f})."
            continue
        a = max(under, key=float)
        text += (
            f" At or below LoRA's KL ({budget['kl']['mean']:.4f}), {name} reaches task accuracy "
            f"{pct(under[a]['test'])} at alpha {float(a):g} (KL {under[a]['kl']['mean']:.4f}), against "
            f"LoRA's {pct(budget['test'])}"
        )
        mine, theirs = r.get("runs", []), lora.get("runs", [])
        if len(mine) == len(theirs) > 1:  # runs are in seed order in every row
            tests = [m["test"] if a == "1.0" else m["wise_ft"][a]["test"] for m in mine]
            gaps = [100 * (x - t["test"]) for x, t in zip(tests, theirs, strict=True)]
            text += f"; paired by seed {', '.join(f'{g:+.1f}' for g in gaps)} points"
        text += "."
    return text


def forgetting_grid_table(report: dict) -> str:
    """Each searched row's rate grid: validation (what chose), task accuracy, KL and reference
    loss change at every rate, mean ± std over the seeds each rate ran at, the chosen rate in bold."""
    import statistics

    def stat(runs: list[dict], key: str, scale: float, fmt: str) -> str:
        vals = [scale * r[key] for r in runs]
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{vals[0] if len(vals) == 1 else statistics.fmean(vals):{fmt}} ± {spread:{fmt.lstrip('+')}}"

    lines = [
        "| row | lr | seeds | validation | task accuracy | KL(base \\|\\| tuned) | reference loss change |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        grid = r.get("grid_runs") or {}
        if r.get("lr_from") or len(grid) < 2:
            continue
        for lr, runs in sorted(grid.items(), key=lambda x: float(x[0])):
            runs = runs if isinstance(runs, list) else [runs]
            mark = "**" if float(lr) == r["lr"] else ""
            lines.append(
                f"| {name} | {mark}{float(lr):g}{mark} | {len(runs)} | "
                f"{stat(runs, 'validation', 100, '.1f')} | {stat(runs, 'test', 100, '.1f')} | "
                f"{stat(runs, 'kl', 1, '.4f')} | "
                f"{stat(runs, 'loss_change', 1, '+.4f')} |"
            )
    return "\n".join(lines)


def forgetting_noise_table(report: dict) -> str:
    """The rows trained on answers with known noise, beside the clean row: task accuracy and KL,
    and for the token rows what share of each kind of target token was kept (summed over every
    step of every seed) and the noise's share of what was kept."""
    rows = {n: r for n, r in report["results"].items() if n.startswith("noisy-")}
    clean = report["results"].get("surgical-gradient-1pct")
    lines = [
        "| row | task accuracy | KL(base \\|\\| tuned) | label kept | noise kept | end-of-turn kept "
        "| noise share of kept |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    if clean is not None:
        s = clean["summary"]
        lines.append(
            f"| clean answers (surgical-gradient-1pct) | {pct(s['test'])} | {s['kl']['mean']:.4f} | "
            "100% | no noise | 100% | 0% |"
        )
    for name, r in rows.items():
        s = r["summary"]
        kept = [x["kept_tokens"] for x in r["runs"] if "kept_tokens" in x]
        kinds = ("answer", "noise", "end")
        tot = {k: sum(c.get(k, 0) for c in kept) for k in [*kinds, *(f"{k}_kept" for k in kinds)]}
        cells = " | ".join(f"{100 * tot[f'{k}_kept'] / max(1, tot[k]):.0f}%" for k in kinds)
        noise_share = 100 * tot["noise_kept"] / max(1, sum(tot[f"{k}_kept"] for k in kinds))
        lines.append(f"| {name} | {pct(s['test'])} | {s['kl']['mean']:.4f} | {cells} | {noise_share:.0f}% |")
    return "\n".join(lines)


def long_targets_table(report: dict) -> str:
    """The long-targets rows, then each token row paired by seed against every target token."""
    import statistics

    base = (report.get("base") or {}).get("test")
    lines = [
        "| row | lr | held-out review loss | sentiment accuracy | KL(base \\|\\| tuned) on RT "
        "| RT loss change | train s | peak RSS |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    if base:
        lines.append(f"| base, zero-shot | | {base['loss']:.4f} | {100 * base['accuracy']:.1f} | 0 | 0 | | |")
    rows = report["results"]
    for name, r in rows.items():
        s = r["summary"]
        grid = ", ".join(f"{x:g}" for x in r["lr_grid"])
        lr = f"{r['lr']:g} (from {r['lr_from']})" if r.get("lr_from") else f"{r['lr']:g} ({grid})"
        ref = [x["reference_seconds"] for x in r["runs"] if "reference_seconds" in x]
        secs = f"{s['train_seconds']['mean']:.0f}" + (
            f" + {statistics.fmean(ref):.0f} reference" if ref else ""
        )
        lines.append(
            f"| {name} | {lr} | {s['test_loss']['mean']:.4f} ± {s['test_loss']['std']:.4f} | "
            f"{pct(s['test_accuracy'])} | {s['kl']['mean']:.4f} ± {s['kl']['std']:.4f} | "
            f"{s['loss_change']['mean']:+.4f} ± {s['loss_change']['std']:.4f} | {secs} | "
            f"{s['peak_rss_mib']['mean']:,.0f} MiB |"
        )
    plain = rows.get("all-tokens", {}).get("runs", [])
    pairs = []
    for name, r in rows.items():
        if name == "all-tokens" or len(r["runs"]) != len(plain) or len(plain) < 2:
            continue
        d_loss = [a["test_loss"] - b["test_loss"] for a, b in zip(r["runs"], plain, strict=True)]
        d_acc = [
            100 * (a["test_accuracy"] - b["test_accuracy"]) for a, b in zip(r["runs"], plain, strict=True)
        ]
        pairs.append(
            f"{name}: loss {statistics.fmean(d_loss):+.4f} ± {statistics.stdev(d_loss):.4f}, "
            f"sentiment {statistics.fmean(d_acc):+.1f} ± {statistics.stdev(d_acc):.1f} points"
        )
    if pairs:
        lines += [
            "",
            "Paired by seed against all-tokens (mean ± std of the differences): " + "; ".join(pairs) + ".",
        ]
    return "\n".join(lines)


COLLAPSED_BELOW = 0.55  # validation accuracy of a run that stayed at one class (balanced classes)
VARIANTS = {"": "as in the table", "-clip1": "gradient norm clipped at 1", "-lower-lr": "next lower lr"}


def collapse_table(report: dict) -> str:
    """Each collapsed quality row with its variants (``-clip1``, ``-lower-lr``): validation by seed,
    ID, OOD and the runs that stayed at one class."""
    rows = report["results"]
    lines = [
        "| row | variant | lr | validation by seed | ID | OOD | one-class runs |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    total = {v: [0, 0] for v in VARIANTS}
    for name in rows:
        if any(name.endswith(v) for v in VARIANTS if v) or " + " in name:
            continue
        present = [v for v in VARIANTS if v and f"{name}{v}" in rows]
        if not present:
            continue
        for v in ["", *present]:
            r = rows[f"{name}{v}"]
            s = r["summary"]
            stuck = sum(x["validation"] < COLLAPSED_BELOW for x in r["runs"])
            total[v][0] += stuck
            total[v][1] += len(r["runs"])
            by_seed = " / ".join(f"{100 * x['validation']:.1f}" for x in r["runs"])
            lines.append(
                f"| {name if not v else ''} | {VARIANTS[v]} | {r['lr']:g} | {by_seed} | {pct(s['id'])} | "
                f"{pct(s['ood'])} | {stuck} of {len(r['runs'])} |"
            )
    counts = "; ".join(f"{VARIANTS[v]}, {n} of {m}" for v, (n, m) in total.items() if m)
    verdict = f"Runs that stayed at one class (validation below {100 * COLLAPSED_BELOW:.0f}%): {counts}"
    return "\n".join(lines) + "\n\n" + verdict + "."


def kernel_speed_table(report: dict) -> str:
    """The CPU kernel on one layer block: ms per method, by threads and tokens."""
    lines = [
        "| threads, tokens | kernel (fp32) | sampled_addmm | kernel / sampled_addmm | kernel on bf16 "
        "| bf16 cast to fp32, then kernel | bf16 / cast first | same bits |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in report["results"].items():
        ms = r["ms"]
        lines.append(
            f"| {key} | {ms['kernel']:.2f} ms | {ms['sampled_addmm']:.2f} ms | "
            f"{r['kernel_vs_sampled_addmm']:.2f}x | {ms['kernel_bf16']:.2f} ms | "
            f"{ms['upcast_kernel']:.2f} ms | {r['bf16_vs_upcast']:.2f}x | "
            f"{'yes' if r['bf16_bits_equal_upcast'] else 'NO'} |"
        )
    return "\n".join(lines)


def demo_table(record: dict) -> str:
    """The demo's own run beside the recorded baselines (the quality benchmark's seed-0 runs)."""
    r = record["result"]
    ref = json.loads(demo_reference() or "null")
    cols = {"surgical demo (this recipe)": r}
    if ref is not None:
        cols.update(ref["baselines"])
    lines = [
        "| | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for label, key in (
        ("validation accuracy (500 RT, for choices)", "validation_accuracy"),
        ("ID accuracy (1,000 held-out RT)", "id_accuracy"),
        ("OOD accuracy (500 IMDB reviews)", "ood_accuracy"),
    ):
        lines.append(
            f"| {label} | "
            + " | ".join(f"{100 * c[key]:.1f}%" if c.get(key) is not None else "" for c in cols.values())
            + " |"
        )
    lines.append("| trainable values | " + " | ".join(count(c["trainable"]) for c in cols.values()) + " |")
    lines.append(
        "| learning rate | "
        + " | ".join(f"{c['lr']:g}" for c in [{"lr": r["config"]["lr"]}, *list(cols.values())[1:]])
        + " |"
    )
    text = "\n".join(lines)
    text += (
        f"\n\nsurgical demo: `{record['command']}` ({record['date'][:10]}, seed {r['config']['seed']}): "
        f"{r['entries']:,} entries + {r['dense']:,} values trained densely, a "
        f"{r['delta_bytes'] / 1024:,.0f} KiB delta, {r['steps']} steps at "
        f"{r['seconds_per_step']:.2f} s/step, peak RSS "
        f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB, {r['total_seconds']:.0f} s in all"
        + (", reloaded bit for bit." if r["reloaded_identical"] else ", RELOAD MISMATCH.")
    )
    if ref is not None:
        means = "; ".join(f"{n} {100 * m['id']:.1f} / {100 * m['ood']:.1f}" for n, m in ref["means"].items())
        text += (
            f" Baselines: the seed-{ref['seeds'][0]} runs of `{ref['command']}` ({ref['date'][:10]}), same "
            f"split and loop. ID / OOD means over seeds {', '.join(map(str, ref['seeds']))}: {means}."
        )
    return text


def trajectory_clusters_table(report: dict) -> str:
    """What ``trajectory`` kept, per point that recorded its clusters: the share of the data and of
    the kept set in clusters the proxy training ends up getting wrong (mean loss at the last
    checkpoint above ln 2, worse than a coin; after ``dropped`` of them were dropped, where a
    point did), the resulting accuracy, and the training loss over the last ten steps (ln 2 =
    0.693: the model still at chance)."""
    import math

    lines = [
        "| point | clusters | proxy ends wrong: share of the data | share of the kept set | ID / OOD "
        "| training loss, last 10 steps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in report["points"]:
        info = p.get("info") or {}
        if "cluster_sizes" not in info:
            continue
        wrong = [row[-1] > math.log(2) for row in info["cluster_mean_losses"]]
        data = sum(n for n, w in zip(info["cluster_sizes"], wrong, strict=True) if w) / sum(
            info["cluster_sizes"]
        )
        # a point that dropped those clusters' examples (``dropped``) trained on what was left
        dropped = info.get("dropped", 0)
        kept = (sum(k for k, w in zip(info["kept_by_cluster"], wrong, strict=True) if w) - dropped) / (
            sum(info["kept_by_cluster"]) - dropped
        )
        tail = p.get("losses", [])[-10:]
        loss = f"{sum(tail) / len(tail):.3f}" if tail else ""
        lines.append(
            f"| {p['criterion']} {100 * p['fraction']:.0f}% seed {p['seed']} | {info['clusters']} | "
            f"{100 * data:.0f}% | {100 * kept:.0f}% | {100 * p['id']:.1f} / {100 * p['ood']:.1f} | {loss} |"
        )
    return "\n".join(lines)


def data_fraction_table(report: dict) -> str:
    """ID / OOD accuracy per criterion and data fraction (mean ± std over the seeds that finished),
    the 100% row first, then the issue's goal checked: full-data ID and OOD at <= 30% of the data."""
    summary = report["summary"]
    full = summary.get("all", {}).get("1.0")
    fractions = sorted({f for c, by in summary.items() if c != "all" for f in by}, key=float)

    seeds = len(report["setup"]["seeds"])

    def cell(st: dict) -> str:
        n = st["id"]["n"]
        one = lambda k: f"{100 * st[k]['mean']:.1f}" if n == 1 else pct(st[k])  # noqa: E731
        return f"{one('id')} / {one('ood')}" + (f" (n={n})" if n != seeds else "")

    lines = [
        "| criterion | "
        + " | ".join(f"{100 * float(f):.0f}%: ID / OOD" for f in fractions)
        + " | selection s |",
        "|---|" + "---:|" * (len(fractions) + 1),
    ]
    if full is not None:
        lines.append("| all data (100%) | " + cell(full) + " |" * len(fractions) + " |")
    for name, by in summary.items():
        if name == "all":
            continue
        secs = [by[f]["selection_seconds"]["mean"] for f in by]
        lines.append(
            f"| {name} | "
            + " | ".join(cell(by[f]) if f in by else "" for f in fractions)
            + f" | {sum(secs) / len(secs):.0f} |"
        )
    text = "\n".join(lines)
    if full is None:
        return text + "\n\nThe goal cannot be checked yet: the 100% points are missing."
    fid, food = full["id"]["mean"], full["ood"]["mean"]
    hits = [
        f"{name} at {100 * float(f):.0f}%"
        for name, by in summary.items()
        if name != "all"
        for f in by
        if float(f) <= 0.3 and by[f]["id"]["mean"] >= fid and by[f]["ood"]["mean"] >= food
    ]
    text += (
        f"\n\nGoal (means over seeds): full-data ID {100 * fid:.1f} and OOD {100 * food:.1f} with at most "
        "30% of the data. "
    )
    nmin = min(st["id"]["n"] for by in summary.values() for st in by.values())
    if nmin < 3:
        text += f"Some points have {nmin} of the 3 seeds, so this is not a result yet. "
    if hits:
        return text + f"Reached by: {', '.join(hits)}."
    at30 = {n: by["0.3"] for n, by in summary.items() if n != "all" and "0.3" in by}
    if not at30:
        return text + "Not reached; no 30% point has finished."
    best = max(at30, key=lambda n: at30[n]["id"]["mean"] + at30[n]["ood"]["mean"])
    b_id, b_ood = at30[best]["id"]["mean"], at30[best]["ood"]["mean"]
    return text + (
        f"Not reached. Best at 30% (ID + OOD): {best}, {100 * b_id:.1f} / {100 * b_ood:.1f} "
        f"({100 * (b_id - fid):+.1f} / {100 * (b_ood - food):+.1f})."
    )


def quality_choice_table(report: dict) -> str:
    """The quality benchmark with every rate chosen on the mean validation over the seeds, beside
    the committed choice on seed 0's validation alone (``quality.json``): per row, each rule's
    rate and the ID / OOD it gives; then the goal's verdict under the mean rule."""
    first = json.loads((RESULTS / "quality.json").read_text())["results"]
    lines = [
        "| row | validation by lr (seed mean) | lr, mean rule | ID | OOD | lr, seed-0 rule | ID | OOD |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    changed = []
    for name, r in report["results"].items():
        if "lr_grid" not in r or name not in first:
            continue  # WiSE-FT rows follow their row
        by = ", ".join(f"{float(k):g}: {100 * v:.1f}" for k, v in r["validation_by_lr"].items())
        f = first[name]
        lines.append(
            f"| {name} | {by} | {r['lr']:g} | {pct(r['summary']['id'])} | {pct(r['summary']['ood'])} | "
            f"{f['lr']:g} | {pct(f['summary']['id'])} | {pct(f['summary']['ood'])} |"
        )
        if r["lr"] != f["lr"]:
            changed.append(name)
    tail = (
        f"The mean rule chooses another rate for {len(changed)} row(s): {', '.join(changed)}."
        if changed
        else "The mean rule chooses the same rate for every row."
    )
    missing = report["setup"].get("missing_rows") or []
    if missing:
        tail += f" Not in this run (a grid run missing): {', '.join(missing)}."
    return "\n".join(lines) + "\n\n" + tail + " " + quality_verdict(report)


def merge_quality_table(report: dict) -> str:
    """Per model (the two experts, multi-task, every merge): RT and IMDB test accuracy, their mean
    and the normalized accuracy (each divided by its expert's), mean ± std over the seeds; then
    the experts' overlap (sparse and dense tensors apart) and task arithmetic's chosen scales."""
    lines = [
        "| model | RT test | IMDB test | mean | normalized |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, st in report["summary"].items():
        lines.append(
            f"| {name} | {pct(st['rt'])} | {pct(st['imdb'])} | {pct(st['mean'])} | {pct(st['normalized'])} |"
        )
    points = report["points"]
    inter = [p["interference"] for p in points]

    def mean(kind: str, key: str) -> float:
        return sum(i[kind][key] for i in inter) / len(inter)

    scales = ", ".join(f"{p['scale_chosen']:g}" for p in points)
    sparse, dense = inter[0]["sparse"], inter[0].get("dense")
    text = (
        f"\n\nThe experts' sparse changes ({sparse['tensors']} weight tensors) share "
        f"{100 * mean('sparse', 'overlap'):.1f}% of the entries either changes (per-tensor mean "
        f"{100 * mean('sparse', 'mean_overlap'):.1f}%); signs disagree on "
        f"{100 * mean('sparse', 'mean_sign_conflict'):.1f}% of the shared entries, "
        f"and the mean cosine per tensor is {mean('sparse', 'mean_cosine'):+.3f}."
    )
    if dense:
        text += (
            f" The {dense['tensors']} tensors both train densely (biases, LayerNorms, the head) share every "
            f"value by construction (signs disagree on {100 * mean('dense', 'mean_sign_conflict'):.1f}%, "
            f"cosine {mean('dense', 'mean_cosine'):+.3f})."
        )
    text += f" Task arithmetic's scale chosen on validation: {scales} (seeds in order)."
    return "\n".join(lines) + text


def domain_select_table(report: dict) -> str:
    """Per row: the RT share of what it kept, the n-gram KL of the kept set to the target, ID / OOD /
    validation accuracy (mean ± std over seeds), selection seconds; then each importance row
    against random and against the pool's RT half, paired by seed."""
    summary, points = report["summary"], report["points"]
    lines = [
        "| row | RT share of kept | n-gram KL to target (kept; pool) | RT test (ID) | IMDB test "
        "| validation (RT) | selection s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row, st in summary.items():
        kls = [
            p["info"]["kl_to_target"]
            for p in points
            if p["row"] == row and "kl_to_target" in p.get("info", {})
        ]
        kl = f"{sum(k['kept'] for k in kls) / len(kls):.3f}; {kls[0]['pool']:.3f}" if kls else ""
        lines.append(
            f"| {row} | {100 * st['rt_share']['mean']:.0f}% | {kl} | {pct(st['id'])} | {pct(st['ood'])} | "
            f"{pct(st['validation'])} | {st['selection_seconds']['mean']:.2f} |"
        )
    by = {(p["row"], p["seed"]): p for p in points}
    notes = []
    for row in (r for r in summary if r.startswith("importance")):
        for other in ("random", "rt-only"):
            seeds = sorted(s for r, s in by if r == row and (other, s) in by)
            if len(seeds) < 2:
                continue
            gaps = {k: [100 * (by[(row, s)][k] - by[(other, s)][k]) for s in seeds] for k in ("id", "ood")}
            mean = {k: sum(v) / len(v) for k, v in gaps.items()}
            sd = {k: (sum((x - mean[k]) ** 2 for x in v) / (len(v) - 1)) ** 0.5 for k, v in gaps.items()}
            id_, ood = f"{mean['id']:+.1f} ± {sd['id']:.1f}", f"{mean['ood']:+.1f} ± {sd['ood']:.1f}"
            notes.append(f"{row} - {other}: RT {id_}, IMDB {ood}")
    tail = (
        f"\n\nPaired by seed ({len(report['setup']['seeds'])} seeds), points: " + "; ".join(notes) + "."
        if notes
        else ""
    )
    return "\n".join(lines) + tail


SECTIONS = {
    "merge_quality": ("merge_quality.json", merge_quality_table),
    "quality_choice": ("quality_mean_choice.json", quality_choice_table),
    "domain_select": ("domain_select.json", domain_select_table),
    "quality": ("quality.json", quality_table),
    "data_fraction": ("data_fraction.json", data_fraction_table),
    "data_fraction_equal_steps": ("data_fraction_equal_steps.json", data_fraction_table),
    "trajectory_clusters": ("data_fraction_equal_steps.json", trajectory_clusters_table),
    "forgetting": ("forgetting.json", forgetting_table),
    "forgetting_wise": ("forgetting.json", forgetting_wise_table),
    "forgetting_grid": ("forgetting.json", forgetting_grid_table),
    "forgetting_noise": ("forgetting.json", forgetting_noise_table),
    "quality_collapse": ("quality_collapse.json", collapse_table),
    "kernel_speed": ("kernel_speed.json", kernel_speed_table),
    "long_targets": ("long_targets.json", long_targets_table),
    "demo": ("demo.json", demo_table),
}
DOCS = (DOC, REPO / "docs" / "data.md", REPO / "README.md")


def header(report: dict) -> str:
    seeds = report["setup"].get("seeds")  # a timing benchmark has none
    state = "" if report["setup"].get("complete", True) else ", cut short: the rows that finished"
    seeds_part = f"seeds {', '.join(map(str, seeds))}, " if seeds else ""
    return (
        f"`{report['command']}` ({report['date'][:10]}, {seeds_part}"
        f"torch {report['machine']['torch']}{state}):\n\n"
    )


def render_doc(text: str) -> str:
    for name, (file, table) in SECTIONS.items():
        path = RESULTS / file
        begin, end = f"<!-- render:{name} -->", f"<!-- /render:{name} -->"
        if not path.is_file() or begin not in text:
            continue
        report = json.loads(path.read_text())
        head = "" if name == "demo" else header(report)
        body = f"{begin}\n{head}{table(report)}\n{end}"
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _m, b=body: b, text, flags=re.S)
    return text


def demo_reference() -> str | None:
    """The demo's recorded baselines: the quality benchmark's seed-0 runs of full fine-tuning and
    LoRA (the demo's split and loop at seed 0), with the means over seeds beside them."""
    from surgical.recipes.demo import BASELINES, RECIPE_ROW, SPLIT_KEYS, DemoConfig

    path = RESULTS / "quality.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    rows = report["results"]
    if report["setup"]["quick"] or any(spec["row"] not in rows for spec in BASELINES.values()):
        return None
    baselines, means = {}, {}
    for name, spec in BASELINES.items():
        row = rows[spec["row"]]
        run = row["runs"][0]  # seeds[0]
        baselines[name] = {
            "validation_accuracy": run["validation"],
            "id_accuracy": run["id"],
            "ood_accuracy": run["ood"],
            "trainable": run["trainable"],
            "lr": row["lr"],
        }
        means[name] = {"id": row["summary"]["id"]["mean"], "ood": row["summary"]["ood"]["mean"]}
    if RECIPE_ROW in rows:
        s = rows[RECIPE_ROW]["summary"]
        means[f"surgical ({RECIPE_ROW})"] = {"id": s["id"]["mean"], "ood": s["ood"]["mean"]}
    defaults = DemoConfig()
    ref = {
        "date": report["date"],
        "command": report["command"],
        "source": "benchmarks/results/quality.json",
        "config": {k: getattr(defaults, k) for k in SPLIT_KEYS},
        "seeds": report["setup"]["seeds"],
        "baselines": baselines,
        "means": means,
    }
    return json.dumps(ref, indent=2) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if a rendered file is out of date")
    args = p.parse_args()
    outputs = {doc: render_doc(doc.read_text()) for doc in DOCS}
    ref = demo_reference()
    if ref is not None:
        outputs[DEMO_REFERENCE] = ref
    stale = [path for path, text in outputs.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"out of date: {path.relative_to(REPO)} (run python benchmarks/render.py)")
        sys.exit(1 if stale else 0)
    for path in stale:
        atomic_write_text(path, outputs[path])
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
