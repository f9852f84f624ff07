"""`surgical train` on chat data: lazy batches, packing, and resume checks over them."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import run_main
from surgical.data.chat import chat_batches
from surgical.data.lazy import LazyBatches
from surgical.recipes.config import DataConfig
from surgical.recipes.data import make_batches
from train_fixtures import conversations, save_tiny_chat_model, tiny_chat_tokenizer, write_chat_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {"llama": save_tiny_chat_model(root / "llama"), "chat": write_chat_jsonl(root / "chat.jsonl", 24)}


def _config(tmp_path, files, **data) -> str:
    cfg = {
        "out": str(tmp_path / "run"),
        "model": {"path": str(files["llama"]), "task": "causal_lm"},
        "data": {"path": str(files["chat"]), "batch_size": 4, "max_length": 32, **data},
        "selection": {"method": "gradient", "density": 0.05},
        "training": {"max_steps": 4, "lr": 0.01, "checkpoint_every": 2},
    }
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.mark.parametrize("packing", [False, True])
def test_the_recipe_batches_are_lazy_and_equal_the_eager_ones(files, packing):
    d = DataConfig(path=str(files["chat"]), batch_size=4, max_length=20, packing=packing)
    lazy = make_batches(d, "causal_lm", tiny_chat_tokenizer())
    assert isinstance(lazy, LazyBatches)
    eager = chat_batches(tiny_chat_tokenizer(), conversations(24), 4, 20, packing=packing)
    assert len(lazy) == len(eager)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(lazy, eager, strict=True) for k in b)


def test_train_on_messages_with_packing_resumes_only_on_the_same_tokens(tmp_path, files, monkeypatch, capsys):
    cfg = _config(tmp_path, files, packing=True)
    code, out, err = run_main(monkeypatch, capsys, "train", "-c", cfg)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_loss"] is not None
    # the same data: the fingerprint of the lazy batches matches, nothing left to train
    code, out, err = run_main(monkeypatch, capsys, "train", "-c", cfg, "--resume")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumed_from"] == 4
    # one answer changed in the file: other tokens, refused by name
    convs = conversations(24)
    convs[5][2]["content"] = "fine"
    write_chat_jsonl(files["chat"].with_name("other.jsonl"), convs=convs)
    other = yaml.safe_load(open(cfg))
    other["data"]["path"] = str(files["chat"].with_name("other.jsonl"))
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(tmp_path / "other.yaml"), "--resume")
    err = " ".join(err.split())
    assert code == 2 and "batches was" in err and "data.path was" in err, err


def test_a_save_to_disk_dataset_stays_a_dataset_under_the_lazy_batches(tmp_path):
    import datasets

    from surgical.core.errors import SurgicalError
    from surgical.data.table import open_table

    rows = [{"messages": c, "extra": i} for i, c in enumerate(conversations(10))]
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows)).save_to_disk(str(tmp_path / "dd"))
    table = open_table(tmp_path / "dd", ["messages"], limit=9)
    assert isinstance(table, datasets.Dataset) and table.column_names == ["messages"] and len(table) == 9
    d = DataConfig(path=str(tmp_path / "dd"), batch_size=4, max_length=24, packing=True, limit=9)
    lazy = make_batches(d, "causal_lm", tiny_chat_tokenizer())
    assert isinstance(lazy.items, datasets.Dataset)  # rows read when a batch is asked for
    eager = chat_batches(tiny_chat_tokenizer(), conversations(9), 4, 24, packing=True)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(lazy, eager, strict=True) for k in b)
    with pytest.raises(SurgicalError, match="lacks column"):
        open_table(tmp_path / "dd", ["prompt"])
    with pytest.raises(SurgicalError, match="has no split 'test'"):
        open_table(tmp_path / "dd", ["messages"], split="test")
    with pytest.raises(SurgicalError, match="has no rows"):
        open_table(tmp_path / "dd", ["messages"], limit=0)


def test_plain_text_causal_lm_batches_are_tokenized_per_batch_as_before(tmp_path):
    from surgical.data.instruct import IGNORE_INDEX
    from surgical.data.lazy import BatchesOf
    from surgical.data.text import TextExamples, text_batches
    from train_fixtures import tiny_tokenizer, write_cls_csv

    path = write_cls_csv(tmp_path / "t.csv", n=11)
    lazy = make_batches(DataConfig(path=str(path), batch_size=4, max_length=6), "causal_lm", tiny_tokenizer())
    assert isinstance(lazy, BatchesOf) and len(lazy) == 3
    eager = text_batches(tiny_tokenizer(), TextExamples.load(path, "text", None), 4, 6)
    for a, b in zip(lazy, eager, strict=True):
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, IGNORE_INDEX)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], labels)
        assert "token_type_ids" not in a and torch.equal(a["attention_mask"], b["attention_mask"])
    assert torch.equal(lazy[-1]["input_ids"], eager[-1]["input_ids"])
