"""The demo's comparison with full fine-tuning and LoRA: recorded numbers are shown only for the
split they were measured on, labelled with their date, and backed by the committed JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.console import Console

from surgical.recipes import demo
from surgical.recipes.demo import BASELINES, SPLIT_KEYS, DemoConfig, recorded_baselines

REPO = Path(__file__).resolve().parents[3]


def _fake_reference(tmp_path, monkeypatch, **config) -> Path:
    ref = tmp_path / "ref.json"
    baselines = {
        name: {
            "validation_accuracy": 0.75,
            "id_accuracy": 0.8,
            "ood_accuracy": 0.7,
            "trainable": 10,
            "lr": 1e-4,
        }
        for name in BASELINES
    }
    cfg = {**dataclasses.asdict(DemoConfig()), **config}
    ref.write_text(
        json.dumps(
            {
                "date": "2026-11-30T01:00:00",
                "command": "surgical demo --compare",
                "config": cfg,
                "baselines": baselines,
            }
        )
    )
    monkeypatch.setattr(demo, "REFERENCE", ref)
    return ref


def test_recorded_only_for_the_same_split(tmp_path, monkeypatch):
    _fake_reference(tmp_path, monkeypatch)
    assert recorded_baselines(DemoConfig()) is not None
    # the surgical row's own settings do not change the baselines
    assert recorded_baselines(DemoConfig(method="fisher", density=0.01, lr=1e-2)) is not None
    for key, value in (("seed", 1), ("held_out", 500), ("train_size", 100), ("epochs", 2), ("validation", 9)):
        assert key in SPLIT_KEYS
        assert recorded_baselines(DemoConfig(**{key: value})) is None, key
    _fake_reference(tmp_path, monkeypatch, seed=3)
    assert recorded_baselines(DemoConfig()) is None


def test_comparison_table_is_labelled(tmp_path, monkeypatch):
    _fake_reference(tmp_path, monkeypatch)
    r = {"validation_accuracy": 0.8, "id_accuracy": 0.81, "ood_accuracy": 0.79, "trainable": 5}
    console = Console(record=True, width=200)
    demo._print_comparison(console, r, DemoConfig())
    text = console.export_text()
    assert "recorded 2026-11-30 by benchmarks/quality.py, seed 0" in text
    assert all(name in text for name in BASELINES) and "81.0%" in text and "80.0%" in text
    measured = {name: {**r, "id_accuracy": 0.5, "lr": 1e-4} for name in BASELINES}
    console = Console(record=True, width=200)
    demo._print_comparison(console, {**r, "baselines": measured}, DemoConfig(seed=7))
    text = console.export_text()
    assert "measured now" in text and "recorded" not in text and "50.0%" in text
    console = Console(record=True, width=200)
    demo._print_comparison(console, r, DemoConfig(seed=7))
    assert "--compare" in console.export_text() and "recorded" not in console.export_text()


def test_the_demo_split_is_the_quality_benchmarks():
    """The recorded baselines are the quality benchmark's seed-0 runs: same split, same sentences."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    train, val, test, ood = quality.split(quick=False)
    mine = demo.demo_split(demo.default_data_path(), DemoConfig())
    for theirs, ours in zip((train, val, test, ood), mine, strict=True):
        assert theirs.texts == ours.texts and theirs.labels == ours.labels


def test_packaged_reference_is_the_quality_benchmarks():
    """What the demo prints as recorded comes from benchmarks/results/quality.json (render.py
    --check keeps the file in step), and the demo's defaults are that benchmark's recipe row."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    ref = json.loads(demo.REFERENCE.read_text())
    report = json.loads((REPO / "benchmarks" / "results" / "quality.json").read_text())
    assert ref["date"] == report["date"] and set(ref["baselines"]) == set(BASELINES)
    assert recorded_baselines(DemoConfig()) == ref  # shown for the defaults
    for name, spec in BASELINES.items():
        assert spec["lr"] == report["results"][spec["row"]]["lr"] == ref["baselines"][name]["lr"]
    recipe = quality.row_specs()[demo.RECIPE_ROW]
    cfg = DemoConfig()
    assert (cfg.method, cfg.density) == (recipe["method"], recipe["density"])
    assert cfg.lr == report["results"][demo.RECIPE_ROW]["lr"]  # chosen on validation
    assert list(cfg.always) == quality.ALWAYS and list(cfg.targets) == [quality.LAYER_LINEARS]
    # the recipe is the surgical row best on validation among those within 1% of the encoder
    rows = report["results"]
    budget = 0.01 * rows["full"]["summary"]["trainable"]["mean"]
    mine = {
        n: r["summary"]["validation"]["mean"]
        for n, r in rows.items()
        if n.startswith("surgical-") and r["summary"]["trainable"]["mean"] <= budget
    }
    assert demo.RECIPE_ROW == max(mine, key=mine.get)
