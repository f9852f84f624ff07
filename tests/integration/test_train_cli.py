"""`surgical train` end to end on tiny on-disk models: outputs, bad input, kill -9 and resume."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import surgical as sg
from conftest import run_main
from surgical.recipes.models import load_model
from surgical.train.checkpoint import latest_checkpoint
from train_fixtures import save_tiny_model, write_cls_csv, write_cls_dataset_dict, write_instruct_jsonl

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, COLUMNS="120", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "bert": save_tiny_model(root / "bert", "bert"),
        "llama": save_tiny_model(root / "llama", "llama"),
        "csv": write_cls_csv(root / "cls.csv"),
        "jsonl": write_instruct_jsonl(root / "ins.jsonl"),
    }


def _config(tmp_path, files, **sections) -> Path:
    cfg = {
        "out": str(tmp_path / "run"),
        "model": {"path": str(files["bert"])},
        "data": {"path": str(files["csv"]), "batch_size": 8, "max_length": 16},
        "selection": {"method": "gradient", "density": 0.05, "always": ["classifier"]},
        "training": {"max_steps": 6, "lr": 0.01},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_train_classification_writes_delta_and_summary(tmp_path, files, monkeypatch, capsys):
    cfg = _config(tmp_path, files)
    code, out, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg), "--lr", "0.02", "--set",
                              "training.max_steps=4")  # fmt: skip
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 4 and len(summary["losses"]) == 4
    assert summary["config"]["training"]["lr"] == 0.02  # the flag overrode the file
    delta = sg.Delta.load(tmp_path / "run" / "delta")
    plan = sg.Plan.load(tmp_path / "run" / "plan")
    assert delta.num_entries == plan.num_entries and set(delta.full) == {
        "classifier.weight",
        "classifier.bias",
    }
    assert summary["trainable"] == plan.num_trainable
    assert "4 steps" in out and "step/s" in out


def test_train_causal_lm_instruction_data(tmp_path, files, monkeypatch, capsys):
    cfg = _config(
        tmp_path, files, model={"path": str(files["llama"]), "task": "causal_lm"},
        data={"path": str(files["jsonl"]), "batch_size": 4}, selection={"always": []},
        schedule={"name": "regrow", "options": {"every": 2}}, training={"max_steps": 4, "bf16": True},
    )  # fmt: skip
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg))
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and all(torch.isfinite(torch.tensor(summary["losses"])))


def test_train_on_a_save_to_disk_dataset_dict_split(tmp_path, files, monkeypatch, capsys):
    pytest.importorskip("datasets")
    disk = write_cls_dataset_dict(tmp_path / "cls-dataset")
    cfg = _config(tmp_path, files, data={"path": str(disk), "split": "test"}, training={"max_steps": 2})
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg))
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["config"]["data"]["split"] == "test"
    again = ["train", "-c", str(cfg), "--set", "data.split=valid", "--overwrite"]
    code, _, err = run_main(monkeypatch, capsys, *again)
    err = " ".join(err.split())
    assert code == 2 and "has no split 'valid' (it has train, test)" in err and "Traceback" not in err
    # --overwrite replaces a run only once the new one's input is checked: the refused run kept it
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert sg.Delta.load(tmp_path / "run" / "delta").num_values > 0


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"data": {"text_column": "sentence"}}, "lacks column(s) sentence"),
        ({"training": {"lr_max": 1}}, "unknown config key 'training.lr_max'"),
        (
            {"model": {"task": "translation"}},
            "'model.task' must be one of auto, classification, causal_lm, got 'translation'",
        ),
        ({"data": {"path": "imdb"}}, "data path 'imdb' does not exist. Pass a .csv, .jsonl/.json, .parquet"),
    ],
)
def test_bad_input_is_one_line(tmp_path, files, monkeypatch, capsys, sections, needle):
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(_config(tmp_path, files, **sections)))
    assert code == 2 and needle in " ".join(err.split())
    assert "Traceback" not in err


def test_plan_for_another_model_is_a_shape_error(tmp_path, files, monkeypatch, capsys):
    from conftest import tiny_llama

    other = tiny_llama()
    sg.select(other, None, method="random", density=0.05, progress=False).save(tmp_path / "llama-plan")
    # a plan selected on a Llama names parameters the BERT model does not have
    cfg2 = _config(tmp_path, files, selection={"plan": str(tmp_path / "llama-plan")})
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg2))
    assert code == 2 and "does not have" in err
    # a plan whose shapes differ from the model's
    wide = sg.select(_wider_bert(), None, method="random", density=0.05, progress=False)
    wide.save(tmp_path / "wide-plan")
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(_config(
        tmp_path, files, selection={"plan": str(tmp_path / "wide-plan")})))  # fmt: skip
    assert code == 2 and "plan was made for another model" in " ".join(err.split())
    # refused before an earlier run that --overwrite would replace is touched
    code, _, err = run_main(
        monkeypatch, capsys, "train", "-c", str(_config(tmp_path, files, training={"max_steps": 1}))
    )
    assert code == 0, err
    done = (tmp_path / "run" / "summary.json").read_text()
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(_config(
        tmp_path, files, selection={"plan": str(tmp_path / "wide-plan")})), "--overwrite")  # fmt: skip
    assert code == 2 and "plan was made for another model" in " ".join(err.split())
    assert (tmp_path / "run" / "summary.json").read_text() == done and (tmp_path / "run" / "delta").is_dir()


def _wider_bert():
    from transformers import BertConfig, BertForSequenceClassification

    c = BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    return BertForSequenceClassification(c)


def test_nan_loss_stops_keeps_checkpoint_and_says_so(tmp_path, files, monkeypatch, capsys):
    cfg = _config(tmp_path, files, training={"lr": 1e30, "warmup": 0.0, "checkpoint_every": 1})
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg))
    err = " ".join(err.split())
    assert code == 2 and "the loss became NaN/inf at step" in err and "kept the last good checkpoint" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "nan" and summary["last_good_checkpoint"].endswith(f"step-{summary['steps']}")
    assert not (tmp_path / "run" / "delta").exists()
    assert "--resume --allow-change training.lr" in err


def test_a_resume_may_change_lr_and_length_when_allowed(tmp_path, files, monkeypatch, capsys):
    """The remedy the NaN message names (a lower lr from the last checkpoint), here on a sane run
    that is continued for two more steps at half the learning rate."""
    cfg = _config(tmp_path, files, training={"lr": 1e-2, "max_steps": 2, "checkpoint_every": 1})
    assert run_main(monkeypatch, capsys, "train", "-c", str(cfg))[0] == 0
    first = json.loads((tmp_path / "run" / "summary.json").read_text())["losses"]
    more = ("--lr", "5e-3", "--max-steps", "4")
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg), "--resume", *more)
    err = " ".join(err.split())
    assert code == 2 and "training.lr was 0.01, now 0.005; training.max_steps was 2, now 4" in err
    train = ("train", "-c", str(cfg))
    code, _, err = run_main(monkeypatch, capsys, *train, *more, "--allow-change", "training.lr")
    assert code == 2 and "--allow-change only applies to a resumed run" in err
    code, _, err = run_main(monkeypatch, capsys, *train, "--resume", "--allow-change", "training.seed")
    assert code == 2 and "cannot be allowed to change 'training.seed'" in err
    allow = ("--allow-change", "training.lr", "--allow-change", "training.max_steps")
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg), "--resume", *more, *allow)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["resumed_from"] == 2 and summary["steps"] == 4
    assert (tmp_path / "run" / "delta" / "delta_config.json").is_file()
    # the loss curve of the whole run: the first two steps come back from the checkpoint
    assert len(summary["losses"]) == 4 and summary["losses"][:2] == first
    assert summary["final_loss"] == summary["losses"][-1]


def _train_proc(cfg: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "surgical", "train", "-c", str(cfg), *extra],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_kill_9_then_resume_ends_with_the_same_delta(tmp_path, files):
    steps = 24
    common = {"training": {"max_steps": steps, "lr": 0.01, "checkpoint_every": 1}, "data": {"limit": 24}}
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir()
    kill_dir.mkdir()
    ref_cfg = _config(ref_dir, files, **common)
    kill_cfg = _config(kill_dir, files, **common)
    victim = _train_proc(kill_cfg)
    ckpts = kill_dir / "run" / "checkpoints"
    deadline = time.time() + 120

    def progressed() -> bool:
        last = latest_checkpoint(ckpts)
        return last is not None and int(last.name.split("-")[1]) >= 3

    while time.time() < deadline and not progressed() and victim.poll() is None:
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)  # mid-training, possibly mid-checkpoint
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (kill_dir / "run" / "delta").exists()
    reference = subprocess.run(
        [sys.executable, "-m", "surgical", "train", "-c", str(ref_cfg)], env=ENV, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-2000:]
    resumed = subprocess.run(
        [sys.executable, "-m", "surgical", "train", "-c", str(kill_cfg), "--resume"], env=ENV,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((kill_dir / "run" / "summary.json").read_text())
    assert summary["resumed_from"] is not None and 3 <= summary["resumed_from"] < steps
    a, b = sg.Delta.load(ref_dir / "run" / "delta"), sg.Delta.load(kill_dir / "run" / "delta")
    for name, (idx, vals) in a.entries.items():
        assert torch.equal(idx, b.entries[name][0]) and torch.equal(vals, b.entries[name][1]), name
    for name, t in a.full.items():
        assert torch.equal(t, b.full[name]), name


def test_resume_refuses_changed_settings_and_allows_harmless_ones(tmp_path, files, monkeypatch, capsys):
    cfg = _config(tmp_path, files, training={"max_steps": 3, "lr": 0.01, "checkpoint_every": 1})
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg))
    assert code == 0, err
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg), "--resume", "--lr", "0.02",
                            "--density", "0.1")  # fmt: skip
    err = " ".join(err.split())
    assert code == 2 and "Traceback" not in err
    assert "training.lr was 0.01, now 0.02" in err and "selection.density was 0.05, now 0.1" in err
    assert "start a fresh run in another directory" in err
    # how often to checkpoint and the resume flag cannot change the result
    code, out, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg), "--resume", "--set",
                              "training.checkpoint_every=2")  # fmt: skip
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"] == 3 and summary["steps"] == 3 and "3 steps" in out
    # a finished run resumed takes no step and keeps its record: the losses of its three steps
    assert len(summary["losses"]) == 3 and summary["final_loss"] == summary["losses"][-1]
    assert "had already finished at step 3" in " ".join(out.split())


def test_keys_lists_every_config_key_with_help(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "train", "--keys")
    assert code == 0
    assert (
        "training.checkpoint_every: Checkpoint every N steps" in out
        and "gamma (int, default 2" in out
        and "labels (str" in out
    )
    assert "pip install 'surgical[quant]'" in " ".join(out.split())  # printed as written, not as markup


SELECTIONS = [
    {"method": "fisher", "density": 0.03, "granularity": "row", "aggregate": "mean",
     "allocation": "per_layer", "options": {"labels": "sampled"}, "always": ["classifier"]},
    {"method": "principal", "count": 300, "options": {"rank": 2}, "targets": ["attention.*"],
     "exclude": ["key"], "max_batches": 2},
    {"method": "fim_layer", "optimizer_bytes": 16 * 9000, "always": ["classifier", "LayerNorm"]},
    {"method": "gradient", "density": 0.2, "granularity": "head", "allocation": "global"},
]  # fmt: skip


@pytest.mark.parametrize("selection", SELECTIONS, ids=[s["method"] for s in SELECTIONS])
def test_train_expresses_every_plan_select_builds(tmp_path, files, monkeypatch, capsys, selection):
    """The same selection section through `surgical train` and through sg.select gives the same plan."""
    from surgical.recipes.config import DataConfig, SelectionConfig
    from surgical.recipes.data import make_batches
    from surgical.recipes.models import load_model

    cfg = _config(tmp_path, files, training={"max_steps": 1})
    raw = yaml.safe_load(cfg.read_text())
    raw["selection"] = selection
    cfg.write_text(yaml.safe_dump(raw))
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg))
    assert code == 0, err
    trained = sg.Plan.load(tmp_path / "run" / "plan")

    model, tok = load_model(files["bert"], "classification", seed=0)
    batches = make_batches(
        DataConfig(path=str(files["csv"]), batch_size=8, max_length=16), "classification", tok
    )
    # the keys the section leaves unset take the default recipe's values (surgical.recipes.defaults)
    section = SelectionConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in selection.items()})
    direct = sg.select(model, batches, progress=False, **section.select_kwargs(0, model, "classification"))
    for kind in ("entries", "rows", "cols"):
        a, b = getattr(trained, kind), getattr(direct, kind)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), kind
    assert trained.dense == direct.dense and trained.num_trainable == direct.num_trainable > 0


def test_train_keys_list_criterion_and_schedule_options(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "train", "--keys")
    assert code == 0
    for line in (
        "selection.granularity: ",
        "selection.options: ",
        "schedule.options: ",
        "fisher: ",
        "labels (str, default 'data', one of data/sampled)",
        "lisa: ",
        "gamma (int, default 2, >= 1)",
    ):
        assert line in out, line


def test_train_on_a_data_selection_keeps_its_manifest_and_resumes_on_it(tmp_path, files, monkeypatch, capsys):
    from surgical.data import DataSelection

    cfg = _config(
        tmp_path,
        files,
        training={"max_steps": None, "epochs": 1, "checkpoint_every": 1},
        data_selection={"method": "loss", "fraction": 0.5, "options": {"keep": "high"}},
    )
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg))
    assert code == 0, err
    sel = DataSelection.load(tmp_path / "run" / "data-selection")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(sel.indices) == 24 and summary["steps"] == 3  # 48 examples -> 24 -> 3 batches of 8
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg), "--resume")
    assert code == 0, err  # the same selection again: the resume matches its checkpoint


def test_token_selection_trains_a_causal_lm_on_part_of_each_answer(tmp_path, files, monkeypatch, capsys):
    for method in ("random", "excess_loss"):
        (tmp_path / method).mkdir()
        cfg = _config(
            tmp_path / method,
            files,
            model={"path": str(files["llama"]), "task": "causal_lm"},
            data={"path": str(files["jsonl"]), "batch_size": 4, "max_length": 32},
            selection={"method": "gradient", "density": 0.05, "always": []},
            training={"max_steps": 2},
            token_selection={"method": method, "fraction": 0.5},
        )
        code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg))
        assert code == 0, err
    cfg = _config(tmp_path, files, token_selection={"method": "random"})
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg))
    assert code == 2 and "token_selection needs a causal LM" in err

    # Rho-1's reference: the base with a delta tuned on target data (here the excess_loss run's)
    tuned = tmp_path / "excess_loss" / "run" / "delta"
    (tmp_path / "rho").mkdir()
    cfg = _config(
        tmp_path / "rho",
        files,
        model={"path": str(files["llama"]), "task": "causal_lm"},
        data={"path": str(files["jsonl"]), "batch_size": 4, "max_length": 32},
        selection={"method": "gradient", "density": 0.05, "always": []},
        training={"max_steps": 2},
        token_selection={"method": "excess_loss", "fraction": 0.5, "reference": str(tuned)},
    )
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg))
    assert code == 0, err
    with_base, with_tuned = sg.Delta.load(tuned), sg.Delta.load(tmp_path / "rho" / "run" / "delta")
    assert with_base.entries.keys() == with_tuned.entries.keys()  # the same plan (same seed and data)
    # against the base every excess loss starts at 0 (ties keep the earliest tokens); the tuned
    # reference ranks other tokens first, so other tokens train
    assert any(not torch.equal(with_base.entries[k][1], with_tuned.entries[k][1]) for k in with_base.entries)
    # a reference delta made on another base (the tiny BERT's), refused before the plan is scored
    bert, _ = load_model(files["bert"], "classification")
    moved = copy.deepcopy(bert)
    with torch.no_grad():
        next(moved.parameters()).add_(1)
    sg.Delta.from_models(bert, moved).save(tmp_path / "bert-delta")

    def never(*args, **kwargs):
        raise AssertionError("the plan was scored before the reference was checked")

    monkeypatch.setattr("surgical.recipes.train.make_plan", never)
    for reference, method, expected in (
        (str(tmp_path / "nowhere"), "excess_loss", "is not a delta directory"),
        (str(tuned), "random", "token_selection.reference is used by excess_loss only"),
        (str(tmp_path / "bert-delta"), "excess_loss", "which this model does not have"),
    ):
        cfg = _config(
            tmp_path / "rho",  # its finished run stays as it is: the config is refused first
            files,
            model={"path": str(files["llama"]), "task": "causal_lm"},
            data={"path": str(files["jsonl"]), "batch_size": 4, "max_length": 32},
            token_selection={"method": method, "reference": reference},
        )
        code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg), "--overwrite")
        assert code == 2 and expected in err and "Traceback" not in err, err
        assert sg.Delta.load(tmp_path / "rho" / "run" / "delta").entries.keys() == with_tuned.entries.keys()


def test_unset_targets_always_and_lr_follow_the_benchmarked_recipe(tmp_path, files, monkeypatch, capsys):
    """Classification: entries of the blocks' Linear weights, the head, biases and LayerNorms dense,
    lr 2e-3 (the quality benchmark's recipe row); an explicit [] switches a default off."""
    cfg = _config(tmp_path, files, training={"max_steps": 1})
    raw = yaml.safe_load(cfg.read_text())
    raw["selection"] = {"method": "gradient", "density": 0.05}
    raw["training"].pop("lr", None)
    cfg.write_text(yaml.safe_dump(raw))
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg))
    assert code == 0, err
    plan = sg.Plan.load(tmp_path / "run" / "plan")
    assert plan.entries and all(re.match(r"bert\.encoder\.layer\.\d+\..*\.weight$", n) for n in plan.entries)
    assert not any("LayerNorm" in n for n in plan.entries)
    assert {"classifier.weight", "classifier.bias"} <= set(plan.dense)
    assert all(n.endswith(".bias") or "LayerNorm" in n or n.startswith("classifier.") for n in plan.dense)
    assert any(n.endswith("LayerNorm.weight") for n in plan.dense)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["lr"] == 2e-3
    raw["selection"].update(always=[], targets=[])
    raw["out"] = str(tmp_path / "bare")
    cfg.write_text(yaml.safe_dump(raw))
    code, _, err = run_main(monkeypatch, capsys, "train", "-c", str(cfg))
    assert code == 0, err
    bare = sg.Plan.load(tmp_path / "bare" / "plan")
    assert not bare.dense and "classifier.weight" in bare.entries  # every Linear weight, nothing dense
