"""`surgical merge`, `wise-ft` and `soup` end to end on tiny on-disk models."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import surgical as sg
from conftest import run_main
from train_fixtures import save_tiny_model, write_cls_csv


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny classifier, train/validation/test data and three deltas trained with other seeds."""
    root = tmp_path_factory.mktemp("merge")
    w = {
        "bert": save_tiny_model(root / "bert", "bert"),
        "train": write_cls_csv(root / "train.csv", n=64, seed=0),
        "val": write_cls_csv(root / "val.csv", n=32, seed=1),
        "id": write_cls_csv(root / "id.csv", n=32, seed=2),
        "ood": write_cls_csv(root / "ood.csv", n=32, seed=3),
        "root": root,
    }
    for seed in range(3):
        cfg = {
            "out": str(root / f"run{seed}"),
            "model": {"path": str(w["bert"])},
            "data": {"path": str(w["train"]), "batch_size": 8, "max_length": 16},
            "selection": {"method": "gradient", "density": 0.05, "always": ["classifier", "bias"]},
            "training": {"max_steps": 6, "lr": 0.02, "seed": 0, "warmup": 0.0},
        }
        cfg["selection"]["max_batches"] = 2 + seed  # other plans: overlapping, not equal
        p = root / f"run{seed}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        import sys

        from surgical import cli

        sys.argv = ["surgical", "train", "-c", str(p)]
        try:
            cli.main()
        except SystemExit as e:
            assert not e.code
        w[f"delta{seed}"] = root / f"run{seed}" / "delta"
    return w


def test_merge_yaml_writes_the_merged_delta_and_its_config(world, tmp_path, monkeypatch, capsys):
    cfg = {
        "method": "ties",
        "options": {"density": 0.5},
        "inputs": [
            {"delta": str(world["delta0"]), "weight": 1.0},
            {"delta": str(world["delta1"]), "weight": 2.0},
        ],
        "out": str(tmp_path / "merged"),
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run_main(monkeypatch, capsys, "merge", str(tmp_path / "m.yaml"))
    assert code == 0, err
    merged = sg.Delta.load(tmp_path / "merged")
    want = sg.merge([sg.Delta.load(world["delta0"]), sg.Delta.load(world["delta1"])], "ties", weights=[1, 2],
                    density=0.5)  # fmt: skip
    assert merged.digest() == want.digest()
    used = yaml.safe_load((tmp_path / "merged" / "merge_config.yaml").read_text())
    assert used["method"] == "ties" and used["options"] == {"density": 0.5}
    assert merged.meta["merge"]["method"] == "ties"
    # the merged delta records how its inputs overlapped, and the command printed it
    pair = [sg.Delta.load(world["delta0"]), sg.Delta.load(world["delta1"])]
    summary = sg.interference_summary(sg.interference(pair))
    assert merged.meta["merge"]["interference"] == summary  # floats survive JSON exactly
    flat = " ".join(out.split())
    assert f"overlap {summary['sparse']['overlap']:.1%} of the values changed" in flat
    assert "model_stock keeps" not in flat


def test_merge_notes_when_model_stock_meets_orthogonal_changes(tmp_path, monkeypatch, capsys):
    a = sg.Delta(shapes={"w": (4, 4)})
    a.entries["w"] = (torch.tensor([0, 1]), torch.tensor([1.0, 0.5]))
    b = sg.Delta(shapes={"w": (4, 4)})
    b.entries["w"] = (torch.tensor([1, 2]), torch.tensor([-0.1, 2.0]))  # cosine -0.022 with a
    for name, d in (("a", a), ("b", b)):
        d.save(tmp_path / name)
    args = ["merge", "--delta", str(tmp_path / "a"), "--delta", str(tmp_path / "b"), "--method"]
    code, out, err = run_main(monkeypatch, capsys, *args, "model_stock", "--out", str(tmp_path / "m"))
    assert code == 0, err
    flat = " ".join(out.split())
    assert "mean cosine -0.022), so model_stock keeps about 0% of their mean change" in flat
    assert sg.Delta.load(tmp_path / "m").meta["merge"]["interference"]["sparse"]["overlap"] == pytest.approx(
        1 / 3
    )
    code, out, err = run_main(monkeypatch, capsys, *args, "ties", "--out", str(tmp_path / "t"))
    assert code == 0 and "model_stock keeps" not in out


def test_merge_check_reports_interference_and_writes_nothing(world, tmp_path, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "merge", "--delta", str(world["delta0"]), "--delta",
                              str(world["delta1"]), "--check", "--out", str(tmp_path / "x"))  # fmt: skip
    assert code == 0, err
    flat = " ".join(out.split())
    rows = sg.interference([sg.Delta.load(world["delta0"]), sg.Delta.load(world["delta1"])])
    summary = sg.interference_summary(rows)  # the plans train biases and the head densely
    assert set(summary) == {"sparse", "dense"} and summary["dense"]["overlap"] == 1.0
    sparse = summary["sparse"]
    assert f"{sparse['tensors']} sparse tensors: overlap {sparse['overlap']:.1%} of the values" in flat
    assert f"{summary['dense']['tensors']} densely changed tensors (overlap 100.0%, full by design)" in flat
    assert "sign conflicts" in flat and not (tmp_path / "x").exists()


def test_wise_ft_sweep_chooses_alpha_on_validation(world, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "wise"
    code, out, err = run_main(
        monkeypatch, capsys, "wise-ft", "--model", str(world["bert"]), "--delta", str(world["delta0"]),
        "--validation", str(world["val"]), "--data", f"id={world['id']}", "--data", f"ood={world['ood']}",
        "--alpha", "0", "--alpha", "0.5", "--alpha", "1", "--out", str(out_dir),
        "--set", "data.batch_size=8", "--set", "data.max_length=16",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out_dir / "wise_ft.json").read_text())
    points = report["points"]
    assert [p["alpha"] for p in points] == [0.0, 0.5, 1.0]
    best = max(points, key=lambda p: (p["results"]["validation"]["accuracy"], p["alpha"]))
    assert report["chosen_alpha"] == best["alpha"]
    assert (out_dir / "wise_ft.png").read_bytes()[:4] == b"\x89PNG"
    # alpha 1 is the fine-tuned model itself
    from surgical.eval import evaluate
    from surgical.recipes.config import DataConfig
    from surgical.recipes.data import make_batches
    from surgical.recipes.models import load_model

    model, tok = load_model(world["bert"], "classification")
    ood = make_batches(DataConfig(path=str(world["ood"]), batch_size=8, max_length=16), "classification", tok)
    with sg.applied(model, sg.Delta.load(world["delta0"])):
        tuned = evaluate(model, {"ood": ood}, show=False)["ood"]
    assert points[-1]["results"]["ood"]["accuracy"] == tuned["accuracy"]
    assert sg.Delta.load(out_dir / "delta").meta["merge"]["options"]["alpha"] == report["chosen_alpha"]


def test_wise_ft_forgetting_budget_limits_the_choice(world, tmp_path, monkeypatch, capsys):
    common = ["wise-ft", "--model", str(world["bert"]), "--delta", str(world["delta0"]), "--validation",
              str(world["val"]), "--reference", str(world["ood"]), "--set", "data.batch_size=8", "--set",
              "data.max_length=16"]  # fmt: skip
    free, capped = tmp_path / "free", tmp_path / "capped"
    code, out, err = run_main(monkeypatch, capsys, *common, "--alpha", "0", "--alpha", "0.5", "--alpha", "1",
                              "--out", str(free))  # fmt: skip
    assert code == 0, err
    assert "note: the delta replaces classifier" in " ".join(out.split())  # a new head: said up front
    points = json.loads((free / "wise_ft.json").read_text())["points"]
    kl = {p["alpha"]: p["results"]["reference"]["kl"] for p in points}
    # alpha 0 keeps the delta's new head (replaced, not interpolated), so even it differs from the base
    assert kl[1.0] > 0 and set(kl) == {0.0, 0.5, 1.0}
    # alpha 1 is the delta itself: its forgetting as `surgical eval --reference` measures it
    from surgical.recipes.config import DataConfig
    from surgical.recipes.data import make_batches
    from surgical.recipes.models import load_model

    model, tok = load_model(world["bert"], "classification")
    ref = make_batches(DataConfig(path=str(world["ood"]), batch_size=8, max_length=16), "classification", tok)
    assert sg.forgetting(model, ref, delta=sg.Delta.load(world["delta0"]), show=False)["kl"] == kl[1.0]
    # a budget at the smallest KL of the grid: the choice is the best on validation within it
    budget = min(kl.values())
    assert max(kl.values()) > budget  # the budget rules out part of the grid
    code, out, err = run_main(monkeypatch, capsys, *common, "--alpha", "0", "--alpha", "0.5", "--alpha", "1",
                              "--max-kl", repr(budget), "--out", str(capped))  # fmt: skip
    assert code == 0, err
    report = json.loads((capped / "wise_ft.json").read_text())
    within = [p for p in report["points"] if p["results"]["reference"]["kl"] <= budget]
    assert 0 < len(within) < 3
    best = max(within, key=lambda p: (p["results"]["validation"]["accuracy"], p["alpha"]))
    assert report["chosen_alpha"] == best["alpha"] and report["max_kl"] == budget
    assert "within KL" in " ".join(out.split())
    assert (capped / "wise_ft.png").read_bytes()[:4] == b"\x89PNG"
    # a budget no alpha of the grid meets: one line, exit 2, nothing written
    code, out, err = run_main(monkeypatch, capsys, *common, "--alpha", "1", "--max-kl", "0",
                              "--out", str(tmp_path / "none"))  # fmt: skip
    assert code == 2 and "no alpha keeps KL on reference within max_kl 0" in err
    assert not (tmp_path / "none").exists()


def test_greedy_soup_never_adds_a_candidate_that_lowers_validation(world, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "soup"
    code, out, err = run_main(
        monkeypatch, capsys, "soup", str(world["delta0"]), str(world["delta1"]), str(world["delta2"]),
        "--model", str(world["bert"]), "--validation", str(world["val"]), "--data", f"ood={world['ood']}",
        "--out", str(out_dir), "--set", "data.batch_size=8", "--set", "data.max_length=16",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out_dir / "soup.json").read_text())
    best = report["steps"][0]["score"]
    for step in report["steps"][1:]:
        assert step["added"] == (step["score"] >= best)
        best = max(best, step["score"]) if step["added"] else best
    assert len(report["greedy"]) == sum(s["added"] for s in report["steps"])
    assert sg.Delta.load(out_dir / "uniform").meta["merge"]["method"] == "linear"
    assert "greedy soup" in out and "uniform soup" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            lambda w, t: ["merge", "--method", "soup", "--delta", str(w["delta0"]), "--out", str(t / "o")],
            "unknown merge method 'soup'",
        ),
        (
            lambda w, t: [
                "merge",
                "--method",
                "ties",
                "--option",
                "alpha=1",
                "--delta",
                str(w["delta0"]),
                "--out",
                str(t / "o"),
            ],
            "unknown option(s) alpha for merge method 'ties'",
        ),
        (
            lambda w, t: [
                "merge",
                "--delta",
                str(w["delta0"]),
                "--delta",
                str(w["delta1"]),
                "--weight",
                "1",
                "--out",
                str(t / "o"),
            ],
            "2 --delta but 1 --weight",
        ),
        (lambda w, t: ["merge", "--delta", str(w["delta0"]), "--out", str(w["delta0"])], "would overwrite"),
        (
            lambda w, t: [
                "merge",
                "--method",
                "wise_ft",
                "--delta",
                str(w["delta0"]),
                "--delta",
                str(w["delta1"]),
                "--out",
                str(t / "o"),
            ],
            "wise_ft merges exactly 1 input(s)",
        ),
        (
            lambda w, t: [
                "merge",
                "--method",
                "slerp",
                "--delta",
                str(w["delta0"]),
                "--delta",
                str(w["delta1"]),
                "--delta",
                str(w["delta2"]),
                "--out",
                str(t / "o"),
            ],  # fmt: skip
            "slerp merges exactly 2 input(s)",
        ),
        (
            lambda w, t: [
                "wise-ft",
                "--model",
                str(w["bert"]),
                "--delta",
                str(w["delta0"]),
                "--validation",
                str(w["val"]),
                "--alpha",
                "1.5",
                "--out",
                str(t / "o"),
            ],
            "alpha 1.5 is outside [0, 1]",
        ),
        (
            lambda w, t: [
                "wise-ft",
                "--model",
                str(w["bert"]),
                "--delta",
                str(w["delta0"]),
                "--out",
                str(t / "o"),
            ],
            "no validation set",
        ),
        (
            lambda w, t: [
                "wise-ft",
                "--model",
                str(w["bert"]),
                "--delta",
                str(w["delta0"]),
                "--validation",
                str(w["val"]),
                "--max-kl",
                "0.01",
                "--out",
                str(t / "o"),
            ],
            "no reference is set",
        ),
        (
            lambda w, t: [
                "wise-ft",
                "--model",
                str(w["bert"]),
                "--delta",
                str(w["delta0"]),
                "--validation",
                str(w["val"]),
                "--reference",
                str(w["ood"]),
                "--max-kl",
                "-1",
                "--out",
                str(t / "o"),
            ],
            "max_kl must be >= 0",
        ),
        (
            lambda w, t: [
                "soup",
                str(w["delta0"]),
                "--model",
                str(w["bert"]),
                "--validation",
                str(w["val"]),
                "--out",
                str(t / "o"),
            ],
            "at least two candidates",
        ),
    ],
)
def test_bad_merge_input_is_one_line(world, tmp_path, monkeypatch, capsys, argv, needle):
    code, _, err = run_main(monkeypatch, capsys, *argv(world, tmp_path))
    assert code == 2 and needle in " ".join(err.split()) and "Traceback" not in err, err


def test_merging_deltas_of_different_bases_is_refused_from_the_headers(world, tmp_path, monkeypatch, capsys):
    other = sg.Delta.load(world["delta1"])
    other.meta["base"]["fingerprint"] = "0" * 16
    other.save(tmp_path / "other")
    code, _, err = run_main(monkeypatch, capsys, "merge", "--delta", str(world["delta0"]), "--delta",
                            str(tmp_path / "other"), "--out", str(tmp_path / "o"))  # fmt: skip
    assert code == 2 and "another base model" in err


def test_merge_yaml_rules_override_weights_and_options_per_tensor(world, tmp_path, monkeypatch, capsys):
    rules = [
        {"match": "layer.0.*", "weights": [1.0, 0.0]},  # layer 0: delta0's change alone
        {"match": "re:layer\\.1\\.", "options": {"density": 0.1}},
    ]
    cfg = {
        "method": "ties",
        "options": {"density": 0.5},
        "inputs": [{"delta": str(world["delta0"])}, {"delta": str(world["delta1"]), "weight": 2.0}],
        "rules": rules,
        "out": str(tmp_path / "merged"),
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run_main(monkeypatch, capsys, "merge", str(tmp_path / "m.yaml"))
    assert code == 0, err
    merged = sg.Delta.load(tmp_path / "merged")
    inputs = [sg.Delta.load(world["delta0"]), sg.Delta.load(world["delta1"])]
    assert merged.digest() == sg.merge(inputs, "ties", weights=[1, 2], rules=rules, density=0.5).digest()
    layer0 = merged.meta["merge"]["rules"][0]["tensors"]
    assert layer0 and all(".layer.0." in n for n in layer0)
    alone = sg.merge(inputs, "ties", weights=[1, 0], density=0.5).to_dense().dense
    dense = merged.to_dense().dense
    assert any(name in dense for name in layer0)
    for name in layer0:  # the same change, or none in both (a tensor only delta1 changed)
        assert (name in dense) == (name in alone) and (
            name not in dense or torch.equal(dense[name], alone[name])
        )
    assert yaml.safe_load((tmp_path / "merged" / "merge_config.yaml").read_text())["rules"] == rules
    # a rule that matches no tensor is refused from the delta headers, before any weight is read
    cfg["rules"] = [{"match": "decoder.*", "weights": [1, 1]}]
    cfg["out"] = str(tmp_path / "merged2")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_main(monkeypatch, capsys, "merge", str(tmp_path / "bad.yaml"))
    assert code == 2 and "rules[0].match ['decoder.*'] matches no tensor" in " ".join(err.split())
    assert not (tmp_path / "merged2").exists()
    cfg["rules"] = [{"match": "layer.0.*", "weights": [1]}]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_main(monkeypatch, capsys, "merge", str(tmp_path / "bad.yaml"))
    assert code == 2 and "2 inputs but 1 rules[0].weights" in " ".join(err.split())


def test_merge_yaml_values_that_vary_over_the_layers(world, tmp_path, monkeypatch, capsys):
    cfg = {
        "method": "slerp",
        "options": {"t": [0.2, 0.8]},
        "inputs": [{"delta": str(world["delta0"]), "weight": [1, 0]}, {"delta": str(world["delta1"])}],
        "out": str(tmp_path / "merged"),
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_main(monkeypatch, capsys, "merge", str(tmp_path / "m.yaml"))
    assert code == 0, err
    merged = sg.Delta.load(tmp_path / "merged")
    inputs = [sg.Delta.load(world["delta0"]), sg.Delta.load(world["delta1"])]
    assert merged.digest() == sg.merge(inputs, "slerp", weights=[[1, 0], 1], t=[0.2, 0.8]).digest()
    per = merged.meta["merge"]["per_tensor"]  # two layers: layer 0 at t 0.2, layer 1 at t 0.8
    assert all(
        v["t"] == pytest.approx(0.2 if ".layer.0." in n else 0.8) for n, v in per.items() if ".layer." in n
    )
    cfg["options"] = {"t": [0.0, 2.0]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**cfg, "out": str(tmp_path / "o")}))
    code, _, err = run_main(monkeypatch, capsys, "merge", str(tmp_path / "bad.yaml"))
    assert code == 2 and "options.t must be in [0, 1]" in " ".join(err.split()) and "Traceback" not in err


@pytest.mark.parametrize(
    "weight, needle",
    [
        ("half", "input 2: a weight must be a finite number, got 'half'"),
        (True, "input 2: a weight must be a finite number, got True"),
        (float("nan"), "input 2: a weight must be a finite number, got nan"),
        ([1, "x"], "input 2"),
    ],
)
def test_merge_yaml_bad_input_weight_is_one_line(world, tmp_path, monkeypatch, capsys, weight, needle):
    cfg = {
        "method": "linear",
        "inputs": [{"delta": str(world["delta0"])}, {"delta": str(world["delta1"]), "weight": weight}],
        "out": str(tmp_path / "o"),
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_main(monkeypatch, capsys, "merge", str(tmp_path / "bad.yaml"))
    assert code == 2 and needle in " ".join(err.split()) and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
