"""`surgical select` and `surgical inspect PLAN` end to end on tiny models saved to disk."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import surgical as sg
from conftest import run_main
from surgical.recipes.demo import default_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _with_tokenizer(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    for f in TOKENIZER_FILES:  # the packaged MiniLM tokenizer (vocab 30522) fits both tiny models
        if (default_model_path() / f).is_file():
            shutil.copy(default_model_path() / f, path / f)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("select_cli")
    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=2,
        )
    )
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=30522,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    data = root / "data.csv"
    rows = ["text,label"] + [
        f"{'a fine film' if i % 2 else 'a dull mess'} number {i},{i % 2}" for i in range(40)
    ]
    data.write_text("\n".join(rows) + "\n")
    return {
        "bert": _with_tokenizer(bert, root / "bert"),
        "llama": _with_tokenizer(llama, root / "llama"),
        "data": data,
        "root": root,
    }


def _is_png(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])  # width, height


def test_select_classification_writes_plan_table_and_heatmap(dirs, monkeypatch, capsys):
    out = dirs["root"] / "plan_cls"
    code, stdout, err = run_main(
        monkeypatch, capsys, "select", str(dirs["bert"]), "--data", str(dirs["data"]), "--out", str(out),
        "--method", "fisher", "--density", "0.1", "--always", "classifier", "--max-batches", "2",
        "--batch-size", "8", "--allocation", "per_layer", "--option", "labels=sampled",
    )  # fmt: skip
    assert code == 0, err
    plan = sg.Plan.load(out)
    assert plan.meta["task"] == "classification" and plan.meta["options"] == {"labels": "sampled"}
    assert plan.num_entries == round(0.1 * plan.meta["targeted"]) and plan.meta["calibration_batches"] == 2
    assert plan.dense == ["classifier.weight", "classifier.bias"]
    assert "layer total" in stdout and "query" in stdout and "always dense: 66 in 2 tensors" in stdout
    w, h = _is_png(out / "selection.png")
    assert w > 400 and h > 200


def test_select_causal_lm_heads(dirs, monkeypatch, capsys):
    out = dirs["root"] / "plan_lm"
    code, stdout, err = run_main(
        monkeypatch, capsys, "select", str(dirs["llama"]), "--data", str(dirs["data"]), "--out", str(out),
        "--granularity", "head", "--count", "1024", "--max-batches", "2", "--batch-size", "4",
    )  # fmt: skip
    assert code == 0, err
    plan = sg.Plan.load(out)
    assert plan.meta["task"] == "causal_lm" and plan.meta["granularity"] == "head"
    assert plan.meta["selected"] == 1024 and (plan.rows or plan.cols) and not plan.entries
    assert "q_proj" in stdout and "o_proj" in stdout


def test_select_reads_a_dataset_dict_split(dirs, tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    rows = {"text": [f"a {'fine' if i % 2 else 'dull'} film {i}" for i in range(16)], "label": [0, 1] * 8}
    ds = datasets.Dataset.from_dict(rows)
    datasets.DatasetDict(calib=ds).save_to_disk(str(tmp_path / "ds"))
    common = ["select", str(dirs["bert"]), "--data", str(tmp_path / "ds"), "--density", "0.1",
              "--max-batches", "2", "--batch-size", "8"]  # fmt: skip
    code, _, err = run_main(monkeypatch, capsys, *common, "--split", "calib", "--out", str(tmp_path / "p"))
    assert code == 0, err
    assert sg.Plan.load(tmp_path / "p").meta["calibration_batches"] == 2
    code, _, err = run_main(monkeypatch, capsys, *common, "--out", str(tmp_path / "q"))
    assert code == 2 and "has no split 'train' (it has calib)" in " ".join(err.split())


def test_inspect_known_plan_prints_shares_and_writes_png(tmp_path, monkeypatch, capsys):
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": [8, 4],
        "model.layers.0.mlp.up_proj.weight": [4, 4],
        "model.layers.1.self_attn.q_proj.weight": [8, 4],
        "model.layers.1.mlp.up_proj.weight": [4, 4],
    }
    plan = sg.Plan(
        entries={"model.layers.0.self_attn.q_proj.weight": torch.arange(8)},  # 8 of 32 = 25%
        rows={"model.layers.1.mlp.up_proj.weight": torch.tensor([0, 1, 2])},  # 12 of 16 = 75%
        dense=["model.layers.1.self_attn.q_proj.weight", "lm_head.weight"],  # 100%; lm_head: always
        shapes={**{n: tuple(s) for n, s in shapes.items()}, "lm_head.weight": (10, 4)},
        meta={"method": "magnitude", "selected": 52, "targeted": 96, "budget": 52, "targeted_shapes": shapes},
    )
    plan.save(tmp_path / "p")
    code, out, err = run_main(
        monkeypatch, capsys, "inspect", str(tmp_path / "p"), "--png", str(tmp_path / "h.png")
    )
    assert code == 0, err
    lines = {ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("│")}
    assert "25.00%" in lines["0"] and "0.00%" in lines["0"] and "16.67%" in lines["0"]  # 8 of 48
    assert "100.00%" in lines["1"] and "75.00%" in lines["1"] and "91.67%" in lines["1"]  # 44 of 48
    assert "always dense: 40 in 1 tensors" in out
    _is_png(tmp_path / "h.png")


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--method", "psychic", "--density", "0.1"],
            "unknown selection criterion 'psychic'. Use one of: fim_layer",
        ),
        (["--count", "99999999"], "exceeds the"),
        (["--density", "0.1", "--max-batches", "0"], "selection.max_batches' must be >= 1"),
        (["--density", "0.1", "--option", "nonsense"], "is not key=value"),
        (
            ["--density", "0.1", "--option", "rank=2"],
            "unknown option(s) rank for selection criterion 'gradient'",
        ),
        (
            ["--density", "0.1", "--granularity", "blob"],
            "'selection.granularity' must be one of entry, row, column, head, tensor, layer, channel, "
            "expert, got 'blob'",
        ),
        (["--density", "0.1", "--data", "{missing}"], "does not exist"),
        (["--density", "0.1", "--out", "{notplan}"], "exists and is not a plan directory"),
    ],
)
def test_select_bad_input_is_one_line(dirs, tmp_path, monkeypatch, capsys, extra, message):
    (tmp_path / "notplan").mkdir()  # a directory of other files (an empty one would be fine)
    (tmp_path / "notplan" / "notes.txt").write_text("keep")
    subs = {"{missing}": str(tmp_path / "missing.csv"), "{notplan}": str(tmp_path / "notplan")}
    args = [
        "select",
        str(dirs["bert"]),
        "--data",
        str(dirs["data"]),
        "--out",
        str(tmp_path / "p"),
        "--max-batches",
        "1",
    ]
    code, out, err = run_main(monkeypatch, capsys, *args, *[subs.get(a, a) for a in extra])
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err + out and not (tmp_path / "p").exists()
