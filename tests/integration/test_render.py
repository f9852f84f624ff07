"""benchmarks/render.py: the docs' tables and the demo's recorded baselines match the committed
JSON, and the default-recipe goal is checked the way the quality issue states it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import render  # noqa: E402


def test_rendered_files_are_up_to_date():
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "render.py"), "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def _row(id_, ood, trainable):
    s = lambda m: {"mean": m, "std": 0.01}  # noqa: E731
    return {"summary": {"id": s(id_), "ood": s(ood), "trainable": s(trainable)}}


def test_goal_check():
    rows = {"full": _row(0.80, 0.78, 22.7e6), "lora": _row(0.75, 0.79, 339e3)}
    report = {"results": {**rows, "surgical-a-1pct": _row(0.81, 0.80, 200e3)}}
    assert "Reached by: surgical-a-1pct." in render.quality_verdict(report)
    report = {
        "results": {**rows, "surgical-a-1pct": _row(0.78, 0.80, 200e3), "surgical-b": _row(0.9, 0.9, 1e6)}
    }
    text = render.quality_verdict(report)  # surgical-b is above 1% of the encoder: not counted
    assert "Not reached" in text and "-2.0 against full" in text and "+1.0 against LoRA" in text
    assert "cannot be checked" in render.quality_verdict({"results": {"lora": rows["lora"]}})


def test_goal_check_pairs_runs_by_seed():
    runs = lambda *pairs: [{"id": i, "ood": o} for i, o in pairs]  # noqa: E731
    rows = {
        "full": {**_row(0.80, 0.78, 22.7e6), "runs": runs((0.80, 0.70), (0.80, 0.86))},
        "lora": {**_row(0.75, 0.79, 339e3), "runs": runs((0.75, 0.72), (0.75, 0.86))},
        "surgical-a-1pct": {**_row(0.81, 0.78, 2e5), "runs": runs((0.82, 0.71), (0.80, 0.85))},
    }
    text = render.quality_verdict({"results": rows})
    # ID: +2, 0 -> +1.0 ± 1.4; OOD: -1, -1 -> -1.0 ± 0.0 (the means alone say -1.0 as well)
    assert "surgical-a-1pct: ID +1.0 ± 1.4, OOD -1.0 ± 0.0." in text
    del rows["surgical-a-1pct"]["runs"][1]  # unpaired: no paired line
    assert "Paired" not in render.quality_verdict({"results": rows})


def test_sections_replace_only_their_markers(tmp_path, monkeypatch):
    import json

    report = {
        "command": "python forgetting.py",
        "date": "2026-11-30T00:00:00",
        "machine": {"torch": "2.13.0"},
        "setup": {"seeds": [0], "complete": True},
        "base": {"test": 0.5},
        "results": {},
    }
    (tmp_path / "forgetting.json").write_text(json.dumps(report))
    monkeypatch.setattr(render, "RESULTS", tmp_path)
    text = "before\n<!-- render:forgetting -->\nold\n<!-- /render:forgetting -->\nafter\n"
    out = render.render_doc(text)
    assert out.startswith("before\n<!-- render:forgetting -->\n`python forgetting.py` (2026-11-30")
    assert "old" not in out and out.endswith("<!-- /render:forgetting -->\nafter\n")
    assert "| base, zero-shot | | 0 | 50.0 |" in out
    assert render.render_doc(out) == out  # idempotent


def _point(id_, ood, n=3):
    s = lambda m: {"mean": m, "std": 0.01, "n": n}  # noqa: E731
    return {"id": s(id_), "ood": s(ood), "selection_seconds": s(10.0)}


def test_data_fraction_goal():
    summary = {
        "all": {"1.0": _point(0.80, 0.78)},
        "random": {"0.1": _point(0.60, 0.60), "0.3": _point(0.79, 0.80), "0.5": _point(0.81, 0.80)},
        "gradient": {"0.1": _point(0.70, 0.70), "0.3": _point(0.78, 0.77), "0.5": _point(0.80, 0.79)},
    }
    report = {"setup": {"seeds": [0, 1, 2]}, "summary": summary}
    text = render.data_fraction_table(report)
    assert "| all data (100%) | 80.0 ± 1.0 / 78.0 ± 1.0 |" in text
    assert (
        "| gradient | 70.0 ± 1.0 / 70.0 ± 1.0 | 78.0 ± 1.0 / 77.0 ± 1.0 | 80.0 ± 1.0 / 79.0 ± 1.0 | 10 |"
        in text
    )
    # random at 30% misses ID by a point: not reached (50% is above the goal's 30%)
    assert "Not reached. Best at 30% (ID + OOD): random, 79.0 / 80.0 (-1.0 / +2.0)." in text
    summary["gradient"]["0.1"] = _point(0.80, 0.78, n=1)  # equal counts as matching; one seed only
    text = render.data_fraction_table(report)
    assert "| 80.0 / 78.0 (n=1) |" in text
    assert (
        "Some points have 1 of the 3 seeds, so this is not a result yet. Reached by: gradient at 10%." in text
    )


def test_collapse_table_lists_each_row_with_its_variants():
    def row(vals, lr=5e-3):
        runs = [{"validation": v, "id": v, "ood": v} for v in vals]
        mean = sum(vals) / len(vals)
        stat = {"mean": mean, "std": 0.0}
        return {"lr": lr, "runs": runs, "summary": {"validation": stat, "id": stat, "ood": stat}}

    report = {
        "results": {
            "surgical-random-1pct": row([0.80, 0.50, 0.78]),
            "surgical-random-1pct-clip1": row([0.81, 0.50, 0.78]),
            "surgical-random-1pct-lower-lr": row([0.80, 0.79, 0.78], lr=3e-3),
            "surgical-lonely-1pct": row([0.5, 0.5, 0.5]),  # no variant: not in the table
        }
    }
    text = render.collapse_table(report)
    assert "| surgical-random-1pct | as in the table | 0.005 | 80.0 / 50.0 / 78.0 |" in text
    assert "|  | gradient norm clipped at 1 | 0.005 | 81.0 / 50.0 / 78.0 |" in text
    assert "|  | next lower lr | 0.003 | 80.0 / 79.0 / 78.0 | 79.0 ± 0.0 | 79.0 ± 0.0 | 0 of 3 |" in text
    assert "lonely" not in text
    assert text.endswith(
        "as in the table, 1 of 3; gradient norm clipped at 1, 1 of 3; next lower lr, 0 of 3."
    )


def test_forgetting_grid_lists_every_searched_rate_and_marks_the_choice():
    def run(val, test, kl):
        return {"validation": val, "test": test, "kl": kl, "loss_change": -0.001}

    report = {
        "results": {
            "lora": {
                "lr": 5e-4,
                "grid_runs": {
                    "0.0005": [run(0.8, 0.81, 0.004), run(0.7, 0.71, 0.006)],
                    "0.001": [run(0.83, 0.75, 0.014), run(0.6, 0.6, 0.016)],
                },
            },
            "lora-wise": {"lr": 5e-4, "lr_from": "lora", "grid_runs": {"0.0005": [run(0.8, 0.81, 0.004)]}},
            "fixed": {"lr": 1e-4, "grid_runs": {"0.0001": [run(0.7, 0.7, 0.001)]}},  # one rate: no search
            "old": {"lr": 1e-4, "grid_runs": {"0.0001": run(0.7, 0.7, 0.001), "0.001": run(0.6, 0.6, 0.1)}},
        }
    }
    text = render.forgetting_grid_table(report)
    assert "| lora | **0.0005** | 2 | 75.0 ± 7.1 | 76.0 ± 7.1 | 0.0050 ± 0.0014 | -0.0010 ± 0.0000 |" in text
    assert "| lora | 0.001 | 2 | 71.5 ± 16.3 | 67.5 ± 10.6 | 0.0150 ± 0.0014 | -0.0010 ± 0.0000 |" in text
    assert "lora-wise" not in text and "fixed" not in text
    assert "| old | **0.0001** | 1 | 70.0 ± 0.0 |" in text  # a report from before: one run per rate


def test_forgetting_noise_sums_kept_tokens_over_seeds():
    def row(tests, kept):
        runs = [{"test": t, "kl": 0.01, "kept_tokens": k} for t, k in zip(tests, kept, strict=True)]
        return {
            "runs": runs,
            "summary": {"test": {"mean": sum(tests) / len(tests), "std": 0.0}, "kl": {"mean": 0.01}},
        }

    every = {"answer": 10, "noise": 60, "end": 20, "answer_kept": 10, "noise_kept": 60, "end_kept": 20}
    half = {"answer": 10, "noise": 60, "end": 20, "answer_kept": 10, "noise_kept": 6, "end_kept": 2}
    report = {
        "results": {
            "surgical-gradient-1pct": row([0.8], [{}]),
            "noisy-all-tokens": row([0.7, 0.6], [every, every]),
            "noisy-excess": row([0.75, 0.75], [half, every]),
        }
    }
    text = render.forgetting_noise_table(report)
    assert (
        "| clean answers (surgical-gradient-1pct) | 80.0 ± 0.0 | 0.0100 | 100% | no noise | 100% | 0% |"
        in text
    )
    assert "| noisy-all-tokens | 65.0 ± 0.0 | 0.0100 | 100% | 100% | 100% | 67% |" in text
    # (10 + 10) of 20 labels, (6 + 60) of 120 noise, (2 + 20) of 40 ends; noise 66 of 108 kept
    assert "| noisy-excess | 75.0 ± 0.0 | 0.0100 | 100% | 55% | 55% | 61% |" in text


def test_trajectory_clusters_counts_the_share_kept_from_clusters_the_proxy_gets_wrong():
    info = {
        "clusters": 3,
        "cluster_sizes": [70, 20, 10],
        "kept_by_cluster": [10, 10, 10],
        "cluster_mean_losses": [[0.69, 0.1], [0.69, 1.5], [0.69, 0.7]],  # ln 2 = 0.6931...
    }
    point = {"criterion": "trajectory+classes", "fraction": 0.3, "seed": 1, "id": 0.489, "ood": 0.526}
    report = {"points": [{**point, "info": info, "losses": [0.7] * 5 + [0.69] * 10}, {**point, "info": {}}]}
    text = render.trajectory_clusters_table(report)
    assert text.splitlines()[2] == "| trajectory+classes 30% seed 1 | 3 | 30% | 67% | 48.9 / 52.6 | 0.690 |"
    assert len(text.splitlines()) == 3  # a point without clusters recorded is left out
    # the -agreeing criterion dropped the 20 kept from the wrong clusters: none left in what it trained
    info = {**info, "dropped": 20, "dropped_clusters": [1, 2]}
    agreeing = {**point, "criterion": "trajectory+classes-agreeing", "info": info, "losses": [0.4] * 10}
    text = render.trajectory_clusters_table({"points": [agreeing]})
    row = "| trajectory+classes-agreeing 30% seed 1 | 3 | 30% | 0% | 48.9 / 52.6 | 0.400 |"
    assert text.splitlines()[2] == row


def test_long_targets_pairs_token_rows_by_seed():
    def row(losses, accs, **extra):
        runs = [
            {"test_loss": x, "test_accuracy": a, "kl": 0.01, "loss_change": 0.0, "train_seconds": 60.0,
             "peak_rss_mib": 2000.0, **extra}
            for x, a in zip(losses, accs, strict=True)
        ]  # fmt: skip
        s = lambda k: {"mean": sum(r[k] for r in runs) / len(runs), "std": 0.0}  # noqa: E731
        summary = {k: s(k) for k in runs[0] if k not in ("reference_seconds",)}
        return {"lr": 1e-4, "lr_grid": [1e-4, 1e-3], "runs": runs, "summary": summary}

    report = {
        "base": {"test": {"loss": 3.0, "accuracy": 0.6}},
        "results": {
            "all-tokens": row([2.0, 2.2], [0.8, 0.7]),
            "excess60-tuned-ref": {
                **row([2.1, 2.1], [0.8, 0.8], reference_seconds=50.0),
                "lr_from": "all-tokens",
            },
        },
    }
    text = render.long_targets_table(report)
    assert "| base, zero-shot | | 3.0000 | 60.0 |" in text
    assert "| all-tokens | 0.0001 (0.0001, 0.001) |" in text and "60 + 50 reference" in text
    # loss: +0.1, -0.1 -> +0.0000 ± 0.1414; sentiment: 0, +10 -> +5.0 ± 7.1
    assert "excess60-tuned-ref: loss +0.0000 ± 0.1414, sentiment +5.0 ± 7.1 points" in text


def test_forgetting_wise_table_meets_lora_kl():
    def row(curve: dict):  # every seed's run chose alpha 1
        stat = lambda m: {"mean": m, "std": 0.0}  # noqa: E731
        alphas = {
            a: {"validation": stat(v), "test": stat(t), "kl": stat(k), "loss_change": stat(0.0)}
            for a, (v, t, k) in curve.items()
        }
        return {"summary": {"wise_ft": {"alphas": alphas, "chosen": {"alphas": [1.0], **alphas["1.0"]}}}}

    report = {
        "base": {"validation": 0.6, "test": 0.64},
        "results": {
            "lora": {"summary": {}},  # a plain row: not in this table
            "lora-wise": row({"0.5": (0.7, 0.7, 0.002), "1.0": (0.8, 0.75, 0.0045)}),
            "surgical-gradient-1pct-wise": row(
                {"0.5": (0.8, 0.8, 0.002), "0.75": (0.82, 0.81, 0.0044), "1.0": (0.82, 0.81, 0.0077)}
            ),
        },
    }
    text = render.forgetting_wise_table(report)
    assert "| base, zero-shot | 0 | 60.0 | 64.0 | 0 | 0 |" in text
    assert "| surgical-gradient-1pct-wise | 0.75 | 82.0 ± 0.0 | 81.0 ± 0.0 | 0.0044 ± 0.0000 |" in text
    assert "| lora |" not in text
    # the largest alpha whose KL is at or below LoRA's own (alpha 1) KL
    assert (
        "LoRA's KL (0.0045), surgical-gradient-1pct-wise reaches task accuracy 81.0 ± 0.0 at alpha 0.75"
        in text
    )
    # with runs (seed order), the point is paired by seed against LoRA's own runs
    report["results"]["lora-wise"]["runs"] = [{"test": 0.80}, {"test": 0.64}]
    report["results"]["surgical-gradient-1pct-wise"]["runs"] = [
        {"test": 0.82, "wise_ft": {"0.75": {"test": 0.77}}},
        {"test": 0.81, "wise_ft": {"0.75": {"test": 0.79}}},
    ]
    text = render.forgetting_wise_table(report)
    assert "against LoRA's 75.0 ± 0.0; paired by seed -3.0, +15.0 points." in text
