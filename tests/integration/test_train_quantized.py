"""``surgical train`` with ``model.quantization``: the base trains in int8, the delta applies to fp32."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import surgical as sg
from conftest import run_main
from train_fixtures import save_tiny_model, write_cls_csv, write_instruct_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {
        "bert": save_tiny_model(root / "bert", "bert"),
        "llama": save_tiny_model(root / "llama", "llama"),
        "csv": write_cls_csv(root / "cls.csv"),
        "jsonl": write_instruct_jsonl(root / "ins.jsonl"),
    }


def _config(tmp_path, files, quantization, **sections) -> str:
    cfg = {
        "out": str(tmp_path / "run"),
        "model": {"path": str(files["llama"]), "task": "causal_lm", "quantization": quantization},
        "data": {"path": str(files["jsonl"]), "batch_size": 4, "max_length": 16},
        "selection": {"method": "random", "density": 0.05},
        "training": {"max_steps": 6, "lr": 0.03},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_train_on_a_quantized_base_and_apply_to_the_full_precision_one(tmp_path, files, monkeypatch, capsys):
    pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")
    cfg = _config(tmp_path, files, {"backend": "torchao", "bits": 8})
    code, out, err = run_main(monkeypatch, capsys, "train", "-c", cfg)
    assert code == 0, err
    assert "quantized 14 Linear weights to int8 (torchao)" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["losses"][-1] < summary["losses"][0]
    assert summary["config"]["model"]["quantization"]["backend"] == "torchao"
    delta = sg.Delta.load(tmp_path / "run" / "delta")
    base = AutoModelForCausalLM.from_pretrained(str(files["llama"]))
    sg.apply(base, delta)  # the fingerprint check passes: the delta names the fp32 base
    assert delta.num_entries == sg.Plan.load(tmp_path / "run" / "plan").num_entries


def test_train_on_an_nf4_base_and_apply_to_the_full_precision_one(tmp_path, files, monkeypatch, capsys):
    pytest.importorskip("bitsandbytes", reason="the quant extra (bitsandbytes) is not installed")
    cfg = _config(tmp_path, files, {"backend": "bnb"})  # bits: the backend's own, 4
    code, out, err = run_main(monkeypatch, capsys, "train", "-c", cfg)
    assert code == 0, err
    # the tiny Llama is 32 wide: only the MLP down projections (64 in) are whole NF4 blocks
    assert "quantized 2 Linear weights to NF4 (bnb)" in out and "13 kept in full precision" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["losses"][-1] < summary["losses"][0]
    delta = sg.Delta.load(tmp_path / "run" / "delta")
    sg.apply(AutoModelForCausalLM.from_pretrained(str(files["llama"])), delta)  # names the fp32 base


def test_densely_trained_heads_stay_in_full_precision(tmp_path, files, monkeypatch, capsys):
    pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")
    cfg = _config(
        tmp_path, files, {"backend": "torchao", "exclude": ["pooler"]},
        model={"path": str(files["bert"]), "task": "classification"},
        data={"path": str(files["csv"]), "batch_size": 8},
        selection={"method": "gradient", "always": ["classifier"]},
    )  # fmt: skip
    code, out, err = run_main(monkeypatch, capsys, "train", "-c", cfg)
    assert code == 0, err
    delta = sg.Delta.load(tmp_path / "run" / "delta")
    assert set(delta.full) == {"classifier.weight", "classifier.bias"}
    base = AutoModelForSequenceClassification.from_pretrained(str(files["bert"]), num_labels=2)
    sg.apply(base, delta)


@pytest.mark.parametrize(
    ("quantization", "sections", "needle"),
    [
        ({"backend": "torchao"}, {}, "quantization backend 'torchao' is not installed"),
        (
            {"backend": "gptq"},
            {},
            "config key 'model.quantization.backend' must be one of none, torchao, bnb",
        ),
        ({"backend": "bnb"}, {}, "quantization backend 'bnb' is not installed"),
        ({"backend": "bnb", "bits": 8}, {}, "backend 'bnb' quantizes to 4 bits here, not 8. Use bits: 4"),
        ({"backend": "torchao", "bits": 2}, {}, "backend 'torchao' quantizes to 8, 4 bits here, not 2"),
    ],
)
def test_bad_quantization_settings_are_one_line_exit_2(
    tmp_path, files, monkeypatch, capsys, quantization, sections, needle
):
    module = {"torchao": "torchao.quantization", "bnb": "bitsandbytes"}.get(quantization["backend"])
    if "not installed" in needle:
        monkeypatch.setitem(sys.modules, module, None)  # as if the backend were absent
    elif module is not None:
        pytest.importorskip(module, reason="the quant extra is not installed")
    cfg = _config(tmp_path, files, quantization, **sections)
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", cfg)
    assert code == 2 and needle in " ".join(err.split()), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_rows_on_a_quantized_weight_are_refused_in_one_line(tmp_path, files, monkeypatch, capsys):
    pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")
    cfg = _config(tmp_path, files, {"backend": "torchao"}, selection={"granularity": "row"})
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", cfg)
    assert code == 2 and "cannot train on a quantized weight" in " ".join(err.split()), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
