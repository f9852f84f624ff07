"""The run config: strict YAML loading, overrides, types, help strings."""

from __future__ import annotations

import dataclasses

import pytest

from surgical.core.errors import SurgicalError
from surgical.recipes.config import help_text, parse_override
from surgical.recipes.config import load_config as _load_config
from surgical.recipes.train import RunConfig


def load_config(path, overrides=None):
    return _load_config(RunConfig, path, overrides)


def _write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = _write(
        tmp_path,
        "out: r\nmodel: {path: m, task: causal_lm}\nselection: {density: 0.02, always: classifier}\n"
        "training: {lr: 1e-3, max_steps: 5}\n",
    )
    cfg = load_config(p, dict([parse_override("training.lr=3e-4"), parse_override("data.batch_size=4")]))
    assert cfg.model.task == "causal_lm" and cfg.selection.density == 0.02
    assert cfg.selection.always == ("classifier",)  # a single string becomes a one-item list
    assert cfg.training.lr == 3e-4 and cfg.training.max_steps == 5 and cfg.data.batch_size == 4
    assert isinstance(cfg.training.lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.lr = 1.0  # type: ignore[misc]
    assert load_config(None).to_dict() == RunConfig().to_dict()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("training: {lrr: 0.1}\n", "unknown config key 'training.lrr'"),
        ("modle: {path: x}\n", "unknown config key 'modle'"),
        ("training: {max_steps: many}\n", "'training.max_steps' must be an integer"),
        ("training: {bf16: 3}\n", "'training.bf16' must be true or false"),
        ("training: 5\n", "section 'training' must be a mapping"),
        ("model:\n  path: [unclosed\n", "is not valid YAML at line"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, needle):
    with pytest.raises(SurgicalError, match=None) as e:
        load_config(_write(tmp_path, text))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(SurgicalError, match="unknown config key 'training.nope'"):
        load_config(None, {"training.nope": 1})
    with pytest.raises(SurgicalError, match="not KEY=VALUE"):
        parse_override("training.lr")
    with pytest.raises(SurgicalError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_has_help():
    lines = help_text(RunConfig)
    assert len(lines) >= 30
    assert all(line.split(": ", 1)[1].strip() for line in lines)
    assert "training.checkpoint_every: Checkpoint every N steps (0: only at the end)." in lines
