"""The data-selection benchmarks' --quick modes run end to end and write consistent reports
(the numbers' consistency, not their values)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--quick", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO / "benchmarks")


def test_data_select_cost_quick(tmp_path):
    out = tmp_path / "cost.json"
    p = _run("data_select_cost.py", "--criteria", "gradient+adam", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["setup"]["quick"] is True and "--quick" in r["command"]
    assert r["machine"]["torch_threads"] == 1 and r["machine"]["torch"] and r["date"]
    assert r["machine"]["note"].startswith("another benchmark") == (
        max(r["machine"]["load_average_start"], r["machine"]["load_average_end"]) > 2
    )
    epoch = r["epoch"]
    assert epoch["examples"] == 96 and epoch["steps"] == 3 and epoch["seconds"] > 0
    assert epoch["peak_rss_bytes"] >= epoch["rss_before_bytes"] > 0
    assert list(r["results"]) == ["gradient+adam"]
    sel = r["results"]["gradient+adam"]
    assert sel["options"]["precondition"] == "adam" and sel["validation_examples"] == 32
    assert sel["selected"] == 29 and sel["examples"] == 96  # 30% of 96, rounded half up
    assert sel["examples_per_second"] == pytest.approx(96 / sel["seconds"], rel=1e-2)
    assert sel["time_vs_epoch"] == sel["seconds"] / epoch["seconds"]
    assert sel["peak_rss_vs_epoch"] == sel["peak_rss_bytes"] / epoch["peak_rss_bytes"]
    assert sel["peak_rss_above_start_bytes"] == sel["peak_rss_bytes"] - sel["rss_before_bytes"] >= 0


def test_agreeing_drops_the_kept_examples_of_the_rising_clusters():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import _data_select as ds
    import torch

    from surgical.data.select_data import DataSelection

    meta = {
        "cluster_mean_losses": [[0.69, 0.2], [0.69, 1.0], [0.7, 0.69]],
        "rising_clusters": [1],  # its loss ends above where it started
        "kept_clusters": [0, 1, 1, 2],
        "kept_by_cluster": [1, 2, 1],
    }
    sel = DataSelection(torch.tensor([3, 5, 7, 9]), None, "trajectory", {}, "h", 12, meta)
    out = ds.agreeing(sel)
    assert out.indices.tolist() == [3, 9] and out.meta["kept_clusters"] == [0, 2]
    assert out.meta["dropped"] == 2 and out.meta["dropped_clusters"] == [1]
    assert sel.indices.tolist() == [3, 5, 7, 9] and sel.meta["kept_clusters"] == [0, 1, 1, 2]  # untouched
    assert ds.criterion("trajectory+classes-agreeing", False) == ("trajectory", {})
    assert {"trajectory+classes", "trajectory+classes-agreeing"} <= ds.CLASS_SHARES

    # the size control: as many as -agreeing keeps, drawn at random from the whole kept set
    sub = ds.same_size_subset(sel, seed=0)
    assert len(sub.indices) == 2 and set(sub.indices.tolist()) <= {3, 5, 7, 9}
    assert sub.meta["subset_of"] == 4 and sum(sub.meta["kept_by_cluster"]) == 2
    by_index = dict(zip([3, 5, 7, 9], meta["kept_clusters"], strict=True))
    assert sub.meta["kept_clusters"] == [by_index[i] for i in sub.indices.tolist()]
    assert ds.same_size_subset(sel, seed=0).indices.tolist() == sub.indices.tolist()  # seeded
    assert "trajectory+classes-subset" in ds.CLASS_SHARES


def test_balanced_restores_the_class_shares_of_the_training_set():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import _data_select as ds
    import torch

    from surgical.data.select_data import DataSelection

    labels = [0, 1] * 10  # the training set: half of each class
    # what -agreeing kept: 6 of class 1 (indices 1, 3, ...), 2 of class 0, from clusters 0 and 2
    indices = torch.tensor([0, 1, 3, 4, 5, 7, 9, 11])
    meta = {"kept_clusters": [0, 0, 2, 2, 0, 2, 2, 0], "kept_by_cluster": [4, 3, 4], "dropped": 3}
    sel = DataSelection(indices, None, "trajectory", {}, "h", 20, meta)
    out = ds.balanced(sel, labels, seed=0)
    kept = out.indices.tolist()
    assert [labels[i] for i in kept].count(0) == [labels[i] for i in kept].count(1) == 2
    assert set(kept) >= {0, 4} and set(kept) <= set(indices.tolist()) and kept == sorted(kept)
    assert out.meta["balance_cut"] == 4 and out.meta["by_class_before"] == [2, 6]
    by_index = dict(zip(indices.tolist(), meta["kept_clusters"], strict=True))
    assert out.meta["kept_clusters"] == [by_index[i] for i in kept]
    # a dropped cluster's count stays as selected (the renderer subtracts ``dropped``); the others
    # lose what was cut
    assert out.meta["kept_by_cluster"][1] == 3
    assert out.meta["kept_by_cluster"][0] + out.meta["kept_by_cluster"][2] == 4
    assert ds.balanced(sel, labels, seed=0).indices.tolist() == kept  # seeded
    assert "trajectory+classes-agreeing-balanced" in ds.CLASS_SHARES & ds.AGREEING & ds.BALANCED


def test_data_fraction_quick(tmp_path):
    out = tmp_path / "df.json"
    args = ["--criteria", "gradient+adam", "--fractions", "0.5", "1.0", "--jobs", "2", "--stratify"]
    args += ["--out", str(out), "--cache", str(tmp_path / "points")]
    p = _run("data_fraction.py", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["setup"]["complete"] is True and not r["failures"] and r["setup"]["seeds"] == [0]
    assert r["setup"]["criteria"]["gradient+adam"]["options"]["precondition"] == "adam"
    points = {(q["criterion"], q["fraction"]): q for q in r["points"]}
    assert set(points) == {("all", 1.0), ("gradient+adam", 0.5)}
    full, half = points[("all", 1.0)], points[("gradient+adam", 0.5)]
    assert full["examples"] == 96 and half["examples"] == 48
    assert full["steps"] == 3 and half["steps"] == 2  # one epoch of what was kept, batch 32
    assert len(full["losses"]) == 3 and len(half["losses"]) == 2 and all(x > 0 for x in half["losses"])
    assert half["positive_share"] == pytest.approx(full["positive_share"], abs=1 / 48)  # stratified
    assert full["selection_seconds"] == 0 and half["selection_seconds"] > 0
    assert half["options"]["warmup_lr"] == 3e-3 and half["info"]["unwarmed"] == 0
    for q in r["points"]:
        assert all(0 <= q[k] <= 1 for k in ("id", "ood", "validation")) and q["train_seconds"] > 0
        s = r["summary"][q["criterion"]][str(q["fraction"])]
        for k in ("id", "ood", "validation", "selection_seconds", "train_seconds"):
            assert s[k]["mean"] == statistics.fmean([q[k]]) and s[k]["std"] == 0.0 and s[k]["n"] == 1
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    # --cached-only: the same points read back from --cache, nothing run, what is missing listed
    again = tmp_path / "again.json"
    args[1] = "gradient+adam,random"
    p = _run("data_fraction.py", *args[:-3], str(again), "--cache", str(tmp_path / "points"), "--cached-only")
    assert p.returncode == 0 and "2 points from" in p.stdout and "1 missing" in p.stdout, p.stderr[-3000:]
    r2 = json.loads(again.read_text())
    assert r2["points"] == r["points"] and r2["setup"]["complete"] is False
    assert r2["setup"]["missing"] == [{"criterion": "random", "fraction": 0.5, "seed": 0}]
    assert len(list((tmp_path / "points").glob("*.json"))) == 2

    # --equal-steps: the 100% point is the same run (read back), the others train its 3 steps
    same = tmp_path / "same.json"
    args = ["--criteria", "random", "--fractions", "0.5", "1.0", "--stratify", "--equal-steps"]
    p = _run("data_fraction.py", *args, "--out", str(same), "--cache", str(tmp_path / "points"))
    assert p.returncode == 0 and "2 points (1 cached)" in p.stdout, p.stderr[-3000:]
    r3 = json.loads(same.read_text())
    assert r3["setup"]["equal_steps"] is True and "one epoch of all the data" in r3["setup"]["recipe"]
    points = {(q["criterion"], q["fraction"]): q for q in r3["points"]}
    assert points[("all", 1.0)] == full
    assert points[("random", 0.5)]["examples"] == 48 and points[("random", 0.5)]["steps"] == 3
    assert len(list((tmp_path / "points").glob("*.json"))) == 3


def test_domain_select_quick(tmp_path):
    out = tmp_path / "dom.json"
    args = ["--rows", "random,importance-top", "--out", str(out), "--cache", str(tmp_path / "points")]
    p = _run("domain_select.py", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["setup"]["complete"] is True and r["setup"]["seeds"] == [0] and r["setup"]["quick"] is True
    points = {q["row"]: q for q in r["points"]}
    assert set(points) == {"random", "importance-top"}
    for q in points.values():
        assert q["examples"] == 48 and q["steps"] == 3  # half of the 96-example pool; one epoch of it all
        assert all(0 <= q[k] <= 1 for k in ("id", "ood", "validation", "rt_share"))
    top = points["importance-top"]
    assert top["rt_share"] > points["random"]["rt_share"] and top["selection_seconds"] > 0
    assert (
        top["info"]["target_coverage"] > 0
        and top["info"]["kl_to_target"]["kept"] < top["info"]["kl_to_target"]["pool"]
    )
    assert r["summary"]["random"]["id"]["mean"] == points["random"]["id"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    again = tmp_path / "again.json"  # read back from the cache, nothing run; what is missing listed
    p = _run("domain_select.py", "--rows", "random,importance-top,pool", "--out", str(again),
             "--cache", str(tmp_path / "points"), "--cached-only")  # fmt: skip
    assert p.returncode == 0 and "2 points, 1 missing" in p.stdout, p.stderr[-3000:]
    r2 = json.loads(again.read_text())
    assert r2["points"] == r["points"] and r2["setup"]["missing"] == [{"row": "pool", "seed": 0}]
