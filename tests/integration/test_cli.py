"""The `surgical` command end to end: the quick demo, apply/inspect, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_main
from surgical.recipes.demo import DemoConfig, default_model_path, run_demo

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_delta(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "delta"
    result = run_demo(DemoConfig.quick(out=str(out)))
    return out, result


def test_quick_demo_result(quick_delta):
    out, r = quick_delta
    assert r["reloaded_identical"] is True
    # 1.83% of the six encoder layers' Linear weights (not the pooler's), exactly
    assert r["entries"] == round(0.0183 * (10_764_288 - 384 * 384)) == 194_288
    pooler_bias, head = 384, 2 * 384 + 2
    biases_norms = 6 * (4 * 384 + 1536 + 384 + 4 * 384) + 2 * 384  # per layer, plus embeddings LN
    assert r["dense"] == pooler_bias + head + biases_norms
    # the quality benchmark's surgical rows at 1% of the encoder (benchmarks/quality.py)
    assert r["trainable"] == 226_162
    assert r["trainable"] == r["entries"] + r["dense"]
    assert r["trainable_share_of_encoder"] <= 0.01
    # fp32 values (4 B) + 16-bit index gaps (2 B) per entry, 4 B per dense value, a small header,
    # and 10 B (gap + float64) per value of a dense change that float32 cannot add back exactly
    tensors = json.loads((out / "delta_config.json").read_text())["tensors"].values()
    fixups = sum(t.get("fixups", 0) for t in tensors)
    assert fixups < 0.2 * r["dense"]
    assert r["delta_bytes"] <= 6 * r["entries"] + 4 * r["dense"] + 10 * fixups + 64 * 1024
    assert (out / "delta.safetensors").is_file()
    assert 0.0 <= r["id_accuracy"] <= 1.0 and 0.0 <= r["ood_accuracy"] <= 1.0
    assert r["peak_rss_bytes"] > 0


def test_cli_quick_demo_subprocess(tmp_path):
    env = dict(os.environ, COLUMNS="120")
    p = subprocess.run(
        [sys.executable, "-m", "surgical", "demo", "--quick", "--out", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "identical predictions" in p.stdout and "ID accuracy" in p.stdout
    assert (tmp_path / "d" / "delta_config.json").is_file()


def test_inspect_and_apply(quick_delta, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForSequenceClassification

    delta_dir, _ = quick_delta
    code, out, _ = run_main(monkeypatch, capsys, "inspect", str(delta_dir))
    assert code == 0 and "entries" in out and "classifier.weight" in out and "bytes per value" in out
    code, out, err = run_main(
        monkeypatch, capsys, "apply", str(default_model_path()), str(delta_dir), "--out", str(tmp_path / "m")
    )
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m")).eval()
    import surgical as sg
    from surgical.recipes.models import load_base

    meta = sg.Delta.load(delta_dir).meta["base"]
    base, tok = load_base(default_model_path(), meta["architecture"], meta["num_labels"])
    sg.apply(base, sg.Delta.load(delta_dir))
    enc = tok(["a gripping, funny film", "dull and lifeless"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(merged(**enc).logits, base(**enc).logits)


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--quick", "--model", "/no/such/model"], "is not a model directory"),
        (["demo", "--quick", "--density", "0"], "density must be in (0, 1]"),
        (["demo", "--quick", "--density", "1.5"], "density must be in (0, 1]"),
        (["demo", "--quick", "--target", "no_such_layer"], "matches no nn.Linear weight"),
        (["demo", "--quick", "--method", "psychic"], "unknown selection criterion"),
        (["demo", "--quick", "--data", "{empty}"], "has no rows"),
        (["demo", "--quick", "--data", "{nocols}"], "lacks column(s) label, source"),
        (["inspect", "/no/such/delta"], "does not exist"),
        (["apply", "/no/such/model", "{delta}", "--out", "{out}"], "is not a model directory"),
        (["inspect", "{truncated}"], "truncated or corrupted"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args, message, tmp_path, monkeypatch, capsys, quick_delta):
    import shutil

    truncated = tmp_path / "trunc"
    shutil.copytree(quick_delta[0], truncated)
    f = truncated / "delta.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    subs = {
        "{empty}": str(_csv(tmp_path / "empty.csv", "text,label,source\n")),
        "{nocols}": str(_csv(tmp_path / "nocols.csv", "text\nhello\n")),
        "{delta}": str(quick_delta[0]),
        "{out}": str(tmp_path / "out"),
        "{truncated}": str(truncated),
    }
    args = [subs.get(a, a) for a in args]
    if args[0] == "demo":
        args += ["--out", str(tmp_path / "never")]
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err + out
    assert not (tmp_path / "never").exists() and not (tmp_path / "out").exists()


def test_demo_refuses_to_overwrite_a_non_delta_directory(tmp_path, monkeypatch, capsys):
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    code, _, err = run_main(monkeypatch, capsys, "demo", "--quick", "--out", str(keep))
    assert code == 2 and "is not a delta directory" in err
    assert (keep / "notes.txt").read_text() == "mine"


def test_error_from_a_real_process_has_no_traceback(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "surgical", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stderr.strip().startswith("error:")
