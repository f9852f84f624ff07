"""The forgetting benchmark's --quick mode (a tiny Llama with a chat template) writes a consistent
report: task accuracy, forgetting, the token-selection rows (the base as the reference, and a
reference tuned on clean answers, selecting from noisy ones) and a WiSE-FT row (full
fine-tuning's change scaled by each alpha)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import forgetting  # noqa: E402  (benchmarks/ is a directory of scripts)


def test_token_kinds_split_a_chat_answer_into_label_noise_and_end():
    labels = torch.tensor(
        [[-100, -100, 10, 11, 12, 2, 198, -100], [-100, 20, 2, 198, -100, -100, -100, -100]]
    )
    kinds = forgetting.token_kinds(labels, eos=2)
    assert kinds["answer"].nonzero().tolist() == [[0, 2], [1, 1]]
    assert kinds["noise"].nonzero().tolist() == [[0, 3], [0, 4]]  # a clean answer has none
    assert kinds["end"].nonzero().tolist() == [[0, 5], [0, 6], [1, 2], [1, 3]]


def test_noise_words_are_fixed_by_the_data_not_the_seed():
    texts = ["a fine and moving film", "dull , dull , dull", "the cast is great"]
    words = forgetting.noise_words(texts, 4)
    assert words == forgetting.noise_words(texts, 4) and [len(w) for w in words] == [4, 4, 4]
    pool = {"fine", "and", "moving", "film", "dull", "the", "cast", "great"}  # three letters or more
    assert all(w in pool for ws in words for w in ws)
    assert forgetting.noise_words(texts, 0) == [[], [], []]


def test_forgetting_quick(tmp_path):
    out = tmp_path / "f.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    tokens = "surgical-gradient-1pct-tokens60"
    rows = f"full-wise,surgical-gradient-1pct,{tokens},noisy-excess30-clean-ref"
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "forgetting.py"),
            "--quick",
            "--rows",
            rows,
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO / "benchmarks",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    r = report["results"]
    assert report["setup"]["complete"] and set(r) == set(rows.split(","))
    assert 0 <= report["base"]["test"] <= 1  # the first row also measured the base
    full, sur, tok, tuned = (r[n]["runs"][0] for n in rows.split(","))
    assert sur["trainable"] == tok["trainable"] == tuned["trainable"] < 0.05 * full["trainable"]
    # the tuned reference is trained first, timed on its own; the other rows have none
    assert tuned["reference_seconds"] > 0 and "reference_seconds" not in tok
    for run in (full, sur, tok, tuned):
        assert 0 <= run["test"] <= 1 and 0 <= run["validation"] <= 1
        assert run["kl"] >= 0 and run["artifact_kib"] > 0 and run["steps"] == 6  # 24 examples / 4
    assert sur["kl"] > 0  # the delta changed the model
    # six noise words after every answer (one truncated at most), 30% of the targets kept
    kept = tuned["kept_tokens"]
    assert kept["answer"] == 24 and 6 * 24 - 6 <= kept["noise"] <= 6 * 24 and kept["end"] <= 24
    share = sum(kept[f"{k}_kept"] for k in ("answer", "noise", "end")) / sum(
        kept[k] for k in ("answer", "noise", "end")
    )
    assert 0.2 <= share <= 0.4 and "kept_tokens" not in sur
    # the token rows reuse the plain row's lr (chosen on validation), never their own search
    for name in ("surgical-gradient-1pct-tokens60", "noisy-excess30-clean-ref"):
        assert r[name]["lr_from"] == "surgical-gradient-1pct"
        assert r[name]["lr"] == r["surgical-gradient-1pct"]["lr"]
    # WiSE-FT: every alpha evaluated on the same run; a smaller share of the change moves the
    # model less on the reference text; the chosen alpha is one of the curve's
    wise = full["wise_ft"]
    assert list(wise) == ["0.25", "0.5", "0.75"]
    assert all(0 <= p["test"] <= 1 and p["kl"] >= 0 for p in wise.values())
    assert wise["0.25"]["kl"] < full["kl"] and abs(wise["0.25"]["loss_change"]) < abs(full["loss_change"])
    summary = r["full-wise"]["summary"]["wise_ft"]
    assert set(summary["alphas"]) == {"0.25", "0.5", "0.75", "1.0"}
    assert summary["alphas"]["1.0"]["kl"]["mean"] == full["kl"]
    assert summary["chosen"]["alphas"][0] in (0.25, 0.5, 0.75, 1.0)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
