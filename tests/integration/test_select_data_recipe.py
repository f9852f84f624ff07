"""The select-data recipe end to end on tiny models saved to disk, and the data_selection section
helpers a training run uses."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from rich.console import Console

from surgical import SurgicalError
from surgical.data import DataSelection, data_hash
from surgical.recipes.config import DataConfig, ModelConfig, load_config
from surgical.recipes.data import make_batches
from surgical.recipes.models import load_model
from surgical.recipes.select_data import (
    DataSelectionConfig,
    SelectDataConfig,
    TokenSelectionConfig,
    build_examples,
    run_select_data,
    selected_batches,
    token_filter,
)
from train_fixtures import save_tiny_model, write_cls_csv, write_instruct_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("select_data_recipe")
    return {
        "root": root,
        "bert": str(save_tiny_model(root / "bert", "bert")),
        "llama": str(save_tiny_model(root / "llama", "llama")),
        "cls": str(write_cls_csv(root / "cls.csv", n=20, seed=1)),
        "cls_other": str(write_cls_csv(root / "cls_other.csv", n=20, seed=2)),
        "ins": str(write_instruct_jsonl(root / "ins.jsonl", n=16, seed=3)),
        "ins_val": str(write_instruct_jsonl(root / "ins_val.jsonl", n=4, seed=4)),
    }


DATA = DataConfig(batch_size=4, max_length=24)


def _run(cfg, **kw):
    console = Console(record=True, width=200)
    sel = run_select_data(cfg, console, show=False, **kw)
    return sel, console.export_text()


@pytest.mark.parametrize("method", ["random", "loss", "diversity", "dedup"])
def test_classification_selection_writes_a_manifest_for_the_built_examples(world, tmp_path, method):
    cfg = SelectDataConfig(
        out=str(tmp_path / "sel"),
        model=ModelConfig(path=world["bert"]),
        data=dataclasses.replace(DATA, path=world["cls"]),
        method=method,
        fraction=0.5,
    )
    sel, text = _run(cfg)
    assert f"wrote selection {tmp_path / 'sel'}: {method}" in text and "cost:" in text
    back = DataSelection.load(tmp_path / "sel")
    assert torch.equal(back.indices, sel.indices) and back.meta["task"] == "classification"
    assert back.meta["config"]["method"] == method
    if method != "dedup":
        assert len(back) == 10
    _, tok = load_model(world["bert"], "classification")
    examples = build_examples(cfg.data, "classification", tok, num_labels=2)
    assert back.data_hash == data_hash(examples) and back.num_examples == 20


def test_trajectory_reports_its_clusters_and_keeps_them_in_the_manifest(world, tmp_path):
    cfg = SelectDataConfig(
        out=str(tmp_path / "sel"),
        model=ModelConfig(path=world["bert"]),
        data=dataclasses.replace(DATA, path=world["cls"]),
        method="trajectory",
        fraction=0.5,
        options={"steps": 4, "clusters": 3},
    )
    sel, text = _run(cfg)
    back = DataSelection.load(tmp_path / "sel")
    assert back.meta["cluster_sizes"] == sel.meta["cluster_sizes"] and sum(back.meta["cluster_sizes"]) == 20
    assert sum(back.meta["kept_by_cluster"]) == len(back) == 10
    sizes = zip(sel.meta["kept_by_cluster"], sel.meta["cluster_sizes"], strict=True)
    pairs = ", ".join(f"{k}/{n}" for k, n in sizes)
    assert f"{sel.meta['clusters']} loss-trajectory clusters, kept/size: {pairs}" in text


def test_summary_notes_a_kept_set_that_leans_on_rising_clusters():
    import io

    from rich.console import Console

    from surgical.recipes.select_data import print_summary

    meta = {
        "clusters": 2,
        "cluster_sizes": [90, 10],
        "kept_by_cluster": [20, 10],
        "cluster_mean_losses": [[0.69, 0.2], [0.69, 1.4]],
        "rising_clusters": [1],
    }
    sel = DataSelection(torch.arange(30), None, "trajectory", {}, "h", 100, meta)

    def text(sel) -> str:
        out = io.StringIO()
        print_summary(sel, [], None, Console(file=out, width=300), 0)
        return out.getvalue()

    # a third of the kept set (a tenth of the data) in the cluster whose loss rose: a note
    assert "note: 33% of the kept examples (10% of the data) are in clusters whose loss rose" in text(sel)
    sel.meta = {**meta, "kept_by_cluster": [29, 1]}  # 3%: below the note's threshold
    assert "note:" not in text(sel) and "2 loss-trajectory clusters, kept/size: 29/90, 1/10" in text(sel)


def test_summary_reports_importance_and_notes_a_kept_set_no_closer_to_the_target():
    import io

    from rich.console import Console

    from surgical.recipes.select_data import print_summary

    q = {"min": -90.0, "p10": -40.0, "median": -12.5, "p90": 1.5, "max": 12.0}
    meta = {"log_weights": q, "target_coverage": 0.987, "kl_to_target": {"pool": 0.18, "kept": 0.13}}
    sel = DataSelection(torch.arange(5), torch.zeros(10), "importance", {}, "h", 10, meta)

    def text(sel) -> str:
        out = io.StringIO()
        print_summary(sel, [], None, Console(file=out, width=300), 0)
        return out.getvalue()

    got = text(sel)
    assert (
        "log importance weights: median -12.5 (10-90%: -40 to 1.5); target n-grams found in the pool: 99%"
        in got
    )
    assert "n-gram KL to the target: pool 0.180, kept 0.130 nats" in got and "note:" not in got
    sel.meta = {**meta, "kl_to_target": {"pool": 0.18, "kept": 0.18}}
    assert "note: the kept examples look no more like the target than the whole pool" in text(sel)


def test_gradient_on_a_plan_support_with_validation(world, tmp_path):
    from surgical import select

    model, _ = load_model(world["llama"], "causal_lm")
    plan = select(model, method="magnitude", density=0.05, always=["model.norm.weight"], progress=False)
    plan.save(tmp_path / "plan")
    cfg = SelectDataConfig(
        out=str(tmp_path / "sel"),
        model=ModelConfig(path=world["llama"]),
        data=dataclasses.replace(DATA, path=world["ins"]),
        method="gradient",
        count=5,
        validation=world["ins_val"],
        plan=str(tmp_path / "plan"),
        options={"dim": 64},
    )
    sel, text = _run(cfg)
    assert len(sel) == 5 and sel.scores is not None and "score" in text
    assert sel.meta["features"] == plan.num_entries + plan.num_dense and sel.meta["validation_examples"] == 4
    assert json.loads((tmp_path / "sel" / "selection.json").read_text())["options"] == {
        "dim": 64,
        "projection": "rademacher",
        "precondition": "none",
        "warmup_steps": 20,
        "warmup_lr": 1e-4,
        "eps": 1e-8,
    }


def test_yaml_config_and_bad_configs(world, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        f"model: {{path: {world['bert']}}}\ndata: {{path: {world['cls']}, batch_size: 4, max_length: 24}}\n"
        f"method: loss\ncount: 3\noptions: {{keep: low}}\nout: {tmp_path / 'sel'}\n"
    )
    sel, _ = _run(load_config(SelectDataConfig, cfg_file))
    assert len(sel) == 3 and sel.options == {"keep": "low"}
    base = {"model.path": world["bert"], "data.path": world["cls"], "out": str(tmp_path / "x")}
    for overrides, message in [
        ({"fraction": 0}, r"config key 'fraction' must be in \(0, 1\]"),
        ({"fraction": 1.5}, r"config key 'fraction' must be in \(0, 1\]"),
        ({"method": "nope"}, "unknown data criterion 'nope'"),
        ({"method": "loss", "options": {"keep": "middle"}}, "options.keep must be one of high, low"),
        ({"method": "loss", "options": {"nope": 1}}, r"unknown option\(s\) nope"),
        ({"method": "gradient"}, "needs the validation data"),
        ({"method": "importance"}, "needs the validation data"),
        ({"validation": world["cls"]}, "validation is used only by methods gradient, importance"),
        ({"plan": "p"}, "plan is used only by method gradient"),
        ({"fraction": None}, "fraction and count are both unset"),
        ({"count": 21}, "count 21 exceeds the 20 examples"),
        ({"model.path": ""}, "needs a model and data"),
        ({"method": "dedup", "stratify": True}, "stratify does not apply to 'dedup'"),
    ]:
        with pytest.raises(SurgicalError, match=message) as e:
            _run(load_config(SelectDataConfig, None, {**base, **overrides}))
        assert "\n" not in str(e.value)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f.txt").write_text("x")
    with pytest.raises(SurgicalError, match="exists and is not a selection directory"):
        _run(load_config(SelectDataConfig, None, {**base, "out": str(tmp_path / "busy")}))


def test_training_batches_follow_the_selection_or_refuse_other_data(world, tmp_path):
    model, tok = load_model(world["bert"], "classification")
    data = dataclasses.replace(DATA, path=world["cls"])
    all_batches, none = selected_batches(
        DataSelectionConfig(), model, tok, data, "classification", num_labels=2
    )
    assert none is None and sum(len(b["labels"]) for b in all_batches) == 20
    section = DataSelectionConfig(method="loss", count=6, options={"keep": "high"})
    batches, sel = selected_batches(section, model, tok, data, "classification", num_labels=2, show=False)
    assert [len(b["labels"]) for b in batches] == [4, 2]
    examples = build_examples(data, "classification", tok, num_labels=2)
    want = torch.stack([examples[i]["labels"] for i in sel.indices])
    assert torch.equal(torch.cat([b["labels"] for b in batches]), want)
    sel.save(tmp_path / "sel")
    again, loaded = selected_batches(
        DataSelectionConfig(manifest=str(tmp_path / "sel")), model, tok, data, "classification", num_labels=2
    )
    assert torch.equal(loaded.indices, sel.indices)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, batches, strict=True))
    other = dataclasses.replace(data, path=world["cls_other"])
    manifest = DataSelectionConfig(manifest=str(tmp_path / "sel"))
    with pytest.raises(SurgicalError, match="the selection was made for other data"):
        selected_batches(manifest, model, tok, other, "classification", num_labels=2)
    with pytest.raises(SurgicalError, match="does not work with data.packing"):
        selected_batches(manifest, model, tok, dataclasses.replace(data, packing=True), "classification")


def test_token_selection_section_masks_each_step(world):
    model, tok = load_model(world["llama"], "causal_lm")
    batch = make_batches(dataclasses.replace(DATA, path=world["ins"]), "causal_lm", tok)[0]
    assert token_filter(TokenSelectionConfig()) is None
    section = TokenSelectionConfig(method="random", fraction=0.5)
    section.check("causal_lm")
    apply = token_filter(section, seed=1)
    a, b = apply(model, batch, 0), apply(model, batch, 1)
    assert torch.equal(a["input_ids"], batch["input_ids"]) and not torch.equal(a["labels"], b["labels"])
    assert ((a["labels"] == -100) | (a["labels"] == batch["labels"])).all()
    assert not ((a["labels"] != -100) & (batch["labels"] == -100)).any()
    reference, _ = load_model(world["llama"], "causal_lm")
    excess = token_filter(TokenSelectionConfig(method="excess_loss"), reference=reference)(model, batch, 0)
    assert (excess["labels"] != -100).sum() < (batch["labels"] != -100).sum()
    with pytest.raises(SurgicalError, match="needs a causal LM"):
        section.check("classification")
    with pytest.raises(SurgicalError, match=r"unknown option\(s\) nope"):
        TokenSelectionConfig(method="random", options={"nope": 1}).check("causal_lm")


def test_the_command_line_writes_the_same_manifest(world, tmp_path, monkeypatch, capsys):
    from conftest import run_main

    code, out, err = run_main(
        monkeypatch,
        capsys,
        "select-data",
        str(world["bert"]),
        "--data",
        str(world["cls"]),
        "--out",
        str(tmp_path / "sel"),
        "--method",
        "loss",
        "--option",
        "keep=high",
        "--fraction",
        "0.25",
        "--set",
        "data.max_length=16",
    )
    assert code == 0, err
    sel = DataSelection.load(tmp_path / "sel")
    assert sel.method == "loss" and sel.options["keep"] == "high"
    assert len(sel.indices) == round(0.25 * sel.num_examples)
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "select-data",
        str(world["bert"]),
        "--data",
        str(world["cls"]),
        "--out",
        str(tmp_path / "x"),
        "--fraction",
        "1.5",
    )
    assert code == 2 and "fraction" in err and "Traceback" not in err


def test_stratified_selection_from_the_config_and_the_training_section(world, tmp_path):
    """stratify: the class shares of the data are kept (within one example per class)."""
    cfg = SelectDataConfig(
        out=str(tmp_path / "sel"),
        model=ModelConfig(path=world["bert"]),
        data=dataclasses.replace(DATA, path=world["cls"]),
        method="loss",
        fraction=0.5,
        stratify=True,
    )
    sel, _ = _run(cfg)
    _, tok = load_model(world["bert"], "classification")
    examples = build_examples(cfg.data, "classification", tok, num_labels=2)
    labels = [int(e["labels"]) for e in examples]
    kept = [labels[i] for i in sel.indices.tolist()]
    assert len(sel) == 10 and sel.meta["stratify"] is True
    assert all(abs(kept.count(c) - labels.count(c) / 2) <= 1 for c in set(labels))
    model, tok = load_model(world["bert"], "classification")
    section = DataSelectionConfig(method="loss", fraction=0.5, stratify=True)
    data = dataclasses.replace(DATA, path=world["cls"])
    _, sel2 = selected_batches(section, model, tok, data, "classification", num_labels=2, show=False)
    assert torch.equal(sel2.indices, sel.indices)
    with pytest.raises(SurgicalError, match="one class label per example"):
        section = DataSelectionConfig(method="loss", fraction=0.5, stratify=True)
        llama, ltok = load_model(world["llama"], "causal_lm")
        selected_batches(
            section, llama, ltok, dataclasses.replace(DATA, path=world["ins"]), "causal_lm", show=False
        )


def test_importance_needs_only_the_tokenizer_and_prefers_the_validation_domain(world, tmp_path):
    import shutil

    tokens_only = tmp_path / "bert-tokens-only"  # the model directory without its weights
    shutil.copytree(world["bert"], tokens_only)
    for f in tokens_only.glob("*.safetensors"):
        f.unlink()
    pool = tmp_path / "pool.csv"  # half film sentences, half cooking ones; validation: film only
    film = ["the film was a great movie", "a dull film with a bad plot", "the actors in this movie shine"]
    food = ["add salt to the soup and stir", "bake the bread for an hour", "chop the onions and fry them"]
    rows = [(t + f" {i}", i % 2) for i in range(8) for t in film + food]
    pool.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    val = tmp_path / "val.csv"
    val.write_text("text,label\n" + "".join(f"{t} again,{i % 2}\n" for i, t in enumerate(film * 2)))
    cfg = SelectDataConfig(
        out=str(tmp_path / "sel"),
        model=ModelConfig(path=str(tokens_only)),
        data=dataclasses.replace(DATA, path=str(pool)),
        method="importance",
        options={"sample": False},
        validation=str(val),
        fraction=0.5,
    )
    sel, text = _run(cfg)
    assert "wrote selection" in text and sel.meta["validation_examples"] == 6
    kl = sel.meta["kl_to_target"]
    assert f"n-gram KL to the target: pool {kl['pool']:.3f}, kept {kl['kept']:.3f} nats" in text
    kept = [rows[i][0] for i in sel.indices.tolist()]
    assert all(any(k.startswith(f) for f in film) for k in kept)  # every kept row is a film one
    with pytest.raises(SurgicalError, match="cannot load a model"):  # a criterion with a model needs it
        _run(dataclasses.replace(cfg, out=str(tmp_path / "sel2"), method="loss", options={}, validation=None))
