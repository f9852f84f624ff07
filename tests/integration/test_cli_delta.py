"""Delta commands end to end on tiny saved models: inspect --png, apply, export, diff, import-lora."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgical as sg
from conftest import cls_batches, run_main, tiny_bert


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base model directory and a trained delta directory for it."""
    root = tmp_path_factory.mktemp("cli")
    tiny_bert().save_pretrained(root / "base")
    model = tiny_bert()
    batches = cls_batches()
    plan = sg.select(model, batches, method="gradient", density=0.05, always=["classifier"], progress=False)
    sg.prepare(model, plan)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for b in batches:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    sg.extract(model).save(root / "delta")
    return root


def _logits(model):
    b = cls_batches(1)[0]
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def test_inspect_writes_a_png(saved, tmp_path, monkeypatch, capsys):
    code, out, err = run_main(
        monkeypatch, capsys, "inspect", str(saved / "delta"), "--png", str(tmp_path / "p.png")
    )
    assert code == 0, err
    assert "bytes per value" in out and "classifier.weight" in out and "entries" in out
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_apply_writes_a_model_that_loads_without_surgical(saved, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(
        monkeypatch, capsys, "apply", str(saved / "base"), str(saved / "delta"), "--out", str(tmp_path / "m")
    )
    assert code == 0, err
    script = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'm')!r})\n"
        "assert not any(k.startswith('surgical') for k in sys.modules)\n"
        f"torch.save(m.state_dict(), {str(tmp_path / 'sd.pt')!r})\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    want = sg.apply(tiny_bert(), sg.Delta.load(saved / "delta")).state_dict()
    got = torch.load(tmp_path / "sd.pt")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_apply_with_scales_and_wrong_count(saved, tmp_path, monkeypatch, capsys):
    d = str(saved / "delta")
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "apply",
        str(saved / "base"),
        d,
        "--out",
        str(tmp_path / "x"),
        "--scale",
        "0.5",
        "--scale",
        "1",
    )
    assert code == 2 and "--scale" in err and not (tmp_path / "x").exists()


def test_apply_to_the_wrong_base_names_both(saved, tmp_path, monkeypatch, capsys):
    tiny_bert(seed=9).save_pretrained(tmp_path / "other")
    args = ["apply", str(tmp_path / "other"), str(saved / "delta"), "--out", str(tmp_path / "m")]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and err.count("fingerprint") == 2 and "--force" in err
    code, _, err = run_main(monkeypatch, capsys, *args, "--force")
    assert code == 0, err


def test_export_peft_shira(saved, tmp_path, monkeypatch, capsys):
    peft = pytest.importorskip("peft")
    code, out, err = run_main(
        monkeypatch,
        capsys,
        "export",
        str(saved / "delta"),
        "--to",
        "peft-shira",
        "--base",
        str(saved / "base"),
        "--out",
        str(tmp_path / "a"),
    )
    assert code == 0, err
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "a")).eval()
    ours = sg.apply(tiny_bert(), sg.Delta.load(saved / "delta"))
    torch.testing.assert_close(_logits(loaded), _logits(ours), atol=1e-5, rtol=1e-5)


def test_diff_then_apply_reproduces(saved, tmp_path, monkeypatch, capsys):
    sg.apply(tiny_bert(), sg.Delta.load(saved / "delta")).save_pretrained(tmp_path / "ft")
    code, _, err = run_main(
        monkeypatch, capsys, "diff", str(saved / "base"), str(tmp_path / "ft"), "--out", str(tmp_path / "d")
    )
    assert code == 0, err
    d = sg.Delta.load(tmp_path / "d")
    want = _logits(sg.apply(tiny_bert(), sg.Delta.load(saved / "delta")))
    torch.testing.assert_close(_logits(sg.apply(tiny_bert(), d)), want, atol=1e-6, rtol=1e-6)  # to rounding


def test_import_lora(saved, tmp_path, monkeypatch, capsys):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False)
    pm = peft.get_peft_model(tiny_bert(), cfg)
    pm.save_pretrained(str(tmp_path / "lora"))
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "import-lora",
        str(tmp_path / "lora"),
        "--base",
        str(saved / "base"),
        "--out",
        str(tmp_path / "d"),
    )
    assert code == 0, err
    ours = sg.apply(tiny_bert(), sg.Delta.load(tmp_path / "d"))
    torch.testing.assert_close(_logits(ours), _logits(pm.merge_and_unload()), atol=1e-5, rtol=1e-5)


def test_unknown_export_format(saved, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "export",
        str(saved / "delta"),
        "--to",
        "onnx",
        "--base",
        str(saved / "base"),
        "--out",
        str(tmp_path / "a"),
    )
    assert code == 2 and "peft-shira" in err and not Path(tmp_path / "a").exists()


def test_apply_says_when_one_delta_is_given_twice(saved, tmp_path, monkeypatch, capsys):
    d = str(saved / "delta")
    code, out, err = run_main(
        monkeypatch, capsys, "apply", str(saved / "base"), d, d, "--out", str(tmp_path / "m")
    )
    assert code == 0, err
    assert "note: delta 2 (" in out and "is the same as delta 1: its change is added twice" in " ".join(
        out.split()
    )
    assert "Warning" not in err  # said once, in the command's words
