"""Shared by the data-selection benchmarks (data_fraction.py, data_select_cost.py).

MiniLM on Rotten Tomatoes exactly as benchmarks/quality.py splits it (its ``split``), the plan of
its ``surgical-gradient-1pct`` row (its ``_plan``: 1% of the six layers' Linear weights by
gradient, always the classifier, biases and LayerNorms), and every data criterion as these
benchmarks run it. quality.py is imported, not copied.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import quality  # noqa: E402  (benchmarks/ is a directory of scripts)

RECIPE = "surgical-gradient-1pct"
LR = 3e-3  # that row's reference learning rate
BATCH, MAX_LENGTH = 32, 64

# name -> (method, options); gradient+adam warms up at the training's own learning rate
CRITERIA: dict[str, tuple[str, dict]] = {
    "random": ("random", {}),
    "loss": ("loss", {}),
    "learnability": ("learnability", {}),
    "trajectory": ("trajectory", {}),
    "diversity": ("diversity", {}),
    "dedup": ("dedup", {}),
    "gradient": ("gradient", {}),
    "gradient+adam": ("gradient", {"precondition": "adam", "warmup_lr": LR}),
    "trajectory+classes": ("trajectory", {}),
    "trajectory+classes-agreeing": ("trajectory", {}),
    "trajectory+classes-subset": ("trajectory", {}),
    "trajectory+classes-agreeing-balanced": ("trajectory", {}),
}
# criteria that always keep the class shares (select_data(stratify=True)), with or without
# --stratify: trajectory chooses a set, so --stratify leaves the plain ``trajectory`` as it is
CLASS_SHARES = {
    "trajectory+classes",
    "trajectory+classes-agreeing",
    "trajectory+classes-subset",
    "trajectory+classes-agreeing-balanced",
}
# trajectory+classes's kept set without the clusters whose loss rose during its proxy training
# (the library's ``rising_clusters``, which the select-data note reports; on every point run here
# the same clusters as those ending above ln 2): the direct test of why trajectory+classes trains
# to chance (docs/data.md)
AGREEING = {"trajectory+classes-agreeing", "trajectory+classes-agreeing-balanced"}
# -agreeing with the class shares of the whole training set restored (the drop can leave one
# class short): the larger class cut down at random to match
BALANCED = {"trajectory+classes-agreeing-balanced"}
# its control for the size: a random subset of trajectory+classes's kept set as large as what
# -agreeing keeps (the same share of those clusters as before, fewer examples)
SUBSET = {"trajectory+classes-subset"}
QUICK_OPTIONS = {  # tiny data: fewer proxy-training steps
    "learnability": {"steps": 2},
    "trajectory": {"steps": 4, "clusters": 3},
    "trajectory+classes": {"steps": 4, "clusters": 3},
    "trajectory+classes-agreeing": {"steps": 4, "clusters": 3},
    "trajectory+classes-subset": {"steps": 4, "clusters": 3},
    "trajectory+classes-agreeing-balanced": {"steps": 4, "clusters": 3},
    "gradient+adam": {"warmup_steps": 2},
}


def criterion(name: str, quick: bool) -> tuple[str, dict]:
    """The data method and its options for a benchmark criterion name."""
    method, options = CRITERIA[name]
    return method, {**options, **(QUICK_OPTIONS.get(name, {}) if quick else {})}


def split(quick: bool):
    """quality.py's split: (train, validation, id, ood) TextExamples."""
    return quality.split(quick)


def examples(tok, texts) -> list:
    """Per-example dicts (input_ids, attention_mask, labels) at the training's max_length, in order."""
    from surgical.data import split_batches, text_batches

    return split_batches(text_batches(tok, texts, BATCH, MAX_LENGTH))


def train_batches(tok, texts, seed: int) -> list:
    """The training batches as quality.py builds them (batch 32, 64 tokens, shuffled by seed)."""
    from surgical.data import text_batches

    return text_batches(tok, texts, BATCH, MAX_LENGTH, shuffle=True, seed=seed)


def plan(model, batches, seed: int):
    """The recipe's plan, scored as quality.py scores it (its first 16 batches)."""
    return quality._plan(quality.row_specs()[RECIPE], model, batches, seed)


def select(
    name: str,
    model,
    tok,
    train,
    val,
    plan_,
    *,
    fraction: float,
    seed: int,
    quick: bool,
    stratify: bool = False,
):
    """Runs one data criterion on the base model and the training set (the validation split is the
    gradient criteria's target); returns the DataSelection. ``stratify``: the library's per-class
    selection, for the criteria that score examples (the others choose a set and ignore it); the
    criteria in ``CLASS_SHARES`` use it always, those in ``AGREEING`` drop what :func:`agreeing`
    drops."""
    import surgical as sg
    from surgical.data.criteria import picks

    method, options = criterion(name, quick)
    extra = {"stratify": True} if (stratify and not picks(method)) or name in CLASS_SHARES else {}
    if method == "gradient":
        extra.update(validation=examples(tok, val), params=plan_)
    sel = sg.select_data(
        model,
        examples(tok, train),
        method=method,
        fraction=fraction,
        seed=seed,
        batch_size=BATCH,
        pad_id=tok.pad_token_id or 0,
        progress=False,
        **extra,
        **options,
    )
    if name in SUBSET:
        return same_size_subset(sel, seed)
    if name in BALANCED:
        return balanced(agreeing(sel), list(train.labels), seed)
    return agreeing(sel) if name in AGREEING else sel


def agreeing(sel):
    """``sel`` (a ``trajectory`` selection) without its examples in ``rising_clusters`` (whose
    mean loss ends above where it started); the meta records how many were dropped (``dropped``)
    and from which clusters (``dropped_clusters``). ``kept_by_cluster`` stays as selected (the
    renderer subtracts ``dropped``)."""
    import dataclasses

    import torch

    wrong = set(sel.meta["rising_clusters"])
    keep = torch.tensor([c not in wrong for c in sel.meta["kept_clusters"]], dtype=torch.bool)
    meta = {**sel.meta, "dropped": int((~keep).sum()), "dropped_clusters": sorted(wrong)}
    meta["kept_clusters"] = [c for c in sel.meta["kept_clusters"] if c not in wrong]
    return dataclasses.replace(sel, indices=sel.indices[keep], meta=meta)


def balanced(sel, labels: list[int], seed: int):
    """``sel`` cut to the class shares of ``labels`` (the whole training set): the largest set that
    keeps every class at its share, each class's examples drawn at random (seeded) from those
    selected. ``kept_by_cluster`` and ``kept_clusters`` count what is left; the meta records how
    many were cut (``balance_cut``) and the sizes per class before (``by_class_before``)."""
    import dataclasses

    import torch

    classes = sorted(set(labels))
    share = {c: labels.count(c) / len(labels) for c in classes}
    mine = [labels[i] for i in sel.indices.tolist()]
    have = {c: mine.count(c) for c in classes}
    n = min(int(have[c] / share[c]) for c in classes)  # the most every class can fill
    want = {c: min(have[c], round(n * share[c])) for c in classes}
    gen = torch.Generator().manual_seed(seed)
    pick = []
    for c in classes:
        where = torch.tensor([i for i, y in enumerate(mine) if y == c], dtype=torch.long)
        pick.append(where[torch.randperm(len(where), generator=gen)[: want[c]]])
    pick = torch.cat(pick).sort().values
    clusters = [sel.meta["kept_clusters"][i] for i in pick.tolist()]
    cut = {j: sel.meta["kept_clusters"].count(j) - clusters.count(j) for j in set(sel.meta["kept_clusters"])}
    kept = [k - cut.get(j, 0) for j, k in enumerate(sel.meta["kept_by_cluster"])]
    meta = {**sel.meta, "kept_clusters": clusters, "kept_by_cluster": kept,
            "balance_cut": len(mine) - len(pick), "by_class_before": [have[c] for c in classes]}  # fmt: skip
    return dataclasses.replace(sel, indices=sel.indices[pick], meta=meta)


def same_size_subset(sel, seed: int):
    """A seeded random subset of ``sel`` (a ``trajectory`` selection) as large as what
    :func:`agreeing` keeps of it; ``kept_by_cluster`` and ``kept_clusters`` count what is left, and
    the meta records the size it was drawn from (``subset_of``)."""
    import dataclasses

    import torch

    n = len(agreeing(sel).indices)
    pick = torch.randperm(len(sel.indices), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    clusters = [sel.meta["kept_clusters"][i] for i in pick.tolist()]
    kept = [clusters.count(j) for j in range(len(sel.meta["kept_by_cluster"]))]
    meta = {**sel.meta, "kept_clusters": clusters, "kept_by_cluster": kept, "subset_of": len(sel.indices)}
    return dataclasses.replace(sel, indices=sel.indices[pick], meta=meta)


def parse_criteria(text: str | None, default: list[str]) -> list[str]:
    """The criteria named by a ``--criteria`` value (comma-separated), or ``default``; exits on
    an unknown name."""
    names = text.split(",") if text else list(default)
    unknown = [c for c in names if c not in CRITERIA]
    if unknown:
        raise SystemExit(f"unknown criteria {unknown}; known: {', '.join(CRITERIA)}")
    return names


def stat(values: list[float]) -> dict:
    """Mean, standard deviation (0 for one value) and count."""
    import statistics

    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def evaluate(base, delta, tok, val, test, ood, quick: bool) -> dict:
    """``delta`` applied to ``base``: accuracy on the validation split, the ID test (64 tokens) and
    the OOD reviews (256 tokens; quick: 128), as quality.py measures them."""
    import surgical as sg
    from surgical.data import text_batches

    sets = {
        "validation": text_batches(tok, val, 64, 64),
        "id": text_batches(tok, test, 64, 64),
        "ood": text_batches(tok, ood, 32, 128 if quick else 256),
    }
    with sg.applied(base, delta):
        res = sg.evaluate(base, sets, task="classification", show=False)
    return {k: res[k]["accuracy"] for k in sets}


def cached_worker(cmd: list[str], cached: Path | None, tmp: Path) -> dict:
    """Runs a worker command (``--result PATH`` appended) in a fresh process and returns its JSON
    result; with ``cached``, the result is also written there (atomically) for later runs."""
    import json
    import subprocess
    import time

    out = tmp / f"r{time.perf_counter_ns()}.json"
    subprocess.run([*cmd, "--result", str(out)], check=True)
    result = json.loads(out.read_text())
    if cached is not None:
        from surgical.core.io import atomic_write_text

        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cached, json.dumps(result))
    return result


def header(benchmark: str, **machine) -> dict:
    """The report's head: name, exact command, date, machine and versions (plus ``machine``)."""
    import torch
    import transformers

    import surgical as sg

    return {
        "benchmark": benchmark,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "surgical": sg.__version__,
            **machine,
        },
    }
