"""load_table and the example loaders over every source: CSV, JSON lines, Parquet, Arrow,
save_to_disk directories (Dataset and DatasetDict) and in-memory datasets objects."""

from __future__ import annotations

import glob
import json

import pytest

datasets = pytest.importorskip("datasets")

from surgical.core.errors import SurgicalError  # noqa: E402
from surgical.data import TextExamples, instruction_batches, load_instructions, load_table, text_batches  # noqa: E402
from train_fixtures import tiny_tokenizer  # noqa: E402

CLS = {"text": ["the movie was good", "the film was bad", "a fun plot"], "label": [1, 0, 1], "id": [7, 8, 9]}
INS = {"prompt": ["the film was", "the movie was"], "response": ["good fun", "very dull"]}


def _sources(tmp_path, columns: dict) -> dict:
    """The same table written in every accepted form."""
    ds = datasets.Dataset.from_dict(columns)
    ds.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict(train=ds, test=ds.select([0])).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "t.parquet"))
    with open(tmp_path / "t.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in ds.to_list())
    ds.to_csv(str(tmp_path / "t.csv"), index=False)
    return {
        "disk": tmp_path / "disk",
        "dict": str(tmp_path / "dict"),
        "parquet": tmp_path / "t.parquet",
        "arrow": glob.glob(str(tmp_path / "disk" / "*.arrow"))[0],
        "jsonl": tmp_path / "t.jsonl",
        "csv": tmp_path / "t.csv",
        "object": ds,
        "dict_object": datasets.DatasetDict(train=ds),
    }


def test_every_source_reads_the_same_classification_examples(tmp_path):
    for name, source in _sources(tmp_path, CLS).items():
        ex = TextExamples.load(source)
        assert ex.texts == CLS["text"] and ex.labels == CLS["label"], name
        assert len(TextExamples.load(source, limit=2)) == 2, name


def test_datasets_rows_hold_only_the_asked_columns(tmp_path):
    rows = load_table(_sources(tmp_path, CLS)["disk"], ["text"])
    assert rows == [{"text": t} for t in CLS["text"]]


def test_arrow_ipc_file_format_is_read_too(tmp_path):
    import pyarrow as pa

    table = datasets.Dataset.from_dict(CLS).data.table
    with pa.OSFile(str(tmp_path / "ipc.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    assert TextExamples.load(tmp_path / "ipc.arrow").labels == CLS["label"]


def test_dataset_dict_split_selection_and_missing_split(tmp_path):
    src = _sources(tmp_path, CLS)["dict"]
    assert len(TextExamples.load(src)) == 3 and len(TextExamples.load(src, split="test")) == 1
    with pytest.raises(SurgicalError, match=r"has no split 'validation' \(it has train, test\)"):
        TextExamples.load(src, split="validation")


def test_text_batches_accept_a_dataset():
    tok = tiny_tokenizer()
    ds = datasets.Dataset.from_dict({"sentence": CLS["text"], "y": CLS["label"]})
    (batch,) = text_batches(tok, ds, 4, 16, text_column="sentence", label_column="y")
    (ref,) = text_batches(tok, TextExamples(CLS["text"], CLS["label"]), 4, 16)
    assert all(batch[k].equal(ref[k]) for k in ref)


def test_causal_lm_instructions_from_saved_dataset(tmp_path):
    src = _sources(tmp_path, INS)
    for name in ("disk", "parquet", "object", "jsonl"):
        assert load_instructions(src[name]) == (INS["prompt"], INS["response"]), name
    tok = tiny_tokenizer()
    (batch,) = instruction_batches(tok, *load_instructions(src["dict"]), batch_size=2, max_length=32)
    assert batch["input_ids"].shape[0] == 2


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: "imdb", "data path 'imdb' does not exist. Pass a .csv, .jsonl/.json, .parquet or .arrow"),
        (lambda p: "", "data path '' does not exist"),
        (lambda p: p, "cannot read dataset directory"),  # a directory that is no dataset
        (lambda p: _save(p, {"text": [], "label": []}), "has no rows"),
        (lambda p: datasets.Dataset.from_dict({"text": [], "label": []}), "the dataset has no rows"),
        (lambda p: _save(p, {"sentence": ["a"], "label": [0]}), "lacks column(s) text (it has sentence, la"),
        (lambda p: _save(p, {"text": ["a"], "label": ["pos"]}), "column 'label' of dataset"),
        (lambda p: _write(p / "x.parquet", b"not parquet"), "cannot parse"),
        (lambda p: _write(p / "x.jsonl", b'{"text": "a", "label": 0}\n{"text": "b"}\n'), "row 2 of"),
        (lambda p: datasets.Dataset.from_dict({"text": ["a"]}), "the dataset lacks column(s) label"),
        (lambda p: {"text": ["a"]}, "cannot read data of type dict"),
    ],
)
def test_errors_are_one_line_and_name_the_problem(tmp_path, make, needle):
    with pytest.raises(SurgicalError) as info:
        TextExamples.load(make(tmp_path))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_loading_never_goes_online(tmp_path, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    sources = _sources(tmp_path, CLS)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for name, source in sources.items():
        assert len(TextExamples.load(source)) == 3, name


def _save(path, columns: dict):
    datasets.Dataset.from_dict(columns).save_to_disk(str(path / "ds"))
    return path / "ds"


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
