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
        name: {"id_accuracy": 0.8, "ood_accuracy": 0.7, "trainable": 10, "seconds_per_step": 1.0}
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
    for key, value in (("seed", 1), ("held_out", 500), ("train_size", 100), ("epochs", 2)):
        assert key in SPLIT_KEYS
        assert recorded_baselines(DemoConfig(**{key: value})) is None, key
    _fake_reference(tmp_path, monkeypatch, seed=3)
    assert recorded_baselines(DemoConfig()) is None


def test_comparison_table_is_labelled(tmp_path, monkeypatch):
    _fake_reference(tmp_path, monkeypatch)
    r = {"id_accuracy": 0.81, "ood_accuracy": 0.79, "trainable": 5, "seconds_per_step": 0.5}
    console = Console(record=True, width=200)
    demo._print_comparison(console, r, DemoConfig())
    text = console.export_text()
    assert "recorded 2026-11-30" in text and "surgical demo --compare" in text
    assert all(name in text for name in BASELINES) and "81.0%" in text and "80.0%" in text
    measured = {name: {**r, "id_accuracy": 0.5} for name in BASELINES}
    console = Console(record=True, width=200)
    demo._print_comparison(console, {**r, "baselines": measured}, DemoConfig(seed=7))
    text = console.export_text()
    assert "measured now" in text and "recorded" not in text and "50.0%" in text
    console = Console(record=True, width=200)
    demo._print_comparison(console, r, DemoConfig(seed=7))
    assert "--compare" in console.export_text() and "recorded" not in console.export_text()

