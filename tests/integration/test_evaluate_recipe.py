"""The eval recipe end to end on tiny models saved to disk (with tokenizers, no downloads)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from rich.console import Console

from surgical import Delta, SurgicalError, apply
from surgical.eval import evaluate, forgetting
from surgical.recipes.config import DataConfig, ModelConfig, load_config
from surgical.recipes.data import make_batches
from surgical.recipes.evaluate import EvalConfig, run_evaluate
from surgical.recipes.models import load_model
from train_fixtures import save_tiny_model, write_cls_csv, write_instruct_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_recipe")
    llama = save_tiny_model(root / "llama", "llama")
    bert = save_tiny_model(root / "bert", "bert")
    base, _ = load_model(llama, "causal_lm")
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "mlp" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    Delta.from_models(base, tuned, density=0.2).save(root / "delta")
    return {
        "root": root,
        "llama": str(llama),
        "bert": str(bert),
        "delta": str(root / "delta"),
        "id": str(write_instruct_jsonl(root / "id.jsonl", n=12, seed=1)),
        "ood": str(write_instruct_jsonl(root / "ood.jsonl", n=10, seed=2)),
        "text": str(write_cls_csv(root / "text.csv", n=12, seed=3)),  # read as plain text by an LM
        "cls_id": str(write_cls_csv(root / "cls_id.csv", n=16, seed=4)),
        "cls_ood": str(write_cls_csv(root / "cls_ood.csv", n=8, seed=5)),
    }


DATA = DataConfig(batch_size=4, max_length=24)


def test_lm_with_delta_and_reference_writes_the_report(world, tmp_path):
    cfg = EvalConfig(
        out=str(tmp_path / "report"),
        model=ModelConfig(path=world["llama"]),
        delta=world["delta"],
        data=DATA,
        sets={"id": world["id"], "ood": world["ood"]},
        reference=world["text"],
    )
    console = Console(record=True, width=200)
    report = run_evaluate(cfg, console, show=False)
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    assert (tmp_path / "report" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert doc["results"] == report["results"]
    assert list(doc["results"]) == ["id", "ood", "reference"]
    assert doc["x"] == ["id", "answer_accuracy"] and doc["y"] == ["reference", "kl"]
    assert doc["meta"]["config"]["sets"] == {"id": world["id"], "ood": world["ood"]}
    assert doc["meta"]["task"] == "causal_lm" and "torch" in doc["meta"]["versions"]
    text = console.export_text()
    assert "reference" in text and "kl" in text and "wrote" in text
    assert "note: the delta replaces" not in text  # an LM delta replaces nothing: no caveat

    # the numbers are those of the library functions on base + delta (and the toggle)
    base, tok = load_model(world["llama"], "causal_lm")
    delta = Delta.load(world["delta"])
    sets = {
        n: make_batches(DataConfig(path=world[n], batch_size=4, max_length=24), "causal_lm", tok)
        for n in ("id", "ood")
    }
    ref = make_batches(DataConfig(path=world["text"], batch_size=4, max_length=24), "causal_lm", tok)
    fg = forgetting(base, ref, delta=delta, show=False)
    apply(base, delta)
    ev = evaluate(base, sets, show=False)
    assert report["results"]["id"] == pytest.approx(ev["id"])
    assert report["results"]["ood"] == pytest.approx(ev["ood"])
    assert report["results"]["reference"] == pytest.approx(fg)
    assert fg["kl"] > 0

    # a second run may replace the report in its own directory
    run_evaluate(cfg, Console(record=True), show=False)


def test_classifier_without_delta_plots_id_against_ood_from_yaml(world, tmp_path):
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "out": str(tmp_path / "cls"),
                "model": {"path": world["bert"]},
                "data": {"batch_size": 4},
                "sets": {"shifted": world["cls_ood"]},
            }
        )
    )
    cfg = load_config(EvalConfig, cfg_file, {"sets.id": world["cls_id"]})  # flags add sets by name
    report = run_evaluate(cfg, Console(record=True), show=False)
    assert list(report["results"]) == ["shifted", "id"]
    assert report["results"]["id"]["examples"] == 16
    assert report["x"] == ["id", "accuracy"] and report["y"] == ["shifted", "accuracy"]
    assert (tmp_path / "cls" / "report.png").is_file()


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"reference": "ref.csv"}, "needs a delta"),
        ({"sets": {}}, "no evaluation sets"),
        ({"data": DataConfig(path="x.csv")}, "not data.path"),
        ({"sets": {"id": 3}}, "must be a data path"),
        ({"model": ModelConfig()}, "model.path is not set"),
    ],
)
def test_bad_config_is_a_one_line_error_before_loading(change, needle, tmp_path):
    base = dict(
        out=str(tmp_path / "o"), model=ModelConfig(path=str(tmp_path / "missing")), sets={"id": "a.csv"}
    )
    with pytest.raises(SurgicalError) as e:
        run_evaluate(EvalConfig(**{**base, **change}), Console(record=True), show=False)
    assert "\n" not in str(e.value) and needle in str(e.value)
    assert not (tmp_path / "o").exists()


def test_bad_files_are_one_line_errors(world, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    cases = [
        (dict(out=str(busy)), "is not a report directory"),
        (dict(out=world["id"] + ".d", delta=str(tmp_path / "nodelta")), "does not exist"),
        (dict(model=ModelConfig(path=world["bert"]), delta=world["delta"]), "does not have"),
        (
            dict(model=ModelConfig(path=world["llama"]), out=world["llama"] + "/r"),
            "would overwrite the model",
        ),
    ]
    for change, needle in cases:
        kw = dict(
            out=str(tmp_path / "o"),
            model=ModelConfig(path=world["llama"]),
            data=DATA,
            sets={"id": world["id"]},
        )
        with pytest.raises(SurgicalError) as e:
            run_evaluate(EvalConfig(**{**kw, **change}), Console(record=True), show=False)
        assert "\n" not in str(e.value) and needle in str(e.value), (needle, str(e.value))
    assert (busy / "notes.txt").read_text() == "mine"
