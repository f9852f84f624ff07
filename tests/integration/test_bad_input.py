"""Bad input and faults across commands, table-driven: each row is one class of mistake.

Every row must end with exit status 2 (a usage error included), one line on stderr naming the
problem, no traceback, and every file that existed before unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

import surgical as sg
from conftest import run_main
from train_fixtures import save_tiny_model, write_cls_csv


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny classifier, a tiny LM, data, a good run directory and its delta."""
    root = tmp_path_factory.mktemp("bad")
    w = {
        "bert": save_tiny_model(root / "bert", "bert"),
        "llama": save_tiny_model(root / "llama", "llama"),
        "csv": write_cls_csv(root / "cls.csv"),
    }
    notok = root / "no-tokenizer"
    shutil.copytree(w["bert"], notok)
    for f in notok.iterdir():
        if "token" in f.name or f.name in ("vocab.txt", "vocab.json", "merges.txt"):
            f.unlink()
    w["notok"] = notok
    cfg = {
        "out": str(root / "run"),
        "model": {"path": str(w["bert"])},
        "data": {"path": str(w["csv"]), "batch_size": 8, "max_length": 16},
        "selection": {"method": "gradient", "density": 0.05, "always": ["classifier"]},
        "training": {"max_steps": 2, "lr": 0.01},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    w["cfg"], w["run"], w["root"] = root / "run.yaml", root / "run", root
    code = run_main_plain("train", "-c", str(w["cfg"]))
    assert code == 0
    w["delta"] = w["run"] / "delta"
    return w


def run_main_plain(*args: str) -> int:
    import sys

    from surgical import cli

    old = sys.argv
    sys.argv = ["surgical", *args]
    try:
        cli.main()
    except SystemExit as e:
        return e.code or 0
    finally:
        sys.argv = old
    return 0


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cfg_with(w, tmp_path, **sections) -> str:
    cfg = yaml.safe_load(w["cfg"].read_text())
    cfg["out"] = str(tmp_path / "fresh")
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


# (id, argv builder, expected text)
CASES = [
    (
        "apply-out-is-base",
        lambda w, t: ["apply", str(w["bert"]), str(w["delta"]), "--out", str(w["bert"])],
        "would overwrite the base model",
    ),
    (
        "apply-out-is-delta",
        lambda w, t: ["apply", str(w["bert"]), str(w["delta"]), "--out", str(w["delta"])],
        "would overwrite the delta",
    ),
    (
        "apply-out-inside-base",
        lambda w, t: ["apply", str(w["bert"]), str(w["delta"]), "--out", str(w["bert"] / "merged")],
        "would overwrite the base model",
    ),
    (
        "apply-nan-scale",
        lambda w, t: ["apply", str(w["bert"]), str(w["delta"]), "--out", str(t / "m"), "--scale", "nan"],
        "--scale must be",
    ),
    (
        "apply-force-other-architecture",
        lambda w, t: ["apply", str(w["llama"]), str(w["delta"]), "--out", str(t / "m"), "--force"],
        "is a 'llama' model",
    ),
    (
        "export-out-is-delta",
        lambda w, t: ["export", str(w["delta"]), "--base", str(w["bert"]), "--out", str(w["delta"])],
        "would overwrite the delta",
    ),
    (
        "export-unknown-format",
        lambda w, t: [
            "export",
            str(w["delta"]),
            "--base",
            str(w["bert"]),
            "--out",
            str(t / "x"),
            "--to",
            "onnx",
        ],
        "unknown export format 'onnx'",
    ),
    (
        "diff-out-is-finetuned",
        lambda w, t: ["diff", str(w["bert"]), str(w["llama"]), "--out", str(w["llama"])],
        "would overwrite the fine-tuned model",
    ),
    ("train-into-existing-run", lambda w, t: ["train", "-c", str(w["cfg"])], "already holds a run"),
    ("train-resume-nothing", lambda w, t: ["train", "-c", _cfg_with(w, t), "--resume"], "nothing to resume"),
    (
        "train-overwrite-and-resume",
        lambda w, t: ["train", "-c", str(w["cfg"]), "--resume", "--overwrite"],
        "contradict",
    ),
    (
        "train-out-is-model",
        lambda w, t: ["train", "-c", _cfg_with(w, t, out=str(w["bert"]))],
        "would overwrite the model",
    ),
    (
        "train-no-tokenizer",
        lambda w, t: ["train", "-c", _cfg_with(w, t, model={"path": str(w["notok"])})],
        "has no usable tokenizer",
    ),
    (
        "train-causal-lm-on-classifier",
        lambda w, t: ["train", "-c", _cfg_with(w, t, model={"task": "causal_lm"})],
        "not a causal language model",
    ),
    (
        "train-negative-lr",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training={"lr": -1})],
        "'training.lr' must be > 0",
    ),
    (
        "train-nan-lr",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training={"lr": float("nan")})],
        "finite number",
    ),
    (
        "train-batch-size-0",
        lambda w, t: ["train", "-c", _cfg_with(w, t, data={"batch_size": 0})],
        "'data.batch_size' must be >= 1",
    ),
    (
        "train-max-steps-0",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training={"max_steps": 0})],
        "'training.max_steps' must be >= 1",
    ),
    (
        "train-warmup-above-1",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training={"warmup": 1.5})],
        "'training.warmup' must be in [0, 1]",
    ),
    (
        "train-negative-checkpoint-every",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training={"checkpoint_every": -1})],
        "'training.checkpoint_every' must be >= 0",
    ),
    (
        "train-max-length-0",
        lambda w, t: ["train", "-c", _cfg_with(w, t, data={"max_length": 0})],
        "'data.max_length' must be >= 1",
    ),
    (
        "train-unknown-schedule-option",
        lambda w, t: ["train", "-c", _cfg_with(w, t, schedule={"name": "lisa", "options": {"gama": 2}})],
        "unknown option(s) gama for schedule 'lisa'",
    ),
    (
        "train-unknown-criterion-option",
        lambda w, t: ["train", "-c", _cfg_with(w, t, selection={"options": {"rank": 2}})],
        "unknown option(s) rank for selection criterion",
    ),
    (
        "train-bad-schedule-value",
        lambda w, t: [
            "train",
            "-c",
            _cfg_with(w, t, schedule={"name": "regrow", "options": {"fraction": 2}}),
        ],
        "schedule.options.fraction must be in (0, 1)",
    ),
    (
        "usage-missing-option",
        lambda w, t: ["apply", str(w["bert"]), str(w["delta"])],
        "Missing option '--out'",
    ),
    ("usage-unknown-option", lambda w, t: ["train", "--no-such-flag"], "No such option"),
    ("usage-bad-number", lambda w, t: ["train", "--lr", "fast"], "Invalid value for '--lr'"),
    ("usage-unknown-command", lambda w, t: ["frobnicate"], "No such command"),
    ("list-unknown", lambda w, t: ["list", "models"], "unknown list 'models'"),
]


@pytest.mark.parametrize("build, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_loses_nothing(world, tmp_path, monkeypatch, capsys, build, needle):
    argv = build(world, tmp_path)
    before = _tree(world["root"])
    code, _, err = run_main(monkeypatch, capsys, *argv)
    text = " ".join(err.split())
    assert code == 2, err
    assert needle in text, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert _tree(world["root"]) == before  # nothing that existed was changed or removed


def test_revert_matches_a_reloaded_delta_by_content(world):
    from surgical.recipes.models import load_base

    meta = sg.Delta.load(world["delta"]).meta["base"]
    model, _ = load_base(world["bert"], meta["architecture"], meta["num_labels"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sg.apply(model, sg.Delta.load(world["delta"]))
    sg.revert(model, sg.Delta.load(world["delta"]))  # another object with the same content
    assert all(json.dumps(n) and bool((p == before[n]).all()) for n, p in model.named_parameters())
