"""Bad input and faults across commands, table-driven: each row is one class of mistake.

Every row must end with exit status 2 (a usage error included), one line on stderr naming the
problem, no traceback, and every file that existed before unchanged. A row is (id, argv builder,
expected text); the id starts with the command. ``KNOWN_BUGS`` holds rows that do not behave yet,
as strict xfails naming where they go wrong. Interrupts (exit 130/143) are in test_signals.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import surgical as sg
from conftest import run_main, tiny_bert, tiny_llama
from train_fixtures import save_tiny_model, tiny_tokenizer, write_cls_csv, write_instruct_jsonl


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
    other = tiny_bert(seed=3)  # a BERT of the same shapes with other weights: another base
    other.config.pad_token_id = 0
    other.save_pretrained(str(root / "bert-other"))
    tiny_tokenizer().save_pretrained(str(root / "bert-other"))
    w["other"] = root / "bert-other"
    w["demo_csv"] = _demo_csv(root / "demo.csv")
    w["ia3"] = root / "ia3"  # a PEFT adapter that is not LoRA
    w["ia3"].mkdir()
    (w["ia3"] / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    save_file({"x": torch.zeros(2)}, str(w["ia3"] / "adapter_model.safetensors"))
    sg.select(tiny_llama(), None, method="random", density=0.05, progress=False).save(root / "llama-plan")
    w["llama_plan"] = root / "llama-plan"
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


def _demo_csv(path: Path) -> Path:
    """text,label,source rows as `surgical demo` reads them (Rotten Tomatoes and IMDB)."""
    rng = random.Random(0)
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["text", "label", "source"])
        for i in range(400):
            word = rng.choice(["good", "bad"])
            out.writerow(
                [f"the movie was very {word}", int(word == "good"), "imdb" if i >= 300 else "rotten_tomatoes"]
            )
    return path


def _write(t: Path, name: str, text: str) -> str:
    (t / name).write_text(text)
    return str(t / name)


def _data(w, t, name: str, text: str) -> list[str]:
    """`surgical train` on a data file holding ``text``."""
    return ["train", "-c", _cfg_with(w, t, data={"path": _write(t, name, text)})]


def _copy(src: Path, t: Path, damage=None) -> str:
    """A copy of ``src`` in the test's own directory, damaged by ``damage(copy)``."""
    target = t / f"copy-{src.name}"
    shutil.copytree(src, target)
    if damage is not None:
        damage(target)
    return str(target)


def _header(f: Path) -> tuple[bytes, int, dict]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n, json.loads(raw[8 : 8 + n])


def _flip(name: str):
    """Flips one bit of the first tensor's data in file ``name``: still parses, still finite."""

    def damage(d: Path) -> None:
        raw, n, _ = _header(d / name)
        data = bytearray(raw)
        data[8 + n + 1] ^= 0x01
        (d / name).write_bytes(bytes(data))

    return damage


def _retype(name: str, suffix: str, dtype: str):
    """Rewrites the header dtype of the first tensor whose key ends with ``suffix`` (same size)."""

    def damage(d: Path) -> None:
        raw, n, header = _header(d / name)
        key = next(k for k in sorted(header) if k.endswith(suffix))
        header[key]["dtype"] = dtype
        text = json.dumps(header, separators=(",", ":")).encode()
        (d / name).write_bytes(raw[:8] + text.ljust(n, b" ") + raw[8 + n :])

    return damage


def _truncate(name: str):
    def damage(d: Path) -> None:
        (d / name).write_bytes((d / name).read_bytes()[: (d / name).stat().st_size // 2])

    return damage


def _resume(w, t, damage=None, **sections) -> list[str]:
    """`surgical train --resume` of a copy of the good run, damaged by ``damage(run)``."""
    run = _copy(w["run"], t, damage)
    return ["train", "-c", _cfg_with(w, t, out=run, **sections), "--resume"]


def _select(w, t, *flags: str) -> list[str]:
    return ["select", str(w["bert"]), "--data", str(w["csv"]), "--out", str(t / "plan"), *flags]


def _apply(w, t, delta, *flags: str) -> list[str]:
    return ["apply", str(w["bert"]), str(delta), "--out", str(t / "merged"), *flags]


def _demo(w, t, *flags: str) -> list[str]:
    return ["demo", "--quick", "--model", str(w["bert"]), "--data", str(w["demo_csv"]),
            "--out", str(t / "demo"), *flags]  # fmt: skip


def _unwritable(w, t) -> list[str]:
    locked = t / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("a 0o500 directory is writable to this user (root)")
    return _apply(w, t, w["delta"])[:-2] + ["--out", str(locked / "merged")]


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
    ("list-extra-argument", lambda w, t: ["list", "criteria", "schedules"], "unexpected extra argument"),
    # --- configs
    ("train-config-missing", lambda w, t: ["train", "-c", str(t / "no.yaml")], "no.yaml' does not exist"),
    ("train-config-is-a-directory", lambda w, t: ["train", "-c", str(t)], "is a directory"),
    ("train-config-empty", lambda w, t: ["train", "-c", _write(t, "e.yaml", "")], "model.path is not set"),
    (
        "train-config-a-list",
        lambda w, t: ["train", "-c", _write(t, "l.yaml", "- a\n")],
        "must hold a mapping",
    ),
    (
        "train-config-malformed",
        lambda w, t: ["train", "-c", _write(t, "m.yaml", "model: {path: [\n")],
        "is not valid YAML at line 2",
    ),
    (
        "train-unknown-key",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training={"lr_max": 1})],
        "unknown config key 'training.lr_max'",
    ),
    (
        "train-string-for-int",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training={"max_steps": "ten"})],
        "'training.max_steps' must be an integer, got 'ten'",
    ),
    (
        "train-list-for-string",
        lambda w, t: ["train", "-c", _cfg_with(w, t, model={"path": ["a", "b"]})],
        "'model.path' must be a string",
    ),
    (
        "train-section-is-a-number",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training=5)],
        "section 'training' must be a mapping",
    ),
    (
        "train-string-for-bool",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training={"bf16": "yes"})],
        "'training.bf16' must be true or false",
    ),
    (
        "train-set-not-key-value",
        lambda w, t: ["train", "-c", str(w["cfg"]), "--set", "training.lr"],
        "is not KEY=VALUE",
    ),
    (
        "train-set-unknown-key",
        lambda w, t: ["train", "-c", str(w["cfg"]), "--set", "training.nope=1"],
        "unknown config key 'training.nope'",
    ),
    (
        "train-set-below-a-value",
        lambda w, t: ["train", "-c", str(w["cfg"]), "--set", "out.x=1"],
        "'out' is not a section",
    ),
    (
        "train-option-not-key-value",
        lambda w, t: ["train", "-c", str(w["cfg"]), "--option", "labels"],
        "option 'labels' is not key=value",
    ),
    # --- numbers out of range
    (
        "train-lr-0",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training={"lr": 0})],
        "'training.lr' must be > 0",
    ),
    (
        "train-grad-accum-0",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training={"grad_accum": 0})],
        "'training.grad_accum' must be >= 1",
    ),
    (
        "train-epochs-0",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training={"epochs": 0, "max_steps": None})],
        "'training.epochs' must be >= 1",
    ),
    (
        "train-negative-max-grad-norm",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training={"max_grad_norm": -1})],
        "'training.max_grad_norm' must be > 0",
    ),
    (
        "train-negative-weight-decay",
        lambda w, t: ["train", "-c", _cfg_with(w, t, training={"weight_decay": -1})],
        "'training.weight_decay' must be >= 0",
    ),
    (
        "train-num-labels-0",
        lambda w, t: ["train", "-c", _cfg_with(w, t, model={"num_labels": 0})],
        "'model.num_labels' must be >= 2",
    ),
    (
        "train-limit-0",
        lambda w, t: ["train", "-c", _cfg_with(w, t, data={"limit": 0})],
        "'data.limit' must be >= 1",
    ),
    # --- selection
    (
        "train-unknown-criterion",
        lambda w, t: ["train", "-c", _cfg_with(w, t, selection={"method": "magic"})],
        "unknown selection criterion 'magic'",
    ),
    (
        "train-unknown-granularity",
        lambda w, t: ["train", "-c", _cfg_with(w, t, selection={"granularity": "atom"})],
        "'selection.granularity' must be one of",
    ),
    (
        "train-unknown-allocation",
        lambda w, t: ["train", "-c", _cfg_with(w, t, selection={"allocation": "fair"})],
        "'selection.allocation' must be one of",
    ),
    (
        "train-density-0",
        lambda w, t: ["train", "-c", _cfg_with(w, t, selection={"density": 0})],
        "'selection.density' must be in (0, 1], got 0.0",
    ),
    (
        "train-density-1.5",
        lambda w, t: ["train", "-c", _cfg_with(w, t, selection={"density": 1.5})],
        "'selection.density' must be in (0, 1], got 1.5",
    ),
    (
        "train-count-0",
        lambda w, t: ["train", "-c", _cfg_with(w, t, selection={"count": 0})],
        "'selection.count' must be >= 1",
    ),
    (
        "train-unknown-schedule",
        lambda w, t: ["train", "-c", _cfg_with(w, t, schedule={"name": "cosine"})],
        "unknown schedule 'cosine'",
    ),
    (
        "train-options-for-no-schedule",
        lambda w, t: ["train", "-c", _cfg_with(w, t, schedule={"name": "none", "options": {"x": 1}})],
        "schedule 'none' takes no options",
    ),
    # --- models and run directories
    (
        "train-model-missing",
        lambda w, t: ["train", "-c", _cfg_with(w, t, model={"path": str(t / "nomodel")})],
        "is not a model directory (no config.json)",
    ),
    (
        "train-model-is-a-file",
        lambda w, t: ["train", "-c", _cfg_with(w, t, model={"path": str(w["csv"])})],
        "is not a model directory (no config.json)",
    ),
    (
        "train-out-is-a-file",
        lambda w, t: ["train", "-c", _cfg_with(w, t, out=str(w["cfg"]))],
        "is a file, not a run directory",
    ),
    (
        "train-out-inside-the-data",
        lambda w, t: ["train", "-c", _cfg_with(w, t, out=str(w["csv"] / "run"))],
        "would overwrite the data",
    ),
    # --- data files
    (
        "train-data-missing",
        lambda w, t: ["train", "-c", _cfg_with(w, t, data={"path": str(t / "no.csv")})],
        "no.csv' does not exist",
    ),
    (
        "train-data-is-a-model-directory",
        lambda w, t: ["train", "-c", _cfg_with(w, t, data={"path": str(w["bert"])})],
        "cannot read dataset directory",
    ),
    ("train-data-missing-column", lambda w, t: _data(w, t, "c.csv", "text\ngood\n"), "lacks column(s) label"),
    ("train-data-header-only", lambda w, t: _data(w, t, "h.csv", "text,label\n"), "has no rows"),
    ("train-data-empty-file", lambda w, t: _data(w, t, "z.csv", ""), "has no rows"),
    (
        "train-data-non-integer-label",
        lambda w, t: _data(w, t, "n.csv", "text,label\ngood,pos\nbad,neg\n"),
        "must hold integer labels",
    ),
    (
        "train-data-label-out-of-range",
        lambda w, t: _data(w, t, "r.csv", "text,label\ngood,1\nbad,7\n"),
        "label 7 is outside 0..1",
    ),
    (
        "train-data-malformed-jsonl",
        lambda w, t: _data(w, t, "m.jsonl", '{"text": "a", "label": 1}\n{oops\n'),
        "cannot parse",
    ),
    # --- plans
    (
        "train-plan-missing",
        lambda w, t: ["train", "-c", _cfg_with(w, t, selection={"plan": str(t / "noplan")})],
        "plan directory",
    ),
    (
        "train-plan-checksum-mismatch",
        lambda w, t: [
            "train",
            "-c",
            _cfg_with(w, t, selection={"plan": _copy(w["run"] / "plan", t, _flip("plan.safetensors"))}),
        ],
        "plan.safetensors' is corrupted (checksum mismatch)",
    ),  # fmt: skip
    (
        "train-plan-dtype-rewritten",
        lambda w, t: [
            "train",
            "-c",
            _cfg_with(
                w,
                t,
                selection={"plan": _copy(w["run"] / "plan", t, _retype("plan.safetensors", ".gaps", "F16"))},
            ),
        ],
        "is stored as float16, expected int16",
    ),  # fmt: skip
    (
        "train-plan-for-another-model",
        lambda w, t: ["train", "-c", _cfg_with(w, t, selection={"plan": str(w["llama_plan"])})],
        "does not have",
    ),
    # --- checkpoints
    (
        "train-resume-corrupted-checkpoint",
        lambda w, t: _resume(w, t, lambda r: _flip("tensors.safetensors")(r / "checkpoints" / "step-2")),
        "checksum mismatch",
    ),
    (
        "train-resume-pickled-checkpoint",
        lambda w, t: _resume(
            w,
            t,
            lambda r: (
                (r / "checkpoints" / "step-9").mkdir()
                or (r / "checkpoints" / "step-9" / "state.pt").write_bytes(b"x")
            ),
        ),
        "was written by an older surgical as a pickle",
    ),  # fmt: skip
    (
        "train-resume-changed-settings",
        lambda w, t: _resume(w, t, training={"lr": 0.5}),
        "training.lr was 0.01, now 0.5",
    ),
    # --- select
    (
        "select-no-model",
        lambda w, t: ["select", "--data", str(w["csv"]), "--out", str(t / "p")],
        "select needs a model and data",
    ),
    (
        "select-model-missing",
        lambda w, t: ["select", str(t / "nomodel"), "--data", str(w["csv"]), "--out", str(t / "p")],
        "is not a model directory",
    ),
    (
        "select-density-0",
        lambda w, t: _select(w, t, "--density", "0"),
        "'selection.density' must be in (0, 1]",
    ),
    ("select-density-1.5", lambda w, t: _select(w, t, "--density", "1.5"), "must be in (0, 1], got 1.5"),
    (
        "select-count-and-optimizer-bytes",
        lambda w, t: _select(w, t, "--count", "5", "--optimizer-bytes", "1600"),
        "give exactly one of density, count and optimizer_bytes",
    ),
    (
        "select-unknown-criterion",
        lambda w, t: _select(w, t, "--method", "magic"),
        "unknown selection criterion",
    ),
    ("select-unknown-granularity", lambda w, t: _select(w, t, "--granularity", "atom"), "must be one of"),
    ("select-unknown-allocation", lambda w, t: _select(w, t, "--allocation", "fair"), "must be one of"),
    (
        "select-unknown-aggregate",
        lambda w, t: _select(w, t, "--aggregate", "max"),
        "must be one of sum, mean",
    ),
    (
        "select-unknown-criterion-option",
        lambda w, t: _select(w, t, "--option", "labels=sampled"),
        "unknown option(s) labels for selection criterion 'gradient'",
    ),
    ("select-max-batches-0", lambda w, t: _select(w, t, "--max-batches", "0"), "must be >= 1"),
    ("select-unknown-task", lambda w, t: _select(w, t, "--task", "nlu"), "'model.task' must be one of"),
    (
        "select-target-matches-nothing",
        lambda w, t: _select(w, t, "--target", "zzz.*"),
        "matches no nn.Linear",
    ),
    (
        "select-expert-granularity-without-experts",
        lambda w, t: _select(w, t, "--granularity", "expert"),
        "found no expert parameter",
    ),
    (
        "select-missing-text-column",
        lambda w, t: _select(w, t, "--text-column", "sentence"),
        "lacks column(s)",
    ),
    (
        "select-out-is-the-model",
        lambda w, t: ["select", str(w["bert"]), "--data", str(w["csv"]), "--out", str(w["bert"])],
        "would overwrite the model",
    ),
    # --- apply and delta files
    ("apply-delta-missing", lambda w, t: _apply(w, t, t / "nodelta"), "nodelta' does not exist"),
    (
        "apply-base-missing",
        lambda w, t: ["apply", str(t / "nobase"), str(w["delta"]), "--out", str(t / "m")],
        "is not a model directory",
    ),
    (
        "apply-base-is-a-file",
        lambda w, t: ["apply", str(w["csv"]), str(w["delta"]), "--out", str(t / "m")],
        "is not a model directory",
    ),
    ("apply-delta-is-a-model", lambda w, t: _apply(w, t, w["llama"]), "delta_config.json' is missing"),
    (
        "apply-delta-without-its-tensors",
        lambda w, t: _apply(w, t, _copy(w["delta"], t, lambda d: (d / "delta.safetensors").unlink())),
        "delta.safetensors' is missing",
    ),
    (
        "apply-delta-truncated-json",
        lambda w, t: _apply(w, t, _copy(w["delta"], t, _truncate("delta_config.json"))),
        "delta_config.json' is truncated or corrupted",
    ),
    (
        "apply-delta-truncated-tensors",
        lambda w, t: _apply(w, t, _copy(w["delta"], t, _truncate("delta.safetensors"))),
        "delta.safetensors' is truncated or corrupted",
    ),
    (
        "apply-delta-checksum-mismatch",
        lambda w, t: _apply(w, t, _copy(w["delta"], t, _flip("delta.safetensors"))),
        "delta.safetensors' is corrupted (checksum mismatch). Save it again",
    ),
    (
        "apply-delta-dtype-rewritten",
        lambda w, t: _apply(w, t, _copy(w["delta"], t, _retype("delta.safetensors", ".values", "I32"))),
        ".values' is stored as int32, expected float32",
    ),
    (
        "apply-scale-count-mismatch",
        lambda w, t: _apply(w, t, w["delta"], "--scale", "1", "--scale", "2"),
        "1 deltas but 2 --scale values",
    ),
    ("apply-infinite-scale", lambda w, t: _apply(w, t, w["delta"], "--scale", "inf"), "--scale must be"),
    (
        "apply-other-base",
        lambda w, t: ["apply", str(w["other"]), str(w["delta"]), "--out", str(t / "m")],
        "is not the base the delta was trained on",
    ),
    (
        "apply-out-below-a-file",
        lambda w, t: _apply(w, t, w["delta"])[:-2] + ["--out", str(w["cfg"] / "merged")],
        "cannot read or write",
    ),
    ("apply-out-unwritable", _unwritable, "Permission denied"),
    # --- inspect
    ("inspect-missing", lambda w, t: ["inspect", str(t / "nothing")], "does not exist"),
    ("inspect-a-model-directory", lambda w, t: ["inspect", str(w["bert"])], "delta_config.json' is missing"),
    ("inspect-a-file", lambda w, t: ["inspect", str(w["csv"])], "cls.csv' is a file, not a delta directory"),
    (
        "inspect-delta-checksum-mismatch",
        lambda w, t: ["inspect", _copy(w["delta"], t, _flip("delta.safetensors"))],
        "checksum mismatch",
    ),
    (
        "inspect-plan-checksum-mismatch",
        lambda w, t: ["inspect", _copy(w["run"] / "plan", t, _flip("plan.safetensors"))],
        "plan.safetensors' is corrupted (checksum mismatch)",
    ),
    # --- export
    (
        "export-base-missing",
        lambda w, t: ["export", str(w["delta"]), "--base", str(t / "nobase"), "--out", str(t / "x")],
        "is not a model directory",
    ),
    (
        "export-delta-missing",
        lambda w, t: ["export", str(t / "nodelta"), "--base", str(w["bert"]), "--out", str(t / "x")],
        "does not exist",
    ),
    (
        "export-other-architecture",
        lambda w, t: ["export", str(w["delta"]), "--base", str(w["llama"]), "--out", str(t / "x")],
        "is a 'llama' model",
    ),
    (
        "export-delta-dtype-rewritten",
        lambda w, t: [
            "export",
            _copy(w["delta"], t, _retype("delta.safetensors", ".gaps", "F16")),
            "--base",
            str(w["bert"]),
            "--out",
            str(t / "x"),
        ],
        ".gaps' is stored as float16, expected int16",
    ),  # fmt: skip
    # --- diff
    (
        "diff-density-0",
        lambda w, t: ["diff", str(w["bert"]), str(w["other"]), "--out", str(t / "d"), "--density", "0"],
        "density must be in (0, 1]",
    ),
    (
        "diff-density-1.5",
        lambda w, t: ["diff", str(w["bert"]), str(w["other"]), "--out", str(t / "d"), "--density", "1.5"],
        "density must be in (0, 1], got 1.5",
    ),
    (
        "diff-unknown-dtype",
        lambda w, t: ["diff", str(w["bert"]), str(w["other"]), "--out", str(t / "d"), "--dtype", "float8"],
        "unknown value dtype 'float8'",
    ),
    (
        "diff-base-missing",
        lambda w, t: ["diff", str(t / "nobase"), str(w["other"]), "--out", str(t / "d")],
        "is not a model directory",
    ),
    # --- import-lora
    (
        "import-lora-missing",
        lambda w, t: ["import-lora", str(t / "nolora"), "--base", str(w["bert"]), "--out", str(t / "l")],
        "adapter_config.json' is missing",
    ),
    (
        "import-lora-of-a-model",
        lambda w, t: ["import-lora", str(w["bert"]), "--base", str(w["bert"]), "--out", str(t / "l")],
        "adapter_config.json' is missing",
    ),
    (
        "import-lora-of-another-adapter-type",
        lambda w, t: ["import-lora", str(w["ia3"]), "--base", str(w["bert"]), "--out", str(t / "l")],
        "is a IA3 adapter",
    ),
    (
        "import-lora-malformed-config",
        lambda w, t: [
            "import-lora",
            _copy(w["ia3"], t, _truncate("adapter_config.json")),
            "--base",
            str(w["bert"]),
            "--out",
            str(t / "l"),
        ],
        "holds a corrupted adapter",
    ),  # fmt: skip
    # --- demo --quick options
    ("demo-density-0", lambda w, t: _demo(w, t, "--density", "0"), "density must be in (0, 1], got 0.0"),
    ("demo-density-1.5", lambda w, t: _demo(w, t, "--density", "1.5"), "density must be in (0, 1], got 1.5"),
    ("demo-unknown-method", lambda w, t: _demo(w, t, "--method", "magic"), "unknown selection criterion"),
    ("demo-epochs-0", lambda w, t: _demo(w, t, "--epochs", "0"), "epochs must be >= 1"),
    ("demo-negative-lr", lambda w, t: _demo(w, t, "--lr", "-1"), "lr must be > 0"),
    ("demo-target-matches-nothing", lambda w, t: _demo(w, t, "--target", "zzz"), "matches no nn.Linear"),
    (
        "demo-model-missing",
        lambda w, t: ["demo", "--quick", "--model", str(t / "nomodel"), "--out", str(t / "demo")],
        "is not a model directory",
    ),
    (
        "demo-data-missing",
        lambda w, t: [
            "demo",
            "--quick",
            "--model",
            str(w["bert"]),
            "--data",
            str(t / "no.csv"),
            "--out",
            str(t / "d"),
        ],
        "no.csv' does not exist",
    ),  # fmt: skip
    (
        "demo-data-without-source",
        lambda w, t: [
            "demo",
            "--quick",
            "--model",
            str(w["bert"]),
            "--data",
            str(w["csv"]),
            "--out",
            str(t / "d"),
        ],
        "lacks column(s) source",
    ),  # fmt: skip
    (
        "demo-out-is-a-file",
        lambda w, t: ["demo", "--quick", "--model", str(w["bert"]), "--out", str(w["csv"])],
        "is an existing file, not a delta directory",
    ),
]

# Faults that are not handled yet, each with where it goes wrong: strict xfails, so that the fix
# makes them pass and the marker has to go.
# Rows that revealed bugs once fixed (they stay as ordinary rows below).
KNOWN_BUGS: list = []


CASES += [
    (
        "select-malformed-regex",
        lambda w, t: _select(w, t, "--target", "re:(("),
        "re:((",
    ),
    (
        "diff-other-architecture",
        lambda w, t: ["diff", str(w["bert"]), str(w["llama"]), "--out", str(t / "d")],
        "is a 'bert' model",
    ),
    (
        "select-data-importance-without-target",
        lambda w, t: [
            "select-data",
            str(w["bert"]),
            "--data",
            str(w["csv"]),
            "--out",
            str(t / "sel"),
            "--method",
            "importance",
        ],  # fmt: skip
        "data criterion 'importance' needs the validation data (its target set). Pass --validation FILE",
    ),
    (
        "train-truncated-model-weights",
        lambda w, t: ["train", "-c", _cfg_with(w, t, model={"path": _truncated_model(w, t)})],
        "cannot load a model from",
    ),
    (
        "apply-truncated-base-weights",
        lambda w, t: ["apply", _truncated_model(w, t), str(w["delta"]), "--out", str(t / "m")],
        "cannot load the base model from",
    ),
    (
        "select-density-and-count",
        lambda w, t: _select(w, t, "--density", "0.1", "--count", "5"),
        "density",
    ),
]


def _chat(w, t, messages=None, template: str | None = "", **data) -> list[str]:
    """`surgical train` (causal_lm) on a messages file; ``template``: the tokenizer's chat template
    ("" the tiny chat one, None the tokenizer without any); ``messages``: the first row's."""
    from train_fixtures import conversations, tiny_chat_tokenizer

    model = t / "chat-llama"
    shutil.copytree(w["llama"], model)
    if template is not None:
        tok = tiny_chat_tokenizer()
        tok.chat_template = template or tok.chat_template
        tok.save_pretrained(str(model))
    rows = conversations(4)
    rows[0] = rows[0] if messages is None else messages
    text = "".join(json.dumps({"messages": m}) + "\n" for m in rows)
    return ["train", "-c", _cfg_with(w, t, model={"path": str(model), "task": "causal_lm"},
                                     data={"path": _write(t, "chat.jsonl", text), **data},
                                     selection={"always": []})]  # fmt: skip


SYSTEMLESS = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
)
CASES += [
    ("train-messages-without-chat-template", lambda w, t: _chat(w, t, template=None), "has no chat template"),
    (
        "train-messages-role-the-template-rejects",
        lambda w, t: _chat(w, t, template=SYSTEMLESS),
        "the chat template rejects conversation 1: System role not supported",
    ),
    (
        "train-messages-template-not-growing-prefixes",
        lambda w, t: _chat(w, t, template="{% for m in messages|reverse %}{{ m['content'] }} {% endfor %}"),
        "does not render conversation 1 as growing prefixes",
    ),
    (
        "train-messages-unknown-role",
        lambda w, t: _chat(w, t, [{"role": "robot", "content": "beep"}]),
        "conversation 1 has a message of role 'robot'",
    ),
    ("train-messages-not-a-list", lambda w, t: _chat(w, t, "hello"), "is not a non-empty list of messages"),
    (
        "train-messages-no-answer",
        lambda w, t: _chat(w, t, [{"role": "user", "content": "the film"}]),
        "conversation 1 has no assistant message",
    ),
    (
        "train-messages-answers-truncated-away",
        lambda w, t: _chat(w, t, max_length=4),
        "every answer was truncated away",
    ),
]


# --out and --png never destroy what is there: a file, or a directory of another kind
CASES += [
    (
        "select-damaged-dataset-dict",
        lambda w, t: ["select", str(w["bert"]), "--data", _fake_dataset_dict(t), "--out", str(t / "p")],
        "its metadata is incomplete or damaged (KeyError: 'splits')",
    ),
    (
        "diff-models-of-two-architectures",
        lambda w, t: ["diff", str(w["llama"]), str(w["bert"]), "--out", str(t / "d")],
        "is a 'llama' model, the fine-tuned model a 'bert' one. Pass two checkpoints of the same",
    ),
    (
        "train-causal-lm-response-column-renamed-wrongly",
        lambda w, t: [
            "train",
            "-c",
            _cfg_with(
                w,
                t,
                model={"path": str(w["llama"]), "task": "causal_lm"},
                data={"path": str(write_instruct_jsonl(t / "i.jsonl")), "response_column": "answer"},
                selection={"always": []},
            ),
        ],  # fmt: skip
        "a causal-LM dataset is read by (it has prompt, response): 'messages' (chat), "
        "'answer' with 'prompt', or 'text'",
    ),
    (
        "eval-set-named-twice",
        lambda w, t: ["eval", str(w["bert"]), "--data", f"id={w['csv']}", "--data", f"id={w['csv']}x"],
        "--data names the set 'id' twice",
    ),
    (
        "merge-option-twice",
        lambda w, t: [
            "merge",
            "--delta",
            str(w["delta"]),
            "--delta",
            str(w["delta"]),
            "--method",
            "ties",
            "--option",
            "density=0.5",
            "--option",
            "density=0.3",
            "--out",
            str(t / "m"),
        ],  # fmt: skip
        "option 'density' is given twice",
    ),
    (
        "train-config-not-utf8",
        lambda w, t: ["train", "-c", _write_bytes(t, "latin.yaml", b"model:\n  path: \xff\xfe\n")],
        "latin.yaml' is not UTF-8 text (byte 15",
    ),
    (
        "merge-config-is-a-pickle",
        lambda w, t: ["merge", _write_bytes(t, "m.pkl", b"\x80\x04\x95\x00")],
        "m.pkl' is not UTF-8 text",
    ),
    (
        "train-config-section-twice",
        lambda w, t: [
            "train",
            "-c",
            _write(t, "dup.yaml", "training:\n  max_steps: 2\ntraining:\n  lr: 0.001\n"),
        ],
        "the key 'training' appears twice (first at line 1)",
    ),
    # square brackets in a path are text, never rich markup (which crashed or dropped them)
    (
        "inspect-path-that-looks-like-markup",
        lambda w, t: ["inspect", "[/bold]"],
        "delta directory '[/bold]' does",
    ),
    (
        "select-data-path-with-brackets",
        lambda w, t: [
            "select",
            str(w["bert"]),
            "--data",
            str(t / "data[quant].csv"),
            "--out",
            str(t / "p[/x]"),
        ],
        "data[quant].csv' does not exist",
    ),
    (
        "apply-out-is-a-data-file",
        lambda w, t: ["apply", str(w["bert"]), str(w["delta"]), "--out", str(w["csv"])],
        "is an existing file, not a model directory",
    ),
    (
        "apply-out-is-another-kind-of-directory",
        lambda w, t: ["apply", str(w["bert"]), str(w["delta"]), "--out", str(w["llama_plan"])],
        "exists and is not a model directory (it holds other files)",
    ),
    (
        "export-out-is-a-delta",
        lambda w, t: ["export", str(w["delta"]), "--base", str(w["bert"]), "--out", str(w["llama_plan"])],
        "exists and is not a PEFT adapter directory",
    ),
    (
        "diff-out-is-a-data-file",
        lambda w, t: ["diff", str(w["bert"]), str(w["other"]), "--out", str(w["csv"])],
        "is an existing file, not a delta directory",
    ),
    (
        "import-lora-out-is-a-model",
        lambda w, t: ["import-lora", str(w["ia3"]), "--base", str(w["bert"]), "--out", str(w["llama"])],
        "exists and is not a delta directory",
    ),
    (
        "merge-out-is-a-data-file",
        lambda w, t: [
            "merge",
            "--delta",
            str(w["delta"]),
            "--delta",
            str(w["delta"]),
            "--out",
            str(w["csv"]),
        ],
        "is an existing file, not a delta directory",
    ),
    (
        "inspect-png-is-the-delta-file",
        lambda w, t: ["inspect", str(w["delta"]), "--png", str(w["delta"] / "delta.safetensors")],
        "delta.safetensors' is an existing file that is not a PNG",
    ),
    (
        "inspect-png-is-a-directory",
        lambda w, t: ["inspect", str(w["llama_plan"]), "--png", str(w["bert"])],
        "is a directory. Pass a file path such as",
    ),
    (
        "select-png-is-the-data",
        lambda w, t: [
            "select",
            str(w["bert"]),
            "--data",
            str(w["csv"]),
            "--out",
            str(t / "p"),
            "--png",
            str(w["csv"]),
        ],
        "cls.csv' is an existing file that is not a PNG",
    ),
    (
        "wise-ft-out-is-a-plan",
        lambda w, t: [
            "wise-ft",
            "--model",
            str(w["bert"]),
            "--delta",
            str(w["delta"]),
            "--validation",
            str(w["csv"]),
            "--out",
            str(w["llama_plan"]),
        ],  # fmt: skip
        "exists and is not a WiSE-FT report directory",
    ),
    (
        "soup-out-is-a-plan",
        lambda w, t: [
            "soup",
            str(w["delta"]),
            str(w["delta"]),
            "--model",
            str(w["bert"]),
            "--validation",
            str(w["csv"]),
            "--out",
            str(w["llama_plan"]),
        ],  # fmt: skip
        "exists and is not a soup report directory",
    ),
]


def _fake_dataset_dict(t: Path) -> str:
    (t / "fakeds").mkdir()
    (t / "fakeds" / "dataset_dict.json").write_text("{}")
    return str(t / "fakeds")


def _write_bytes(t: Path, name: str, data: bytes) -> str:
    (t / name).write_bytes(data)
    return str(t / name)


def _truncated_model(w, t) -> str:
    return _copy(w["bert"], t, _truncate("model.safetensors"))


PARAMS = [pytest.param(build, needle, id=name) for name, build, needle in CASES] + [
    pytest.param(build, needle, id=name, marks=pytest.mark.xfail(strict=True, reason=why))
    for name, build, needle, why in KNOWN_BUGS
]


def test_the_suite_covers_at_least_60_classes_across_every_command():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)) >= 60
    commands = {n.split("-")[0] for n in names}  # each row's id starts with its command
    assert {"train", "select", "apply", "inspect", "export", "diff", "import", "demo", "list"} <= commands


@pytest.mark.parametrize("build, needle", PARAMS)
def test_bad_input_is_one_clear_line_and_loses_nothing(world, tmp_path, monkeypatch, capsys, build, needle):
    before = _tree(world["root"])
    try:
        argv = build(world, tmp_path)
        code, _, err = run_main(monkeypatch, capsys, *argv)
    finally:
        for d in [tmp_path, *tmp_path.rglob("*")]:  # the unwritable row's directory, for cleanup
            if d.is_dir() and not d.is_symlink():
                d.chmod(0o700)
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
